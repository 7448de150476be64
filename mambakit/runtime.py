"""Process-wide settings that change how fast the same code runs, recorded next to benchmark numbers.

Both decide how often a step pays for fresh memory. A buffer the kernel has not handed out yet is faulted in
4 KiB at a time when it is first written (a fresh 800 MB tensor: 0.33 s to write, 0.07 s into a buffer
already mapped). glibc's malloc maps fresh memory for every block above its mmap threshold (128 KiB, raised
on the fly to the size of the last such block freed) and gives the top of its heap back to the kernel as
soon as more than twice that is free, so a loop that frees and reallocates the same activations every step
keeps paying: a Vim-Ti forward at 1024 px took about 280,000 page faults.

The `mambakit` command applies both settings before anything else (and the vision / MIL benchmark scripts
do the same for every model they time, so peers get them too):

- malloc (`configure_malloc` -> `tune_malloc`; MAMBAKIT_MALLOC=default opts out): blocks up to 32 MiB
  (glibc's ceiling for the threshold) come from the heap and freed memory stays in it (trim threshold
  2 GiB), so a training loop reuses its pages after a few steps. Vim-Ti forward at 1024 px: 9 page faults
  instead of ~280,000, 1.6-1.8 s instead of 2.4 s in the same minutes. The heap keeps what a step freed, so
  the resident size stays at the step's peak between steps. Larger blocks are still mapped per use. Only
  glibc has these knobs; elsewhere this is a no-op. Python code using mambakit as a library can call
  `tune_malloc()`: it is a property of the process, so importing mambakit does not do it.
- huge pages (`prefer_huge_pages`: THP_MEM_ALLOC_ENABLE=1 unless the environment sets it): torch backs
  buffers of 2 MiB and more with transparent huge pages (it reads the variable once, at its first CPU
  allocation, so it must be in the environment before that). Blocks above 32 MiB are still mapped per use,
  and with huge pages they are faulted in 2 MiB at a time: whole-slide bags (MambaMIL or TransMIL, 100k
  patches, forward+backward) ran about 25% faster. Without the malloc tuning, huge pages made Vim-Ti at
  1024 px 5-20% slower (every 5-15 MB buffer was a fresh mapping to fill with huge pages); with it they
  cost nothing measurable there (forward 2.29 / 2.16 / 1.76 s with, 2.49 / 2.37 / 1.80 s without,
  alternated).
- MAMBAKIT_MALLOC=heap (opt-in): "tuned", and no block is mapped per use at all (glibc's M_MMAP_MAX = 0), so
  the buffers above 32 MiB that large batches at high resolution allocate every step (200-400 MB activations
  of an EfficientVMamba-T batch of 8 at 1024 px) are reused from the heap too. EfficientVMamba-T forward,
  batch 8, 1024 px: 2.8 s instead of 4.1-4.4 s (most of the difference was page faults in silu, LayerNorm and
  the lattice gather); ResNet-18 3.6 instead of 4.7-4.8 s. The price is memory: what a step frees stays
  resident and fragments (that forward's maximum resident size 3.9 instead of 2.8 GB), so it is not the
  default.

OpenMP waiting (`configure_openmp`: GOMP_SPINCOUNT=10000 unless the environment sets OMP_WAIT_POLICY or
GOMP_SPINCOUNT): torch runs its ops, MKL and oneDNN, and the fused scan kernel (kernels/cpu_scan.py) on one
OpenMP pool, libgomp's. As shipped, an idle thread of that pool spins 300,000 rounds (about 4 ms on the
2-core Xeon of benchmarks/README.md, up to ~15 ms where `pause` is slow) before it sleeps, after every
parallel region and at every barrier. On an idle machine that is free; next to other jobs it takes the
cores they need, and a thread spinning at a barrier holds a core while the thread it waits for waits for
one: the demo models (100-250 short parallel regions per training step) ran 47-80x slower next to four
2-thread jobs instead of ~5x (benchmarks/load.py, "Training under a competing load"). 10,000 rounds (~0.13
ms here) still bridge the gaps between consecutive ops of a step, so the quiet case keeps its speed (within
about 5% on every workload measured), while next to four 2-thread jobs it is 5-6x faster than as shipped.
Shorter spins (GOMP_SPINCOUNT=1000, or OMP_WAIT_POLICY=passive) are faster still when the machine is known
to be shared (up to 2x more at 4 competing jobs) and 10-25% slower when it is quiet. libgomp reads the variable once,
when torch loads it, so the command sets it before anything imports torch; processes it starts (DataLoader
workers, torchrun ranks) inherit it.

Threads (`configure_threads`, MAMBAKIT_THREADS=auto by default): even with short spins, a 2-thread step next
to four other 2-thread jobs took 12-18x its quiet time instead of the fair ~5x. Each op of a step is a
parallel region whose threads wait for each other at its end; on cores that other jobs keep busy, one of the
two is usually waiting in the run queue, so every region costs a scheduling round rather than its work. So
the command measures, as it starts, how busy other processes keep each of its cores over 0.1 s (/proc/stat;
niced work counts as idle) and uses the cores they leave free, at least one: every core on a quiet machine
(as before), one thread on a busy one. A run records its count (summary.json,
checkpoints) and a resumed run goes on with it; results change in the last bits with the count (torch's
reductions and GEMMs split work by thread), so the command says when it uses fewer than every core.
MAMBAKIT_THREADS=N fixes the count, "keep" leaves torch's choice, and OMP_NUM_THREADS (the user's, or
torchrun's for several ranks) always wins.

Measurements and commands: benchmarks/README.md. The benchmark scripts print both settings with their tables
(`huge_pages_note`, `malloc_note`).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["huge_pages_note", "HUGE_PAGES_ENV", "prefer_huge_pages", "tune_malloc", "configure_malloc",
           "malloc_note", "MALLOC_ENV", "MALLOC_MODES", "configure_openmp", "openmp_note", "OPENMP_ENV",
           "SPIN_COUNT", "openmp_loaded", "THREADS_ENV", "configure_threads", "restore_threads", "threads_for",
           "busy_cores", "usable_cores"]

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
MALLOC_ENV = "MAMBAKIT_MALLOC"
MALLOC_MODES = ("tuned", "heap", "default")
MMAP_THRESHOLD = 32 << 20              # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1         # mallopt takes a C int
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MALLOC_STATE = {"mode": "default"}    # what this process did: "tuned", "heap", "default" or "unavailable"


def prefer_huge_pages() -> str:
    """Ask torch for huge pages (THP_MEM_ALLOC_ENABLE=1) unless the environment already says either way.
    It only takes effect before torch's first CPU allocation in this process, and in the processes it starts
    (which inherit the variable). Returns the value in effect."""
    return os.environ.setdefault(HUGE_PAGES_ENV, "1")


def huge_pages_note() -> str:
    """One line for a benchmark's machine description: the setting and the kernel's THP mode."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        mode = "unknown"
    return f"{HUGE_PAGES_ENV}={os.environ.get(HUGE_PAGES_ENV, 'unset')} (kernel THP mode: {mode})"


def _glibc():
    """The C library when it is glibc (it has gnu_get_libc_version and mallopt), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt        # noqa: B018 - AttributeError where absent
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def tune_malloc(heap_only: bool = False) -> bool:
    """Make glibc serve blocks up to 32 MiB (with heap_only: all blocks) from its heap and keep freed memory
    (see the module docstring). Returns False (and changes nothing) where the C library is not glibc or
    refuses a value."""
    libc = _glibc()
    if libc is None:
        _MALLOC_STATE["mode"] = "unavailable"
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                               TRIM_THRESHOLD) == 1
    if ok and heap_only:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    _MALLOC_STATE["mode"] = ("heap" if heap_only else "tuned") if ok else "unavailable"
    return ok


def configure_malloc(mode: str | None = None) -> str:
    """Apply MAMBAKIT_MALLOC (or `mode`): "tuned" (the default) calls `tune_malloc`, "heap" calls it with
    heap_only, "default" leaves glibc's own behaviour. Returns what is in effect: "tuned", "heap", "default"
    or "unavailable"."""
    mode = (mode or os.environ.get(MALLOC_ENV, "") or "tuned").strip().lower()
    if mode not in MALLOC_MODES:
        raise ValueError(f"{MALLOC_ENV}={mode!r}: expected one of {MALLOC_MODES}")
    if mode in ("tuned", "heap"):
        tune_malloc(heap_only=mode == "heap")
    return _MALLOC_STATE["mode"]


def malloc_note() -> str:
    """One line for a benchmark's machine description: what this process did to malloc."""
    mode = _MALLOC_STATE["mode"]
    if mode == "tuned":
        return (f"malloc tuned (glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold 2 GiB; "
                f"{MALLOC_ENV}=default to opt out)")
    if mode == "heap":
        return (f"malloc heap-only ({MALLOC_ENV}=heap: no block mapped per use, trim threshold 2 GiB)")
    if mode == "unavailable":
        return "malloc as the C library does it (not glibc, nothing to tune)"
    return f"malloc as glibc does it ({MALLOC_ENV}=default)"


# ------------------------------------------------------------------------------------------------------
# OpenMP: how long torch's idle threads spin

OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = 10000                     # rounds of ~13 ns here (Xeon, KVM): ~0.13 ms, then sleep
_OPENMP_STATE = {"set": False, "late": False}


def openmp_loaded() -> bool:
    """Whether an OpenMP runtime (libgomp, libiomp, libomp) is already mapped into this process: it read its
    environment when it was loaded (with torch), so a variable set now reaches only the processes this one
    starts. Without /proc (not Linux): whether torch has been imported."""
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f for name in ("libgomp", "libiomp", "libomp."))
    except OSError:
        return "torch" in sys.modules


def configure_openmp() -> dict:
    """GOMP_SPINCOUNT=SPIN_COUNT unless the environment sets OMP_WAIT_POLICY or GOMP_SPINCOUNT itself. Must
    run before torch is imported (see the module docstring); returns the two variables as they now are."""
    if not any(os.environ.get(name, "").strip() for name in OPENMP_ENV):
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        _OPENMP_STATE["set"] = True
        _OPENMP_STATE["late"] = openmp_loaded()
    return {name: os.environ.get(name) for name in OPENMP_ENV}


def openmp_note() -> str:
    """One line for a benchmark's machine description: the OpenMP waiting torch's threads do here."""
    values = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in OPENMP_ENV)
    if _OPENMP_STATE["set"]:
        who = "set by mambakit" + (" after the OpenMP runtime was loaded: it reaches child processes only"
                                   if _OPENMP_STATE["late"] else "")
    elif any(os.environ.get(name, "").strip() for name in OPENMP_ENV):
        who = "from the environment"
    else:
        who = "torch's OpenMP as shipped: idle threads spin 300,000 rounds"
    return f"{values} ({who})"


# ------------------------------------------------------------------------------------------------------
# threads: how many to use when the machine is shared

THREADS_ENV = "MAMBAKIT_THREADS"
_THREADS_STATE: dict = {"mode": "untouched", "threads": None, "busy": None, "cores": None}


def _affinity() -> set | None:
    """The cores this process may run on, where the platform says (Linux)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return None


def usable_cores() -> int:
    mine = _affinity()
    return len(mine) if mine else (os.cpu_count() or 1)


def _cpu_ticks() -> dict | None:
    """{cpu: (busy ticks, all ticks)} since boot for the cores this process may use, from /proc/stat (None
    without it). Busy: user, system, irq, softirq, steal. Niced work counts as idle (it yields to a normal
    job: a nice-19 thread gets ~1.5% of a core beside one), and so does iowait."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mine = _affinity()
    ticks = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        cpu = int(name[3:])
        if mine is not None and cpu not in mine:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = ([int(x) for x in fields[:8]] + [0] * 8)[:8]
        ticks[cpu] = (user + system + irq + softirq + steal, user + nice + system + idle + iowait + irq + softirq + steal)
    return ticks or None


def busy_cores(interval_s: float = 0.1, read=_cpu_ticks) -> float | None:
    """How many of this process's cores other processes keep busy: each core's busy share over `interval_s`,
    summed (this process sleeps meanwhile, so it does not count itself); None where it cannot be measured.
    Per core rather than the load average, which lags by a minute (jobs started together would all see an
    idle machine) and, in a container, counts the whole host."""
    import time

    before = read()
    if before is None:
        return None
    time.sleep(interval_s)
    after = read()
    if after is None:
        return None
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        if t1 > t0:
            busy += min(max((b1 - b0) / (t1 - t0), 0.0), 1.0)
    return busy


def threads_for(cores: int, busy: float | None) -> int:
    """The thread count for a job on `cores` cores of which other processes keep `busy` busy: the cores they
    leave free, at least one (unknown: every core). A fork-join job (each op a parallel region whose threads
    wait for each other at its end) with a thread on a core that another job holds waits for a scheduling
    round at each of its 100-250 regions per step; a thread per free core never does."""
    import math

    if busy is None:
        return max(cores, 1)
    return max(1, min(cores, cores - math.floor(busy + 0.5)))


def configure_threads(log=None) -> dict:
    """Pick torch's thread count for this process (MAMBAKIT_THREADS): "auto" (the default) uses every usable
    core on a quiet machine and one thread where other processes already keep the cores busy; a number sets
    it; "keep" leaves torch's own choice. OMP_NUM_THREADS in the environment (the user's, or torchrun's for
    several ranks) always wins. Before torch is imported it sets OMP_NUM_THREADS (which the processes this one
    starts inherit), after it torch.set_num_threads. Results change in the last bits with the thread count, so
    the count is printed when it is not every core, recorded in each run (summary.json, checkpoints), and a
    resumed run continues with the count it started with (`restore_threads`)."""
    value = os.environ.get(THREADS_ENV, "").strip().lower() or "auto"
    cores = usable_cores()
    state = {"mode": value, "threads": None, "busy": None, "cores": cores}
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        state["mode"] = "environment"
    elif value == "keep":
        pass
    elif value == "auto":
        state["busy"] = busy_cores()
        n = threads_for(cores, state["busy"])
        if n < cores:
            _set_threads(n)
            state["threads"] = n
            if log is not None:
                log(f"mambakit: other processes keep {state['busy']:.1f} of {cores} core(s) busy: running with "
                    f"{n} thread(s), which keeps its share of a busy machine ({THREADS_ENV}={cores} to use every "
                    f"core; results differ in the last bits with the thread count)")
    else:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: expected 'auto', 'keep' or a thread count >= 1")
        _set_threads(n)
        state["mode"], state["threads"] = "fixed", n
    _THREADS_STATE.update(state)
    return dict(state)


def _set_threads(n: int) -> None:
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)


def restore_threads(recorded: int | None) -> str | None:
    """A resumed run: continue with the thread count its checkpoint recorded, when this process chose its count
    automatically (an explicit MAMBAKIT_THREADS / OMP_NUM_THREADS is the user's decision and stays). Returns a
    note for the run's log when it changed anything."""
    import torch

    if not recorded or _THREADS_STATE["mode"] != "auto" or recorded == torch.get_num_threads():
        return None
    current = torch.get_num_threads()
    torch.set_num_threads(int(recorded))
    return (f"resumed with the {recorded} thread(s) the run started with (this machine's state would give "
            f"{current}): a resumed run repeats the uninterrupted one")

