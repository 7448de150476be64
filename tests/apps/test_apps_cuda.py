"""Each app's Mamba models on a CUDA GPU: float32 on the GPU against float64 on the CPU, forward and backward
(tests/cuda_parity.py), at small sizes with upstream's structure (Vim's middle class token and bimamba v2,
EfficientVMamba's atrous lattices, MambaMIL's SR-Mamba with padding, Mamba4Rec, TiM4Rec's time-modulated SSD,
S-Mamba's bidirectional mixers over variates). Skipped without CUDA."""

import pytest
import timm
import torch
from torch import nn

import mambakit.apps.vision  # noqa: F401  (registers the vision models with timm)
from cuda_parity import assert_cuda_matches_cpu_float64
from mambakit.apps.pathology.models import MambaMIL
from mambakit.apps.recsys.config import Mamba4RecConfig, TiM4RecConfig
from mambakit.apps.recsys.models import build_model as build_recommender
from mambakit.apps.timeseries.models import SMamba

pytestmark = pytest.mark.gpu


def test_vim_on_gpu():
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=64, depth=3, num_classes=10, drop_path_rate=0.0)
    assert_cuda_matches_cpu_float64(model, (torch.randn(2, 3, 64, 64),))


def test_efficient_vmamba_on_gpu():
    torch.manual_seed(0)
    model = timm.create_model("efficient_vmamba_tiny", num_classes=10, drop_path_rate=0.0)
    assert_cuda_matches_cpu_float64(model, (torch.randn(2, 3, 64, 64),))


def test_mambamil_on_gpu():
    torch.manual_seed(0)
    model = MambaMIL(in_dim=64, n_classes=3, dim=64, rate=5, layer=2)
    assert_cuda_matches_cpu_float64(model, (torch.randn(1, 503, 64),))


class WithTimes(nn.Module):
    """A recommender fed (items, lengths) with its timestamps (float64 unix seconds, kept in float64 on
    either device) held aside, so that the parity check's float32 cast does not round them."""

    def __init__(self, model: nn.Module, times: torch.Tensor | None):
        super().__init__()
        self.model, self.times = model, times

    def forward(self, items, lengths):
        times = None if self.times is None else self.times.to(items.device)
        return self.model(items, lengths, times)


def _sessions(n_items: int, batch: int, max_len: int):
    lengths = torch.randint(1, max_len + 1, (batch,))
    items = torch.randint(1, n_items, (batch, max_len))
    items[torch.arange(max_len) >= lengths[:, None]] = 0
    times = 1.6e9 + torch.cumsum(torch.rand(batch, max_len, dtype=torch.float64) * 86400, dim=1)
    return items, lengths, times


def test_mamba4rec_on_gpu():
    torch.manual_seed(0)
    items, lengths, _ = _sessions(200, 8, 50)
    model = build_recommender(Mamba4RecConfig(), n_items=200, max_len=50)
    assert_cuda_matches_cpu_float64(WithTimes(model, None), (items, lengths))


def test_tim4rec_on_gpu():
    torch.manual_seed(0)
    items, lengths, times = _sessions(200, 8, 50)
    model = build_recommender(TiM4RecConfig(), n_items=200, max_len=50)
    assert_cuda_matches_cpu_float64(WithTimes(model, times), (items, lengths))


def test_smamba_on_gpu():
    torch.manual_seed(0)
    model = SMamba(96, 24, d_model=32, d_ff=32, e_layers=2, d_state=2)
    assert_cuda_matches_cpu_float64(model, (torch.randn(4, 96, 7), torch.rand(4, 96, 4) - 0.5))
