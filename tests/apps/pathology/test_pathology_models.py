"""MIL models against float64 transcriptions of the upstream computations (MambaMIL's SR-Mamba fast path,
ABMIL, mean/max pooling, Nystrom attention), parameter names and counts, and input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.apps.pathology.models import (ABMIL, MambaMIL, MaxMIL, MeanMIL, NystromAttention, PPEG, TransMIL,
                                            build_mil_model, moore_penrose_iter_pinv)
from mambakit.kernels.reference import selective_scan_ref


# --------------------------------------------------------------------------------------------------
# SR-Mamba: upstream's fast path (mamba_inner_fn_no_out_proj on xz and on the stride-R reordered xz)

def _inner(xz, conv, x_proj_w, dt_proj, A, D):
    """mamba_ssm's mamba_inner_fn_no_out_proj: xz (b, 2d, L) -> gated SSM output (b, d, L)."""
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1, groups=x.shape[1])[..., :L])
    rank, n = dt_proj.weight.shape[1], A.shape[1]
    x_dbl = F.linear(x.transpose(1, 2).reshape(-1, x.shape[1]), x_proj_w)            # (b l, r + 2n)
    delta = (dt_proj.weight @ x_dbl[:, :rank].t()).reshape(-1, xz.shape[0], L).transpose(0, 1)
    B = x_dbl[:, rank:rank + n].reshape(xz.shape[0], L, n).transpose(1, 2)
    C = x_dbl[:, -n:].reshape(xz.shape[0], L, n).transpose(1, 2)
    return selective_scan_ref(x, delta, A, B, C, D, z=z, delta_bias=dt_proj.bias, delta_softplus=True)


def upstream_srmamba(m, hidden, rate):
    """isyangshu/MambaMIL srmamba.py SRMamba.forward (fast path), with its TransposeTokenReEmbedding."""
    b, L, dim = hidden.shape
    xz = (m.in_proj.weight @ hidden.reshape(-1, dim).t()).reshape(-1, b, L).transpose(0, 1)   # (b, 2d, L)
    out = _inner(xz, m.conv1d, m.x_proj.weight, m.dt_proj, -torch.exp(m.A_log), m.D)
    x = xz.transpose(1, 2)                                            # transpose_normal_padding
    groups = math.ceil(L / rate)
    x = F.pad(x, (0, 0, 0, groups * rate - L))
    x = x.reshape(b, groups, rate, -1).transpose(1, 2).reshape(b, groups * rate, -1)   # b (k w) d -> b (w k) d
    out_b = _inner(x.transpose(1, 2), m.conv1d_b, m.x_proj_b.weight, m.dt_proj_b, -torch.exp(m.A_b_log), m.D_b)
    y = out_b.transpose(1, 2).reshape(b, rate, groups, -1).transpose(1, 2).reshape(b, groups * rate, -1)[:, :L]
    return F.linear((out + y.transpose(1, 2)).transpose(1, 2), m.out_proj.weight, m.out_proj.bias)


def upstream_mambamil(model, x, rate):
    h = model._fc1(x)
    for norm, mixer in model.layers:
        h = h + upstream_srmamba(mixer, norm(h), rate)
    h = model.norm(h)
    a = torch.softmax(model.attention(h).transpose(1, 2), dim=-1)
    return model.classifier(torch.bmm(a, h).squeeze(1))


@pytest.mark.parametrize("length, rate", [(23, 5), (20, 5), (3, 5), (40, 10)])
def test_mambamil_matches_upstream_srmamba_forward_and_backward(length, rate):
    torch.manual_seed(length)
    model = MambaMIL(in_dim=24, n_classes=3, layer=2, rate=rate, dim=16, d_state=4).double()
    for _, mixer in model.layers:
        mixer.scan_backend = "reference"
        with torch.no_grad():    # non-zero dt biases (upstream init zeroes them) to exercise every path
            mixer.dt_proj.bias.uniform_(-3, 0)
            mixer.dt_proj_b.bias.uniform_(-3, 0)
    x = torch.randn(1, length, 24, dtype=torch.float64, requires_grad=True)
    ours = model(x)
    ref = upstream_mambamil(model, x, rate)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * w).sum(), [x, model.layers[0][1].A_b_log, model.layers[1][1].conv1d_b.weight])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, model.layers[0][1].A_b_log, model.layers[1][1].conv1d_b.weight])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_mambamil_fast_kernel_matches_reference_in_float32():
    torch.manual_seed(0)
    model = MambaMIL(in_dim=32, n_classes=2, rate=5, dim=32, d_state=8)
    x = torch.randn(57, 32)
    out = model(x)
    ref = upstream_mambamil(model, x.unsqueeze(0), 5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _upstream_mambamil_shapes(in_dim=1024, n_classes=2, layers=2, dim=512, d_state=16, d_conv=4, expand=2):
    d_inner, rank = expand * dim, math.ceil(dim / 16)
    shapes = {"_fc1.0.weight": (dim, in_dim), "_fc1.0.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
              "classifier.weight": (n_classes, dim), "classifier.bias": (n_classes,),
              "attention.0.weight": (128, dim), "attention.0.bias": (128,), "attention.2.weight": (1, 128),
              "attention.2.bias": (1,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "0.weight": (dim,), p + "0.bias": (dim,), p + "1.in_proj.weight": (2 * d_inner, dim),
                       p + "1.out_proj.weight": (dim, d_inner)})
        for s in ("", "_b"):
            shapes.update({f"{p}1.conv1d{s}.weight": (d_inner, 1, d_conv), f"{p}1.conv1d{s}.bias": (d_inner,),
                           f"{p}1.x_proj{s}.weight": (rank + 2 * d_state, d_inner),
                           f"{p}1.dt_proj{s}.weight": (d_inner, rank), f"{p}1.dt_proj{s}.bias": (d_inner,),
                           f"{p}1.D{s}": (d_inner,)})
        shapes[p + "1.A_log"] = shapes[p + "1.A_b_log"] = (d_inner, d_state)
    return shapes


def test_mambamil_has_upstream_names_shapes_and_size():
    model = MambaMIL(in_dim=1024, n_classes=2, rate=5)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _upstream_mambamil_shapes()
    assert sum(p.numel() for p in model.parameters()) == 4_227_843     # upstream MambaMIL(1024, 2)


def test_mambamil_checkpointing_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    plain = MambaMIL(in_dim=8, n_classes=2, dim=8, d_state=4, rate=3).double()
    ckpt = MambaMIL(in_dim=8, n_classes=2, dim=8, d_state=4, rate=3, checkpoint_layers=True).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 20, 8, dtype=torch.float64, requires_grad=True)
    outs = [m(x) for m in (plain, ckpt)]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad(o.sum(), [x, m.layers[1][1].in_proj.weight]) for o, m in zip(outs, (plain, ckpt))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_mambamil_memory_efficient_gives_the_same_values_and_gradients(dropout):
    """set_memory_efficient: the mixers recompute their intermediates, the layers their LayerNorm's output and
    the input projection its output in the backward (`output_recomputed`, taken: spied); the same values,
    gradients equal to float64 rounding (with dropout after the projection: the same mask, not redrawn)."""
    from mambakit.apps.pathology import models as models_module
    from mambakit.core import set_memory_efficient
    torch.manual_seed(0)
    plain = MambaMIL(in_dim=8, n_classes=2, dim=8, d_state=4, rate=3, dropout=dropout).double()
    lean = MambaMIL(in_dim=8, n_classes=2, dim=8, d_state=4, rate=3, dropout=dropout).double()
    lean.load_state_dict(plain.state_dict())
    assert set_memory_efficient(lean) == 2
    calls = []
    real = models_module.output_recomputed
    models_module.output_recomputed = lambda *a: calls.append(1) or real(*a)
    x = torch.randn(1, 20, 8, dtype=torch.float64)
    outs = []
    try:
        for m in (plain, lean):
            torch.manual_seed(5)
            outs.append(m(x))
    finally:
        models_module.output_recomputed = real
    assert len(calls) == 3 and torch.equal(outs[0], outs[1])
    grads = [torch.autograd.grad(o.sum(), list(m.parameters())) for o, m in zip(outs, (plain, lean))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mambamil_init_modes():
    up = MambaMIL(in_dim=16, n_classes=2, dim=16, init="upstream")
    assert all(float(m.dt_proj.bias.detach().abs().max()) == 0 for _, m in up.layers)          # upstream zeroes dt biases
    mamba = MambaMIL(in_dim=16, n_classes=2, dim=16, init="mamba")
    dt = F.softplus(mamba.layers[0][1].dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-4 - 1e-7 and float(dt.max()) <= 0.1 + 1e-6


def test_mambamil_scores_and_variants():
    torch.manual_seed(0)
    x = torch.randn(30, 8)
    for mixer in ("SRMamba", "Mamba", "BiMamba"):
        model = MambaMIL(in_dim=8, n_classes=4, dim=8, d_state=4, mixer=mixer, rate=3)
        logits, scores = model(x, return_scores=True)
        assert logits.shape == (1, 4) and scores.shape == (1, 30)
        torch.testing.assert_close(scores.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="mixer"):
        MambaMIL(in_dim=8, mixer="Hydra")


# --------------------------------------------------------------------------------------------------
# baselines

def test_abmil_matches_definition_and_is_permutation_invariant():
    torch.manual_seed(0)
    x = torch.randn(40, 12, dtype=torch.float64)
    for gated in (False, True):
        model = ABMIL(in_dim=12, n_classes=3, gated=gated, dim=10, hidden=6).double()
        h = F.relu(model.feature[0](x))
        if gated:
            s = model.attention_weights(torch.tanh(model.attention_V[0](h)) * torch.sigmoid(model.attention_U[0](h)))
        else:
            s = model.attention[2](torch.tanh(model.attention[0](h)))
        a = torch.softmax(s.squeeze(1), 0)
        expected = model.classifier(a @ h)
        logits, scores = model(x, return_scores=True)
        torch.testing.assert_close(logits[0], expected)
        torch.testing.assert_close(scores[0], a)
        perm = torch.randperm(40)
        torch.testing.assert_close(model(x[perm]), logits)
    assert "attention_V.0.weight" in ABMIL(gated=True).state_dict()
    assert set(ABMIL(gated=False).state_dict()) == {"feature.0.weight", "feature.0.bias", "attention.0.weight",
                                                    "attention.0.bias", "attention.2.weight", "attention.2.bias",
                                                    "classifier.0.weight", "classifier.0.bias"}


def test_mean_and_max_pool_instance_logits():
    torch.manual_seed(0)
    x = torch.randn(25, 6)
    mean, mx = MeanMIL(in_dim=6, n_classes=2, dim=5).eval(), MaxMIL(in_dim=6, n_classes=2, dim=5).eval()
    torch.testing.assert_close(mean(x), mean.head(x).mean(0, keepdim=True))
    torch.testing.assert_close(mx(x), mx.head(x).max(0, keepdim=True)[0])
    assert set(mean.state_dict()) == {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"}
    _, scores = mx(x, return_scores=True)
    top = int(mx(x).argmax())
    torch.testing.assert_close(scores[0], mx.head(x)[:, top])


def test_bag_shape_errors():
    model = ABMIL(in_dim=8, n_classes=2)
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="in_dim=8"):
        model(torch.randn(5, 7))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 8))
    with pytest.raises(ValueError, match="unknown MIL model"):
        build_mil_model("clam", 8, 2)


# --------------------------------------------------------------------------------------------------
# TransMIL

def test_iterative_pinv_converges_to_the_pseudo_inverse():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(2, 3, 16, 16, dtype=torch.float64) * 4, dim=-1)
    torch.testing.assert_close(moore_penrose_iter_pinv(x, iters=30), torch.linalg.pinv(x), rtol=1e-6, atol=1e-6)


def _nystrom_reference(attn: NystromAttention, x: torch.Tensor, iters: int) -> torch.Tensor:
    """Nystromformer attention written per head with explicit landmark means (float64)."""
    b, n, _ = x.shape
    h, m = attn.heads, attn.num_landmarks
    pad = (m - n % m) % m
    xp = torch.cat([torch.zeros(b, pad, x.shape[2], dtype=x.dtype), x], dim=1)
    q, k, v = attn.to_qkv(xp).chunk(3, dim=-1)
    d = q.shape[-1] // h
    group = math.ceil(n / m)
    heads = []
    for i in range(h):
        qi, ki, vi = (t[0, :, i * d:(i + 1) * d] for t in (q, k, v))
        qi = qi * attn.scale
        ql = torch.stack([qi[j * group:(j + 1) * group].mean(0) for j in range(m)])
        kl = torch.stack([ki[j * group:(j + 1) * group].mean(0) for j in range(m)])
        out = torch.softmax(qi @ kl.T, -1) @ torch.linalg.pinv(torch.softmax(ql @ kl.T, -1)) @ (torch.softmax(ql @ ki.T, -1) @ vi)
        heads.append(out + _depthwise(attn, vi, i))
    out = attn.to_out(torch.cat(heads, dim=-1)[None])
    return out[:, -n:]


def _depthwise(attn, vi, i):
    """Head i's residual: every value column convolved along the sequence with the head's kernel."""
    w = attn.res_conv.weight[i, 0, :, 0]
    k, d = w.shape[0], vi.shape[1]
    return F.conv1d(vi.T.unsqueeze(0), w.view(1, 1, k).expand(d, 1, k), padding=k // 2, groups=d)[0].T


@pytest.mark.parametrize("n, landmarks", [(20, 4), (18, 4), (7, 8)])
def test_nystrom_attention_matches_reference(n, landmarks):
    torch.manual_seed(n)
    attn = NystromAttention(dim=16, dim_head=4, heads=4, num_landmarks=landmarks, pinv_iterations=40,
                            residual_conv_kernel=5).double().eval()
    with torch.no_grad():
        attn.to_qkv.weight.mul_(3)          # sharper softmaxes: a well-conditioned landmark kernel
    x = torch.randn(1, n, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _nystrom_reference(attn, x, 40), rtol=1e-6, atol=1e-6)


def test_nystrom_with_one_token_per_landmark_is_exact_softmax_attention():
    torch.manual_seed(1)
    attn = NystromAttention(dim=8, dim_head=4, heads=2, num_landmarks=6, pinv_iterations=40, residual=False).double()
    with torch.no_grad():
        attn.to_qkv.weight.mul_(3)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(1, 6, 2, 4).transpose(1, 2) for t in (q, k, v))
    exact = torch.softmax(q * attn.scale @ k.transpose(-1, -2), -1) @ v
    torch.testing.assert_close(attn(x), attn.to_out(exact.transpose(1, 2).reshape(1, 6, 8)), rtol=1e-6, atol=1e-6)


def test_transmil_runs_on_any_bag_size_and_ppeg_identity():
    torch.manual_seed(0)
    model = TransMIL(in_dim=16, n_classes=2, dim=32).eval()
    for n in (1, 2, 5, 17):
        assert model(torch.randn(n, 16)).shape == (1, 2)
    with pytest.raises(NotImplementedError, match="per-instance"):
        model(torch.randn(3, 16), return_scores=True)
    ppeg = PPEG(4)
    for conv in (ppeg.proj, ppeg.proj1, ppeg.proj2):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    x = torch.randn(1, 1 + 9, 4)
    torch.testing.assert_close(ppeg(x, 3, 3), x)
    keys = set(TransMIL().state_dict())
    assert {"cls_token", "_fc1.0.weight", "pos_layer.proj.weight", "layer1.attn.to_qkv.weight",
            "layer2.attn.res_conv.weight", "layer1.norm.weight", "norm.weight", "classifier.weight"} <= keys
