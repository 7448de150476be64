"""Processes, devices and data sharding for single-process and torchrun (DDP) runs.

Under `torchrun --nproc_per_node=K` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) the
engine joins the process group (gloo on CPU, nccl on CUDA with device cuda:LOCAL_RANK). Without those
variables it runs as one process.

Sharding keeps a K-process run equal to a one-process run:

- Training: `EpochBatchSampler` draws one permutation per epoch from (seed, epoch) -- the same in every
  process -- cuts it into GLOBAL batches of `batch_size`, and gives rank k the k-th contiguous chunk of each.
  The union of the ranks' micro-batches is exactly the one-process batch, so averaged gradients match. It can
  start at a batch offset, which is how a mid-epoch resume skips what was already trained on.
- Evaluation: `ShardSampler` gives each rank a contiguous slice of the split, without the padding duplicates
  of torch's DistributedSampler, and `gather_outputs` concatenates the per-sample outputs of all ranks in
  rank order, i.e. in dataset order, so metrics are computed on exactly the split.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, get_worker_info

from .seed import sample_seed

__all__ = ["DistEnv", "DistributedSetupError", "init_distributed", "resolve_device", "EpochBatchSampler",
           "ShardSampler",
           "SeededSamples", "epoch_generator", "split_sizes", "gather_outputs", "all_gather_object", "broadcast_object",
           "all_reduce_sum", "barrier", "world_size"]


class DistributedSetupError(RuntimeError, ValueError):
    """A device or process setup that cannot work (CUDA asked for but absent, more processes than GPUs, a
    half-configured torchrun environment). A ValueError too, so the CLI prints it as a one-line error."""


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu; `cuda` without CUDA is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device: expected 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedSetupError("train.device=cuda, but CUDA is not available here (torch.cuda.is_available() "
                                    f"is False; torch {torch.__version__}). Use train.device=cpu or auto.")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedSetupError(f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but only {count} GPU(s) "
                                    "are visible; start at most that many processes per node (--nproc_per_node).")
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from None


def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (idempotent), and pick this process's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_preference, local_rank)
    if world_size <= 1:
        return DistEnv(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise DistributedSetupError(f"WORLD_SIZE={world_size} but {name} is not set; start multi-process "
                                            "runs with torchrun (see the README's multi-GPU section)")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                **({"device_id": device} if device.type == "cuda" else {}))
        atexit.register(_destroy)
    elif dist.get_backend() != backend:
        raise DistributedSetupError(f"the process group already uses backend {dist.get_backend()!r}, but "
                                    f"device {device} needs {backend!r}")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# samplers

def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous chunks of `total` items; the first `total % parts` get one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _chunk(items: Sequence[int], rank: int, world_size: int) -> Sequence[int]:
    sizes = split_sizes(len(items), world_size)
    start = sum(sizes[:rank])
    return items[start:start + sizes[rank]]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator an epoch's sample order is drawn from: seeded by (seed, epoch) only."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch))


class EpochBatchSampler(Sampler):
    """This rank's share of each global training batch of one epoch, as lists of `(epoch, index)` keys
    (read through `SeededSamples`).

    dataset_len: number of samples; batch_size: GLOBAL batch; drop_last: drop the final partial global batch.
    order: the epoch's visiting order (dataset indices; default a permutation from `epoch_generator`). It must
    be the same in every process, i.e. drawn from `epoch_generator(seed, epoch)` alone.
    start_batch: skip the first global batches (mid-epoch resume).
    """

    def __init__(self, dataset_len: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True, start_batch: int = 0,
                 order: Sequence[int] | None = None):
        if dataset_len < 1:
            raise ValueError("the training set is empty")
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self._order = None if order is None else [int(i) for i in order]
        self.epoch_len = dataset_len if order is None else len(self._order)
        self.batch_size = batch_size
        self.num_batches = self.batches_per_epoch(self.epoch_len, batch_size, drop_last)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} is outside the epoch's {self.num_batches} batches")
        self.start_batch = start_batch
        self.dataset_len = dataset_len

    @staticmethod
    def batches_per_epoch(epoch_len: int, batch_size: int, drop_last: bool) -> int:
        return epoch_len // batch_size if drop_last else -(-epoch_len // batch_size)

    def order(self) -> list[int]:
        """The epoch's sample order, the same in every process."""
        if self._order is not None:
            return self._order
        if not self.shuffle:
            return list(range(self.dataset_len))
        return torch.randperm(self.dataset_len, generator=epoch_generator(self.seed, self.epoch)).tolist()

    def global_batch(self, order: list[int], batch: int) -> list[int]:
        return order[batch * self.batch_size:(batch + 1) * self.batch_size]

    def global_batch_size(self, batch: int) -> int:
        return min(self.batch_size, self.epoch_len - batch * self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        for batch in range(self.start_batch, self.num_batches):
            local = _chunk(self.global_batch(order, batch), self.rank, self.world_size)
            yield [(self.epoch, index) for index in local]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


class ShardSampler(Sampler):
    """Indices of this rank's contiguous slice of an evaluation split (no padding, no duplicates)."""

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1):
        sizes = split_sizes(dataset_len, world_size)
        self.start = sum(sizes[:rank])
        self.length = sizes[rank]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.start + self.length))

    def __len__(self) -> int:
        return self.length


class SeededSamples(Dataset):
    """Reads `(epoch, index)` keys from a map-style dataset. Inside a DataLoader worker it first seeds
    python, numpy and torch from (seed, epoch, index), so random augmentations depend only on the sample,
    not on which worker or process loads it: a resumed or multi-process run transforms every sample exactly
    as the uninterrupted one-process run did. In the main process (num_workers=0) it does not reseed, since
    the global generators there are part of the checkpointed state."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if get_worker_info() is not None:
            import random

            import numpy as np
            seed = sample_seed(self.seed, epoch, index)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        return self.dataset[index]


# --------------------------------------------------------------------------------------------------
# collectives (no-ops in a single process)

def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    if not env.distributed:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _concat_outputs(chunks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    if not chunks:
        return {}
    keys = list(chunks[0])
    merged: dict[str, Any] = {}
    for key in keys:
        values = []
        for i, chunk in enumerate(chunks):
            if set(chunk) != set(keys):
                raise ValueError(f"{where}: eval_step returned keys {sorted(chunk)} for one batch but "
                                 f"{sorted(keys)} for another; every batch must return the same keys")
            values.append(chunk[key])
        if all(isinstance(v, torch.Tensor) for v in values):
            for v in values:
                if v.dim() == 0:
                    raise ValueError(f"{where}: eval_step output {key!r} is a 0-d tensor; return per-sample "
                                     "values with the batch as dimension 0")
            merged[key] = torch.cat([v.detach().cpu() for v in values], dim=0)
        elif all(isinstance(v, (list, tuple)) for v in values):
            merged[key] = [item for v in values for item in v]
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise ValueError(f"{where}: eval_step output {key!r} must be a tensor (batch as dim 0) or a list "
                             f"per batch, got {', '.join(kinds)}")
    lengths = {key: len(value) for key, value in merged.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: eval_step outputs have different numbers of samples: {lengths}")
    return merged


def gather_outputs(batches: list[dict[str, Any]], env: DistEnv, where: str = "eval_step") -> dict[str, Any]:
    """Concatenate this rank's per-batch outputs, then every rank's, in rank order (= dataset order with
    `ShardSampler`). Every rank receives the full result."""
    local = _concat_outputs(batches, where)
    parts = [p for p in all_gather_object(local, env) if p]
    return _concat_outputs(parts, where) if len(parts) > 1 else (parts[0] if parts else {})
