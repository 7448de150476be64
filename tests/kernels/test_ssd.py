"""Mamba-2 SSD: the chunked scan and the one-step update against the sequential float64 reference, the
reference against the Mamba-1 reference, and `mambakit.core.ssd`'s validation and dispatch."""

import pytest
import torch

from mambakit.core.ssd import available_ssd_backends, ssd_scan, ssd_state_update
from mambakit.kernels.reference import selective_scan_ref, ssd_scan_ref
from mambakit.kernels.ssd import ssd_chunked, ssd_step

INPUT_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_multiplier", "initial_states")


def make_inputs(b, L, h, p, g, n, *, dtype=torch.float64, D="head", z=True, dt_bias=True, multiplier=True,
                init=True):
    return dict(
        x=torch.randn(b, L, h, p, dtype=dtype),
        dt=torch.randn(b, L, h, dtype=dtype),
        A=-(torch.rand(h, dtype=dtype) * 2 + 0.1),
        B=torch.randn(b, L, g, n, dtype=dtype),
        C=torch.randn(b, L, g, n, dtype=dtype),
        D={"head": torch.randn(h, dtype=dtype), "headdim": torch.randn(h, p, dtype=dtype), None: None}[D],
        z=torch.randn(b, L, h, p, dtype=dtype) if z else None,
        dt_bias=torch.randn(h, dtype=dtype) * 0.5 if dt_bias else None,
        dt_multiplier=torch.rand(b, L, h, dtype=dtype) + 0.5 if multiplier else None,
        initial_states=torch.randn(b, h, p, n, dtype=dtype) if init else None,
    )


def forward_and_grads(fn, inputs, g_y, g_s, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, final = fn(**leaves, return_final_states=True, **kwargs)
    grads = torch.autograd.grad((y * g_y).sum() + (final * g_s).sum(), list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


def assert_matches_reference(inputs, chunk_size, rtol=1e-10, atol=1e-10, **kwargs):
    b, L, h, p = inputs["x"].shape
    n = inputs["B"].shape[-1]
    g_y, g_s = torch.randn(b, L, h, p, dtype=torch.float64), torch.randn(b, h, p, n, dtype=torch.float64)
    y, s, grads = forward_and_grads(ssd_chunked, inputs, g_y, g_s, chunk_size=chunk_size, **kwargs)
    inputs64 = {k: None if v is None else v.double() for k, v in inputs.items()}
    y_ref, s_ref, grads_ref = forward_and_grads(ssd_scan_ref, inputs64, g_y, g_s, **kwargs)
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(s.double(), s_ref, rtol=rtol, atol=atol)
    assert set(grads) == {k for k, v in inputs.items() if v is not None}
    for name, g_ref in grads_ref.items():
        scale = g_ref.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name].double() / scale, g_ref / scale, rtol=rtol, atol=atol,
                                   msg=lambda m, k=name: f"gradient of {k}: {m}")
    return grads


# (b, L, h, p, g, n, chunk, input options, scan options)
CASES = {
    "L_not_multiple_of_chunk_g2_D_per_head": (2, 37, 4, 3, 2, 5, 8, dict(), dict(dt_softplus=True)),
    "L1": (2, 1, 4, 3, 2, 5, 8, dict(), dict(dt_softplus=True)),
    "exact_chunks_D_per_headdim_no_z_no_init": (1, 32, 2, 4, 1, 3, 16,
                                                dict(D="headdim", z=False, init=False), dict(dt_softplus=True)),
    "many_chunks_dt_limit_g_eq_h": (1, 203, 4, 2, 4, 2, 2, dict(D="headdim"),
                                    dict(dt_softplus=True, dt_limit=(0.05, 1.5))),  # 102 chunks: 2 blocks
    "chunk_longer_than_L_raw_dt": (2, 5, 2, 2, 1, 4, 64, dict(D=None, dt_bias=False, multiplier=False), dict()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_reference_forward_and_all_gradients(case):
    b, L, h, p, g, n, chunk, options, kwargs = CASES[case]
    inputs = make_inputs(b, L, h, p, g, n, **options)
    if not kwargs.get("dt_softplus"):
        inputs["dt"] = inputs["dt"].abs() * 0.5  # a raw step size is positive
    assert_matches_reference(inputs, chunk, **kwargs)


def test_chunked_float32_against_float64_reference():
    inputs = make_inputs(2, 50, 4, 8, 2, 16, dtype=torch.float32)
    y = ssd_chunked(**inputs, chunk_size=16, dt_softplus=True)
    assert y.dtype == torch.float32
    assert_matches_reference(inputs, 16, rtol=1e-4, atol=1e-4, dt_softplus=True)


def test_chunked_half_inputs_return_input_dtype():
    inputs = make_inputs(1, 20, 2, 4, 1, 8, dtype=torch.float32)
    half = {k: None if v is None else v.to(torch.bfloat16) for k, v in inputs.items()}
    y, final = ssd_chunked(**half, chunk_size=8, dt_softplus=True, return_final_states=True)
    y_ref, final_ref = ssd_scan_ref(**{k: None if v is None else v.double() for k, v in half.items()},
                                    dt_softplus=True, return_final_states=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(y.double(), y_ref, rtol=2 * eps, atol=2 * eps * y_ref.abs().max().item())
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


def test_padded_tail_leaves_final_state_unchanged():
    """softplus(0 + dt_bias) > 0, so padding dt before softplus would decay the state on the padded steps;
    the tail must be padded with dt = 0 after it."""
    inputs = make_inputs(2, 13, 2, 3, 1, 4, dt_bias=True)
    inputs["dt_bias"] = torch.full((2,), 3.0, dtype=torch.float64)   # softplus(3) ~ 3: a wrong pad would show
    _, final = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True, return_final_states=True)
    _, final_ref = ssd_scan_ref(**inputs, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(final, final_ref, rtol=1e-12, atol=1e-12)
    # and the same inputs cut at a chunk boundary give the state after step 8
    cut = {k: (v[:, :8] if k in ("x", "dt", "B", "C", "z", "dt_multiplier") else v) for k, v in inputs.items()}
    _, final_8 = ssd_chunked(**cut, chunk_size=8, dt_softplus=True, return_final_states=True)
    _, final_8_ref = ssd_scan_ref(**cut, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(final_8, final_8_ref, rtol=1e-12, atol=1e-12)


def test_chunk_lengths_are_balanced_and_any_chunking_gives_the_same_result():
    inputs = make_inputs(1, 65, 2, 2, 1, 3)
    y64, s64 = ssd_chunked(**inputs, chunk_size=64, dt_softplus=True, return_final_states=True)   # 2 x 33
    y7, s7 = ssd_chunked(**inputs, chunk_size=7, dt_softplus=True, return_final_states=True)      # 10 x 7
    y_ref, s_ref = ssd_scan_ref(**inputs, dt_softplus=True, return_final_states=True)
    for y, s in ((y64, s64), (y7, s7)):
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


def test_empty_sequence_returns_the_initial_state():
    inputs = make_inputs(2, 0, 2, 3, 1, 4)
    y, final = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True, return_final_states=True)
    assert y.shape == (2, 0, 2, 3)
    torch.testing.assert_close(final, inputs["initial_states"])


def test_dt_multiplier_scales_raw_dt_and_its_gradient_flows():
    inputs = make_inputs(1, 21, 2, 2, 1, 3, z=False, init=False)
    # multiplying the raw dt equals passing dt * multiplier with no multiplier
    y = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True)
    folded = dict(inputs, dt=inputs["dt"] * inputs["dt_multiplier"], dt_multiplier=None)
    torch.testing.assert_close(y, ssd_chunked(**folded, chunk_size=8, dt_softplus=True), rtol=1e-12, atol=1e-12)
    grads = assert_matches_reference(inputs, 8, dt_softplus=True)
    assert grads["dt_multiplier"].abs().min() > 0


def test_reference_ssd_equals_mamba1_with_a_shared_over_the_state():
    """Mamba-2 is Mamba-1 over d = h*p channels with A[h] repeated over (p, n), dt[h] repeated over p,
    and each of g groups of B/C serving (h/g)*p consecutive channels."""
    b, L, h, p, g, n = 2, 9, 4, 3, 2, 5
    inp = make_inputs(b, L, h, p, g, n, D="headdim", multiplier=False)
    y2, s2 = ssd_scan_ref(**inp, dt_softplus=True, return_final_states=True)
    d = h * p
    u = inp["x"].reshape(b, L, d).transpose(1, 2)
    delta = inp["dt"].repeat_interleave(p, dim=2).transpose(1, 2)
    A1 = inp["A"].repeat_interleave(p)[:, None].expand(d, n)
    B1, C1 = inp["B"].permute(0, 2, 3, 1), inp["C"].permute(0, 2, 3, 1)          # (b, g, n, L)
    y1, s1 = selective_scan_ref(u, delta, A1, B1, C1, D=inp["D"].reshape(d),
                                z=inp["z"].reshape(b, L, d).transpose(1, 2),
                                delta_bias=inp["dt_bias"].repeat_interleave(p), delta_softplus=True,
                                return_last_state=True, initial_state=inp["initial_states"].reshape(b, d, n))
    torch.testing.assert_close(y2, y1.transpose(1, 2).reshape(b, L, h, p), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s1.reshape(b, h, p, n), rtol=1e-12, atol=1e-12)


def test_intra_chunk_memory_is_linear_in_length():
    """No intermediate of the chunked scan grows like L^2: the largest saved tensor at L=4096 is
    O(b h L chunk), about 64x smaller than the (L, L) matrix of a quadratic form."""
    b, L, h, p, g, n, chunk = 1, 4096, 1, 1, 1, 1, 64
    inputs = {k: v.requires_grad_() if v is not None else None
              for k, v in make_inputs(b, L, h, p, g, n, dtype=torch.float32, init=False).items()}
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ssd_chunked(**inputs, chunk_size=chunk, dt_softplus=True)
    assert largest <= 2 * b * h * L * chunk < L * L


# ------------------------------------------------------------------------------------------- state update

def test_state_update_step_by_step_equals_the_scan():
    b, L, h, p, g, n = 2, 7, 4, 2, 2, 3
    inputs = make_inputs(b, L, h, p, g, n, D="headdim")
    opts = dict(dt_softplus=True, dt_limit=(0.01, 2.0))
    y_ref, final_ref = ssd_scan(**inputs, **opts, return_final_states=True, backend="reference")
    state = inputs["initial_states"].clone()
    ys = []
    for t in range(L):
        ys.append(ssd_state_update(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                                   inputs["C"][:, t], D=inputs["D"], z=inputs["z"][:, t], dt_bias=inputs["dt_bias"],
                                   dt_multiplier=inputs["dt_multiplier"][:, t], **opts))
    torch.testing.assert_close(torch.stack(ys, dim=1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final_ref, rtol=1e-12, atol=1e-12)


def test_ssd_step_half_state_kept_in_its_dtype():
    b, h, p, g, n = 2, 2, 3, 1, 4
    state = torch.randn(b, h, p, n, dtype=torch.float16)
    x, dt = torch.randn(b, h, p, dtype=torch.float16), torch.rand(b, h, dtype=torch.float16)
    A, B, C = -torch.rand(h), torch.randn(b, g, n, dtype=torch.float16), torch.randn(b, g, n, dtype=torch.float16)
    expected_state = torch.exp(dt.float() * A)[..., None, None] * state.float() + \
        (dt.float()[..., None] * x.float())[..., None] * B.float()[:, :, None, :]
    y = ssd_step(state, x, dt, A, B, C)
    assert state.dtype == torch.float16 and y.dtype == torch.float16
    torch.testing.assert_close(state.float(), expected_state, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y.float(), (expected_state * C.float()[:, :, None, :]).sum(-1), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------- core.ssd API

def test_backends_agree_and_auto_is_chunked():
    assert available_ssd_backends() == ["chunked", "cpu", "reference", "triton"]
    inputs = make_inputs(1, 11, 2, 2, 1, 3)
    y_ref = ssd_scan(**inputs, chunk_size=4, dt_softplus=True, backend="reference")
    y_chunk = ssd_scan(**inputs, chunk_size=4, dt_softplus=True, backend="chunked")
    y_auto = ssd_scan(**inputs, chunk_size=4, dt_softplus=True)
    torch.testing.assert_close(y_chunk, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(y_auto, y_chunk)


@pytest.mark.parametrize("case", ["L_not_multiple_of_chunk_g2_D_per_head", "many_chunks_dt_limit_g_eq_h"])
def test_cpu_backend_runs_mamba2_on_the_mamba1_cpu_kernel(case):
    """backend="cpu": Mamba-2 as the Mamba-1 scan over h*p channels, every input's gradient against the
    loop, including dt_multiplier and dt_limit (applied around the kernel)."""
    import functools

    from mambakit.core.scan import selective_scan
    from mambakit.kernels.ssd import ssd_via_selective_scan
    b, L, h, p, g, n, _, options, kwargs = CASES[case]
    inputs = make_inputs(b, L, h, p, g, n, **options)
    g_y, g_s = torch.randn(b, L, h, p, dtype=torch.float64), torch.randn(b, h, p, n, dtype=torch.float64)
    scan = functools.partial(selective_scan, backend="cpu")
    y, s, grads = forward_and_grads(functools.partial(ssd_via_selective_scan, scan), inputs, g_y, g_s, **kwargs)
    y_ref, s_ref, grads_ref = forward_and_grads(ssd_scan_ref, inputs, g_y, g_s, **kwargs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, k=name: f"gradient of {k}: {m}")
    # and through the public entry point
    y_api = ssd_scan(**inputs, backend="cpu", **kwargs)
    torch.testing.assert_close(y_api, y_ref, rtol=1e-10, atol=1e-10)


def _bad(inputs, **changes):
    return dict(inputs, **changes)


@pytest.mark.parametrize("change, message", [
    (lambda i: _bad(i, x=i["x"][0]), r"x must have shape \(batch, length, nheads, headdim\), got \(9, 4, 2\)"),
    (lambda i: _bad(i, dt=i["dt"][..., :3]), r"dt has shape \(2, 9, 3\), expected \(2, 9, 4\)"),
    (lambda i: _bad(i, A=torch.randn(4, 1)), r"A has shape \(4, 1\), expected \(4,\)"),
    (lambda i: _bad(i, B=torch.randn(2, 9, 3, 5)), r"B has 3 groups, which must divide nheads=4"),
    (lambda i: _bad(i, C=torch.randn(2, 9, 2, 6)), r"C has shape \(2, 9, 2, 6\), expected \(2, 9, 2, 5\)"),
    (lambda i: _bad(i, D=torch.randn(3)), r"D has shape \(3,\), expected \(4,\) or \(4, 2\)"),
    (lambda i: _bad(i, z=torch.randn(2, 9, 4, 3)), r"z has shape \(2, 9, 4, 3\), expected \(2, 9, 4, 2\)"),
    (lambda i: _bad(i, dt_bias=torch.randn(2, 4)), r"dt_bias has shape \(2, 4\), expected \(4,\)"),
    (lambda i: _bad(i, dt_multiplier=torch.randn(2, 8, 4)), r"dt_multiplier has shape \(2, 8, 4\), expected \(2, 9, 4\)"),
    (lambda i: _bad(i, initial_states=torch.randn(2, 4, 2, 4)),
     r"initial_states has shape \(2, 4, 2, 4\), expected \(2, 4, 2, 5\)"),
    (lambda i: _bad(i, chunk_size=0), r"chunk_size must be a positive int, got 0"),
    (lambda i: _bad(i, dt_limit=(1.0, 0.5)), r"dt_limit must satisfy min <= max"),
    (lambda i: _bad(i, backend="cuda"), r"unknown backend 'cuda'"),
    (lambda i: _bad(i, backend="triton"), r"backend 'triton' needs CUDA tensors, got tensors on cpu"),
])
def test_bad_inputs_name_the_argument_and_the_expected_shape(change, message):
    inputs = dict(make_inputs(2, 9, 4, 2, 2, 5, dtype=torch.float32), chunk_size=4)
    with pytest.raises(ValueError, match=message):
        ssd_scan(**change(inputs))


def test_bad_dtype_is_a_type_error():
    inputs = make_inputs(1, 3, 2, 2, 1, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"ssd_scan: B has dtype torch.int64, expected a floating dtype"):
        ssd_scan(**dict(inputs, B=torch.ones(1, 3, 1, 2, dtype=torch.int64)))


def test_state_update_validation():
    b, h, p, g, n = 2, 4, 2, 2, 3
    state = torch.zeros(b, h, p, n)
    args = [state, torch.randn(b, h, p), torch.randn(b, h), -torch.rand(h), torch.randn(b, g, n), torch.randn(b, g, n)]
    with pytest.raises(ValueError, match=r"ssd_state_update: state must have shape \(batch, nheads, headdim, dstate\)"):
        ssd_state_update(state[0], *args[1:])
    with pytest.raises(ValueError, match=r"ssd_state_update: dt has shape \(2, 4, 2\), expected \(2, 4\)"):
        ssd_state_update(*args[:2], torch.randn(b, h, p), *args[3:])
    with pytest.raises(ValueError, match=r"ssd_state_update: C has shape \(2, 1, 3\), expected \(2, 2, 3\)"):
        ssd_state_update(*args[:5], torch.randn(b, 1, n))
    with pytest.raises(ValueError, match=r"backend 'triton' needs CUDA tensors"):
        ssd_state_update(*args, backend="triton")
