"""Process-wide settings that change how fast the same code runs, recorded next to benchmark numbers.

torch's CPU allocator backs buffers of 2 MiB and more with transparent huge pages when the environment has
THP_MEM_ALLOC_ENABLE=1 at the time torch is imported (c10 reads it once, at its first allocation). Whether
that helps depends on the workload, measured on this project's 2-core machine (kernel THP mode "madvise"):

- whole-slide bags (MambaMIL or TransMIL, 100k patches, forward+backward): about 25% faster. Each step
  writes several fresh tensors of hundreds of MB, which are otherwise faulted in 4 KiB at a time (a fresh
  800 MB tensor: 0.33 s to write, 0.10 s with huge pages);
- Vim-Ti at 1024 px: 5-20% slower (many 5-15 MB buffers, freed and reused: no fault cost to save, and the
  kernel compacts memory to find huge pages).

So it is left to the user (`export THP_MEM_ALLOC_ENABLE=1` before starting Python or `mambakit`); the
benchmark scripts print the setting with their tables (`huge_pages_note`).
"""

from __future__ import annotations

import os

__all__ = ["huge_pages_note", "HUGE_PAGES_ENV"]

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def huge_pages_note() -> str:
    """One line for a benchmark's machine description: the setting and the kernel's THP mode."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        mode = "unknown"
    return f"{HUGE_PAGES_ENV}={os.environ.get(HUGE_PAGES_ENV, 'unset')} (kernel THP mode: {mode})"
