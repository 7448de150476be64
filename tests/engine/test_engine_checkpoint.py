"""Atomic, checksummed checkpoints: round trip, refusal of truncated / corrupt / unverifiable files, resume
selection, retention and folder resolution."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from mambakit.engine.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, checkpoint_name, find_resume_checkpoint,
                                        list_checkpoints, load_checkpoint, prune_checkpoints, resolve_checkpoint,
                                        save_checkpoint, verify_checkpoint, write_pointer)


def state(step=1):
    torch.manual_seed(step)
    return {"format": CHECKPOINT_FORMAT, "model": {"w": torch.randn(64, 32)}, "progress": {"step": step},
            "python_rng": (3, tuple(range(625)), None), "config": {"train": {"lr": 1e-3}}}


def saved(folder, step):
    path = folder / checkpoint_name(step)
    save_checkpoint(state(step), path)
    return path


def test_round_trip_and_sidecar_is_sha256sum_format(tmp_path):
    path = saved(tmp_path, 3)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "step-00000003.pt.sha256").read_text() == f"{digest}  step-00000003.pt\n"
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state(3)["model"]["w"]) and loaded["progress"] == {"step": 3}
    assert loaded["python_rng"] == (3, tuple(range(625)), None)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = saved(tmp_path, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt or truncated: sha256 .* refusing"):
        load_checkpoint(path)


def test_flipped_byte_is_refused(tmp_path):
    path = saved(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{path} is corrupt or truncated"):
        load_checkpoint(path)


def test_missing_or_malformed_sidecar_is_refused(tmp_path):
    path = saved(tmp_path, 1)
    sidecar = tmp_path / (path.name + ".sha256")
    sidecar.write_text("not a hash\n")
    with pytest.raises(CheckpointError, match="checksum file step-00000001.pt.sha256 is malformed"):
        verify_checkpoint(path)
    sidecar.unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} has no checksum file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_verified_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    save_checkpoint({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="is not a mambakit training checkpoint"):
        load_checkpoint(path)


def test_a_crash_before_the_rename_leaves_no_checkpoint(tmp_path, monkeypatch):
    saved(tmp_path, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(2), tmp_path / checkpoint_name(2))
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert find_resume_checkpoint(tmp_path).name == "step-00000001.pt"


def test_resume_without_checkpoints_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match=rf"cannot resume: no checkpoint in {tmp_path}"):
        find_resume_checkpoint(tmp_path)


def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    saved(tmp_path, 2)
    newest = saved(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"(?s)step-00000004.pt is corrupt.*resuming from .*step-00000002.pt"):
        assert find_resume_checkpoint(tmp_path).name == "step-00000002.pt"
    assert (tmp_path / "step-00000004.pt.refused").exists() and not newest.exists()
    (tmp_path / "step-00000002.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="every checkpoint failed verification"):
        find_resume_checkpoint(tmp_path)


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    for step in (1, 2, 3, 4, 5):
        saved(tmp_path, step)
    stray = tmp_path / ".step-00000009.pt.tmp-999999999"
    stray.write_bytes(b"partial")
    deleted = prune_checkpoints(tmp_path, keep=2, protect={"step-00000002.pt"})
    assert sorted(p.name for p in deleted) == ["step-00000001.pt", "step-00000003.pt"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert not (tmp_path / "step-00000001.pt.sha256").exists() and not stray.exists()


def test_resolve_checkpoint_from_run_folder_prefers_best(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    saved(folder, 2)
    saved(folder, 5)
    assert resolve_checkpoint(tmp_path).name == "step-00000005.pt"          # no pointers: the newest
    write_pointer(folder, "latest", {"file": "step-00000005.pt"})
    write_pointer(folder, "best", {"file": "step-00000002.pt"})
    assert json.loads((folder / "best.json").read_text())["file"] == "step-00000002.pt"
    assert resolve_checkpoint(tmp_path).name == "step-00000002.pt"
    assert resolve_checkpoint(folder, prefer="latest").name == "step-00000005.pt"
    assert resolve_checkpoint(folder / "step-00000005.pt") == folder / "step-00000005.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    assert os.listdir(folder).count("best.json") == 1
