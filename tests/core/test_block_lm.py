"""Norms, Block, MixerModel, init_weights and the LM wrapper: upstream keys, residual stream, init statistics,
variable lengths through the backbone, greedy generation."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambakit.core import (Block, DropPath, Mamba, MambaConfig, MambaLMHeadModel, MixerModel, MultiOrderMamba, RMSNorm,
                           RMSNormGated, init_weights)
from mambakit.core.lm import padded_vocab_size

F64 = torch.float64


def test_rmsnorm_and_gated_rmsnorm_formulas():
    x, z = torch.randn(3, 5, 8, dtype=F64), torch.randn(3, 5, 8, dtype=F64)
    n = RMSNorm(8, eps=1e-5, dtype=F64)
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
    rms = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(n(x), rms(x) * n.weight)
    g = RMSNormGated(8, group_size=4, norm_before_gate=False, dtype=F64)
    with torch.no_grad():
        g.weight.uniform_(0.5, 1.5)
    xg = (x * F.silu(z)).view(3, 5, 2, 4)
    torch.testing.assert_close(g(x, z), rms(xg).view(3, 5, 8) * g.weight)
    g.norm_before_gate = True
    torch.testing.assert_close(g(x, z), rms(x.view(3, 5, 2, 4)).view(3, 5, 8) * g.weight * F.silu(z))
    half = RMSNorm(8)(torch.randn(2, 8).to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert [k for k, _ in n.named_parameters()] == ["weight"]
    with pytest.raises(ValueError, match="group_size=3 must divide hidden_size=8"):
        RMSNormGated(8, group_size=3)


def test_block_is_add_norm_mixer_and_keeps_residual():
    blk = Block(16, partial(Mamba, d_state=4, dtype=F64), norm_cls=partial(RMSNorm, dtype=F64),
                residual_in_fp32=True)
    h, r = torch.randn(2, 6, 16, dtype=F64), torch.randn(2, 6, 16, dtype=F64)
    out, res = blk(h, r)
    torch.testing.assert_close(res, h + r)
    torch.testing.assert_close(out, blk.mixer(blk.norm(h + r)))
    out0, res0 = blk(h)                                    # first block: the residual is the input itself
    torch.testing.assert_close(res0, h)
    with pytest.raises(ValueError, match="residual has shape"):
        blk(h, r[:, :3])


def test_block_residual_in_fp32_and_mlp():
    blk = Block(16, partial(Mamba, d_state=4), mlp_cls=partial(nn.Linear, out_features=16),
                residual_in_fp32=True).to(torch.bfloat16)
    h = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    out, res = blk(h, h)
    assert res.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert hasattr(blk, "norm2") and hasattr(blk, "mlp")


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = (y[:, 0] != 0).float()
    assert set(y.unique().tolist()) <= {0.0, 2.0} and abs(kept.mean().item() - 0.5) < 0.05
    assert torch.all((y == 0).all(1) | (y == 2).all(1)), "drops whole samples"


def test_backbone_equals_manual_block_loop_and_vim_drop_path_schedule():
    torch.manual_seed(0)
    bb = MixerModel(16, 3, ssm_cfg={"d_state": 4}, dtype=F64, drop_path_rate=0.2)
    assert [blk.drop_path.p if isinstance(blk.drop_path, DropPath) else 0.0 for blk in bb.layers] == \
        pytest.approx([0.0, 0.0, 0.1])
    assert bb.final_drop_path.p == pytest.approx(0.2)
    bb.eval()
    x = torch.randn(2, 5, 16, dtype=F64)
    h, r = x, None
    for blk in bb.layers:
        h, r = blk(h, r)
    torch.testing.assert_close(bb(inputs_embeds=x), bb.norm_f(h + r))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        bb()
    with pytest.raises(ValueError, match="no embedding"):
        bb(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown ssm_cfg layer 'Mamba9'"):
        MixerModel(16, 1, ssm_cfg={"layer": "Mamba9"})


def test_init_weights_statistics():
    torch.manual_seed(0)
    n_layer = 4
    bb = MixerModel(256, n_layer, vocab_size=1000, ssm_cfg={"bias": True}, d_intermediate=512)
    assert bb.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for blk in bb.layers:
        mixer = blk.mixer
        assert torch.all(mixer.in_proj.bias == 0) and torch.all(mixer.out_proj.bias == 0)
        dt = F.softplus(mixer.dt_proj.bias.detach())
        assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)   # dt bias survives (_no_reinit)
        # kaiming_uniform(a=sqrt(5)) has std 1/sqrt(3 fan_in); then / sqrt(2 * n_layer) with an MLP
        for w in (mixer.out_proj.weight, blk.mlp.fc2.weight):
            expected = 1 / math.sqrt(3 * w.shape[1]) / math.sqrt(2 * n_layer)
            assert w.std().item() == pytest.approx(expected, rel=0.05)
    lin = nn.Linear(4, 4)
    lin.bias._no_reinit = True
    before = lin.bias.clone()
    init_weights(lin, n_layer=2)
    assert torch.equal(lin.bias, before)


def test_backbone_lengths_with_bidirectional_mixers():
    bb = MixerModel(16, 2, mixer_cls=partial(MultiOrderMamba, orders=("identity", "flip"), d_state=4), dtype=F64)
    seqs = [torch.randn(7, 16, dtype=F64), torch.randn(4, 16, dtype=F64)]
    batch = torch.full((2, 7, 16), 9.0, dtype=F64)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    out = bb(inputs_embeds=batch, lengths=torch.tensor([7, 4]))
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i, : len(s)], bb(inputs_embeds=s[None])[0], rtol=1e-11, atol=1e-12)


# -- the LM wrapper ----------------------------------------------------------------------------------------

def upstream_lm_state_dict(d_model, n_layer, vocab, d_state=16, d_conv=4, expand=2):
    """A mamba_ssm MambaLMHeadModel (Mamba-1, the 130m config's layout) state dict at a tiny width."""
    di, r = expand * d_model, math.ceil(d_model / 16)
    emb = torch.randn(vocab, d_model)
    sd = {"backbone.embedding.weight": emb, "backbone.norm_f.weight": torch.rand(d_model), "lm_head.weight": emb}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        sd.update({p + "norm.weight": torch.rand(d_model), p + "mixer.A_log": torch.randn(di, d_state),
                   p + "mixer.D": torch.randn(di), p + "mixer.in_proj.weight": torch.randn(2 * di, d_model) * 0.1,
                   p + "mixer.conv1d.weight": torch.randn(di, 1, d_conv) * 0.3, p + "mixer.conv1d.bias": torch.randn(di),
                   p + "mixer.x_proj.weight": torch.randn(r + 2 * d_state, di) * 0.1,
                   p + "mixer.dt_proj.weight": torch.randn(di, r) * 0.1, p + "mixer.dt_proj.bias": torch.randn(di),
                   p + "mixer.out_proj.weight": torch.randn(d_model, di) * 0.1})
    return sd


def test_lm_loads_upstream_checkpoint_strictly_and_ties_head():
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=61, pad_vocab_size_multiple=8)
    lm = MambaLMHeadModel(cfg)
    assert padded_vocab_size(50277, 8) == 50280 and lm.lm_head.weight.shape == (64, 32)
    assert lm.lm_head.weight is lm.backbone.embedding.weight
    sd = upstream_lm_state_dict(32, 2, 64)
    lm.load_state_dict(sd, strict=True)
    assert torch.equal(lm.lm_head.weight, sd["backbone.embedding.weight"])
    assert set(lm.state_dict()) == set(sd)
    logits = lm(torch.randint(0, 61, (2, 5))).logits
    assert logits.shape == (2, 5, 64)


def test_lm_mamba2_layout_loads_strictly():
    cfg = MambaConfig(d_model=64, n_layer=1, vocab_size=40, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 32})
    lm = MambaLMHeadModel(cfg)
    keys = {k.removeprefix("backbone.layers.0.mixer.") for k in lm.state_dict() if ".mixer." in k}
    assert keys == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                    "out_proj.weight"}
    assert lm.backbone.layers[0].mixer.in_proj.weight.shape == (2 * 128 + 2 * 16 + 4, 64)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_greedy_generate_equals_recomputing_the_prefix(layer):
    torch.manual_seed(0)
    ssm = {"layer": layer, "d_state": 8} | ({"headdim": 16, "chunk_size": 8} if layer == "Mamba2" else {})
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=ssm)
    lm = MambaLMHeadModel(cfg, dtype=F64).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompt = torch.randint(0, 50, (2, 4))
    out = lm.generate(prompt, max_length=10)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        while seq.shape[1] < 10:
            nxt = lm(seq).logits[:, -1, :50].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


def test_generate_stops_at_eos_and_validates():
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=20, ssm_cfg={"d_state": 4})
    lm = MambaLMHeadModel(cfg)
    first = lm.generate(torch.tensor([[1, 2]]), max_length=3)[0, 2].item()
    out = lm.generate(torch.tensor([[1, 2]]), max_length=50, eos_token_id=first)
    assert out.shape == (1, 3)
    with pytest.raises(ValueError, match="max_length=2 must exceed"):
        lm.generate(torch.tensor([[1, 2]]), max_length=2)
    with pytest.raises(ValueError, match="attention layers"):
        MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, attn_layer_idx=[1]))
