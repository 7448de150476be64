"""The reference scans against independent element-by-element recurrences (float64), and against each other."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.kernels.reference import selective_scan_ref, selective_state_update_ref, ssd_scan_ref


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         initial_state=None):
    """The recurrence written one scalar at a time, straight from the definition (float64, tiny sizes)."""
    b, d, L = u.shape
    N = A.shape[1]
    out = torch.zeros(b, d, L, dtype=torch.float64)
    last = torch.zeros(b, d, N, dtype=torch.float64)
    for bi in range(b):
        for c in range(d):
            gB = c // (d // B.shape[1]) if B.dim() == 4 else None
            gC = c // (d // C.shape[1]) if C.dim() == 4 else None
            x = [float(initial_state[bi, c, n]) if initial_state is not None else 0.0 for n in range(N)]
            for t in range(L):
                dt = float(delta[bi, c, t]) + (float(delta_bias[c]) if delta_bias is not None else 0.0)
                if delta_softplus:
                    dt = math.log1p(math.exp(dt)) if dt <= 20 else dt
                y = 0.0
                for n in range(N):
                    Bv = float(B[bi, gB, n, t] if gB is not None else B[bi, n, t])
                    Cv = float(C[bi, gC, n, t] if gC is not None else C[bi, n, t])
                    x[n] = math.exp(dt * float(A[c, n])) * x[n] + dt * Bv * float(u[bi, c, t])
                    y += x[n] * Cv
                if D is not None:
                    y += float(D[c]) * float(u[bi, c, t])
                if z is not None:
                    zv = float(z[bi, c, t])
                    y *= zv / (1 + math.exp(-zv))
                out[bi, c, t] = y
            last[bi, c] = torch.tensor(x, dtype=torch.float64)
    return out, last


def random_inputs(b, d, L, N, GB=None, GC=None, dtype=torch.float64, extras=True):
    def bc(G):
        return torch.randn(b, N, L, dtype=dtype) if G is None else torch.randn(b, G, N, L, dtype=dtype)
    inputs = dict(u=torch.randn(b, d, L, dtype=dtype), delta=torch.randn(b, d, L, dtype=dtype) * 0.5,
                  A=-torch.rand(d, N, dtype=dtype) * 2, B=bc(GB), C=bc(GC))
    if extras:
        inputs.update(D=torch.randn(d, dtype=dtype), z=torch.randn(b, d, L, dtype=dtype),
                      delta_bias=torch.randn(d, dtype=dtype) * 0.3, initial_state=torch.randn(b, d, N, dtype=dtype))
    return inputs


@pytest.mark.parametrize("GB,GC", [(None, None), (2, 2), (None, 4), (2, 4)])
@pytest.mark.parametrize("extras", [True, False], ids=["D_z_bias_init", "plain"])
def test_reference_matches_scalar_recurrence(GB, GC, extras):
    inputs = random_inputs(2, 4, 6, 3, GB, GC, extras=extras)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    want_out, want_last = naive_selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, want_last, rtol=1e-12, atol=1e-12)


def test_reference_without_softplus_uses_delta_as_is():
    inputs = random_inputs(1, 2, 5, 2)
    inputs["delta"] = inputs["delta"].abs()
    out = selective_scan_ref(**inputs)
    torch.testing.assert_close(out, naive_selective_scan(**inputs)[0], rtol=1e-12, atol=1e-12)


def test_reference_gradients_pass_gradcheck():
    inputs = {k: v.requires_grad_() for k, v in random_inputs(1, 4, 5, 2, GB=2, GC=None).items()}
    names = list(inputs)

    def f(*tensors):
        out, last = selective_scan_ref(**dict(zip(names, tensors)), delta_softplus=True, return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(f, tuple(inputs.values()))


def test_reference_length_zero_returns_the_initial_state():
    inputs = random_inputs(2, 4, 0, 3)
    out, last = selective_scan_ref(**inputs, return_last_state=True)
    assert out.shape == (2, 4, 0)
    torch.testing.assert_close(last, inputs["initial_state"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_dtypes(dtype):
    inputs = random_inputs(1, 4, 6, 3, dtype=torch.float32)
    inputs["u"] = inputs["u"].to(dtype)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    out64, last64 = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True,
                                       return_last_state=True)
    assert out64.dtype == torch.float64 and last64.dtype == torch.float64


def test_reference_accepts_non_contiguous_inputs():
    inputs = random_inputs(2, 4, 6, 3, GB=2, GC=2)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v)
               for k, v in inputs.items()}
    assert not strided["u"].is_contiguous() and not strided["A"].is_contiguous()
    torch.testing.assert_close(selective_scan_ref(**strided, delta_softplus=True),
                               selective_scan_ref(**inputs, delta_softplus=True), rtol=0, atol=0)


@pytest.mark.parametrize("G", [None, 2])
def test_state_update_equals_one_scan_step(G):
    inputs = random_inputs(2, 4, 1, 3, GB=G, GC=G)
    state = inputs["initial_state"].clone()
    sq = {k: inputs[k][..., 0] for k in ("u", "delta", "B", "C", "z")}
    y = selective_state_update_ref(state, sq["u"], sq["delta"], inputs["A"], sq["B"], sq["C"], D=inputs["D"],
                                   z=sq["z"], dt_bias=inputs["delta_bias"], dt_softplus=True)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, out[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)


def test_ssd_reference_is_the_selective_scan_with_one_decay_per_head():
    """Mamba-2 with h heads of dim p and g groups is the Mamba-1 scan over d = h * p channels whose A and dt
    are shared inside each head."""
    b, L, h, p, g, n = 2, 7, 4, 3, 2, 5
    x, z = torch.randn(b, L, h, p, dtype=torch.float64), torch.randn(b, L, h, p, dtype=torch.float64)
    dt, dt_bias = torch.randn(b, L, h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    A, D = -torch.rand(h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    B, C = torch.randn(b, L, g, n, dtype=torch.float64), torch.randn(b, L, g, n, dtype=torch.float64)
    S0 = torch.randn(b, h, p, n, dtype=torch.float64)
    y, S = ssd_scan_ref(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_states=S0,
                        return_final_states=True)

    def channels(t):                                       # (b, L, h, p) -> (b, h*p, L)
        return t.reshape(b, L, h * p).transpose(1, 2)
    out, last = selective_scan_ref(
        channels(x), channels(dt[..., None].expand(b, L, h, p)), A.repeat_interleave(p)[:, None].expand(h * p, n),
        B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D=D.repeat_interleave(p), z=channels(z),
        delta_bias=dt_bias.repeat_interleave(p), delta_softplus=True, initial_state=S0.reshape(b, h * p, n),
        return_last_state=True)
    torch.testing.assert_close(y, out.transpose(1, 2).reshape(b, L, h, p), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, last.reshape(b, h, p, n), rtol=1e-12, atol=1e-12)


def test_reference_softplus_matches_torch_threshold():
    """Above 20 softplus is the identity (torch's threshold); the reference uses F.softplus."""
    inputs = random_inputs(1, 2, 3, 2, extras=False)
    inputs["delta"] = torch.tensor([[[25.0, -30.0, 0.1], [19.0, 21.0, -5.0]]], dtype=torch.float64)
    inputs["A"] = -torch.full((2, 2), 0.01, dtype=torch.float64)
    out = selective_scan_ref(**inputs, delta_softplus=True)
    manual = selective_scan_ref(**{**inputs, "delta": F.softplus(inputs["delta"])})
    torch.testing.assert_close(out, manual, rtol=0, atol=0)
