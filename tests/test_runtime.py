"""mambakit.runtime: torch's huge-page allocations, which must be requested before torch is imported, so
every check runs in a fresh interpreter."""

import os
import subprocess
import sys

import pytest

BIG = 8 << 20          # floats: a 32 MiB buffer, well above c10's 2 MiB huge-page threshold


def _python(code: str, **env_changes) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _after(setup: str) -> str:
    """Code that runs `setup`, then allocates a big tensor and prints: the variable, and the buffer's offset
    in its page (c10 page-aligns the buffers it advises for huge pages; glibc's mmap'd blocks are not)."""
    return (f"{setup}\nimport os, torch\nt = torch.empty({BIG})\n"
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'), t.data_ptr() % 4096)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's huge-page path is Linux only")
def test_use_huge_pages_before_torch_turns_them_on():
    out = _python(_after("from mambakit.runtime import use_huge_pages\nprint(use_huge_pages())"))
    assert out == ["True", "1", "0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's huge-page path is Linux only")
def test_without_it_big_buffers_are_not_page_aligned():
    # the control for the test above: the alignment is the setting's doing
    out = _python(_after("pass"))
    assert out[0] == "unset" and out[1] != "0"


def test_an_explicit_zero_in_the_environment_wins():
    out = _python("from mambakit.runtime import use_huge_pages\nimport os\n"
                  "print(use_huge_pages(), os.environ['THP_MEM_ALLOC_ENABLE'])", THP_MEM_ALLOC_ENABLE="0")
    assert out == ["False", "0"]


def test_too_late_once_torch_is_imported():
    out = _python("import torch, os\nfrom mambakit.runtime import use_huge_pages\n"
                  "print(use_huge_pages(), os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))")
    assert out == ["False", "unset"]


def test_the_mambakit_command_turns_them_on_before_importing_torch():
    out = _python("import sys\nfrom mambakit.cli import main\nassert 'torch' not in sys.modules\n"
                  "main(['data', 'list'])\nimport os\nprint(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))")
    assert out[-1] == "1"


def test_huge_pages_note_names_the_setting_and_the_kernel_mode():
    out = subprocess.run([sys.executable, "-c", "from mambakit.runtime import huge_pages_note; print(huge_pages_note())"],
                         capture_output=True, text=True, env=dict(os.environ, THP_MEM_ALLOC_ENABLE="1"), timeout=60)
    assert out.stdout.startswith("THP_MEM_ALLOC_ENABLE=1 (kernel THP mode: ")
