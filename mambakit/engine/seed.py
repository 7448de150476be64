"""Seeding and random-number-generator state capture, so that a resumed run draws the same numbers (dropout
masks, augmentations in the main process) as an uninterrupted one.

The captured state holds only tensors, ints and tuples of ints, so a checkpoint containing it loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "capture_rng_state", "restore_rng_state", "sample_seed"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device). `deterministic` also asks torch for
    deterministic algorithms (warning, not failing, where an op has none) and turns off cuDNN autotuning."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)          # seeds every CUDA device too
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; it must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. run seed, epoch, sample index); the same in every process
    and python version (unlike `hash()`)."""
    digest = hashlib.blake2b(b",".join(str(int(p)).encode() for p in parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator this process uses: python, numpy, torch CPU and each CUDA device."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, tuple(internal), gauss),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            # A resumed run on a different number of visible GPUs: restore what maps one to one.
            cuda_states = cuda_states[: torch.cuda.device_count()]
        for index, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, index)
