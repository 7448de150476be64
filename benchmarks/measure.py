"""What the subprocess-per-case benchmarks share: the peak-memory probe of a child process, running a child
under a memory and time limit, and the machine description."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["status_kib", "reset_peak", "rss_gib", "run_child", "machine", "machine_note", "fmt"]


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset the kernel's resident high-water mark (VmHWM) of this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except FileNotFoundError:
        pass
    return 0.0


def run_child(cmd: list[str], root: Path, limit_gib: float, timeout_s: float) -> dict:
    """Run a benchmark child that prints one JSON line last; stop it above `limit_gib` resident memory or
    after `timeout_s`. Returns its JSON, or {"status": "oom" | "timeout" | "error", "detail": ...}."""
    # freed large buffers go back to the OS between steps, so each step's peak is its own (as benchmarks/mil.py)
    env = dict(os.environ, PYTHONPATH=str(root), MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start = time.time()
    while proc.poll() is None:
        if rss_gib(proc.pid) > limit_gib:
            proc.kill()
            proc.wait()
            return {"status": "oom", "detail": f"resident memory passed {limit_gib:g} GiB (stopped)"}
        if time.time() - start > timeout_s:
            proc.kill()
            proc.wait()
            return {"status": "timeout", "detail": f"over {timeout_s:g} s"}
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        return {"status": "oom" if killed else "error",
                "detail": "killed by the kernel (out of memory)" if killed else " ".join(err.strip().splitlines()[-1:])}
    return json.loads(out.strip().splitlines()[-1])


def machine(root: Path) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0.0
    try:
        mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit}


def machine_note(info: dict) -> str:
    return (f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; torch {info['torch']}; "
            f"commit {info['commit']}; load average {info['load_average_start'][0]:.2f} at the start, "
            f"{info['load_average_end'][0]:.2f} at the end.")


def fmt(r: dict | None, key: str, digits: int | None = None) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return {"oom": "OOM", "timeout": "timeout", "skipped": "skipped"}.get(r.get("status"), "error")
    value = r[key]
    if digits is None:
        digits = 3 if value < 1 else 2
    return f"{value:.{digits}f}"
