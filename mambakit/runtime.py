"""Process-wide settings that must be made before torch is imported.

`use_huge_pages()` asks torch's CPU allocator to back every buffer of 2 MiB or more with transparent huge
pages (c10 reads `THP_MEM_ALLOC_ENABLE` once, at torch's first allocation, then aligns such buffers to a
page and madvises them MADV_HUGEPAGE). A fresh buffer is otherwise faulted in 4 KiB at a time: on a 2-core
machine whose kernel runs THP in "madvise" mode, writing a new 800 MB activation took 0.33 s that way and
0.10 s with huge pages, and a whole MambaMIL or TransMIL step on a 100k-patch bag ran 26% faster (see
benchmarks/README.md). Where the kernel's THP mode is "always" it changes nothing, and with "never" the
advice is ignored.

The `mambakit` command and the benchmark scripts call it first. A program that imports torch itself can
get the same by exporting THP_MEM_ALLOC_ENABLE=1 before starting Python, or by calling this before its
first `import torch`. An explicit THP_MEM_ALLOC_ENABLE=0 in the environment is respected.
"""

from __future__ import annotations

import os
import sys

__all__ = ["use_huge_pages", "huge_pages_note", "HUGE_PAGES_ENV"]

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Turn torch's huge-page allocations on unless the environment already says otherwise (children
    started later inherit the setting). Returns False when torch was imported first: then it is too late
    for this process, and nothing is changed."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return os.environ[HUGE_PAGES_ENV] == "1"


def huge_pages_note() -> str:
    """One line for a benchmark's machine description: the setting and the kernel's THP mode."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        mode = "unknown"
    return f"{HUGE_PAGES_ENV}={os.environ.get(HUGE_PAGES_ENV, 'unset')} (kernel THP mode: {mode})"
