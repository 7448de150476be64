"""Multi-order mixers: Vim's bimamba v2 as flip-composed causal mixers, SR-Mamba against MambaMIL's formula,
parameter names, merges, variable lengths for every kind of order, and the step() error."""

import pytest
import torch
import torch.nn.functional as F

import core_refs
from core_refs import randomize
from mambakit.core import Mamba, MultiOrderMamba, PerOrderMamba, PointOrder, StrideOrder

F64 = torch.float64


def make(orders, merge="sum", d_model=16, **kw):
    return randomize(MultiOrderMamba(d_model, orders=orders, merge=merge, d_state=4, dtype=F64, **kw))


def causal_copy(bi, suffix):
    """A causal Mamba holding the bidirectional mixer's shared projections and one order's parameters."""
    m = Mamba(bi.d_model, d_state=bi.d_state, d_conv=bi.d_conv, dtype=F64)
    sd = {k: v for k, v in bi.state_dict().items() if k.startswith(("in_proj", "out_proj"))}
    for name in ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"):
        mod, _, attr = name.partition(".")
        sd[name] = bi.state_dict()[f"{mod}{suffix}.{attr}"]
    sd["A_log"], sd["D"] = bi.state_dict()[f"A{suffix}_log"], bi.state_dict()[f"D{suffix}"]
    m.load_state_dict(sd, strict=True)
    return m


@pytest.mark.parametrize("if_divide_out", [True, False])
def test_vim_bimamba_v2_is_flip_composition_of_two_causal_mixers(if_divide_out):
    bi = randomize(MultiOrderMamba.vim(16, if_divide_out=if_divide_out, d_state=4, dtype=F64))
    fwd, bwd = causal_copy(bi, ""), causal_copy(bi, "_b")
    x = torch.randn(3, 11, 16, dtype=F64)
    expected = fwd(x) + bwd(x.flip(1)).flip(1)            # out_proj has no bias, so it distributes over the sum
    if if_divide_out:
        expected = expected / 2
    torch.testing.assert_close(bi(x), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("orders,merge", [(("identity", "flip"), "mean"), (("identity", "flip"), "sum"),
                                          (("flip", "identity", "flip"), "mean")])
def test_inference_sums_the_orders_in_place_with_the_same_numbers(orders, merge, dtype, monkeypatch):
    """At inference on the fused CPU kernel each order after the first adds its output into the first's as the
    kernel writes it: bit for bit the per-order outputs summed (the path taken under autograd)."""
    from mambakit.core.mamba import SelectiveSSM
    m = randomize(MultiOrderMamba(24, orders=orders, merge=merge, d_state=4, dtype=dtype)).eval()
    x = torch.randn(2, 37, 24, dtype=dtype)
    if not m._projected_scan(x):
        pytest.skip("needs the fused CPU scan kernel")
    calls = []
    branch = SelectiveSSM._branch

    def spy(self, *args, accumulate_into=None, **kw):
        calls.append(accumulate_into is not None)
        return branch(self, *args, accumulate_into=accumulate_into, **kw)
    monkeypatch.setattr(SelectiveSSM, "_branch", spy)
    with torch.no_grad():
        got = m(x)
    assert calls == [False] + [True] * (len(orders) - 1)
    want = m(x)                                          # parameters require grad: one output per order, merged
    assert calls[len(orders):] == [False] * len(orders)
    assert torch.equal(got, want.detach())


def vim_state_dict_keys(d_model, d_state=16, expand=2, d_conv=4):
    import math
    di, r = expand * d_model, math.ceil(d_model / 16)
    keys = {"in_proj.weight": (2 * di, d_model), "out_proj.weight": (d_model, di)}
    for s in ("", "_b"):
        keys.update({f"conv1d{s}.weight": (di, 1, d_conv), f"conv1d{s}.bias": (di,),
                     f"x_proj{s}.weight": (r + 2 * d_state, di), f"dt_proj{s}.weight": (di, r),
                     f"dt_proj{s}.bias": (di,), f"A{s}_log": (di, d_state), f"D{s}": (di,)})
    return keys


def test_vim_checkpoint_names_load_strictly_and_init():
    m = MultiOrderMamba.vim(192)
    sd = {k: torch.randn(s) for k, s in vim_state_dict_keys(192).items()}
    m.load_state_dict(sd, strict=True)
    fresh = MultiOrderMamba.vim(64)
    assert torch.equal(fresh.A_b_log, fresh.A_log) and torch.equal(fresh.D_b, torch.ones(128))
    assert fresh.A_b_log._no_weight_decay and fresh.D_b._no_weight_decay and fresh.dt_proj_b.bias._no_reinit
    dt_b = F.softplus(fresh.dt_proj_b.bias.detach())
    assert dt_b.min() >= 0.001 * (1 - 1e-5) and dt_b.max() <= 0.1 * (1 + 1e-5)


def test_more_than_two_orders_use_numbered_names():
    m = MultiOrderMamba(16, orders=("identity", "flip", "stride_3"), merge="concat")
    names = set(m.state_dict())
    for s in ("", "_1", "_2"):
        assert {f"conv1d{s}.weight", f"x_proj{s}.weight", f"dt_proj{s}.bias", f"A{s}_log", f"D{s}"} <= names
    assert "merge_proj.weight" in names and m.merge_proj.weight.shape == (32, 96)
    custom = MultiOrderMamba(16, orders=("identity", "flip"), param_suffixes=("", "_rev"))
    assert "A_rev_log" in custom.state_dict() and "conv1d_rev.weight" in custom.state_dict()


def test_sr_mamba_matches_mambamil_formula():
    """MambaMIL SRMamba: zero-pad xz to a multiple of R, rearrange "(k w) -> (w k)", scan with the _b set,
    rearrange back, drop the padding; out_proj(forward + that)."""
    R = 4
    m = randomize(MultiOrderMamba.sr(16, rate=R, d_state=4, dtype=F64, bias=True))
    x = torch.randn(2, 10, 16, dtype=F64)
    xz = m.in_proj(x)
    b, L, c = xz.shape
    pad = (-L) % R
    K = (L + pad) // R
    xz_b = F.pad(xz, (0, 0, 0, pad)).view(b, K, R, c).transpose(1, 2).reshape(b, K * R, c)
    y_b = core_refs.mamba1_branch_of(m, xz_b, "_b")
    y_b = y_b.view(b, R, K, -1).transpose(1, 2).reshape(b, K * R, -1)[:, :L]
    expected = m.out_proj(core_refs.mamba1_branch_of(m, xz) + y_b)
    torch.testing.assert_close(m(x), expected, rtol=1e-11, atol=1e-12)


def test_sr_without_padding_differs_only_when_length_is_not_a_multiple():
    m = make(("identity", StrideOrder(4)))
    nopad = make(("identity", StrideOrder(4, pad=False)))
    nopad.load_state_dict(m.state_dict())
    x = torch.randn(1, 12, 16, dtype=F64)
    torch.testing.assert_close(m(x), nopad(x), rtol=1e-12, atol=1e-13)
    assert not torch.allclose(m(x[:, :10]), nopad(x[:, :10]))


def test_merges_concat_and_gate_match_manual_formulas():
    for merge in ("concat", "gate"):
        m = make(("identity", "flip", "stride_2"), merge=merge)
        x = torch.randn(2, 7, 16, dtype=F64)
        xz = m.in_proj(x)
        ys = [core_refs.mamba1_branch_of(m, xz, ""),
              core_refs.mamba1_branch_of(m, xz.flip(1), "_1").flip(1)]
        sr = torch.cat([xz, xz.new_zeros(2, 1, xz.shape[-1])], 1)[:, [0, 2, 4, 6, 1, 3, 5, 7]]
        y2 = core_refs.mamba1_branch_of(m, sr, "_2")
        ys.append(torch.empty_like(ys[0]).index_copy_(1, torch.tensor([0, 2, 4, 6, 1, 3, 5]), y2[:, :7]))
        cat = torch.cat(ys, -1)
        if merge == "concat":
            y = m.merge_proj(cat)
        else:
            w = torch.softmax(m.merge_gate(cat), -1)
            y = sum(w[..., k:k + 1] * ys[k] for k in range(3))
        torch.testing.assert_close(m(x), m.out_proj(y), rtol=1e-11, atol=1e-12)


def padded_batch(seqs, L, fill=30.0):
    out = torch.full((len(seqs), L, seqs[0].shape[-1]), fill, dtype=F64)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


@pytest.mark.parametrize("orders", [("identity", "flip"), ("flip", StrideOrder(3)), ("stride_4_nopad",)])
def test_variable_lengths_match_each_sequence_alone(orders):
    m = make(orders, merge="mean")
    lengths = [8, 5, 1, 7]
    seqs = [torch.randn(n, 16, dtype=F64) for n in lengths]
    out = m(padded_batch(seqs, 8), lengths=torch.tensor(lengths))
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i, : len(s)], m(s[None])[0], rtol=1e-11, atol=1e-12)
        assert torch.all(out[i, len(s):] == 0)


def test_point_orders_with_lengths_match_alone():
    m = make((PointOrder("hilbert", depth=6), PointOrder("xzy")), merge="sum")
    lengths = [12, 9]
    pts = [torch.rand(n, 3) for n in lengths]
    feats = [torch.randn(n, 16, dtype=F64) for n in lengths]
    coords = torch.zeros(2, 12, 3)
    for i, p in enumerate(pts):
        coords[i, : len(p)] = p
        coords[i, len(p):] = 5.0                                           # padding far away
    out = m(padded_batch(feats, 12), lengths=torch.tensor(lengths), coords=coords)
    for i in range(2):
        alone = m(feats[i][None], coords=pts[i][None])[0]
        torch.testing.assert_close(out[i, : lengths[i]], alone, rtol=1e-11, atol=1e-12)


def test_grid_orders_and_precomputed_indices():
    from mambakit.core import CROSS_SCAN, scan_order
    m = make(CROSS_SCAN, merge="sum")
    x = torch.randn(2, 12, 16, dtype=F64)
    y = m(x, hw=(3, 4))
    idx = [scan_order(n).indices(12, hw=(3, 4)) for n in CROSS_SCAN]
    torch.testing.assert_close(m(x, order_indices=idx), y)
    assert not torch.allclose(m(x, hw=(4, 3)), y)
    with pytest.raises(ValueError, match="order_indices"):
        m(x, order_indices=idx[:2])


def test_per_order_mamba_is_s_mamba_composition():
    torch.manual_seed(0)
    m = PerOrderMamba(16, orders=("identity", "flip"), merge="sum", d_state=4, dtype=F64)
    for sub in m.mixers:
        randomize(sub)
    x = torch.randn(2, 9, 16, dtype=F64)
    torch.testing.assert_close(m(x), m.mixers[0](x) + m.mixers[1](x.flip(1)).flip(1), rtol=1e-12, atol=1e-13)
    cat = PerOrderMamba(16, orders=("identity", "flip"), merge="concat", d_state=4, dtype=F64)
    assert cat(x).shape == (2, 9, 32) and cat.out_features == 32
    lengths = torch.tensor([9, 4])
    out = m(padded_batch([x[0], x[1, :4]], 9), lengths=lengths)
    torch.testing.assert_close(out[1, :4], m(x[1:2, :4])[0], rtol=1e-12, atol=1e-13)


def test_not_causal_mixers_refuse_recurrent_decoding():
    from mambakit.core import InferenceParams
    for m in (MultiOrderMamba.vim(16, layer_idx=0), PerOrderMamba(16)):
        with pytest.raises(RuntimeError, match="is not causal"):
            m.step(torch.randn(1, 1, 16), None, None)
        with pytest.raises(RuntimeError, match="is not causal"):
            m(torch.randn(1, 3, 16), inference_params=InferenceParams(3, 1))
        with pytest.raises(RuntimeError, match="is not causal"):
            m.allocate_inference_cache(1, 3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown merge 'max'"):
        MultiOrderMamba(16, merge="max")
    with pytest.raises(ValueError, match="unknown scan order 'zigzag'"):
        MultiOrderMamba(16, orders=("identity", "zigzag"))
    with pytest.raises(ValueError, match="param_suffixes must be 2 distinct"):
        MultiOrderMamba(16, param_suffixes=("", ""))
    with pytest.raises(ValueError, match="d_model=16"):
        MultiOrderMamba(16)(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="has length 0"):
        MultiOrderMamba(16)(torch.randn(1, 0, 16))
    with pytest.raises(ValueError, match="unknown merge 'gate'"):
        PerOrderMamba(16, merge="gate")
