"""TSLib data conventions: borders, windows, scaler, calendar features, and every CSV error."""

import numpy as np
import pandas as pd
import pytest

from mambakit.apps.timeseries.data import (DataError, ForecastWindows, StandardScaler, build_splits,
                                           infer_frequency, read_series, split_borders, time_feature_names,
                                           time_features)


def write_csv(path, n=40, freq="h", columns=("a", "b", "OT"), start="2020-01-01"):
    dates = pd.date_range(start, periods=n, freq=freq)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"date": dates.strftime("%Y-%m-%d %H:%M:%S")})
    for j, c in enumerate(columns):
        df[c] = np.arange(n) * (j + 1) + rng.normal(size=n)
    df.to_csv(path, index=False)
    return df


# --------------------------------------------------------------------------------------------------
# borders and windows

def test_ett_hour_borders_are_12_4_4_months_with_lookback_overlap():
    b = split_borders(17420, 96, "ett_hour")
    assert b == {"train": (0, 8640), "val": (8640 - 96, 11520), "test": (11520 - 96, 14400)}
    m = split_borders(69680, 96, "ett_minute")
    assert m == {"train": (0, 34560), "val": (34560 - 96, 46080), "test": (46080 - 96, 57600)}


def test_ratio_borders_follow_tslib_int_truncation():
    # n = 101: num_train = int(70.7) = 70, num_test = int(20.2) = 20, num_val = 11
    b = split_borders(101, 5, "ratio")
    assert b == {"train": (0, 70), "val": (65, 81), "test": (76, 101)}


def test_windows_match_hand_built_example():
    data = np.arange(20, dtype=np.float64).reshape(10, 2)          # row r = [2r, 2r+1]
    marks = np.arange(10, dtype=np.float64)[:, None] / 100
    w = ForecastWindows(data, marks, seq_len=4, label_len=2, pred_len=3)
    assert len(w) == 10 - 4 - 3 + 1
    item = w[2]
    np.testing.assert_array_equal(item["x"].numpy(), data[2:6])          # lookback rows 2..5
    np.testing.assert_array_equal(item["y"].numpy(), data[4:9])          # label rows 4,5 + horizon 6,7,8
    np.testing.assert_array_equal(item["x_mark"].numpy(), marks[2:6].astype(np.float32))
    np.testing.assert_array_equal(item["y_mark"].numpy(), marks[4:9].astype(np.float32))
    assert int(item["index"]) == 2
    last = w[len(w) - 1]
    np.testing.assert_array_equal(last["y"][-1].numpy(), data[-1])       # the last window ends on the last row
    with pytest.raises(IndexError):
        w[len(w)]


def test_split_windows_and_scaler_fit_on_train_rows_only(tmp_path):
    path = tmp_path / "s.csv"
    df = write_csv(path, n=200)
    frame = read_series(path)
    splits = build_splits(frame, seq_len=8, label_len=4, pred_len=5, split="ratio")
    raw = df[["a", "b", "OT"]].to_numpy()
    train = raw[:140]
    np.testing.assert_allclose(splits.scaler.mean, train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(splits.scaler.std, train.std(0), rtol=1e-12)          # population std
    assert not np.allclose(splits.scaler.mean, raw.mean(0))                          # the trend makes them differ
    scaled = (raw - train.mean(0)) / train.std(0)
    # the first test window looks back into the validation rows: rows 160-8 .. 160
    first = splits.test[0]
    np.testing.assert_allclose(first["x"].numpy(), scaled[152:160], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first["y"][-5:].numpy(), scaled[160:165], rtol=1e-5, atol=1e-6)
    assert len(splits.train) == 140 - 8 - 5 + 1
    assert len(splits.val) == (160 - 132) - 8 - 5 + 1
    assert len(splits.test) == (200 - 152) - 8 - 5 + 1
    # inverse_transform undoes transform on numpy and on torch
    np.testing.assert_allclose(splits.scaler.inverse_transform(scaled), raw, rtol=1e-10)


def test_etth1_matches_tslib_counts(etth1_csv):
    frame = read_series(etth1_csv)
    assert frame.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    s = build_splits(frame, 96, 48, 96, split="ett_hour")
    assert (len(s.train), len(s.val), len(s.test)) == (8449, 2785, 2785)     # TSLib prints these for ETTh1-96
    assert s.freq == "h" and s.n_marks == 4


# --------------------------------------------------------------------------------------------------
# calendar features

def test_time_features_on_known_dates():
    dates = pd.DatetimeIndex(["2016-07-01 00:00", "2016-12-31 23:00", "2017-01-02 12:00"])
    f = time_features(dates, "h")
    assert time_feature_names("h") == ["hour_of_day", "day_of_week", "day_of_month", "day_of_year"]
    # 2016-07-01 was a Friday (dayofweek 4), day-of-year 183 (leap year)
    np.testing.assert_allclose(f[0], [0 / 23 - 0.5, 4 / 6 - 0.5, 0 / 30 - 0.5, 182 / 365 - 0.5])
    # 2016-12-31 23:00, Saturday, day 366
    np.testing.assert_allclose(f[1], [23 / 23 - 0.5, 5 / 6 - 0.5, 30 / 30 - 0.5, 365 / 365 - 0.5])
    # 2017-01-02 12:00, Monday
    np.testing.assert_allclose(f[2], [12 / 23 - 0.5, 0 / 6 - 0.5, 1 / 30 - 0.5, 1 / 365 - 0.5])
    assert np.all(np.abs(f) <= 0.5 + 1e-12)


def test_time_feature_sets_by_frequency():
    assert time_feature_names("15min")[0] == "minute_of_hour" and len(time_feature_names("30min")) == 5
    assert time_feature_names("D") == ["day_of_week", "day_of_month", "day_of_year"]
    assert time_feature_names("MS") == ["month_of_year"]
    minute = time_features(pd.DatetimeIndex(["2014-01-01 00:30"]), "30min")
    assert minute[0, 0] == pytest.approx(30 / 59 - 0.5)
    with pytest.raises(DataError, match="not a pandas frequency"):
        time_feature_names("fortnightly")


def test_infer_frequency_and_irregular_error():
    assert infer_frequency(pd.date_range("2020", periods=10, freq="30min")) == "30min"
    dates = pd.date_range("2020", periods=10, freq="h").delete(5)
    with pytest.raises(DataError, match=r"my\.csv: line 7, column 'date': irregular dates.*2:00:00.*1:00:00"):
        infer_frequency(dates, "my.csv", "date")


# --------------------------------------------------------------------------------------------------
# CSV errors name the file, the column and the line

def _csv(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


def test_missing_file_and_columns(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_series(tmp_path / "nope.csv")
    path = _csv(tmp_path, "time,a,OT\n2020-01-01,1,2\n")
    with pytest.raises(DataError, match=r"bad\.csv: no date column 'date' \(columns: time, a, OT\)"):
        read_series(path)
    with pytest.raises(DataError, match=r"bad\.csv: no column 'zz'"):
        read_series(path, date_column="time", columns=["a", "zz"])
    with pytest.raises(DataError, match=r"bad\.csv: no target column 'load'"):
        read_series(path, date_column="time", target="load", features="S")


def test_non_numeric_value(tmp_path):
    path = _csv(tmp_path, "date,a,OT\n2020-01-01 00:00,1,2\n2020-01-01 01:00,x7,3\n2020-01-01 02:00,1,3\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 3, column 'a': non-numeric value 'x7'"):
        read_series(path)


def test_nan_value(tmp_path):
    path = _csv(tmp_path, "date,a,OT\n2020-01-01 00:00,1,2\n2020-01-01 01:00,2,3\n2020-01-01 02:00,1,\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 4, column 'OT': missing value \(NaN\)"):
        read_series(path)


def test_duplicate_and_unsorted_dates(tmp_path):
    dup = _csv(tmp_path, "date,a\n2020-01-01 00:00,1\n2020-01-01 01:00,2\n2020-01-01 01:00,3\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 4, column 'date': duplicate date '2020-01-01 01:00' "
                                        r"\(also on line 3\)"):
        read_series(dup, target=None)
    back = _csv(tmp_path, "date,a\n2020-01-01 00:00,1\n2020-01-01 02:00,2\n2020-01-01 01:00,3\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 4, column 'date': dates are not sorted"):
        read_series(back, target=None)
    garbage = _csv(tmp_path, "date,a\n2020-01-01 00:00,1\nyesterday,2\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 3, column 'date': cannot parse date 'yesterday'"):
        read_series(garbage, target=None)


def test_series_too_short_names_the_part(tmp_path):
    path = tmp_path / "short.csv"
    write_csv(path, n=60)
    frame = read_series(path)
    with pytest.raises(DataError, match=r"short\.csv: the series is too short: its val part .* "
                                        r"lookback \+ horizon = 24 \+ 12 = 36 rows"):
        build_splits(frame, seq_len=24, label_len=12, pred_len=12, split="ratio")
    with pytest.raises(DataError, match=r"short\.csv: the series has 60 rows but split 'ett_hour' reads rows "
                                        r"up to 14400"):
        build_splits(frame, seq_len=4, label_len=2, pred_len=2, split="ett_hour")


def test_features_s_ms_and_target_goes_last(tmp_path):
    path = tmp_path / "f.csv"
    write_csv(path, n=30, columns=("OT", "a", "b"))
    assert read_series(path, features="M").columns == ["a", "b", "OT"]
    assert read_series(path, features="S").columns == ["OT"]
    assert read_series(path, columns=["b"], features="MS").columns == ["b", "OT"]
    assert read_series(path, columns=["b", "a"], target=None).columns == ["b", "a"]


def test_scaler_state_round_trip():
    s = StandardScaler.fit(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_array_equal(s.std, [1.0, 1.0])        # a constant column gets std 1, not a division by 0
    t = StandardScaler.from_state_dict(s.state_dict())
    np.testing.assert_array_equal(t.mean, s.mean)
