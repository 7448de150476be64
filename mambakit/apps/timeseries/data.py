"""Forecasting data with the Time-Series-Library (TSLib) conventions that S-Mamba, iTransformer and most
long-term forecasting papers use, for any CSV with a date column.

The pipeline, each step a small function so that tests can check it against a hand-built example:

    frame   = read_series(path, date_column, columns, target, features)   # validated, target last
    borders = split_borders(len(frame), seq_len, split)                   # train / val / test row ranges
    scaler  = StandardScaler.fit(values[train])                          # train part only
    marks   = time_features(dates, freq)                                   # timeF, in [-0.5, 0.5]
    windows = ForecastWindows(scaled[b1:b2], marks[b1:b2], seq_len, label_len, pred_len)

Upstream facts reproduced here (wzhwzhwzh0921/S-D-Mamba `data_provider/data_loader.py`, the TSLib layout):

- ETT hourly borders: train [0, 12*30*24), val [12*30*24 - L, 16*30*24), test [16*30*24 - L, 20*30*24);
  the minute files multiply every number by 4. Rows past 20 months are unused. Custom CSVs: 70 / 10 / 20 %
  by time, with `num_train = int(0.7 n)`, `num_test = int(0.2 n)` and validation taking the rest; val and
  test start L rows early so that their first window's lookback is the end of the previous part.
- The target column is moved last (`[date, other columns..., target]`); features M uses every column,
  S only the target, MS every column as input and the last (target) as the output that is scored.
- The scaler is sklearn-style (population std) and fitted on the training rows only.
- A window starting at `i` has lookback `x = data[i : i+L]`, label + horizon `y = data[i+L-label : i+L+H]`
  and the calendar features of both ranges; a part with n rows has `n - L - H + 1` windows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mambakit.data.errors import DataError as SharedDataError

__all__ = [
    "DataError",
    "SeriesFrame",
    "FILLS",
    "read_series",
    "validate_series",
    "regularize",
    "split_borders",
    "SPLITS",
    "StandardScaler",
    "infer_frequency",
    "time_features",
    "time_feature_names",
    "ForecastWindows",
    "ForecastSplits",
    "build_splits",
]

Features = Literal["M", "S", "MS"]
SplitKind = Literal["ett_hour", "ett_minute", "ratio"]
SPLITS = ("train", "val", "test")


class DataError(SharedDataError):
    """A data file does not meet what forecasting needs. The message names the file, column and line."""


# --------------------------------------------------------------------------------------------------
# reading and validating a CSV

#: How `read_series` treats missing time steps and missing values (`data.fill`): "none" refuses them with
#: the first one named, the others put the series on its regular grid and fill every missing cell.
FILLS = ("none", "interpolate", "ffill", "zero")


@dataclass
class SeriesFrame:
    """A validated multivariate series: `values` (n, C) float64 in `columns` order, target last when
    there is one; `dates` a DatetimeIndex, strictly increasing and, once `freq` is set, regular at it.

    Long files (`id_column`) are pivoted: one variate per (series id, value column), named `column@id`;
    `source_columns` are the file's value columns. `filled` counts the cells `fill` filled and
    `inserted` the time steps that were missing from every series."""
    source: str
    dates: pd.DatetimeIndex
    values: np.ndarray
    columns: list[str]
    target: str | None
    features: str
    freq: str | None = None
    fill: str = "none"
    filled: int = 0
    inserted: int = 0
    id_column: str | None = None
    ids: list[str] | None = None
    source_columns: list[str] | None = None

    def __len__(self) -> int:
        return len(self.dates)

    def fill_note(self) -> str | None:
        """One line for the user when `fill` changed the data (None when it did not)."""
        if not self.filled:
            return None
        return (f"{self.source}: data.fill={self.fill} filled {self.filled} missing value(s) of {self.values.size} "
                f"({self.inserted} time step(s) absent from the file); filled rows are trained on and scored "
                f"like observed ones")


def _line(row: int) -> int:
    """CSV line of data row `row` (0-based): the header is line 1."""
    return row + 2


def read_series(path: str | Path, date_column: str = "date", columns: Sequence[str] | None = None,
                target: str | None = "OT", features: Features = "M", id_column: str | None = None,
                freq: str | None = None, fill: str = "none") -> SeriesFrame:
    """Read a CSV into a validated, regular `SeriesFrame`: the one function train, eval and forecast use.

    columns: the value columns to use (default: every column but the date and id columns). The target (needed
    for features S and MS; for M it only fixes which column goes last, as in TSLib) is moved last.
    id_column: the file is long: several series stacked, told apart by this column. Each series' rows are
    sorted by date and the series become variates `column@id` on the union of their dates (see `SeriesFrame`);
    the target then names one of them (`temp@KSEA`).
    freq: the step of the series (default: inferred). fill: what to do with missing steps and values
    (`FILLS`): "none" refuses them; "interpolate" (linear in time, the nearest value at the ends), "ffill"
    (the last value before, the first one for a leading gap) or "zero" fill them on the regular grid.
    Raises `DataError` naming the file, column, line (and series) for a missing column, a non-numeric value, a
    missing value or time step (with fill none), an unparseable, duplicate or unsorted date, or a date off
    the grid.
    """
    if fill not in FILLS:
        raise DataError(f"data.fill must be one of {', '.join(FILLS)}, got {fill!r}")
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{source}: not a readable CSV file: {e}") from None
    allow_missing = fill != "none"
    if id_column is None:
        frame = validate_series(df, source, date_column, columns, target, features, allow_missing=allow_missing)
        return regularize(frame, freq, fill, date_column)
    return _read_long(df, source, date_column, id_column, columns, target, features, freq, fill)


def validate_series(df: pd.DataFrame, source: str, date_column: str = "date",
                    columns: Sequence[str] | None = None, target: str | None = "OT",
                    features: Features = "M", allow_missing: bool = False) -> SeriesFrame:
    """Validate a wide DataFrame as `pd.read_csv` returns it, read from `source`; see `read_series`.
    With `allow_missing`, empty values stay NaN (for `regularize` to fill) instead of being refused."""
    if features not in ("M", "S", "MS"):
        raise DataError(f"{source}: features must be 'M', 'S' or 'MS', got {features!r}")
    available = [c for c in df.columns]
    if date_column not in available:
        raise DataError(f"{source}: no date column '{date_column}' (columns: {', '.join(map(str, available))})")
    value_columns = _choose_columns(source, available, date_column, columns, target, features)
    dates = _parse_dates(source, df[date_column], date_column)
    _check_order(source, dates, df[date_column], date_column, np.arange(len(df)), wide=df)
    values = np.empty((len(df), len(value_columns)), dtype=np.float64)
    for j, name in enumerate(value_columns):
        values[:, j] = _parse_numbers(source, df[name], name, allow_missing)
    if len(df) == 0:
        raise DataError(f"{source}: the file has a header but no rows")
    return SeriesFrame(source=source, dates=pd.DatetimeIndex(dates), values=values, columns=value_columns,
                       target=target if target in value_columns else None, features=features,
                       source_columns=list(value_columns))


def _choose_columns(source: str, available: list, date_column: str, columns: Sequence[str] | None,
                    target: str | None, features: str, id_column: str | None = None) -> list[str]:
    skip = {date_column, id_column}
    wanted = list(columns) if columns else [c for c in available if c not in skip]
    for name in wanted:
        if name not in available:
            raise DataError(f"{source}: no column '{name}' (columns: {', '.join(map(str, available))})")
        if name == date_column:
            raise DataError(f"{source}: column '{name}' is the date column; it cannot be a value column")
        if name == id_column:
            raise DataError(f"{source}: column '{name}' is the id column (data.id_column); it cannot be a value "
                            f"column")
    if len(set(wanted)) != len(wanted):
        raise DataError(f"{source}: columns {wanted} name a column twice")
    if id_column is not None:          # the target names a pivoted series; `_read_long` checks it
        return wanted
    if features in ("S", "MS"):
        if not target:
            raise DataError(f"{source}: features {features} need a target column (data.target)")
        if target not in available:
            raise DataError(f"{source}: no target column '{target}' (columns: {', '.join(map(str, available))})")
    if features == "S":
        return [target]
    if target and target in available:
        if columns and target not in wanted and features == "MS":
            wanted.append(target)
        if target in wanted:
            wanted = [c for c in wanted if c != target] + [target]
    if not wanted:
        raise DataError(f"{source}: no value columns besides the date column '{date_column}'")
    return wanted


def _parse_dates(source: str, raw: pd.Series, name: str) -> np.ndarray:
    """datetime64[ns] of every row (in file order), timezone dropped; errors name the line."""
    missing = np.flatnonzero(raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy())
    if len(missing):
        raise DataError(f"{source}: line {_line(missing[0])}, column '{name}': missing date")
    try:
        dates = pd.to_datetime(raw)
    except (ValueError, TypeError, OverflowError):
        # One format for the whole column failed: parse element by element to name the bad line.
        dates = pd.to_datetime(raw.astype(str), errors="coerce", format="mixed")
        bad = np.flatnonzero(dates.isna().to_numpy())
        row = int(bad[0]) if len(bad) else 0
        if not len(bad):
            raise DataError(f"{source}: column '{name}': dates are written in more than one format") from None
        raise DataError(f"{source}: line {_line(row)}, column '{name}': cannot parse date {raw.iloc[row]!r}") from None
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_localize(None)
    return dates.to_numpy(dtype="datetime64[ns]")


def _id_hint(df: pd.DataFrame, date_column: str) -> str:
    """For a wide file with repeated dates: name the column that looks like a series id, if one does."""
    text = [c for c in df.columns if c != date_column and not pd.api.types.is_numeric_dtype(df[c].dtype)
            and 1 < df[c].nunique() < len(df)]
    which = f"data.id_column={text[0]}" if text else "data.id_column=<the column naming each series>"
    return f"; if the file stacks several series (long format), set {which}"


def _check_order(source: str, dates: np.ndarray, raw: pd.Series, name: str, rows: np.ndarray,
                 wide: pd.DataFrame | None = None, series: str = "") -> None:
    """Dates strictly increasing: the first duplicate or step back is an error naming both lines.
    `rows` are the file rows of `dates` (a subset for one series of a long file, named by `series`); for a
    wide file (`wide`, the whole table) the error says how to read it as a long one."""
    steps = np.diff(dates.astype(np.int64))
    hint = "" if wide is None or not ((steps <= 0).any()) else _id_hint(wide, name)
    dup = np.flatnonzero(steps == 0)
    if len(dup):
        r, p = int(rows[dup[0] + 1]), int(rows[dup[0]])
        raise DataError(f"{source}: line {_line(r)}, column '{name}': {series}duplicate date {str(raw.iloc[r])!r} "
                        f"(also on line {_line(p)}){hint}")
    back = np.flatnonzero(steps < 0)
    if len(back):
        r, p = int(rows[back[0] + 1]), int(rows[back[0]])
        raise DataError(f"{source}: line {_line(r)}, column '{name}': dates are not sorted: {str(raw.iloc[r])!r} "
                        f"comes after {str(raw.iloc[p])!r} (line {_line(p)}); sort the file by date{hint}")


def _parse_numbers(source: str, raw: pd.Series, name: str, allow_missing: bool = False) -> np.ndarray:
    """float64 values of a column as pandas' CSV reader parsed them (as TSLib reads its files)."""
    if pd.api.types.is_bool_dtype(raw.dtype):
        raise DataError(f"{source}: line 2, column '{name}': non-numeric value {str(raw.iloc[0])!r} "
                        f"(true/false); write it as 0/1")
    if pd.api.types.is_numeric_dtype(raw.dtype):
        numbers = raw.to_numpy(dtype=np.float64)
    else:
        numbers = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        text_bad = np.flatnonzero(np.isnan(numbers) & raw.notna().to_numpy())
        if len(text_bad):
            r = int(text_bad[0])
            raise DataError(f"{source}: line {_line(r)}, column '{name}': non-numeric value {str(raw.iloc[r])!r}")
    missing = np.flatnonzero(np.isnan(numbers))
    if len(missing) and not allow_missing:
        raise DataError(f"{source}: line {_line(int(missing[0]))}, column '{name}': missing value (NaN); "
                        f"{len(missing)} row(s) of this column are missing; fill or drop them first, or set "
                        f"data.fill=interpolate, ffill or zero")
    infinite = np.flatnonzero(np.isinf(numbers))
    if len(infinite):
        r = int(infinite[0])
        raise DataError(f"{source}: line {_line(r)}, column '{name}': infinite value {str(raw.iloc[r])!r}")
    return numbers


# --------------------------------------------------------------------------------------------------
# long files: several series stacked with an id column, pivoted into variates

def _read_long(df: pd.DataFrame, source: str, date_column: str, id_column: str, columns: Sequence[str] | None,
               target: str | None, features: str, freq: str | None, fill: str) -> SeriesFrame:
    """Each series (rows of one id) is validated and regularized like a wide file on the grid spanning all
    series, then the series are set side by side: variates `column@id`, ids in sorted order."""
    if features not in ("M", "S", "MS"):
        raise DataError(f"{source}: features must be 'M', 'S' or 'MS', got {features!r}")
    available = list(df.columns)
    for kind, name in (("date", date_column), ("id", id_column)):
        if name not in available:
            raise DataError(f"{source}: no {kind} column '{name}' (columns: {', '.join(map(str, available))})")
    if id_column == date_column:
        raise DataError(f"{source}: data.id_column and data.date_column are both '{id_column}'")
    value_columns = _choose_columns(source, available, date_column, columns, target, features, id_column)
    if not value_columns:
        raise DataError(f"{source}: no value columns besides the date column '{date_column}' and the id column "
                        f"'{id_column}'")
    if len(df) == 0:
        raise DataError(f"{source}: the file has a header but no rows")
    ids = df[id_column]
    no_id = np.flatnonzero(ids.isna().to_numpy() | (ids.astype(str).str.strip() == "").to_numpy())
    if len(no_id):
        raise DataError(f"{source}: line {_line(no_id[0])}, column '{id_column}': missing series id")
    ids = ids.astype(str).str.strip()
    groups = ids.groupby(ids, sort=False).indices                  # id -> its file rows, one pass
    names = sorted(ids.unique())
    dates = _parse_dates(source, df[date_column], date_column)
    values = np.stack([_parse_numbers(source, df[c], c, fill != "none") for c in value_columns], axis=1)

    series, file_rows = {}, {}
    for name in names:
        rows = np.asarray(groups[name])
        rows = rows[np.argsort(dates[rows], kind="stable")]      # a long file need not be sorted
        _check_order(source, dates[rows], df[date_column], date_column, rows, series=f"{id_column} '{name}': ")
        file_rows[name] = rows
        series[name] = SeriesFrame(source=source, dates=pd.DatetimeIndex(dates[rows]), values=values[rows],
                                   columns=[f"{c}@{name}" for c in value_columns], target=None, features="M")
    freq = freq or _common_frequency(series, source, id_column, fill, dates)
    start, end = dates.min(), dates.max()
    parts = [regularize(frame, freq, fill, date_column, start=start, end=end,
                        label=f"{id_column} '{name}': ", lines=file_rows[name])
             for name, frame in series.items()]
    wide = np.concatenate([p.values for p in parts], axis=1)
    pivoted = [c for p in parts for c in p.columns]
    out_columns = _order_pivoted(source, pivoted, target, features, id_column, names, value_columns)
    order = [pivoted.index(c) for c in out_columns]
    inserted = len(parts[0].dates) - len(np.unique(dates))
    return SeriesFrame(source=source, dates=parts[0].dates, values=wide[:, order], columns=out_columns,
                       target=target if target in out_columns else None, features=features, freq=freq, fill=fill,
                       filled=sum(p.filled for p in parts), inserted=inserted, id_column=id_column,
                       ids=names, source_columns=list(value_columns))


def _order_pivoted(source: str, pivoted: list[str], target: str | None, features: str, id_column: str,
                   ids: list[str], value_columns: list[str]) -> list[str]:
    """The pivoted variates with the target last (only the target for S)."""
    if target in pivoted:
        return [target] if features == "S" else [c for c in pivoted if c != target] + [target]
    if features == "M" and (target is None or target in value_columns or target == "OT"):
        return pivoted
    choices = ", ".join(f"{target if target in value_columns else value_columns[0]}@{i}" for i in ids)
    raise DataError(f"{source}: with data.id_column={id_column} the target names one series as column@id "
                    f"(for example {choices}), got data.target={target!r}")


def _common_frequency(series: dict, source: str, id_column: str, fill: str, dates: np.ndarray) -> str | None:
    """The frequency every series of a long file shares (inferred from those without gaps; the usual step
    when all have gaps and `fill` may fill them)."""
    found = {}
    for name, frame in series.items():
        if len(frame) >= 3 and (f := _infer_freq(frame.dates)) is not None:
            found[name] = f
    offsets = {pd.tseries.frequencies.to_offset(f) for f in found.values()}
    if len(offsets) > 1:
        listed = ", ".join(f"'{n}' {f}" for n, f in found.items())
        raise DataError(f"{source}: the series of id column '{id_column}' have different frequencies ({listed}); "
                        f"set data.freq")
    if found:
        return next(iter(found.values()))
    if fill != "none" and len(np.unique(dates)) >= 3:
        return _usual_step(pd.DatetimeIndex(np.unique(dates)))
    return None          # regularize infers it per series and names the first irregular step


def regularize(frame: SeriesFrame, freq: str | None = None, fill: str = "none", date_column: str = "date",
               start=None, end=None, label: str = "", lines: np.ndarray | None = None) -> SeriesFrame:
    """The frame on its regular grid `start .. end` (default: its first .. last date) at `freq` (default:
    inferred), with every missing step and value filled by `fill`; fill "none" refuses either, naming the
    first. A date off the grid is always an error. `lines` are the file rows of the frame's rows (default
    0..n-1) and `label` prefixes errors (the series of a long file)."""
    dates, source = frame.dates, frame.source
    rows = np.arange(len(dates)) if lines is None else np.asarray(lines)
    if freq is None:
        if len(dates) < 3:
            return frame
        freq = _infer_freq(dates)
        if freq is None:
            if fill == "none":
                infer_frequency(dates, source, date_column, rows=rows, label=label)
            freq = _usual_step(dates)
    start = dates[0] if start is None else pd.Timestamp(start)
    end = dates[-1] if end is None else pd.Timestamp(end)
    grid = pd.date_range(start, end, freq=_to_offset(freq))
    position = grid.get_indexer(dates)
    off = np.flatnonzero(position < 0)
    if len(grid) == 0 or grid[0] != start or len(off):
        r = int(off[0]) if len(off) else 0
        raise DataError(f"{source}: line {_line(int(rows[r]))}, column '{date_column}': {label}date {dates[r]} is not "
                        f"on the {freq!r} grid that starts at {start} (data.freq={freq}); resample the file or fix "
                        f"data.freq")
    values = np.full((len(grid), frame.values.shape[1]), np.nan)
    values[position] = frame.values
    missing = np.isnan(values)
    absent = len(grid) - len(dates)
    if missing.any() and fill == "none":
        _refuse_gap(frame, grid, position, rows, date_column, label, freq)
    if missing.any():
        values = _fill(values, fill, source, frame.columns)
    return dataclasses.replace(frame, dates=grid, values=values, freq=freq, fill=fill,
                               filled=int(missing.sum()), inserted=absent)


def _refuse_gap(frame: SeriesFrame, grid: pd.DatetimeIndex, position: np.ndarray, rows: np.ndarray,
                date_column: str, label: str, freq: str) -> None:
    """The fill=none error for the first missing step or value."""
    source = frame.source
    hint = "; set data.fill=interpolate, ffill or zero to fill them (data.fill=none refuses them)"
    gaps = np.flatnonzero(np.diff(position) > 1)
    nan_rows = np.flatnonzero(np.isnan(frame.values).any(axis=1))
    if len(frame.dates) and position[0] > 0:
        raise DataError(f"{source}: column '{date_column}': {label}starts at {frame.dates[0]}, {position[0]} step(s) "
                        f"after the other series (first date {grid[0]}){hint}")
    if len(gaps) and (not len(nan_rows) or gaps[0] < nan_rows[0]):
        g = int(gaps[0])
        missed = int(position[g + 1] - position[g] - 1)
        raise DataError(f"{source}: line {_line(int(rows[g + 1]))}, column '{date_column}': {label}{missed} missing "
                        f"time step(s) between {frame.dates[g]} (line {_line(int(rows[g]))}) and {frame.dates[g + 1]} "
                        f"at frequency {freq!r}{hint}")
    if len(nan_rows):
        r = int(nan_rows[0])
        column = frame.columns[int(np.flatnonzero(np.isnan(frame.values[r]))[0])]
        raise DataError(f"{source}: line {_line(int(rows[r]))}, column '{column}': missing value (NaN){hint}")
    raise DataError(f"{source}: column '{date_column}': {label}ends at {frame.dates[-1]}, before the other series "
                    f"(last date {grid[-1]}){hint}")


def _fill(values: np.ndarray, fill: str, source: str, columns: list[str]) -> np.ndarray:
    """Fill the NaNs of (n, C) `values` column by column; see `read_series`."""
    out = values.copy()
    t = np.arange(len(values))
    for j in range(values.shape[1]):
        known = ~np.isnan(values[:, j])
        if not known.any():
            raise DataError(f"{source}: column '{columns[j]}' has no value at all; nothing to fill it from")
        if fill == "zero":
            out[~known, j] = 0.0
        elif fill == "interpolate":      # linear between neighbours; np.interp holds the end values outside
            out[~known, j] = np.interp(t[~known], t[known], values[known, j])
        elif fill == "ffill":
            last = np.maximum.accumulate(np.where(known, t, -1))
            first = int(np.flatnonzero(known)[0])
            out[:, j] = values[np.where(last < 0, first, last), j]
        else:
            raise DataError(f"unknown data.fill {fill!r}; expected one of {', '.join(FILLS)}")
    return out


def _usual_step(dates: pd.DatetimeIndex) -> str:
    """The most common step between consecutive dates, as a frequency string ('h', '30min', ...)."""
    steps, counts = np.unique(np.diff(dates.asi8), return_counts=True)
    return pd.tseries.frequencies.to_offset(pd.Timedelta(int(steps[np.argmax(counts)]))).freqstr


# --------------------------------------------------------------------------------------------------
# splits

def split_borders(n_rows: int, seq_len: int, split: SplitKind = "ratio",
                  ratios: Sequence[float] = (0.7, 0.1, 0.2)) -> dict[str, tuple[int, int]]:
    """Row ranges [start, stop) of train / val / test, as TSLib computes them.

    ett_hour: 12 / 4 / 4 months of 30 days (8640 / 2880 / 2880 rows); ett_minute: the same times 4.
    ratio: `num_train = int(r0 n)`, `num_test = int(r2 n)`, val the rest (TSLib's `Dataset_Custom`).
    val and test start `seq_len` rows early: their first window looks back into the previous part.
    """
    if split in ("ett_hour", "ett_minute"):
        unit = 30 * 24 * (4 if split == "ett_minute" else 1)
        num_train, num_val, num_test = 12 * unit, 4 * unit, 4 * unit
    elif split == "ratio":
        if len(ratios) != 3 or any(r <= 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-9:
            raise DataError(f"split ratios must be three positive numbers summing to 1, got {list(ratios)}")
        num_train = int(n_rows * ratios[0])
        num_test = int(n_rows * ratios[2])
        num_val = n_rows - num_train - num_test
    else:
        raise DataError(f"unknown split {split!r}; expected 'ett_hour', 'ett_minute' or 'ratio'")
    train_end = num_train
    val_end = num_train + num_val
    test_end = num_train + num_val + num_test
    return {
        "train": (0, train_end),
        "val": (train_end - seq_len, val_end),
        "test": (val_end - seq_len, test_end),
    }


def check_length(source: str, n_rows: int, borders: dict[str, tuple[int, int]], seq_len: int, pred_len: int,
                 split: str) -> None:
    """Every part must hold at least one window of lookback + horizon rows."""
    need = seq_len + pred_len
    last = max(stop for _, stop in borders.values())
    if n_rows < last:
        raise DataError(f"{source}: the series has {n_rows} rows but split '{split}' reads rows up to {last} "
                        f"(the fixed ETT borders need 20 months of data); use data.split=ratio for this file")
    for name, (start, stop) in borders.items():
        if start < 0 or stop - start < need:
            rows = stop - max(start, 0)
            raise DataError(
                f"{source}: the series is too short: its {name} part (rows {max(start, 0)}..{stop - 1} of {n_rows}, "
                f"split '{split}') holds {rows} rows, but one window needs lookback + horizon = "
                f"{seq_len} + {pred_len} = {need} rows")


# --------------------------------------------------------------------------------------------------
# scaling

@dataclass
class StandardScaler:
    """Per-column mean / population std, as sklearn's StandardScaler (a zero std is treated as 1)."""
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> "StandardScaler":
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(axis=0)
        std = values.std(axis=0)
        std = np.where(std < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean)), 1.0, std)
        return cls(mean=mean, std=std)

    def transform(self, values):
        return (values - self._like(self.mean, values)) / self._like(self.std, values)

    def inverse_transform(self, values):
        return values * self._like(self.std, values) + self._like(self.mean, values)

    def select(self, index) -> "StandardScaler":
        """The scaler of a subset of columns (e.g. the target for MS)."""
        return StandardScaler(mean=self.mean[index], std=self.std[index])

    def state_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "StandardScaler":
        return cls(mean=np.asarray(state["mean"], dtype=np.float64), std=np.asarray(state["std"], dtype=np.float64))

    @staticmethod
    def _like(stat: np.ndarray, values):
        if isinstance(values, torch.Tensor):
            return torch.as_tensor(stat, dtype=values.dtype, device=values.device)
        return stat


# --------------------------------------------------------------------------------------------------
# calendar features (TSLib timeF, from gluonts)

_FEATURES = {
    "second_of_minute": lambda ix: ix.second / 59.0 - 0.5,
    "minute_of_hour": lambda ix: ix.minute / 59.0 - 0.5,
    "hour_of_day": lambda ix: ix.hour / 23.0 - 0.5,
    "day_of_week": lambda ix: ix.day_of_week / 6.0 - 0.5,
    "day_of_month": lambda ix: (ix.day - 1) / 30.0 - 0.5,
    "day_of_year": lambda ix: (ix.day_of_year - 1) / 365.0 - 0.5,
    "month_of_year": lambda ix: (ix.month - 1) / 11.0 - 0.5,
    "week_of_year": lambda ix: (np.asarray(ix.isocalendar().week, dtype=np.float64) - 1) / 52.0 - 0.5,
}


def time_feature_names(freq: str) -> list[str]:
    """Which calendar features a frequency gets (TSLib `time_features_from_frequency_str`):
    hourly -> hour, weekday, day of month, day of year (4); minutely -> minute + those (5); ..."""
    offset = _to_offset(freq)
    o = pd.offsets
    table = [
        ((o.YearEnd, o.YearBegin), []),
        ((o.QuarterEnd, o.QuarterBegin, o.MonthEnd, o.MonthBegin, o.BusinessMonthEnd, o.BusinessMonthBegin),
         ["month_of_year"]),
        ((o.Week,), ["day_of_month", "week_of_year"]),
        ((o.Day, o.BusinessDay), ["day_of_week", "day_of_month", "day_of_year"]),
        ((o.Hour, o.BusinessHour), ["hour_of_day", "day_of_week", "day_of_month", "day_of_year"]),
        ((o.Minute,), ["minute_of_hour", "hour_of_day", "day_of_week", "day_of_month", "day_of_year"]),
        ((o.Second,), ["second_of_minute", "minute_of_hour", "hour_of_day", "day_of_week", "day_of_month",
                       "day_of_year"]),
    ]
    for kinds, names in table:
        if isinstance(offset, kinds):
            return list(names)
    raise DataError(f"unsupported frequency {freq!r} for calendar features; use yearly, quarterly, monthly, "
                    f"weekly, daily, business-daily, hourly, minutely or secondly data")


def time_features(dates: pd.DatetimeIndex, freq: str) -> np.ndarray:
    """TSLib's `timeenc=1` features of `dates`: (n, F) float64, each in [-0.5, 0.5]."""
    dates = pd.DatetimeIndex(dates)
    names = time_feature_names(freq)
    if not names:
        return np.zeros((len(dates), 0))
    return np.stack([np.asarray(_FEATURES[n](dates), dtype=np.float64) for n in names], axis=1)


def _to_offset(freq: str):
    try:
        return pd.tseries.frequencies.to_offset(freq)
    except ValueError:
        raise DataError(f"not a pandas frequency: {freq!r} (examples: 'h', '15min', 'D', 'W', 'MS')") from None


def infer_frequency(dates: pd.DatetimeIndex, source: str = "<dates>", column: str = "date",
                    rows: np.ndarray | None = None, label: str = "") -> str:
    """The pandas frequency string of regularly spaced dates; `DataError` naming the first irregular
    step when there is none (`rows`: the file rows of the dates, default 0..n-1; `label` names the series)."""
    dates = pd.DatetimeIndex(dates)
    if len(dates) < 3:
        raise DataError(f"{source}: column '{column}': need at least 3 dates to infer the frequency")
    freq = _infer_freq(dates)
    if freq is not None:
        return freq
    steps = dates[1:] - dates[:-1]
    values, counts = np.unique(steps, return_counts=True)
    usual = values[np.argmax(counts)]
    r = int(np.flatnonzero(steps != usual)[0]) + 1
    line = _line(r if rows is None else int(rows[r]))
    raise DataError(f"{source}: line {line}, column '{column}': {label}irregular dates: {dates[r - 1]} -> {dates[r]} "
                    f"is {pd.Timedelta(steps[r - 1])}, but most steps are {pd.Timedelta(usual)}; "
                    f"resample the file to a fixed frequency, or set data.fill=interpolate, ffill or zero to fill "
                    f"missing steps")


def _infer_freq(dates: pd.DatetimeIndex) -> str | None:
    """`pd.infer_freq` as a string, on pandas versions that return a string or an offset."""
    try:
        with pd.option_context("future.infer_freq_returns_offset", True):
            freq = pd.infer_freq(dates)
    except (KeyError, pd.errors.OptionError):
        freq = pd.infer_freq(dates)
    if freq is None or isinstance(freq, str):
        return freq
    return freq.freqstr


# --------------------------------------------------------------------------------------------------
# windows

class ForecastWindows(Dataset):
    """Sliding windows over one part of a scaled series.

    data (n, C), marks (n, F). Item i (0 <= i < n - seq_len - pred_len + 1) is a dict of float32 tensors:
      x       (seq_len, C)               data[i : i+seq_len]
      y       (label_len + pred_len, C)  data[i+seq_len-label_len : i+seq_len+pred_len]
      x_mark  (seq_len, F), y_mark (label_len + pred_len, F) the calendar features of the same rows
      index   ()                          i (int64), the window's first row in this part
    """

    def __init__(self, data: np.ndarray, marks: np.ndarray, seq_len: int, label_len: int, pred_len: int,
                 offset: int = 0):
        if data.shape[0] != marks.shape[0]:
            raise ValueError(f"data has {data.shape[0]} rows but marks has {marks.shape[0]}")
        if not 0 <= label_len <= seq_len:
            raise ValueError(f"label_len must be in [0, seq_len={seq_len}], got {label_len}")
        self.data = torch.as_tensor(np.asarray(data, dtype=np.float32))
        self.marks = torch.as_tensor(np.asarray(marks, dtype=np.float32))
        self.seq_len, self.label_len, self.pred_len = seq_len, label_len, pred_len
        self.offset = offset      # row of data[0] in the whole series (for dates in plots)

    def __len__(self) -> int:
        return max(0, self.data.shape[0] - self.seq_len - self.pred_len + 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        s_end = i + self.seq_len
        r_begin = s_end - self.label_len
        r_end = s_end + self.pred_len
        return {
            "x": self.data[i:s_end],
            "y": self.data[r_begin:r_end],
            "x_mark": self.marks[i:s_end],
            "y_mark": self.marks[r_begin:r_end],
            "index": torch.tensor(i, dtype=torch.long),
        }


@dataclass
class ForecastSplits:
    """Everything a task needs from the data: the three window datasets and how they were made."""
    train: ForecastWindows
    val: ForecastWindows
    test: ForecastWindows
    scaler: StandardScaler | None
    columns: list[str]
    target: str | None
    features: str
    freq: str
    mark_names: list[str]
    dates: pd.DatetimeIndex
    borders: dict[str, tuple[int, int]]
    source: str
    id_column: str | None = None
    source_columns: list[str] | None = None
    fill: str = "none"

    @property
    def n_variates(self) -> int:
        return len(self.columns)

    @property
    def n_marks(self) -> int:
        return len(self.mark_names)

    def meta(self) -> dict:
        """What a checkpoint must carry to forecast a new file the same way (plain JSON types)."""
        return {
            "columns": list(self.columns), "target": self.target, "features": self.features, "freq": self.freq,
            "mark_names": list(self.mark_names),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "borders": {k: list(v) for k, v in self.borders.items()}, "source": self.source,
            "id_column": self.id_column, "source_columns": list(self.source_columns or self.columns),
            "fill": self.fill,
        }


def build_splits(frame: SeriesFrame, seq_len: int, label_len: int, pred_len: int, split: SplitKind = "ratio",
                 ratios: Sequence[float] = (0.7, 0.1, 0.2), scale: bool = True, freq: str | None = None,
                 timeenc: Literal["timeF", "none"] = "timeF", date_column: str = "date") -> ForecastSplits:
    """The three window datasets of a validated series, with the scaler fitted on the training rows."""
    for name, value in (("seq_len", seq_len), ("pred_len", pred_len)):
        if value < 1:
            raise DataError(f"{frame.source}: {name} must be >= 1, got {value}")
    borders = split_borders(len(frame), seq_len, split, ratios)
    check_length(frame.source, len(frame), borders, seq_len, pred_len, split)
    if freq is None:
        freq = frame.freq or infer_frequency(frame.dates, frame.source, date_column)
    values = frame.values
    scaler = None
    if scale:
        b1, b2 = borders["train"]
        scaler = StandardScaler.fit(values[b1:b2])
        values = scaler.transform(values)
    mark_names = time_feature_names(freq) if timeenc == "timeF" else []
    marks = time_features(frame.dates, freq) if timeenc == "timeF" else np.zeros((len(frame), 0))
    parts = {name: ForecastWindows(values[b1:b2], marks[b1:b2], seq_len, label_len, pred_len, offset=b1)
             for name, (b1, b2) in borders.items()}
    return ForecastSplits(train=parts["train"], val=parts["val"], test=parts["test"], scaler=scaler,
                          columns=list(frame.columns), target=frame.target, features=frame.features, freq=freq,
                          mark_names=mark_names, dates=frame.dates, borders=borders, source=frame.source,
                          id_column=frame.id_column, source_columns=frame.source_columns, fill=frame.fill)
