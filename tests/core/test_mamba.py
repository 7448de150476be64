"""Mamba (Mamba-1): numerics against an independent loop, upstream checkpoint keys, initialisation, recurrent
decoding and variable lengths."""

import math

import pytest
import torch

import core_refs
from core_refs import randomize
from mambakit.core import InferenceParams, Mamba

F64 = torch.float64


def make(d_model=16, **kw):
    return Mamba(d_model, d_state=4, layer_idx=0, dtype=F64, **kw)


@pytest.mark.parametrize("bias,conv_bias", [(True, True), (False, False)])
def test_forward_and_backward_match_independent_loop(bias, conv_bias):
    m = randomize(make(conv_bias=conv_bias, bias=bias))
    x = torch.randn(2, 9, 16, dtype=F64, requires_grad=True)
    y = m(x)
    y_ref = core_refs.mamba1(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *m.parameters()], g)
    for (name, _), a, r in zip([("x", None), *m.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def upstream_mamba_keys(d_model, d_state=16, d_conv=4, expand=2, bias=False, conv_bias=True):
    """Key -> shape of a mamba_ssm Mamba state dict (UPSTREAM.md "Checkpoint keys")."""
    di, r = expand * d_model, math.ceil(d_model / 16)
    keys = {"A_log": (di, d_state), "D": (di,), "in_proj.weight": (2 * di, d_model),
            "conv1d.weight": (di, 1, d_conv), "x_proj.weight": (r + 2 * d_state, di),
            "dt_proj.weight": (di, r), "dt_proj.bias": (di,), "out_proj.weight": (d_model, di)}
    if conv_bias:
        keys["conv1d.bias"] = (di,)
    if bias:
        keys.update({"in_proj.bias": (2 * di,), "out_proj.bias": (d_model,)})
    return keys


@pytest.mark.parametrize("d_model,bias,conv_bias", [(24, False, True), (40, True, False)])
def test_upstream_state_dict_loads_strictly(d_model, bias, conv_bias):
    m = Mamba(d_model, bias=bias, conv_bias=conv_bias)
    sd = {k: torch.randn(s) for k, s in upstream_mamba_keys(d_model, bias=bias, conv_bias=conv_bias).items()}
    m.load_state_dict(sd, strict=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert m.dt_rank == math.ceil(d_model / 16)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(1)
    m = Mamba(64, d_state=16, dt_min=0.002, dt_max=0.05)
    N = 16
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(128, 1))
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32
    assert torch.equal(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    # log-uniform: the median of log(dt) sits near the middle of [log dt_min, log dt_max]
    mid = (math.log(0.002) + math.log(0.05)) / 2
    assert abs(dt.log().median().item() - mid) < 0.5
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > 0.8 * bound
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None


def test_dt_init_floor_and_constant():
    m = Mamba(16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3, dt_init="constant")
    dt = torch.nn.functional.softplus(m.dt_proj.bias.detach().double())
    torch.testing.assert_close(dt, torch.full_like(dt, 1e-3), rtol=1e-4, atol=0)
    assert torch.allclose(m.dt_proj.weight, torch.full_like(m.dt_proj.weight, m.dt_rank ** -0.5))


def test_step_equals_forward():
    m = randomize(make())
    x = torch.randn(3, 10, 16, dtype=F64)
    y = m(x)
    conv_state, ssm_state = m.allocate_inference_cache(3, 10)
    assert conv_state.shape == (3, 32, 4) and ssm_state.shape == (3, 32, 4) and ssm_state.dtype == F64
    steps = [m.step(x[:, t:t + 1], conv_state, ssm_state)[0] for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("prefill", [1, 3, 7])
def test_prefill_then_step_and_chunked_continuation(prefill):
    m = randomize(make())
    x = torch.randn(2, 9, 16, dtype=F64)
    y = m(x)
    params = InferenceParams(max_seqlen=9, max_batch_size=2)
    outs = [m(x[:, :prefill], inference_params=params)]
    params.seqlen_offset = prefill
    for t in range(prefill, 9):
        outs.append(m(x[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-12, atol=1e-13)
    # several tokens at once after a prefill continue the scan from the cached states
    params = InferenceParams(max_seqlen=9, max_batch_size=2)
    first = m(x[:, :prefill], inference_params=params)
    params.seqlen_offset = prefill
    rest = m(x[:, prefill:], inference_params=params)
    torch.testing.assert_close(torch.cat([first, rest], 1), y, rtol=1e-12, atol=1e-13)


def test_variable_lengths_match_each_sequence_alone():
    m = randomize(make())
    lengths = torch.tensor([7, 3, 5])
    seqs = [torch.randn(1, int(n), 16, dtype=F64) for n in lengths]
    batch = torch.zeros(3, 7, 16, dtype=F64)
    for i, s in enumerate(seqs):
        batch[i, : s.shape[1]] = s
        batch[i, s.shape[1]:] = 100 * torch.randn(7 - s.shape[1], 16)    # garbage padding
    out = m(batch, lengths=lengths)
    for i, s in enumerate(seqs):
        n = s.shape[1]
        torch.testing.assert_close(out[i, :n], m(s)[0], rtol=1e-12, atol=1e-13)
        assert torch.all(out[i, n:] == 0)


def test_ragged_prefill_then_step_continues_each_sequence():
    """With lengths, the prefill caches each sequence's own last state, so decoding continues correctly."""
    m = randomize(make())
    lengths = torch.tensor([6, 2])
    full = torch.randn(2, 9, 16, dtype=F64)
    prompt = full[:, :6].clone()
    prompt[1, 2:] = 50.0                                                   # padding of the short prompt
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    m(prompt, inference_params=params, lengths=lengths)
    params.seqlen_offset = 6
    nxt = torch.randn(2, 3, 16, dtype=F64)
    outs = []
    for t in range(3):
        outs.append(m(nxt[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    for i, n in enumerate(lengths.tolist()):
        alone = m(torch.cat([full[i:i + 1, :n], nxt[i:i + 1]], 1))[0, n:]
        torch.testing.assert_close(torch.cat(outs, 1)[i], alone, rtol=1e-12, atol=1e-13)


def test_float32_close_to_float64():
    m = randomize(make())
    x = torch.randn(2, 12, 16, dtype=F64)
    y64 = m(x)
    y32 = m.float()(x.float())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)


def test_bfloat16_module_runs_in_bfloat16_and_stays_close():
    m = randomize(make()).float()
    x = torch.randn(2, 12, 16)
    y32 = m(x)
    m16 = m.to(torch.bfloat16)
    y16 = m16(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()
    conv, ssm = m16.allocate_inference_cache(2, 12)
    assert conv.dtype == ssm.dtype == torch.bfloat16
    assert m16.step(x[:, :1].to(torch.bfloat16), conv, ssm)[0].dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    m = make()
    with pytest.raises(ValueError, match=r"expected \(batch, length, d_model=16\)"):
        m(torch.randn(2, 5, 8, dtype=F64))
    with pytest.raises(ValueError, match="hidden_states has shape"):
        m(torch.randn(5, 16, dtype=F64))
    with pytest.raises(ValueError, match="has length 0"):
        m(torch.randn(2, 0, 16, dtype=F64))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        m(torch.randn(2, 5, 16, dtype=F64), lengths=torch.tensor([6, 1]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        m(torch.randn(2, 5, 16, dtype=F64), lengths=torch.tensor([1.0, 2.0]))
    conv, ssm = m.allocate_inference_cache(2, 4)
    with pytest.raises(ValueError, match="one token at a time"):
        m.step(torch.randn(2, 2, 16, dtype=F64), conv, ssm)
    with pytest.raises(ValueError, match="ssm_state has shape"):
        m.step(torch.randn(2, 1, 16, dtype=F64), conv, ssm[:1])
    with pytest.raises(ValueError, match="layer_idx"):
        Mamba(16)(torch.randn(1, 3, 16), inference_params=InferenceParams(4, 1))
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="uniform")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_mixers_project_delta_inside_the_kernel_with_the_reference_numbers(dtype, monkeypatch):
    """On the CPU the mixers hand dt_proj to the fused kernel instead of materialising delta, in inference and
    in training; outputs and gradients equal the same mixer on the reference scan (which materialises delta),
    float64 to rounding, float32 within the kernel's tolerance."""
    import copy

    from mambakit.core import MultiOrderMamba
    from mambakit.kernels import cpu_scan

    calls = []
    real = cpu_scan.selective_scan_cpu_projected
    monkeypatch.setattr(cpu_scan, "selective_scan_cpu_projected", lambda *a, **k: calls.append(1) or real(*a, **k))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    for mixer in (Mamba(24, d_state=8).to(dtype), MultiOrderMamba.vim(24, d_state=8).to(dtype)):
        ref = copy.deepcopy(mixer)
        ref.scan_backend = "reference"
        h = torch.randn(2, 37, 24, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(mixer(h), ref(h), **tol)
        out, ref_out = mixer(h), ref(h)
        torch.testing.assert_close(out, ref_out, **tol)
        weight = torch.randn_like(out)
        grads = torch.autograd.grad((out * weight).sum(), list(mixer.parameters()))
        ref_grads = torch.autograd.grad((ref_out * weight).sum(), list(ref.parameters()))
        for (name, _), g, r in zip(mixer.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(g, r, **tol, msg=name)
    assert len(calls) == 6          # Mamba's one order, Vim's two; with and without autograd
