"""Models: output shapes, the last valid position is read (padding invariance), TiM4Rec's time path, and
float64 comparisons against direct transcriptions of the upstream forward passes."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.apps.recsys.config import GRU4RecConfig, Mamba4RecConfig, SASRecConfig, TiM4RecConfig
from mambakit.apps.recsys.models import TiSSD, build_model

N_ITEMS, MAX_LEN = 30, 12
SMALL = {
    "mamba4rec": Mamba4RecConfig(hidden_size=16, d_state=8, dropout_prob=0.0),
    "mamba4rec2": Mamba4RecConfig(hidden_size=16, d_state=8, num_layers=2, dropout_prob=0.0),
    "tim4rec": TiM4RecConfig(hidden_size=16, d_state=8, head_dim=8, dropout_prob=0.0, time_dropout=0.0),
    "sasrec": SASRecConfig(hidden_size=16, inner_size=32, hidden_dropout_prob=0.0, attn_dropout_prob=0.0),
    "gru4rec": GRU4RecConfig(embedding_size=16, hidden_size=24, num_layers=2, dropout_prob=0.0),
}


def make(name, n_items=N_ITEMS, max_len=MAX_LEN):
    return build_model(SMALL[name], n_items, max_len).double().eval()


def batch(lengths, width=MAX_LEN, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    seq = torch.randint(1, N_ITEMS, (b, width), generator=gen)
    length = torch.tensor(lengths)
    valid = torch.arange(width) < length.unsqueeze(1)
    seq = torch.where(valid, seq, 0)
    gaps = torch.randint(1, 10**5, (b, width), generator=gen).double()
    times = torch.where(valid, 8.8e8 + torch.cumsum(gaps, 1), 0.0)
    return seq, length, times


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_and_scores(name):
    model = make(name)
    seq, length, times = batch([12, 5, 1])
    h = model(seq, length, times)
    hidden = SMALL[name].embedding_size if name == "gru4rec" else SMALL[name].hidden_size
    assert h.shape == (3, hidden)
    scores = model(seq, length, times, scores=True)
    assert scores.shape == (3, N_ITEMS)
    torch.testing.assert_close(scores, h @ model.item_embedding.weight.t())


@pytest.mark.parametrize("name", ["mamba4rec", "mamba4rec2", "sasrec", "gru4rec"])
def test_reads_last_valid_position_and_ignores_padding(name):
    model = make(name)
    seq, length, _ = batch([12, 7, 3, 1])
    out = model(seq, length)
    for i, n in enumerate(length.tolist()):
        alone = model(seq[i:i + 1, :n], length[i:i + 1])                 # no padding at all
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-10, atol=1e-10)
    garbage = torch.where(seq == 0, torch.randint(1, N_ITEMS, seq.shape), seq)
    torch.testing.assert_close(model(garbage, length), out, rtol=1e-10, atol=1e-10)
    # A different length reads a different position.
    assert not torch.allclose(model(seq[:1], torch.tensor([11])), out[:1])


def test_tim4rec_ignores_padded_items_and_needs_full_width():
    model = make("tim4rec")
    seq, length, times = batch([12, 7, 3, 1])
    out = model(seq, length, times)
    garbage = torch.where(seq == 0, torch.randint(1, N_ITEMS, seq.shape), seq)
    torch.testing.assert_close(model(garbage, length, times), out, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(seq, length.clamp(max=6), times)[:2], out[:2])
    with pytest.raises(ValueError, match=r"item_seq has length 7, expected exactly 12 \(max_len\)"):
        model(seq[:, :7], length.clamp(max=7), times[:, :7])
    with pytest.raises(ValueError, match="needs time_seq"):
        model(seq, length)


def test_time_signal_changes_output_and_trains_the_time_mlp():
    model = make("tim4rec")
    seq, length, times = batch([12, 9])
    # At upstream's init the time path is nearly silent (the dt multiplier is ~0.05 and softplus(dt_bias) is
    # small); move the weights as training would, then the gaps must matter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for layer in model.ssd_layers:
            layer.ssd.dt_bias.fill_(0.5)
            layer.ssd.conv1d4time_1.weight.mul_(8)
            layer.ssd.conv1d4time_2.weight.mul_(8)
    out = model(seq, length, times)
    stretched = torch.where(times > 0, 8.8e8 + (times - 8.8e8) ** 1.3 / 50, 0.0)   # other gaps, same order
    change = (model(seq, length, stretched) - out).abs().amax(1)
    assert change[0] > 1e-2
    # Upstream's padded gap (0 - t_last, about -8.8e8) dominates the LayerNorm over positions, so a sequence
    # shorter than max_len barely sees its gaps; mask_padding_gaps removes that.
    assert change[1] < 1e-3
    model.config.mask_padding_gaps = True
    masked_change = (model(seq, length, stretched) - model(seq, length, times)).abs().amax(1)
    assert masked_change[1] > 1e-2
    model.config.mask_padding_gaps = False
    model.train()
    loss = model(seq, length, times, scores=True).logsumexp(-1).sum()
    loss.backward()
    for i, layer in enumerate(model.ssd_layers):
        ssd = layer.ssd
        used = [ssd.mlp4time_scale[1].weight, ssd.mlp4time_scale[3].weight, ssd.conv1d4time_1.weight,
                ssd.conv1d4time_2.weight]
        if i < len(model.ssd_layers) - 1:
            used.append(ssd.time_gate_residual[1].weight)
        else:   # as upstream: the last layer's next time signal is computed for nobody
            assert ssd.time_gate_residual[1].weight.grad is None
        for p in used:
            assert p.grad is not None and p.grad.abs().sum() > 0
    # Without the time path the timestamps are not read at all.
    plain = build_model(TiM4RecConfig(hidden_size=16, d_state=8, head_dim=8, is_time=False), N_ITEMS, MAX_LEN).eval()
    assert not hasattr(plain.ssd_layers[0].ssd, "mlp4time_scale")
    torch.testing.assert_close(plain(seq, length, times), plain(seq, length, None))


def test_sasrec_matches_recbole_attention_in_float64():
    model = make("sasrec")
    seq, length, _ = batch([12, 6, 2])
    got = model(seq, length)
    # RecBole 1.2.1 SASRec.forward / MultiHeadAttention / FeedForward, transcribed.
    x = model.item_embedding(seq) + model.position_embedding(torch.arange(seq.shape[1])).unsqueeze(0)
    x = model.LayerNorm(x)
    mask = (seq != 0).unsqueeze(1).unsqueeze(2)
    mask = torch.where(torch.tril(mask.expand(-1, -1, seq.shape[1], -1)), 0.0, -10000.0).double()
    for layer in model.trm_encoder.layer:
        att = layer.multi_head_attention
        heads, size = att.n_heads, att.head_size
        q = att.query(x).view(*x.shape[:2], heads, size).permute(0, 2, 1, 3)
        k = att.key(x).view(*x.shape[:2], heads, size).permute(0, 2, 3, 1)
        v = att.value(x).view(*x.shape[:2], heads, size).permute(0, 2, 1, 3)
        probs = torch.softmax(q @ k / math.sqrt(size) + mask, dim=-1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(x.shape)
        x = att.LayerNorm(att.dense(ctx) + x)
        ff = layer.feed_forward
        h = ff.dense_1(x)
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = ff.LayerNorm(ff.dense_2(h) + x)
    want = x[torch.arange(3), length - 1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def naive_ssd(x, dt, A, B, C, D):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t. x (b, L, h, p), dt (b, L, h),
    B, C (b, L, n)."""
    b, L, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(L):
        state = torch.exp(dt[:, t] * A)[:, :, None, None] * state \
            + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append((state * C[:, t, None, None, :]).sum(-1) + D[None, :, None] * x[:, t])
    return torch.stack(ys, 1)


def upstream_tissd(m: TiSSD, u, time_diff):
    """AlwaysFHao/TiM4Rec ssd.py TiSSD.forward (nn.Conv1d path, d_mlp = 0, rms_norm=True), transcribed."""
    zxbcdt = m.in_proj(u)
    z, xBC, dt = torch.split(zxbcdt, [m.d_inner, m.d_inner + 2 * m.d_state, m.n_heads], dim=-1)
    k = m.d_conv
    xBC = m.act(m.conv1d(xBC.transpose(1, 2)).transpose(1, 2)[:, :-(k - 1), :])
    time_dt = time_diff * m.mlp4time_scale(time_diff)
    time_dt = m.act(m.conv1d4time_1(time_dt)[:, :, :-(k - 1)])
    time_dt = m.act(m.conv1d4time_2(time_dt).transpose(1, 2)[:, :-(k - 1), :])
    x, B, C = torch.split(xBC, [m.d_inner, m.d_state, m.d_state], dim=-1)
    dt_final = F.softplus(dt * time_dt + m.dt_bias)
    y = naive_ssd(x.unflatten(-1, (m.n_heads, m.head_dim)), dt_final, -torch.exp(m.A_log), B, C, m.D)
    y = y.flatten(-2)
    y = y * F.silu(z)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps) * m.norm.weight
    out = m.out_proj(y)
    gate = m.time_gate_residual(time_diff)
    return out, m.time_layer_norm(gate * time_diff + (1 - gate) * time_dt.transpose(-1, -2))


@pytest.mark.parametrize("activation, p2p", [("auto", False), ("silu", True)])
def test_tissd_matches_upstream_transcription(activation, p2p):
    torch.manual_seed(1)
    m = TiSSD(d_model=16, seq_len=10, d_state=8, d_conv=4, expand=2, head_dim=8, chunk_size=4,
              p2p_residual=p2p, norm_eps=1e-6, conv_activation=activation).double().eval()
    assert isinstance(m.act, torch.nn.Hardswish if activation == "auto" else torch.nn.SiLU)   # 4 heads: %8 != 0
    for p in m.parameters():                      # move away from the zero-bias init so every term matters
        p.data.add_(0.1 * torch.randn_like(p))
    u = torch.randn(3, 10, 16, dtype=torch.float64)
    time_diff = torch.randn(3, m.n_heads, 10, dtype=torch.float64)
    out, nxt = m(u, time_diff)
    want_out, want_next = upstream_tissd(m, u, time_diff)
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(nxt, want_next, rtol=1e-9, atol=1e-10)


def test_tim4rec_time_gaps_as_upstream():
    model = make("tim4rec")
    times = torch.tensor([[100.0, 160.0, 400.0, 0.0, 0.0]], dtype=torch.float64)
    # Upstream diffs the zero-padded list: the first padded gap is 0 - t_last.
    assert model.time_gaps(times, torch.tensor([3])).tolist() == [[0.0, 60.0, 240.0, -400.0, 0.0]]
    model.config.mask_padding_gaps = True
    assert model.time_gaps(times, torch.tensor([3])).tolist() == [[0.0, 60.0, 240.0, 0.0, 0.0]]


def test_mamba4rec_init_variants():
    up = build_model(Mamba4RecConfig(hidden_size=32), 100, 10)
    dt_bias = up.mamba_layers[0].mamba.dt_proj.bias
    assert torch.count_nonzero(dt_bias) == 0                      # Mamba4Rec's _init_weights zeroes it
    assert abs(up.mamba_layers[0].mamba.in_proj.weight.std().item() - 0.02) < 0.003
    mamba = build_model(Mamba4RecConfig(hidden_size=32, mixer_init="mamba"), 100, 10)
    dt = F.softplus(mamba.mamba_layers[0].mamba.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.99 and dt.max() <= 0.1 * 1.01      # mamba_ssm's dt in [dt_min, dt_max]
    assert abs(mamba.item_embedding.weight.std().item() - 0.02) < 0.003


def test_input_errors():
    model = make("sasrec")
    seq, length, _ = batch([5, 3])
    with pytest.raises(ValueError, match=r"item_seq_len must lie in \[1, 12\], got min 0"):
        model(seq, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match=r"item_seq has length 13, expected at most 12"):
        model(torch.ones(2, 13, dtype=torch.long), length)
    with pytest.raises(ValueError, match="item_seq must be int64"):
        model(seq.float(), length)
    with pytest.raises(ValueError, match="not divisible by head_dim"):
        build_model(TiM4RecConfig(hidden_size=20, head_dim=16), 10, 5)
