"""mambakit.runtime: the malloc tuning the `mambakit` command applies, and the lines benchmarks print about
it and about torch's huge-page allocations."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("value", ["1", "0"])
def test_huge_pages_note_names_the_setting_and_the_kernel_mode(value, monkeypatch):
    from mambakit.runtime import huge_pages_note

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", value)
    note = huge_pages_note()
    assert note.startswith(f"THP_MEM_ALLOC_ENABLE={value} (kernel THP mode: ") and note.endswith(")")


def test_huge_pages_note_without_the_variable(monkeypatch):
    from mambakit.runtime import huge_pages_note

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert huge_pages_note().startswith("THP_MEM_ALLOC_ENABLE=unset")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's huge-page path is Linux only")
def test_the_variable_reaches_torchs_allocator_only_before_import():
    """What the READMEs tell users: exported before Python starts, torch page-aligns (and advises) big
    buffers; glibc's own mmap'd blocks are not page-aligned."""
    code = "import torch; print(torch.empty(8 << 20).data_ptr() % 4096)"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={"THP_MEM_ALLOC_ENABLE": "1", "PATH": "/usr/bin:/bin"})
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout.split() == ["0"] and off.stdout.split() != ["0"]


_GLIBC = sys.platform.startswith("linux") and subprocess.run(
    [sys.executable, "-c", "import ctypes; ctypes.CDLL(None).gnu_get_libc_version"],
    capture_output=True).returncode == 0

# A loop that allocates and writes an 8 MiB and a 12 MiB tensor: the page faults of five iterations after
# twenty (glibc settles on a layout of its heap that fits both blocks within a few iterations).
_REALLOC_FAULTS = """
import resource, sys, torch
from mambakit.runtime import configure_malloc, malloc_note
mode = configure_malloc()
def step():
    a = torch.empty(2 << 20).fill_(1.0)
    b = torch.empty(3 << 20).fill_(2.0)
for _ in range(20):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(mode, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, malloc_note(), sep="|")
"""


def _realloc_faults(mode: str, code: str = _REALLOC_FAULTS) -> tuple[str, int, str]:
    env = dict(os.environ, MAMBAKIT_MALLOC=mode, MALLOC_MMAP_THRESHOLD_="65536", THP_MEM_ALLOC_ENABLE="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    applied, faults, note = proc.stdout.strip().splitlines()[-1].split("|")
    return applied, int(faults), note


@pytest.mark.skipif(not _GLIBC, reason="the malloc tuning is for glibc; elsewhere it is a no-op")
def test_tuned_malloc_reuses_freed_buffers_without_page_faults():
    """20 MiB = 5120 pages of 4 KiB per iteration: glibc with a pinned 64 KiB mmap threshold maps (and
    faults in) both blocks afresh every time; tuned, freed blocks are reused from the heap."""
    applied, faults, note = _realloc_faults("tuned")
    assert applied == "tuned" and faults < 5 * 5120 // 10, faults
    assert note.startswith("malloc tuned (glibc mmap threshold 32 MiB")
    applied, faults, note = _realloc_faults("default")
    assert applied == "default" and faults >= 5 * 5120, faults
    assert "MAMBAKIT_MALLOC=default" in note


_BIG_REALLOC_FAULTS = _REALLOC_FAULTS.replace("2 << 20", "12 << 20").replace("3 << 20", "16 << 20")


@pytest.mark.skipif(not _GLIBC, reason="the malloc tuning is for glibc; elsewhere it is a no-op")
def test_heap_mode_also_reuses_blocks_above_32_mib():
    """48 and 64 MiB blocks (28,672 pages per iteration): tuned, glibc still maps them afresh every time;
    MAMBAKIT_MALLOC=heap serves them from the heap, reused."""
    pages = 5 * (28 << 20) // 4096
    applied, faults, note = _realloc_faults("heap", _BIG_REALLOC_FAULTS)
    assert applied == "heap" and faults < pages // 10, faults
    assert note.startswith("malloc heap-only (MAMBAKIT_MALLOC=heap")
    applied, faults, _ = _realloc_faults("tuned", _BIG_REALLOC_FAULTS)
    assert applied == "tuned" and faults >= pages, faults


def test_configure_malloc_rejects_an_unknown_mode(monkeypatch):
    from mambakit.runtime import configure_malloc

    monkeypatch.setenv("MAMBAKIT_MALLOC", "fast")
    with pytest.raises(ValueError, match=r"MAMBAKIT_MALLOC='fast': expected one of \('tuned', 'heap', 'default'\)"):
        configure_malloc()


def test_the_command_reports_a_bad_malloc_setting(monkeypatch, capsys):
    from mambakit.cli import main

    monkeypatch.setenv("MAMBAKIT_MALLOC", "fast")
    assert main(["--help"]) == 1
    assert "MAMBAKIT_MALLOC='fast'" in capsys.readouterr().err


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_prefer_huge_pages_keeps_what_the_user_set(preset, expected, monkeypatch):
    from mambakit.runtime import prefer_huge_pages

    if preset is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", preset)
    assert prefer_huge_pages() == expected and os.environ["THP_MEM_ALLOC_ENABLE"] == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's huge-page path is Linux only")
def test_the_command_reaches_torch_with_huge_pages_before_its_first_allocation():
    """`python -m mambakit` sets the variable before anything imports torch: a big buffer allocated after the
    command has started is page-aligned (torch's huge-page path); with THP_MEM_ALLOC_ENABLE=0 it is not."""
    code = ("import sys; from mambakit.cli import main; main(['--help']); import torch; "
            "print(torch.empty(8 << 20).data_ptr() % 4096)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(env, THP_MEM_ALLOC_ENABLE="0", MAMBAKIT_MALLOC="default"))
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout.split()[-1] == "0" and off.stdout.split()[-1] != "0"


# ------------------------------------------------------------------------------------------------------
# OpenMP spinning (issue 20, "Shared machines")

def _clear_openmp_env(monkeypatch):
    """No OpenMP variable in the environment, and runtime's record of what it did reset (restored after)."""
    from mambakit import runtime

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_OPENMP_STATE", {"set": False, "late": False})


def test_configure_openmp_limits_the_spin_count_when_nothing_is_set(monkeypatch):
    from mambakit.runtime import SPIN_COUNT, configure_openmp

    _clear_openmp_env(monkeypatch)
    assert configure_openmp() == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": str(SPIN_COUNT)}
    assert os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT) and "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize("name,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("OMP_WAIT_POLICY", "passive"),
                                        ("GOMP_SPINCOUNT", "300000"), ("GOMP_SPINCOUNT", "infinity")])
def test_configure_openmp_keeps_what_the_user_set(name, value, monkeypatch):
    """Either variable set by the user leaves both alone (GOMP_SPINCOUNT would override a wait policy)."""
    from mambakit.runtime import configure_openmp, openmp_note

    _clear_openmp_env(monkeypatch)
    monkeypatch.setenv(name, value)
    other = "GOMP_SPINCOUNT" if name == "OMP_WAIT_POLICY" else "OMP_WAIT_POLICY"
    assert configure_openmp() == {name: value, other: None}
    assert other not in os.environ
    assert openmp_note() == f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, " \
                            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')} (from the environment)"


def test_openmp_note_says_when_the_setting_came_too_late(monkeypatch):
    """In this test process torch (and its libgomp) is already loaded: the variable can only reach children."""
    import torch  # noqa: F401

    from mambakit import runtime

    _clear_openmp_env(monkeypatch)
    assert runtime.openmp_loaded()
    runtime.configure_openmp()
    assert runtime.openmp_note() == (f"OMP_WAIT_POLICY=unset, GOMP_SPINCOUNT={runtime.SPIN_COUNT} (set by mambakit "
                                     "after the OpenMP runtime was loaded: it reaches child processes only)")


def _openmp_display(code: str, **env_extra) -> dict:
    """libgomp's own report of its settings (OMP_DISPLAY_ENV=VERBOSE, printed when torch loads it) in a
    fresh process running `code`: {name: value}."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    shown = {}
    for line in proc.stderr.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep:
            shown[name] = value.strip("'")
    assert "GOMP_SPINCOUNT" in shown, f"no OpenMP settings displayed (torch not on libgomp?): {proc.stderr[-500:]}"
    return shown


def test_the_command_limits_openmp_spinning_before_torch_loads_its_openmp_runtime():
    """`mambakit` sets GOMP_SPINCOUNT before anything imports torch: libgomp itself reports the value (it reads
    the variable once, when torch loads it). Without the command, torch's libgomp spins 300,000 rounds; a
    user's own setting wins."""
    from mambakit.runtime import SPIN_COUNT

    code = "import sys; from mambakit.cli import main; main(['--help']); import torch"
    assert _openmp_display(code)["GOMP_SPINCOUNT"] == str(SPIN_COUNT)
    assert _openmp_display("import torch")["GOMP_SPINCOUNT"] == "300000"
    assert _openmp_display(code, GOMP_SPINCOUNT="50000")["GOMP_SPINCOUNT"] == "50000"
    passive = _openmp_display(code, OMP_WAIT_POLICY="passive")
    assert passive["OMP_WAIT_POLICY"] == "PASSIVE" and passive["GOMP_SPINCOUNT"] == "0"


# --------------------------------------------------------------------------------------------------
# threads on a shared machine

@pytest.mark.parametrize("cores, busy, expected", [(2, 0.0, 2), (2, None, 2), (2, 0.4, 2), (2, 0.6, 1),
                                                   (2, 2.0, 1), (16, 2.0, 14), (16, 0.2, 16), (1, 1.0, 1)])
def test_threads_for_takes_the_cores_others_leave_free(cores, busy, expected):
    from mambakit.runtime import threads_for

    assert threads_for(cores, busy) == expected


def test_busy_cores_sums_each_cores_busy_share_over_the_interval():
    from mambakit.runtime import busy_cores

    # core 0 fully busy, core 1 a quarter busy, core 2 appears only later (hot-plugged: not counted)
    readings = iter([{0: (100, 1000), 1: (50, 1000)}, {0: (200, 1100), 1: (75, 1100), 2: (5, 10)}])
    assert busy_cores(interval_s=0, read=lambda: next(readings)) == pytest.approx(1.25)
    assert busy_cores(interval_s=0, read=lambda: None) is None


def test_cpu_ticks_counts_niced_work_and_iowait_as_idle(monkeypatch, tmp_path):
    import builtins

    import mambakit.runtime as rt

    stat = ("cpu  9 9 9 9 9 9 9 9 0 0\n"
            "cpu0 10 500 20 300 40 1 2 3 0 0\n"
            "cpu1 1 2 3 4 5 6 7 8 0 0\n"
            "intr 1 2 3\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: __import__("io").StringIO(stat)
                        if path == "/proc/stat" else real_open(path, *a, **k))
    monkeypatch.setattr(rt, "_affinity", lambda: {0})          # this process may use core 0 only
    assert rt._cpu_ticks() == {0: (10 + 20 + 1 + 2 + 3, 10 + 500 + 20 + 300 + 40 + 1 + 2 + 3)}


@pytest.fixture
def threads_restored(monkeypatch):
    import torch

    import mambakit.runtime as rt

    before, state = torch.get_num_threads(), dict(rt._THREADS_STATE)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield rt
    torch.set_num_threads(before)
    rt._THREADS_STATE.clear()
    rt._THREADS_STATE.update(state)


def test_auto_threads_use_one_thread_on_a_busy_machine_and_say_so(threads_restored, monkeypatch):
    import torch

    rt = threads_restored
    monkeypatch.setenv(rt.THREADS_ENV, "auto")
    monkeypatch.setattr(rt, "usable_cores", lambda: 2)
    monkeypatch.setattr(rt, "busy_cores", lambda: 2.0)
    lines = []
    state = rt.configure_threads(log=lines.append)
    assert state["threads"] == 1 and torch.get_num_threads() == 1
    assert "other processes keep 2.0 of 2 core(s) busy: running with 1 thread(s)" in lines[0]
    assert "MAMBAKIT_THREADS=2" in lines[0]
    # a resumed run goes on with the count it started with, whatever the machine does now
    note = rt.restore_threads(2)
    assert torch.get_num_threads() == 2 and "resumed with the 2 thread(s) the run started with" in note
    assert rt.restore_threads(2) is None


def test_auto_threads_leave_a_quiet_machine_alone(threads_restored, monkeypatch):
    import torch

    rt = threads_restored
    torch.set_num_threads(2)
    monkeypatch.setenv(rt.THREADS_ENV, "auto")
    monkeypatch.setattr(rt, "usable_cores", lambda: 2)
    monkeypatch.setattr(rt, "busy_cores", lambda: 0.1)
    lines = []
    assert rt.configure_threads(log=lines.append)["threads"] is None
    assert torch.get_num_threads() == 2 and lines == []


def test_explicit_thread_settings_win(threads_restored, monkeypatch):
    import torch

    rt = threads_restored
    monkeypatch.setattr(rt, "busy_cores", lambda: 2.0)
    monkeypatch.setenv(rt.THREADS_ENV, "3")
    assert rt.configure_threads()["mode"] == "fixed" and torch.get_num_threads() == 3
    assert rt.restore_threads(1) is None and torch.get_num_threads() == 3     # the user's count stays
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                              # torchrun's, or the user's
    monkeypatch.setenv(rt.THREADS_ENV, "auto")
    assert rt.configure_threads()["mode"] == "environment" and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(rt.THREADS_ENV, "keep")
    assert rt.configure_threads()["threads"] is None and torch.get_num_threads() == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(rt.THREADS_ENV, bad)
        with pytest.raises(ValueError, match="MAMBAKIT_THREADS=.*expected 'auto', 'keep' or a thread count"):
            rt.configure_threads()


def test_the_command_sets_the_thread_count_before_torch_loads():
    """In a fresh process the count reaches torch through OMP_NUM_THREADS (set before the import)."""
    code = ("from mambakit.cli import main; main(['--help']); import torch, os; "
            "print(torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "MAMBAKIT_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["1", "1"]
