"""iTransformer and DLinear: shapes, and numbers against direct float64 re-derivations of upstream's maths."""

import math

import numpy as np
import pytest
import torch

from mambakit.apps.timeseries.models import (DLinear, DLinearConfig, ITransformer, ITransformerConfig,
                                             MultiHeadAttention, SeriesDecomposition, build_model,
                                             instance_denormalize, instance_normalize)


@pytest.mark.parametrize("pred_len", [1, 24])
def test_itransformer_shapes_with_and_without_marks(pred_len):
    model = ITransformer(seq_len=48, pred_len=pred_len, d_model=32, d_ff=64, e_layers=2, n_heads=4)
    x = torch.randn(3, 48, 5)
    assert model(x, torch.rand(3, 48, 4) - 0.5).shape == (3, pred_len, 5)
    assert model(x).shape == (3, pred_len, 5)
    with pytest.raises(ValueError, match=r"expected x of shape \(batch, seq_len=48, variates\), got \(3, 40, 5\)"):
        model(torch.randn(3, 40, 5))


def test_attention_matches_upstream_einsum_reference():
    torch.manual_seed(1)
    attn = MultiHeadAttention(d_model=16, n_heads=4, dropout=0.0).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    # upstream FullAttention: scores = einsum(blhe,bshe->bhls); softmax(scores / sqrt(E)); einsum(bhls,bshd->blhd)
    b, l, _ = x.shape
    q = attn.query_projection(x).view(b, l, 4, -1)
    k = attn.key_projection(x).view(b, l, 4, -1)
    v = attn.value_projection(x).view(b, l, 4, -1)
    a = torch.softmax(torch.einsum("blhe,bshe->bhls", q, k) / math.sqrt(4), dim=-1)
    ref = attn.out_projection(torch.einsum("bhls,bshd->blhd", a, v).reshape(b, l, -1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g, retain_graph=True)
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-12)


def test_instance_norm_round_trip_and_statistics():
    x = torch.randn(4, 30, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64) + 5
    z, mean, std = instance_normalize(x)
    torch.testing.assert_close(z.mean(1), torch.zeros(4, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    np.testing.assert_allclose(std.squeeze(1).numpy(), np.sqrt(x.numpy().var(1) + 1e-5), rtol=1e-12)
    torch.testing.assert_close(instance_denormalize(z, mean, std), x, rtol=1e-12, atol=1e-12)


def test_itransformer_is_scale_and_shift_equivariant_per_series():
    """With instance norm (and eps negligible), scaling/shifting a series scales/shifts its forecast."""
    torch.manual_seed(0)
    model = ITransformer(seq_len=24, pred_len=6, d_model=16, d_ff=16, e_layers=1, n_heads=2).double().eval()
    x = 30 * torch.randn(2, 24, 3, dtype=torch.float64)           # variance >> eps = 1e-5
    a = torch.tensor([100.0, 1.0, 1000.0], dtype=torch.float64)
    c = torch.tensor([3.0, -2.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(model(x * a + c), model(x) * a + c, rtol=1e-6, atol=1e-6 * 1000 * 30)


def _moving_average_reference(x, k):
    """numpy re-derivation of Autoformer's series_decomp: edge-replicated padding + mean over k."""
    pad = (k - 1) // 2
    padded = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], axis=1)
    trend = np.stack([padded[:, t:t + k].mean(1) for t in range(x.shape[1])], axis=1)
    return x - trend, trend


def test_series_decomposition_matches_reference():
    x = np.random.default_rng(0).normal(size=(2, 40, 3))
    res, trend = SeriesDecomposition(25)(torch.from_numpy(x))
    ref_res, ref_trend = _moving_average_reference(x, 25)
    np.testing.assert_allclose(trend.numpy(), ref_trend, rtol=1e-12)
    np.testing.assert_allclose(res.numpy(), ref_res, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("individual", [False, True])
def test_dlinear_shapes_init_and_reference(individual):
    model = DLinear(seq_len=32, pred_len=8, n_variates=3, moving_avg=5, individual=individual).double()
    x = torch.randn(4, 32, 3, dtype=torch.float64)
    y = model(x)
    assert y.shape == (4, 8, 3)
    seasonal = model.Linear_Seasonal[0] if individual else model.Linear_Seasonal
    trend = model.Linear_Trend[0] if individual else model.Linear_Trend
    assert torch.all(seasonal.weight == 1 / 32)           # TSLib's averaging initialisation
    res, tr = _moving_average_reference(x.numpy(), 5)
    i = 0
    ref = res[:, :, i] @ seasonal.weight.detach().numpy().T + seasonal.bias.detach().numpy() \
        + tr[:, :, i] @ trend.weight.detach().numpy().T + trend.bias.detach().numpy()
    np.testing.assert_allclose(y[:, :, i].detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    keys = set(model.state_dict())
    assert ("Linear_Seasonal.0.weight" in keys) == individual and ("Linear_Seasonal.weight" in keys) != individual


def test_build_model_from_configs():
    it = build_model(ITransformerConfig(d_model=16, d_ff=32, n_heads=2), seq_len=12, pred_len=4, n_variates=2)
    dl = build_model(DLinearConfig(), seq_len=12, pred_len=4, n_variates=2)
    assert isinstance(it, ITransformer) and isinstance(dl, DLinear)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ITransformerConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="moving_avg must be an odd number"):
        DLinearConfig(moving_avg=24)
