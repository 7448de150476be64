"""The engine on a CUDA GPU: a run on cuda ends where the same run on the CPU ends, fp16 (with its grad scaler) and
bf16 autocast train, and torchrun with the nccl backend equals one plain process. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from engine_toy import ToyRecipe, ToyTask
from test_engine_processes import assert_same, last_state, run_toy

from mambakit.engine.checkpoint import load_checkpoint
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer

pytestmark = pytest.mark.gpu

COMMON = ["run.curves=false", "run.progress=false", "train.batch_size=8", "train.epochs=3"]


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def fit(run_dir, *overrides):
    result = Trainer(ToyTask(load_config(ToyRecipe, None, [*COMMON, *overrides]))).fit(run_dir)
    return load_checkpoint(result.last_checkpoint), result


def test_a_cuda_run_ends_where_the_cpu_run_ends(tmp_path, cuda):
    cpu, _ = fit(tmp_path / "cpu", "train.device=cpu")
    gpu, _ = fit(tmp_path / "gpu", "train.device=cuda")
    assert all(t.device.type == "cpu" for t in gpu["model"].values())   # checkpoints hold CPU tensors
    assert_same(cpu["model"], gpu["model"], atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(tmp_path, cuda, precision):
    state, result = fit(tmp_path / precision, "train.device=cuda", f"train.precision={precision}")
    reference, _ = fit(tmp_path / "fp32", "train.device=cuda")
    assert result.steps > 0
    for key, value in reference["model"].items():
        assert torch.isfinite(state["model"][key]).all(), key
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=5e-2, msg=key)


def test_torchrun_nccl_equals_one_process(tmp_path, cuda):
    common = ["train.device=cuda", "train.epochs=2", "data.n_train=45", "train.drop_last=false"]
    run_toy(tmp_path / "single", *common)
    run_toy(tmp_path / "ddp", *common, nproc=1)
    single, ddp = last_state(tmp_path / "single"), last_state(tmp_path / "ddp")
    assert ddp["world_size"] == 1 and single["progress"] == ddp["progress"]
    assert_same(single["model"], ddp["model"], atol=1e-6)
