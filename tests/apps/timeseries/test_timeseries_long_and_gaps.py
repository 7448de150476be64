"""Series as users have them: long files (several stations stacked with an id column, interleaved, unsorted)
and files with gaps, read by `read_series` the same way for train, eval and forecast (`data.id_column`,
`data.fill`). Expected values are written out by hand from the files."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mambakit.apps.timeseries.config import ForecastRecipe
from mambakit.apps.timeseries.data import DataError, read_series
from mambakit.apps.timeseries.forecast import forecast_csv, load_forecaster
from mambakit.apps.timeseries.task import ForecastTask
from mambakit.cli import main
from mambakit.engine.config import load_config

from ts_reference import eval_loop

# Hand-written: 3 stations, hourly 00:00..05:00, rows interleaved, 03:00 of KSEA / KSFO before their 02:00,
# and KPDX has no 03:00 row (between its 02:00 on line 11 and its 04:00 on line 13).
STATIONS = Path(__file__).parent / "data" / "stations_long.csv"
PIVOTED = ["temp@KPDX", "humidity@KPDX", "temp@KSEA", "humidity@KSEA", "temp@KSFO", "humidity@KSFO"]
BY_HAND = np.array([  # KPDX temp, hum | KSEA temp, hum | KSFO temp, hum; row 3 = 03:00, KPDX's missing hour
    [7.0, 70, 5.0, 80, 11.0, 90],
    [6.6, 71, 4.5, 82, 10.8, 90],
    [6.0, 73, 4.0, 85, 10.5, 91],
    [np.nan, np.nan, 3.8, 86, 10.4, 92],
    [5.0, 77, 3.5, 88, 10.2, 92],
    [5.2, 76, 3.9, 87, 10.1, 93],
])


def _expected(kpdx_03):
    out = BY_HAND.copy()
    out[3, :2] = kpdx_03
    return out


@pytest.mark.parametrize("fill, kpdx_03", [("interpolate", [5.5, 75.0]),     # halfway between 02:00 and 04:00
                                           ("ffill", [6.0, 73.0]),           # the 02:00 values
                                           ("zero", [0.0, 0.0])])
def test_long_file_pivots_each_station_into_variates_and_fills_the_missing_hour(fill, kpdx_03):
    frame = read_series(STATIONS, date_column="time", id_column="station", target=None, fill=fill)
    assert frame.columns == PIVOTED
    assert list(frame.dates) == list(pd.date_range("2024-03-10 00:00", periods=6, freq="h"))
    assert frame.freq == "h" and frame.filled == 2 and frame.inserted == 0
    np.testing.assert_array_equal(frame.values, _expected(kpdx_03))
    assert frame.source_columns == ["temp", "humidity"] and frame.ids == ["KPDX", "KSEA", "KSFO"]


def test_long_file_without_fill_names_the_station_the_gap_and_its_lines():
    with pytest.raises(DataError, match=r"stations_long\.csv: line 13, column 'time': station 'KPDX': 1 missing "
                                        r"time step\(s\) between 2024-03-10 02:00:00 \(line 11\) and 2024-03-10 "
                                        r"04:00:00 at frequency 'h'; set data\.fill=interpolate, ffill or zero"):
        read_series(STATIONS, date_column="time", id_column="station", target=None)


def test_long_file_read_as_wide_names_the_id_column():
    with pytest.raises(DataError, match=r"line 3, column 'time': duplicate date '2024-03-10T00:00' \(also on "
                                        r"line 2\); if the file stacks several series \(long format\), set "
                                        r"data\.id_column=station"):
        read_series(STATIONS, date_column="time", target=None)


def test_long_file_target_names_one_station_and_goes_last(tmp_path):
    frame = read_series(STATIONS, date_column="time", id_column="station", target="temp@KSEA", features="MS",
                        fill="ffill")
    assert frame.columns == [c for c in PIVOTED if c != "temp@KSEA"] + ["temp@KSEA"]
    np.testing.assert_array_equal(frame.values[:, -1], [5.0, 4.5, 4.0, 3.8, 3.5, 3.9])
    s = read_series(STATIONS, date_column="time", id_column="station", target="humidity@KPDX", features="S",
                    fill="interpolate")
    assert s.columns == ["humidity@KPDX"]
    np.testing.assert_array_equal(s.values[:, 0], [70, 71, 73, 75, 77, 76])
    with pytest.raises(DataError, match=r"with data\.id_column=station the target names one series as column@id "
                                        r"\(for example temp@KPDX, temp@KSEA, temp@KSFO\), got data\.target='temp'"):
        read_series(STATIONS, date_column="time", id_column="station", target="temp", features="MS", fill="zero")


def test_long_file_duplicate_within_a_station_and_missing_id(tmp_path):
    text = STATIONS.read_text().splitlines()
    dup = tmp_path / "dup.csv"
    dup.write_text("\n".join(text + ["2024-03-10T04:00,KSFO,10.3,92"]) + "\n")      # line 19 repeats line 14
    with pytest.raises(DataError, match=r"dup\.csv: line 19, column 'time': station 'KSFO': duplicate date "
                                        r"'2024-03-10T04:00' \(also on line 14\)"):
        read_series(dup, date_column="time", id_column="station", target=None, fill="zero")
    no_id = tmp_path / "noid.csv"
    no_id.write_text("\n".join(text[:5] + ["2024-03-10T01:00,,4.5,82"] + text[6:]) + "\n")
    with pytest.raises(DataError, match=r"noid\.csv: line 6, column 'station': missing series id"):
        read_series(no_id, date_column="time", id_column="station", target=None, fill="zero")
    with pytest.raises(DataError, match=r"no id column 'site' \(columns: time, station, temp, humidity\)"):
        read_series(STATIONS, date_column="time", id_column="site", target=None)


# --------------------------------------------------------------------------------------------------
# wide files with gaps

def _gappy(tmp_path, drop=(3,), nan_at=None):
    """date,a,b hourly with a = 10 * row, b = 100 - row; rows `drop` removed."""
    dates = pd.date_range("2021-01-01", periods=8, freq="h")
    df = pd.DataFrame({"date": dates.strftime("%Y-%m-%d %H:%M"), "a": 10.0 * np.arange(8),
                       "b": 100.0 - np.arange(8)})
    if nan_at is not None:
        df.loc[nan_at, "b"] = np.nan
    path = tmp_path / "gappy.csv"
    df.drop(index=list(drop)).to_csv(path, index=False)
    return path


def test_given_frequency_no_longer_hides_a_gap(tmp_path):
    """data.freq=h used to skip every check: the gap is refused with fill none, with or without data.freq."""
    path = _gappy(tmp_path)
    with pytest.raises(DataError, match=r"gappy\.csv: line 5, column 'date': 1 missing time step\(s\) between "
                                        r"2021-01-01 02:00:00 \(line 4\) and 2021-01-01 04:00:00 at frequency 'h'"):
        read_series(path, target=None, freq="h")
    with pytest.raises(DataError, match=r"line 5, column 'date': irregular dates.*data\.fill=interpolate"):
        read_series(path, target=None)


@pytest.mark.parametrize("freq", [None, "h"])
def test_wide_gaps_filled_on_the_grid(tmp_path, freq):
    path = _gappy(tmp_path, drop=(3, 4))         # 03:00 and 04:00 missing: a = 30, 40 and b = 97, 96 by hand
    frame = read_series(path, target=None, freq=freq, fill="interpolate")
    assert frame.freq == "h" and frame.inserted == 2 and frame.filled == 4 and len(frame) == 8
    np.testing.assert_allclose(frame.values, np.stack([10.0 * np.arange(8), 100.0 - np.arange(8)], 1))
    ffill = read_series(path, target=None, freq=freq, fill="ffill")
    np.testing.assert_array_equal(ffill.values[3:5], [[20.0, 98.0], [20.0, 98.0]])


def test_missing_values_and_off_grid_dates(tmp_path):
    path = _gappy(tmp_path, drop=(), nan_at=5)
    with pytest.raises(DataError, match=r"line 7, column 'b': missing value \(NaN\).*data\.fill=interpolate"):
        read_series(path, target=None)
    np.testing.assert_array_equal(read_series(path, target=None, fill="zero").values[:, 1],
                                  [100, 99, 98, 97, 96, 0, 94, 93])
    off = tmp_path / "off.csv"
    off.write_text("date,a\n2021-01-01 00:00,1\n2021-01-01 01:00,2\n2021-01-01 01:30,3\n2021-01-01 03:00,4\n"
                   "2021-01-01 04:00,5\n")
    with pytest.raises(DataError, match=r"off\.csv: line 4, column 'date': date 2021-01-01 01:30:00 is not on the "
                                        r"'h' grid"):
        read_series(off, target=None, freq="h", fill="interpolate")
    with pytest.raises(DataError, match=r"data\.fill must be one of none, interpolate, ffill, zero"):
        read_series(off, target=None, fill="mean")


# --------------------------------------------------------------------------------------------------
# train / eval / forecast on a long file with a gap, through the CLI

def long_csv(path, n=240, drop_hour=100, seed=0):
    """Three stations, hourly, rows shuffled (interleaved and unsorted), station B missing one hour."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    dates = pd.date_range("2022-06-01", periods=n, freq="h").strftime("%Y-%m-%d %H:%M")
    parts = []
    for k, name in enumerate(["C", "A", "B"]):
        part = pd.DataFrame({"time": dates, "station": name,
                             "temp": 15 + 5 * k + 4 * np.sin(2 * np.pi * (t - 2 * k) / 24) + rng.normal(0, .3, n),
                             "wind": 3 + k + np.cos(2 * np.pi * t / 24) + rng.normal(0, .2, n)})
        if name == "B":
            part = part.drop(index=drop_hour)
        parts.append(part)
    df = pd.concat(parts).sample(frac=1.0, random_state=seed)
    df.to_csv(path, index=False)
    return df


def long_recipe(path, csv, features="M", target=None, fill="interpolate"):
    path.write_text(f"""data:
  path: {csv}
  date_column: time
  id_column: station
  target: {target or 'null'}
  features: {features}
  fill: {fill}
  seq_len: 24
  label_len: 12
  pred_len: 6
model: {{name: dlinear, moving_avg: 5}}
eval: {{original_scale: true, seasonal_period: 24, plot_windows: 0}}
train:
  epochs: 1
  batch_size: 16
  seed: 3
  optimizer: {{name: adam, lr: 0.01}}
run: {{progress: false, tensorboard: false}}
""")
    return path


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts_long")
    csv = root / "stations.csv"
    long_csv(csv)
    recipe = long_recipe(root / "r.yaml", csv, features="MS", target="temp@B")
    run = root / "run"
    assert main(["timeseries", "train", "-c", str(recipe), "--run-dir", str(run)]) == 0
    return {"root": root, "csv": csv, "recipe": recipe, "run": run}


def test_long_run_records_how_the_file_was_read(long_run):
    model, recipe = load_forecaster(long_run["run"])
    info = model.info
    assert info["id_column"] == "station" and info["fill"] == "interpolate" and info["date_column"] == "time"
    assert info["source_columns"] == ["temp", "wind"] and info["columns"][-1] == "temp@B"
    assert sorted(info["columns"]) == sorted(f"{c}@{s}" for s in "ABC" for c in ("temp", "wind"))


def test_forecast_reads_the_original_long_file_as_training_did(long_run):
    """The original file (date column 'time', stations interleaved and shuffled, B's missing hour) forecasts
    without any renaming: B's hour is filled as in training, and the forecast of every test window equals
    the evaluation loop's prediction for it, twice."""
    model, _ = load_forecaster(long_run["run"])
    task = ForecastTask(load_config(ForecastRecipe, long_run["recipe"]))
    df = pd.read_csv(long_run["csv"])
    b = df[df.station == "B"].assign(time=lambda d: pd.to_datetime(d.time)).set_index("time").sort_index()
    n = len(task.splits.dates)
    hold = n - 100 - 2                    # the lookback ends 2 rows after B's filled hour (row 100)
    result = forecast_csv(model, long_run["csv"], holdout=hold, horizon=6)
    assert result.columns == ["temp@B"]
    filled = (b.temp.iloc[99] + b.temp.iloc[100]) / 2          # B's rows 99 and 101 of the grid, halfway
    np.testing.assert_allclose(result.history[100, 0], filled, rtol=1e-12)
    np.testing.assert_allclose(result.history[:100, 0], b.temp.to_numpy()[:100], rtol=1e-12)

    _, _, preds = eval_loop(task, model)
    scaler = task.splits.scaler
    start = task.splits.test.offset
    for i in (0, len(preds) // 2, len(preds) - 1):
        hold = n - (start + i + 24)
        first = forecast_csv(model, long_run["csv"], holdout=hold)
        second = forecast_csv(model, long_run["csv"], holdout=hold)
        np.testing.assert_array_equal(first.values, second.values)
        expected = preds[i][:, -1] * scaler.std[-1] + scaler.mean[-1]
        np.testing.assert_allclose(first.values[:, 0], expected, rtol=1e-5, atol=1e-5)
    out = long_run["root"] / "cli_fc.csv"
    assert main(["timeseries", "forecast", "--checkpoint", str(long_run["run"]), "--csv", str(long_run["csv"]),
                 "--out", str(out)]) == 0
    assert list(pd.read_csv(out).columns) == ["time", "temp@B"]


def test_forecast_refuses_a_file_without_a_station_of_the_model(long_run, tmp_path):
    model, _ = load_forecaster(long_run["run"])
    df = pd.read_csv(long_run["csv"])
    fewer = tmp_path / "fewer.csv"
    df[df.station != "C"].to_csv(fewer, index=False)
    with pytest.raises(DataError, match=r"fewer\.csv: the model was trained on .*; this file gives series "
                                        r"temp@C, wind@C \(no rows for them in id column 'station'\)"):
        forecast_csv(model, fewer)
    more = tmp_path / "more.csv"              # a fourth station the model never saw: left out, same forecast
    extra = df[df.station == "A"].assign(station="D", temp=lambda d: d.temp + 100)
    pd.concat([extra, df]).to_csv(more, index=False)
    np.testing.assert_array_equal(forecast_csv(model, more).values, forecast_csv(model, long_run["csv"]).values)


def test_fill_none_refuses_the_long_file_in_training(long_run, tmp_path):
    recipe = long_recipe(tmp_path / "none.yaml", long_run["csv"], fill="none")
    with pytest.raises(DataError, match=r"station 'B': 1 missing time step\(s\) between 2022-06-05 03:00:00"):
        ForecastTask(load_config(ForecastRecipe, recipe)).build_datasets()
