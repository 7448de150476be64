"""mambakit.runtime: the line benchmarks print about torch's huge-page allocations."""

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
