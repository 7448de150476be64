"""Checkpoints that are written atomically and verified before they are loaded.

Layout of `<run>/checkpoints/`:

    step-00000120.pt          torch.save of the training state (see `Trainer` for the keys)
    step-00000120.pt.sha256   "<sha256>  step-00000120.pt" (sha256sum format)
    latest.json               {"file": "step-00000120.pt", "sha256": ..., "step": 120, "epoch": ...}
    best.json                 {"file": ..., "sha256": ..., "metric": "val/loss", "value": ..., ...}

Writing one checkpoint (`save_checkpoint`):
  1. the state is streamed into `.step-00000120.pt.tmp-<pid>` in the same folder, hashing the bytes on the
     way; then flush + fsync;
  2. the sidecar `step-00000120.pt.sha256` is written the same way (temp file, fsync, os.replace);
  3. the temp file is renamed onto `step-00000120.pt` (os.replace, atomic on POSIX), and the folder fsynced;
  4. `latest.json` is replaced atomically, last.
A crash at any point leaves either no `step-*.pt` for that step (a stray temp file, swept later) or a
complete file whose sidecar already holds its hash. A file whose bytes do not hash to its sidecar --
truncated, flipped, or a sidecar missing -- is refused by `load_checkpoint` with an error naming the file; it
is never partly loaded. `--resume` takes the highest step that verifies, reports any it had to skip, and
renames those to `*.refused` so they cannot shadow later saves.

Retention: the newest `keep` step files, plus the one `best.json` names, are kept; older ones are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["CheckpointError", "CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
           "checkpoint_name", "list_checkpoints", "find_resume_checkpoint", "resolve_checkpoint",
           "prune_checkpoints", "write_pointer", "read_pointer", "sha256_of", "missing_sidecar_error"]

CHECKPOINT_FORMAT = "mambakit-checkpoint-v1"
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model. The message names the file.
    (A ValueError too, so the CLI prints it as a one-line error.)"""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save streams into it)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> str:
    """Write `state` to `path` atomically with its sha256 sidecar; returns the sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            torch.save(state, writer)
            raw.flush()
            os.fsync(raw.fileno())
        digest = writer.hash.hexdigest()
        _write_bytes_atomically(_sidecar(path), f"{digest}  {path.name}\n".encode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: str | Path, require_sidecar: bool = True) -> str | None:
    """Check that `path` exists and hashes to its sidecar; returns the sha256 or raises CheckpointError.

    `require_sidecar=False` (the zoo reading a file that may be any state dict) lets a file without a sidecar
    through unverified and returns None; a sidecar that is there must still match."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        if not require_sidecar:
            return None
        raise missing_sidecar_error(path)
    fields = sidecar.read_text().split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise CheckpointError(f"checkpoint {path}: checksum file {sidecar.name} is malformed")
    expected = fields[0]
    actual = sha256_of(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: sha256 {actual} does not match "
                              f"{expected} recorded in {sidecar.name} ({path.stat().st_size} bytes); refusing "
                              "to load it")
    return actual


def missing_sidecar_error(path: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} has no checksum file {_sidecar(path).name}; it may be incomplete "
                           f"(refusing to load it). If it was copied, copy the .sha256 file with it; if you trust "
                           f"the file as it is, write one with `sha256sum {path.name} > {_sidecar(path).name}` "
                           f"in its folder")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load a mambakit checkpoint (weights_only: no code runs while loading)."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the bytes verified, so this is a format problem, not corruption
        raise CheckpointError(f"checkpoint {path} could not be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a mambakit training checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r})")
    return state


# --------------------------------------------------------------------------------------------------
# the checkpoint folder

def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `step-*.pt` in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_pointer(folder: str | Path, name: str, record: dict[str, Any]) -> None:
    """Atomically write `latest.json` / `best.json`."""
    _write_bytes_atomically(Path(folder) / f"{name}.json", (json.dumps(record, indent=1) + "\n").encode())


def read_pointer(folder: str | Path, name: str) -> dict[str, Any] | None:
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or "file" not in record:
        raise CheckpointError(f"{path} does not name a checkpoint file")
    return record


def find_resume_checkpoint(folder: str | Path) -> Path:
    """The newest checkpoint in `folder` that verifies. Newer ones that fail are renamed `*.refused`, with a
    warning saying why; no checkpoint at all is an error."""
    folder = Path(folder)
    candidates = list_checkpoints(folder)
    if not candidates:
        raise CheckpointError(f"cannot resume: no checkpoint in {folder} (start without --resume, or pass "
                              "the run folder of an earlier run)")
    refused = []
    for _, path in reversed(candidates):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            refused.append(str(e))
            for bad in (path, _sidecar(path)):
                if bad.exists():
                    os.replace(bad, bad.with_name(bad.name + ".refused"))
            continue
        if refused:
            warnings.warn("skipped checkpoints that failed verification (renamed *.refused):\n  "
                          + "\n  ".join(refused) + f"\nresuming from {path}", stacklevel=2)
        return path
    raise CheckpointError(f"cannot resume from {folder}: every checkpoint failed verification:\n  "
                          + "\n  ".join(refused))


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file from a file, a `checkpoints/` folder or a run folder. For folders, `prefer`
    ('best' or 'latest') picks the pointer to follow; the other is the fallback."""
    path = Path(path)
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    order = [prefer, "latest" if prefer == "best" else "best"]
    for name in order:
        record = read_pointer(folder, name)
        if record is not None:
            return folder / record["file"]
    candidates = list_checkpoints(folder)
    if candidates:
        return candidates[-1][1]
    raise CheckpointError(f"no checkpoint found in {folder}")


def prune_checkpoints(folder: str | Path, keep: int, protect: set[str] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints (and any named in `protect`); sweep stray temp
    files. Returns the deleted paths."""
    folder = Path(folder)
    candidates = list_checkpoints(folder)
    doomed = [p for _, p in candidates[:-keep] if p.name not in protect] if keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
    for stray in folder.glob(".*.tmp-*"):
        pid = stray.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stray.unlink(missing_ok=True)
    return doomed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint file (<run>/checkpoints/step-N.pt -> <run>), or its own folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
