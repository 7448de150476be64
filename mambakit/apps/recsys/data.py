"""Interaction files -> per-user chronological sequences -> leave-one-out examples, as RecBole 1.2.1 does.

The pipeline, with the RecBole 1.2.1 source it follows (recbole/data/dataset/dataset.py unless noted):

1. `read_atomic`: a tab-separated file whose first line types every column as `name:type`, type one of
   token, token_seq, float, float_seq (`_load_feat`). Malformed headers, unknown types, missing columns,
   empty ids and non-numeric floats are errors naming the file, the column and the line. A plain CSV with
   named columns (MovieLens `ratings.csv`: `userId,movieId,rating,timestamp`) is read too (`read_csv_interactions`).
2. `kcore_filter`: drop users with fewer than `user_min` interactions and items with fewer than `item_min`,
   both judged on the same counts, and repeat until nothing changes (`_filter_by_inter_num` with
   "[k,inf)" intervals).
3. `build_sequences`: each user's interactions are sorted by timestamp. Two choices decide the order of
   interactions with equal timestamps, which are common (MovieLens-100k: 51% of a user's consecutive
   ratings share the exact second, 70% once rounded to float32):
   - `time_precision`: "float64" (default) keeps the exact times; "float32" rounds them as RecBole does
     (it holds float fields as float32 tensors, `_dataframe_to_interaction`), so unix times 64-128 s apart
     tie too.
   - `tie_break`: "hash" (default) orders tied interactions by a fixed hash of the (user, item) tokens: a
     deterministic order that carries no information about the items (file order often does: MovieLens
     `ratings.csv` lists a user's ratings by ascending movie id, so "next item = a higher id" becomes
     learnable) and does not depend on the row order of the file. "file" keeps the file order (RecBole's
     stable `Interaction.sort`).
   Item ids 1..n (0 is padding): with tie_break "file" in order of first appearance in the filtered file
   (RecBole's `_remap` with `pd.factorize`); with "hash" in order of first appearance in the canonical
   (time, hash) order, so that the same interactions in any row order give the same ids and sequences.
   RecBole's own setting is `time_precision: float32` with `tie_break: file`.
4. `leave_one_out`: every interaction but each user's first is the target of one example whose input is the
   (at most `max_len`) interactions before it (sequential_dataset.py `data_augmentation`); per user the
   last example goes to test, the second last to validation, the rest to training; a user with two
   examples gets no validation example, a user with one only a training example
   (`_split_index_by_leave_one_out` with `valid_and_test`).

A trained model carries its `Vocabulary` (item tokens, titles, the items k-core filtering removed, and a
`fingerprint` of the interactions it was trained on), so recommending needs no data file, and evaluating
on data that is not the training data is an error instead of a silent remap.

Batches are built by `SequenceCollator` from example indices with vectorised gathers: item ids
right-padded with 0 (left-aligned, as RecBole), the length, the target, the timestamps when a model needs
them, and where each example's history starts (for masking already-seen items at evaluation).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

__all__ = [
    "ATOMIC_TYPES", "AtomicFileError", "AtomicFile", "AtomicTable", "parse_header", "read_atomic",
    "find_atomic_files", "kcore_filter", "SequenceData", "build_sequences", "load_sequence_data",
    "leave_one_out", "LOOSplit", "ExampleIndex", "ExampleDataset", "SequenceCollator", "interaction_counts",
    "make_batch", "PAD_TOKEN", "Vocabulary", "fingerprint", "check_fingerprint", "read_csv_interactions",
    "TIE_WARN_SHARE", "TieWarning",
]

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
PAD_TOKEN = "[PAD]"
#: Warn when more than this share of a user's consecutive interactions share a timestamp.
TIE_WARN_SHARE = 0.2


class AtomicFileError(ValueError):
    """A RecBole atomic file that cannot be read as asked. The message names the file and the column."""


# --------------------------------------------------------------------------------------------------
# atomic files

@dataclass(frozen=True)
class AtomicFile:
    """One atomic file: a path on disk, or a member of a zip archive (how RecBole hosts its datasets)."""
    path: Path
    member: str | None = None

    @property
    def source(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    @property
    def suffix(self) -> str:
        return (self.member or self.path.name).rsplit(".", 1)[-1]

    def read_text(self) -> str:
        try:
            if self.member is None:
                raw = self.path.read_bytes()
            else:
                with zipfile.ZipFile(self.path) as archive:
                    raw = archive.read(self.member)
        except OSError as e:
            raise AtomicFileError(f"{self.source}: cannot read: {e}") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AtomicFileError(f"{self.source}: not UTF-8 text ({e})") from None


@dataclass
class AtomicTable:
    """The columns of an atomic file that were asked for. `types` maps every column of the header to its type
    (file order); `frame` holds the loaded ones: token and *_seq columns as str, float columns as float64."""
    source: str
    types: dict[str, str]
    frame: pd.DataFrame


def parse_header(line: str, source: str) -> dict[str, str]:
    """`"user_id:token\\titem_id:token"` -> `{"user_id": "token", "item_id": "token"}`."""
    line = line.rstrip("\r\n")
    if not line.strip():
        raise AtomicFileError(f"{source}: the first line must be a header of name:type fields, got an empty line")
    types: dict[str, str] = {}
    for position, cell in enumerate(line.split("\t"), start=1):
        name, sep, ftype = cell.partition(":")
        if not sep or not name.strip() or not ftype.strip() or ":" in ftype:
            raise AtomicFileError(f"{source}: header field {position} {cell!r} is not of the form name:type "
                                  f"(type one of {', '.join(ATOMIC_TYPES)})")
        name, ftype = name.strip(), ftype.strip()
        if ftype not in ATOMIC_TYPES:
            raise AtomicFileError(f"{source}: column {name!r} has unknown type {ftype!r}; "
                                  f"expected one of {', '.join(ATOMIC_TYPES)}")
        if name in types:
            raise AtomicFileError(f"{source}: column {name!r} appears twice in the header")
        types[name] = ftype
    return types


def read_atomic(file: AtomicFile | str | Path, columns: Mapping[str, str | tuple[str, ...] | None] | None = None
                ) -> AtomicTable:
    """Read an atomic file, keeping `columns` (all when None).

    `columns` maps a column name to the type(s) it must have (None: any type). A required column that is
    missing, or has another type, is an error naming the file and the column; so is an empty value in a
    token column, a value that is not a finite number in a float column, or a row with the wrong number of
    fields.
    """
    if not isinstance(file, AtomicFile):
        file = AtomicFile(Path(file))
    source = file.source
    text = file.read_text()
    header, _, body = text.partition("\n")
    types = parse_header(header, source)
    wanted = list(types) if columns is None else list(columns)
    for name in wanted:
        if name not in types:
            raise AtomicFileError(f"{source}: missing column {name!r}; the header has "
                                  f"{', '.join(f'{n}:{t}' for n, t in types.items())}")
        allowed = None if columns is None else columns[name]
        if isinstance(allowed, str):
            allowed = (allowed,)
        if allowed is not None and types[name] not in allowed:
            raise AtomicFileError(f"{source}: column {name!r} has type {types[name]!r}; expected "
                                  f"{' or '.join(repr(a) for a in allowed)}")
    frame = _read_body(body, list(types), wanted, source)
    for name in wanted:
        if types[name] == "float":
            frame[name] = _to_float(frame[name], source, name)
        elif types[name] == "token":
            _check_no_empty(frame[name], source, name)
    return AtomicTable(source=source, types=types, frame=frame)


def _read_body(body: str, names: list[str], wanted: list[str], source: str) -> pd.DataFrame:
    if not body.strip():
        return pd.DataFrame({n: pd.Series([], dtype=object) for n in wanted})
    rows = body.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    # Check the field count ourselves: pandas pads short rows with NaN and its message has no file name.
    for number, row in enumerate(rows, start=2):
        count = row.count("\t") + 1
        if count != len(names):
            raise AtomicFileError(f"{source}: line {number} has {count} tab-separated fields, the header has "
                                  f"{len(names)} ({', '.join(names)})")
    frame = pd.read_csv(io.StringIO("\n".join(rows)), sep="\t", header=None, names=names, usecols=wanted,
                        dtype=str, keep_default_na=False, na_filter=False, quoting=csv.QUOTE_NONE,
                        engine="c")
    return frame[wanted].astype(object)


def _to_float(values: pd.Series, source: str, name: str) -> pd.Series:
    numbers = pd.to_numeric(values.str.strip(), errors="coerce").astype(np.float64)
    bad = ~np.isfinite(numbers.to_numpy())
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise AtomicFileError(f"{source}: column {name!r} (float), line {row + 2}: {values.iloc[row]!r} is not "
                              f"a finite number")
    return numbers


def _check_no_empty(values: pd.Series, source: str, name: str) -> None:
    empty = (values.str.strip() == "").to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise AtomicFileError(f"{source}: column {name!r} (token), line {row + 2}: empty value")


def find_atomic_files(path: str | Path, name: str | None = None) -> dict[str, AtomicFile]:
    """The atomic files of one dataset: `{"inter": ..., "item": ..., "user": ...}` (item/user when present).

    `path` is a folder, a zip archive (RecBole's hosting serves `Amazon_Beauty.zip` holding
    `Amazon_Beauty.inter` ...) or an `.inter` file. `name` picks the stem when there are several."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a folder, a .zip, an .inter or a .csv "
                                f"file)")
    if path.is_file() and path.suffix == ".csv":
        return _csv_files(path)
    if path.is_file() and path.suffix == ".inter":
        candidates = [AtomicFile(p) for p in sorted(path.parent.iterdir()) if p.is_file()]
        name = name or path.stem
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            candidates = [AtomicFile(path, m) for m in archive.namelist() if not m.endswith("/")]
    elif path.is_dir():
        candidates = [AtomicFile(p) for p in sorted(path.iterdir()) if p.is_file()]
        zips = [f.path for f in candidates if f.suffix == "zip" and zipfile.is_zipfile(f.path)]
        if not any(f.suffix == "inter" for f in candidates):
            if len(zips) == 1:
                return find_atomic_files(zips[0], name)       # a registry folder holding RecBole's zip
            if name is None and (path / "ratings.csv").is_file():
                return _csv_files(path / "ratings.csv")       # a MovieLens folder (ml-latest-small, ml-25m)
    else:
        raise AtomicFileError(f"{path}: expected a folder, a .zip archive, an .inter or a .csv file")

    def stem(f: AtomicFile) -> str:
        return Path(f.member or f.path.name).name.rsplit(".", 1)[0]

    inters = [f for f in candidates if f.suffix == "inter" and (name is None or stem(f) == name)]
    if not inters:
        what = f"{name}.inter file" if name else ".inter file (nor a ratings.csv)"
        raise AtomicFileError(f"{path}: holds no {what}")
    if len(inters) > 1:
        raise AtomicFileError(f"{path}: holds several .inter files ({', '.join(stem(f) for f in inters)}); "
                              f"name one with data.name")
    chosen = stem(inters[0])
    files = {"inter": inters[0]}
    for suffix in ("item", "user"):
        for f in candidates:
            if f.suffix == suffix and stem(f) == chosen:
                files[suffix] = f
    return files


def _csv_files(path: Path) -> dict[str, AtomicFile]:
    """A ratings CSV, with MovieLens' movies.csv beside it as the titles."""
    files = {"inter": AtomicFile(path)}
    if (path.parent / "movies.csv").is_file() and path.name != "movies.csv":
        files["item"] = AtomicFile(path.parent / "movies.csv")
    return files


#: Column names tried when the configured default name is absent from a CSV header (MovieLens ratings.csv).
CSV_ALIASES = {"user_id": ("userId", "user"), "item_id": ("movieId", "itemId", "item"), "timestamp": ("time",)}


def _csv_column(header: list[str], wanted: str, option: str, source: str) -> str:
    if wanted in header:
        return wanted
    found = [a for a in CSV_ALIASES.get(wanted, ()) if a in header]
    if found:
        return found[0]
    raise AtomicFileError(f"{source}: no column {wanted!r} (set {option}); the header has {', '.join(header)}")


def read_csv_interactions(file: AtomicFile, user_field: str = "user_id", item_field: str = "item_id",
                          time_field: str = "timestamp") -> tuple[pd.DataFrame, dict[str, str]]:
    """A comma-separated file with a header of column names (MovieLens `ratings.csv`:
    userId,movieId,rating,timestamp). Returns the frame with columns user, item, time (tokens as str, time as
    float64 seconds; ISO dates are converted) and the columns used. The default field names fall back to
    MovieLens' (`userId`, `movieId`) when absent."""
    source = file.source
    text = file.read_text()
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise AtomicFileError(f"{source}: not a CSV file with a header line: {str(e).strip()}") from None
    header = [str(c) for c in frame.columns]
    used = {"user": _csv_column(header, user_field, "data.user_field", source),
            "item": _csv_column(header, item_field, "data.item_field", source),
            "time": _csv_column(header, time_field, "data.time_field", source)}
    for key in ("user", "item"):
        _check_no_empty(frame[used[key]], source, used[key])
    raw_time = frame[used["time"]].str.strip()
    times = pd.to_numeric(raw_time, errors="coerce").astype(np.float64)
    if len(times) and np.isnan(times.to_numpy()).all():   # dates, not unix seconds
        dates = pd.to_datetime(raw_time, errors="coerce", utc=True, format="ISO8601")
        times = pd.Series((dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(), dtype=np.float64)
    bad = ~np.isfinite(times.to_numpy())
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise AtomicFileError(f"{source}: column {used['time']!r}, line {row + 2}: {raw_time.iloc[row]!r} is not a "
                              f"unix time in seconds or an ISO date")
    out = pd.DataFrame({"user": frame[used["user"]].astype(object), "item": frame[used["item"]].astype(object),
                        "time": times.to_numpy()})
    return out, used


# --------------------------------------------------------------------------------------------------
# filtering and sequences

def kcore_filter(users: np.ndarray, items: np.ndarray, user_min: int = 0, item_min: int = 0) -> np.ndarray:
    """Boolean mask of the interactions that survive k-core filtering.

    Each round bans every user with fewer than `user_min` and every item with fewer than `item_min`
    remaining interactions (both judged on the same counts, as RecBole), drops their interactions, and
    repeats until a round bans nobody: the result is the largest subset in which every user and item
    meets its minimum.
    """
    keep = np.ones(len(users), dtype=bool)
    if user_min <= 1 and item_min <= 1:
        return keep
    user_codes, user_index = np.unique(users, return_inverse=True)
    item_codes, item_index = np.unique(items, return_inverse=True)
    while True:
        user_counts = np.bincount(user_index[keep], minlength=len(user_codes))
        item_counts = np.bincount(item_index[keep], minlength=len(item_codes))
        ban = keep & ((user_counts[user_index] < user_min) | (item_counts[item_index] < item_min))
        if not ban.any():
            return keep
        keep &= ~ban


@dataclass
class SequenceData:
    """Every user's chronological interactions, stored flat (CSR).

    User u (0-based) owns positions `offsets[u]:offsets[u + 1]` of `items` (ids 1..n_items, 0 is padding) and
    `times` (float64 seconds). `item_tokens[i]` is item i's original token (`item_tokens[0] == "[PAD]"`);
    `item_titles` maps item id -> title when an `.item` file with a title column was read. `removed_items`:
    tokens of the file that k-core filtering removed; `fingerprint`: see `fingerprint()`.
    """
    name: str
    item_tokens: np.ndarray
    user_tokens: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    times: np.ndarray
    item_titles: dict[int, str] | None = None
    stats: dict = field(default_factory=dict)
    removed_items: tuple[str, ...] = ()
    fingerprint: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        """Number of item ids including padding (the size of the scoring layer)."""
        return len(self.item_tokens)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    def token_to_id(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self.item_tokens) if i > 0}

    def tie_share(self) -> float:
        """Share of a user's consecutive interactions (as ordered) that have equal timestamps."""
        same_user = np.ones(max(len(self.items) - 1, 0), dtype=bool)
        same_user[self.offsets[1:-1] - 1] = False
        pairs = int(same_user.sum())
        if pairs == 0:
            return 0.0
        return float((same_user & (self.times[1:] == self.times[:-1])).sum()) / pairs

    def vocabulary(self) -> "Vocabulary":
        titles = None
        if self.item_titles:
            titles = tuple(self.item_titles.get(i) for i in range(1, self.n_items))
        return Vocabulary(item_tokens=tuple(str(t) for t in self.item_tokens[1:]), titles=titles,
                          removed_items=tuple(self.removed_items), fingerprint=dict(self.fingerprint))


@dataclass(frozen=True)
class Vocabulary:
    """What a trained model needs besides its weights: item tokens (id i is `item_tokens[i - 1]`, 0 is
    padding), their titles, the tokens k-core filtering removed (to say so when one is asked for), and the
    fingerprint of the interactions it was trained on. Saved as JSON inside the model (`models.attach_vocabulary`),
    so it travels with every checkpoint."""
    item_tokens: tuple[str, ...]
    titles: tuple[str | None, ...] | None = None
    removed_items: tuple[str, ...] = ()
    fingerprint: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": 1, "item_tokens": list(self.item_tokens),
                           "titles": None if self.titles is None else list(self.titles),
                           "removed_items": list(self.removed_items), "fingerprint": self.fingerprint},
                          sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str = "vocabulary") -> "Vocabulary":
        try:
            raw = json.loads(text)
            return cls(item_tokens=tuple(raw["item_tokens"]),
                       titles=None if raw["titles"] is None else tuple(raw["titles"]),
                       removed_items=tuple(raw["removed_items"]), fingerprint=dict(raw["fingerprint"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{source}: the stored item vocabulary is unreadable ({e})") from None

    def token_to_id(self) -> dict[str, int]:
        return {tok: i + 1 for i, tok in enumerate(self.item_tokens)}

    def title(self, item_id: int) -> str | None:
        return None if self.titles is None else self.titles[item_id - 1]

    @property
    def n_items(self) -> int:
        """Item ids including padding."""
        return len(self.item_tokens) + 1


def fingerprint(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> dict:
    """What identifies a set of interactions: row, user and item counts; `interactions`, a sha256 over the
    sorted per-row hashes of (user, item, exact time), the same for any row order; `row_order`, the same
    hashes in file order (it matters only with tie_break "file")."""
    frame = pd.DataFrame({"user": np.asarray(users, dtype=object), "item": np.asarray(items, dtype=object),
                          "time": np.asarray(times, dtype=np.float64)})
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return {"rows": int(len(rows)), "users": int(frame["user"].nunique()), "items": int(frame["item"].nunique()),
            "interactions": hashlib.sha256(np.sort(rows).tobytes()).hexdigest(),
            "row_order": hashlib.sha256(rows.tobytes()).hexdigest()}


def check_fingerprint(expected: dict, actual: dict, source: str, tie_break: str) -> None:
    """A clear error unless `actual` (the data file) is the data the model was trained on."""
    if expected.get("interactions") != actual["interactions"]:
        raise AtomicFileError(
            f"{source}: not the data this model was trained on ({actual['rows']} interactions, {actual['users']} "
            f"users, {actual['items']} items; training had {expected.get('rows')}, {expected.get('users')}, "
            f"{expected.get('items')}; interaction fingerprint {actual['interactions'][:12]} vs "
            f"{str(expected.get('interactions'))[:12]}). The model's item ids belong to its training data: "
            f"evaluate on that file, or train on this one")
    if tie_break == "file" and expected.get("row_order") != actual["row_order"]:
        raise AtomicFileError(
            f"{source}: the same interactions as the training data, but in another row order; with "
            f"data.tie_break=file the row order decides the order of equal timestamps, so the sequences (and the "
            f"results) would differ. Use the file in its original order (tie_break=hash does not depend on it)")


def _tie_hash(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random uint64 per (user, item): pandas' SipHash with its fixed default key."""
    frame = pd.DataFrame({"user": users, "item": items})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def build_sequences(users: np.ndarray, items: np.ndarray, times: np.ndarray, name: str = "data",
                    time_precision: str = "float64", tie_break: str = "hash",
                    vocabulary: Vocabulary | None = None) -> SequenceData:
    """Remap tokens and order each user's interactions by time (inputs: the filtered interactions in file
    order; tokens as str, times as float64). See the module docstring for `time_precision` and `tie_break`.
    With a `vocabulary` (a trained model's), item ids are its ids; an item it does not know is an error."""
    if time_precision not in ("float32", "float64"):
        raise ValueError(f"time_precision must be 'float32' or 'float64', got {time_precision!r}")
    if tie_break not in ("hash", "file"):
        raise ValueError(f"tie_break must be 'hash' or 'file', got {tie_break!r}")
    users = np.asarray(users, dtype=object)
    items = np.asarray(items, dtype=object)
    times = np.asarray(times, dtype=np.float64)
    if time_precision == "float32":
        times = times.astype(np.float32).astype(np.float64)
    # The canonical order of all interactions: by time, ties by file position or by the (user, item) hash.
    second = np.arange(len(items)) if tie_break == "file" else _tie_hash(users, items)
    canonical = np.lexsort((second, times))
    first_seen = np.arange(len(items)) if tie_break == "file" else canonical
    if vocabulary is not None:
        item_uniques, item_ids = np.asarray(vocabulary.item_tokens, dtype=object), _lookup(items, vocabulary)
    else:
        item_ids, item_uniques = _factorize_in_order(items, first_seen)
    user_ids, user_uniques = _factorize_in_order(users, first_seen)
    item_ids = np.asarray(item_ids, dtype=np.int64) + 1
    order = canonical[np.argsort(user_ids[canonical], kind="stable")]   # per user, in canonical order
    counts = np.bincount(user_ids, minlength=len(user_uniques))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SequenceData(
        name=name,
        item_tokens=np.array([PAD_TOKEN] + [str(t) for t in item_uniques], dtype=object),
        user_tokens=np.array([str(t) for t in user_uniques], dtype=object),
        offsets=offsets,
        items=item_ids[order],
        times=times[order],
    )


def _factorize_in_order(tokens: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based codes of `tokens` numbered by first appearance when visited in `order`, and the uniques."""
    codes, uniques = pd.factorize(tokens[order])
    out = np.empty(len(tokens), dtype=np.int64)
    out[order] = codes
    return out, uniques


def _lookup(items: np.ndarray, vocabulary: Vocabulary) -> np.ndarray:
    """0-based positions of `items` in the vocabulary (ids - 1)."""
    index = pd.Index(vocabulary.item_tokens)
    pos = index.get_indexer(items)
    if (pos < 0).any():
        unknown = sorted(set(items[pos < 0].tolist()))
        raise AtomicFileError(f"{len(unknown)} item(s) after filtering are not in the model's vocabulary (e.g. "
                              f"{', '.join(map(repr, unknown[:5]))}): the data.* filtering options differ from "
                              f"training, or this is other data")
    missing = len(vocabulary.item_tokens) - len(np.unique(pos))
    if missing:
        raise AtomicFileError(f"{missing} of the model's {len(vocabulary.item_tokens)} items are not in the data "
                              f"after filtering: the data.* filtering options differ from training")
    return pos


def load_sequence_data(path: str | Path, name: str | None = None, *, user_field: str = "user_id",
                       item_field: str = "item_id", time_field: str = "timestamp", user_min: int = 0,
                       item_min: int = 0, title_field: str | None = "auto", time_precision: str = "float64",
                       tie_break: str = "hash", vocabulary: Vocabulary | None = None) -> SequenceData:
    """Read a dataset (folder, RecBole zip, .inter or ratings .csv file), k-core filter it and build the
    sequences. With a `vocabulary` (a trained model's) the file must hold the interactions it was trained
    on (`check_fingerprint`) and ids are the vocabulary's.

    `title_field`: the `.item` column shown as the item's title ("auto": the first of movie_title, title,
    name that exists; None: no titles)."""
    files = find_atomic_files(path, name)
    source = files["inter"].source
    if files["inter"].suffix == "csv":
        frame, used = read_csv_interactions(files["inter"], user_field, item_field, time_field)
        item_field = used["item"]                 # the titles file (movies.csv) names it the same way
        users, items, times = (frame[c].to_numpy(dtype=t) for c, t in (("user", object), ("item", object),
                                                                        ("time", np.float64)))
    else:
        inter = read_atomic(files["inter"], {user_field: "token", item_field: "token", time_field: "float"})
        users = inter.frame[user_field].to_numpy(dtype=object)
        items = inter.frame[item_field].to_numpy(dtype=object)
        times = inter.frame[time_field].to_numpy(dtype=np.float64)
    if len(users) == 0:
        raise AtomicFileError(f"{source}: holds no interactions (a header and no data rows)")
    print_ = fingerprint(users, items, times)
    if vocabulary is not None:
        check_fingerprint(vocabulary.fingerprint, print_, source, tie_break)
    keep = kcore_filter(users, items, user_min, item_min)
    if not keep.any():
        raise AtomicFileError(
            f"{source}: no interactions remain after k-core filtering (users with >= {user_min} and items "
            f"with >= {item_min} interactions); it had {len(users)} interactions, {len(set(users))} users and "
            f"{len(set(items))} items. Lower data.user_min_interactions / data.item_min_interactions")
    stem = Path(files["inter"].member or files["inter"].path.name).name.rsplit(".", 1)[0]
    try:
        data = build_sequences(users[keep], items[keep], times[keep], name=stem, time_precision=time_precision,
                               tie_break=tie_break, vocabulary=vocabulary)
    except AtomicFileError as e:
        raise AtomicFileError(f"{source}: {e}") from None
    data.fingerprint = print_
    data.removed_items = tuple(sorted(set(items.tolist()) - set(items[keep].tolist())))
    data.stats = {"raw_interactions": int(len(users)), "raw_users": int(len(set(users))),
                  "raw_items": int(len(set(items))), "interactions": data.n_interactions,
                  "users": data.n_users, "items": data.n_items - 1, "tie_share": data.tie_share()}
    if data.stats["tie_share"] > TIE_WARN_SHARE:
        warnings.warn(f"{source}: {data.stats['tie_share']:.0%} of a user's consecutive interactions have equal "
                      f"timestamps (time_precision={time_precision}); their order is set by "
                      f"tie_break={tie_break}, not by the data", TieWarning, stacklevel=2)
    if "item" in files and title_field is not None:
        data.item_titles = _read_titles(files["item"], item_field, title_field, data)
    return data


class TieWarning(UserWarning):
    """Many interactions share a timestamp, so their order is the tie-break's, not the data's."""


def _read_titles(file: AtomicFile, item_field: str, title_field: str, data: SequenceData) -> dict[int, str] | None:
    if file.suffix == "csv":      # MovieLens movies.csv: movieId,title,genres
        frame = pd.read_csv(io.StringIO(file.read_text()), dtype=str, keep_default_na=False)
        column = "title" if title_field == "auto" else title_field
        if item_field not in frame.columns or column not in frame.columns:
            return None                             # a movies.csv of another layout: no titles
        pairs = zip(frame[item_field], frame[column])
    else:
        table_types = parse_header(file.read_text().partition("\n")[0], file.source)
        if title_field == "auto":
            title_field = next((c for c in ("movie_title", "title", "name") if c in table_types), None)
            if title_field is None:
                return None
        table = read_atomic(file, {item_field: "token", title_field: ("token", "token_seq")})
        pairs = zip(table.frame[item_field], table.frame[title_field])
    lookup = data.token_to_id()
    titles = {}
    for token, title in pairs:
        item_id = lookup.get(str(token))
        if item_id is not None:
            titles[item_id] = str(title)
    return titles


# --------------------------------------------------------------------------------------------------
# leave-one-out split

@dataclass
class ExampleIndex:
    """Examples as two int64 arrays: `target[i]` is the flat position of the item to predict and `start[i]` the
    flat position where its user's history starts (so the full history is items[start:target])."""
    start: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class LOOSplit:
    train: ExampleIndex
    val: ExampleIndex
    test: ExampleIndex


def leave_one_out(data: SequenceData) -> LOOSplit:
    """RecBole's `LS: valid_and_test` split of the augmented prefixes (see the module docstring)."""
    starts = data.offsets[:-1]
    lengths = np.diff(data.offsets)
    n_examples = np.maximum(lengths - 1, 0)               # every interaction but the first is a target
    held_out = np.minimum(2, np.maximum(n_examples - 1, 0))  # RecBole: min(2, examples - 1)
    last = data.offsets[1:] - 1
    has_test = held_out >= 1
    has_val = held_out >= 2
    test = ExampleIndex(starts[has_test], last[has_test])
    val = ExampleIndex(starts[has_val], last[has_val] - 1)
    n_train = n_examples - held_out
    train_users = np.repeat(np.arange(data.n_users), n_train)
    first_target = starts + 1
    run_start = np.repeat(np.cumsum(n_train) - n_train, n_train)
    train_target = first_target[train_users] + (np.arange(len(train_users)) - run_start)
    train = ExampleIndex(starts[train_users], train_target.astype(np.int64))
    return LOOSplit(train=train, val=val, test=test)


def interaction_counts(data: SequenceData, split: LOOSplit) -> np.ndarray:
    """Per item id, how often it occurs in the training part (every interaction except the validation and
    test targets): the most-popular baseline's scores. Index 0 (padding) is 0."""
    held = np.zeros(data.n_interactions, dtype=bool)
    held[split.val.target] = True
    held[split.test.target] = True
    return np.bincount(data.items[~held], minlength=data.n_items).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# batches

class ExampleDataset(Dataset):
    """Yields `(history_start, target_pos)` pairs; `SequenceCollator` turns a list of them into a batch in one
    vectorised step (so one collate function serves every split)."""

    def __init__(self, examples: ExampleIndex):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(self.examples.start[i]), int(self.examples.target[i])


class SequenceCollator:
    """Builds batches: `collate([(start, target), ...])` -> dict of tensors.

    item_seq (b, T) int64: the last min(history, max_len) items before the target, left-aligned and
    right-padded with 0; item_seq_len (b,); target (b,); history_start / target_pos (b,): flat positions
    for masking the full history; time_seq (b, T) float64 when `with_time`. T is `max_len` when
    `fixed_length` (models tied to the length, TiM4Rec) and the longest input of the batch otherwise
    (every other model reads only positions < length and is causal, so the result is the same).
    """

    def __init__(self, data: SequenceData, max_len: int, *, with_time: bool = False, fixed_length: bool = False):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.items = torch.from_numpy(data.items)
        self.times = torch.from_numpy(data.times)
        self.max_len = max_len
        self.with_time = with_time
        self.fixed_length = fixed_length

    def __call__(self, pairs: Iterable[tuple[int, int]]) -> dict[str, torch.Tensor]:
        pairs = torch.as_tensor(list(pairs), dtype=torch.long).view(-1, 2)
        start, target = pairs[:, 0], pairs[:, 1]
        length = torch.clamp(target - start, max=self.max_len)
        if len(length) and int(length.min()) < 1:
            raise ValueError("SequenceCollator: an example has an empty history (target_pos == history_start)")
        width = self.max_len if self.fixed_length else max(int(length.max()) if len(length) else 1, 1)
        offsets = torch.arange(width)
        pos = (target - length).unsqueeze(1) + offsets
        valid = offsets.unsqueeze(0) < length.unsqueeze(1)
        pos = torch.where(valid, pos, torch.zeros_like(pos))
        batch = {
            "item_seq": torch.where(valid, self.items[pos], torch.zeros_like(pos)),
            "item_seq_len": length,
            "target": self.items[target],
            "history_start": start,
            "target_pos": target,
        }
        if self.with_time:
            batch["time_seq"] = torch.where(valid, self.times[pos], torch.zeros((), dtype=self.times.dtype))
        return batch

    def batch(self, examples: ExampleIndex, indices: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """The batch of `examples[indices]` (all of them when None)."""
        dataset = ExampleDataset(examples)
        indices = range(len(dataset)) if indices is None else indices
        return self([dataset[i] for i in indices])


def make_batch(item_ids: list[int], times: list[float] | None, max_len: int, fixed_length: bool) -> dict[str, torch.Tensor]:
    """One inference batch from a user's history (ids already remapped; the last `max_len` are kept)."""
    item_ids = list(item_ids)[-max_len:]
    width = max_len if fixed_length else len(item_ids)
    seq = torch.zeros(1, width, dtype=torch.long)
    seq[0, :len(item_ids)] = torch.tensor(item_ids, dtype=torch.long)
    batch = {"item_seq": seq, "item_seq_len": torch.tensor([len(item_ids)])}
    if times is not None:
        times = list(times)[-max_len:]
        t = torch.zeros(1, width, dtype=torch.float64)
        t[0, :len(times)] = torch.tensor(times, dtype=torch.float64)
        batch["time_seq"] = t
    return batch
