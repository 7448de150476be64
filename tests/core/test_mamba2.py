"""Mamba2: numerics against an independent recurrence, upstream keys, init, decoding, variable lengths."""

import math

import pytest
import torch

import core_refs
from mambakit.core import InferenceParams, Mamba2

F64 = torch.float64

CONFIGS = [
    dict(),                                                        # defaults: rmsnorm, ngroups 1, D per head
    dict(ngroups=2, D_has_hdim=True, norm_before_gate=True),
    dict(rmsnorm=False, dt_limit=(0.01, 0.5)),
    dict(d_ssm=16, bias=True),                                     # gated-MLP part next to the SSM
]


def make(d_model=16, **kw):
    kw = {"d_state": 4, "headdim": 8, "chunk_size": 4, "layer_idx": 0, **kw}
    m = Mamba2(d_model, dtype=F64, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.rand_like(p) * 3 + 0.2))
            elif name == "D":
                p.copy_(torch.randn_like(p))
            else:
                p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_and_backward_match_independent_recurrence(cfg):
    m = make(**cfg)
    u = torch.randn(2, 7, 16, dtype=F64, requires_grad=True)
    y, y_ref = m(u), core_refs.mamba2(m, u)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    params = [p for p in m.parameters()]
    for a, r in zip(torch.autograd.grad(y, [u, *params], g), torch.autograd.grad(y_ref, [u, *params], g)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def upstream_mamba2_keys(d_model, d_state=128, expand=2, headdim=64, ngroups=1, d_conv=4):
    """Key -> shape of a mamba_ssm Mamba2 state dict (D_has_hdim=False, rmsnorm=True, bias=False)."""
    di = expand * d_model
    h = di // headdim
    conv_dim = di + 2 * ngroups * d_state
    return {"in_proj.weight": (2 * di + 2 * ngroups * d_state + h, d_model), "conv1d.weight": (conv_dim, 1, d_conv),
            "conv1d.bias": (conv_dim,), "dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (di,),
            "out_proj.weight": (d_model, di)}


def test_upstream_state_dict_loads_strictly():
    m = Mamba2(64, d_state=16, headdim=32, ngroups=2)
    sd = {k: torch.randn(s) for k, s in upstream_mamba2_keys(64, d_state=16, headdim=32, ngroups=2).items()}
    m.load_state_dict(sd, strict=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(3)
    m = Mamba2(256, d_state=16, headdim=16)                     # 32 heads
    A = torch.exp(m.A_log.detach())
    assert A.shape == (32,) and A.min() >= 1 and A.max() <= 16
    assert torch.equal(m.D, torch.ones(32)) and torch.equal(m.norm.weight, torch.ones(512))
    dt = torch.nn.functional.softplus(m.dt_bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_bias._no_weight_decay
    assert m.norm.group_size == 512 and not m.norm.norm_before_gate


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_equals_forward(cfg):
    m = make(**cfg)
    u = torch.randn(2, 9, 16, dtype=F64)
    y = m(u)
    conv_state, ssm_state = m.allocate_inference_cache(2, 9)
    assert ssm_state.shape == (2, m.nheads, 8, 4)
    steps = [m.step(u[:, t:t + 1], conv_state, ssm_state)[0] for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-11, atol=1e-12)


def test_prefill_then_step_and_dt_multiplier():
    m = make()
    u = torch.randn(2, 8, 16, dtype=F64)
    mult = torch.rand(2, 8, m.nheads, dtype=F64) + 0.5
    y = m(u, dt_multiplier=mult)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    outs = [m(u[:, :5], inference_params=params, dt_multiplier=mult[:, :5])]
    params.seqlen_offset = 5
    for t in range(5, 8):
        outs.append(m(u[:, t:t + 1], inference_params=params, dt_multiplier=mult[:, t:t + 1]))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-11, atol=1e-12)
    assert not torch.allclose(y, m(u))                           # the multiplier matters


def test_variable_lengths_and_ragged_prefill():
    m = make()
    lengths = torch.tensor([3, 6])
    full = torch.randn(2, 8, 16, dtype=F64)
    batch = full[:, :6].clone()
    batch[0, 3:] = 40.0
    out = m(batch, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i, :n], m(full[i:i + 1, :n])[0], rtol=1e-11, atol=1e-12)
        assert torch.all(out[i, n:] == 0)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    m(batch, inference_params=params, lengths=lengths)
    params.seqlen_offset = 6
    nxt = torch.randn(2, 1, 16, dtype=F64)
    step_out = m(nxt, inference_params=params)
    for i, n in enumerate(lengths.tolist()):
        alone = m(torch.cat([full[i:i + 1, :n], nxt[i:i + 1]], 1))[0, -1]
        torch.testing.assert_close(step_out[i, 0], alone, rtol=1e-11, atol=1e-12)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of headdim"):
        Mamba2(24, headdim=64)
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=2"):
        Mamba2(64, headdim=64, ngroups=3)
    with pytest.raises(ValueError, match="process_group"):
        Mamba2(64, process_group=object())
    m = make()
    with pytest.raises(ValueError, match=r"d_model=16"):
        m(torch.randn(1, 3, 12, dtype=F64))
    with pytest.raises(ValueError, match="has length 0"):
        m(torch.randn(1, 0, 16, dtype=F64))
    with pytest.raises(ValueError, match="dt_multiplier has shape"):
        m(torch.randn(1, 3, 16, dtype=F64), dt_multiplier=torch.ones(1, 3, 7, dtype=F64))
    conv, ssm = m.allocate_inference_cache(1, 3)
    with pytest.raises(ValueError, match="conv_state has shape"):
        m.step(torch.randn(1, 1, 16, dtype=F64), conv[..., :2], ssm)
    with torch.no_grad():
        assert math.isfinite(float(m(torch.randn(1, 2, 16, dtype=F64)).sum()))
