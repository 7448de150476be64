"""Reference scans: the sequential recurrences, written for clarity, in any floating dtype.

They are the ground truth of every kernel test (run them in float64). They are differentiable through
autograd, so they also serve as the slow fallback when no fast kernel can be built.

Selective scan (Mamba-1), per batch b, channel d, state n, time t:

    dt      = softplus(delta + delta_bias)          (softplus only when delta_softplus)
    x_t     = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t      x_{-1} = initial_state (or 0)
    y_t     = <x_t, C_t> + D * u_t
    out_t   = y_t * silu(z_t)                       (when z is given)

SSD (Mamba-2), per head h with scalar A_h, head dim p, state n:

    dt      = softplus(dt * dt_multiplier + dt_bias)    (each part optional; clamped to dt_limit)
    S_t     = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T      S: (p, n)
    y_t     = S_t C_t + D * x_t,  then * silu(z_t) when z is given
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "selective_state_update_ref", "ssd_scan_ref", "expand_groups"]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_groups(BC: torch.Tensor, d: int) -> torch.Tensor:
    """(b, N, L) or (b, G, N, L) -> (b, d, N, L): each of G groups serves d // G consecutive channels."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(BC.shape[0], d, *BC.shape[1:])
    G = BC.shape[1]
    return BC.repeat_interleave(d // G, dim=1)


def _grouped(BC: torch.Tensor, G: int) -> torch.Tensor:
    """(b, N, L) or (b, G', N, L) with G' dividing G -> (b, G, N, L): group k of G' serves groups
    k*G/G' .. (k+1)*G/G' - 1 (the same channels as before)."""
    BC = BC.unsqueeze(1) if BC.dim() == 3 else BC
    return BC if BC.shape[1] == G else BC.repeat_interleave(G // BC.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (d,);
    initial_state: (b, d, N). Returns out (b, d, L) in u's dtype [, last_state (b, d, N) in the compute dtype:
    float64 if any input is float64, else float32].

    The loop runs over time on per-step views made by `unbind` before the loop, and works in the grouped
    view (b, G, d/G, N) of the state, so neither B/C nor dA is ever expanded to (b, d, N, L): forward memory
    is O(b*d*N) without grad, and autograd records O(L) small nodes (indexing `dA[:, :, t]` in the loop
    would make every step's backward materialise a zero tensor of the full (b, d, L, N) size)."""
    dtype_in = u.dtype
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    b, d, L = u.shape
    N = A.shape[1]
    G = math.lcm(*(1 if t.dim() == 3 else t.shape[1] for t in (B, C)))    # B and C may be grouped differently
    Bg, Cg = _grouped(B.to(ct), G), _grouped(C.to(ct), G)                 # (b, G, N, L)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A_g = A.reshape(G, d // G, N)
    x = u.new_zeros(b, G, d // G, N) if initial_state is None else initial_state.to(ct).reshape(b, G, d // G, N)
    delta_t = delta.reshape(b, G, d // G, L).unbind(-1)                       # L x (b, G, d/G)
    deltau_t = (delta * u).reshape(b, G, d // G, L).unbind(-1)
    B_t, C_t = Bg.unbind(-1), Cg.unbind(-1)                                # L x (b, G, N)
    ys = []
    for t in range(L):
        dA = torch.exp(delta_t[t].unsqueeze(-1) * A_g)                     # (b, G, d/G, N)
        x = dA * x + deltau_t[t].unsqueeze(-1) * B_t[t].unsqueeze(2)
        ys.append((x * C_t[t].unsqueeze(2)).sum(-1).reshape(b, d))
    y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(ct)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(dtype_in)
    return (out, x.reshape(b, d, N)) if return_last_state else out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step. state: (b, d, N), updated in place; x, dt, z: (b, d); A: (d, N);
    B, C: (b, N) or (b, G, N); D, dt_bias: (d,). Returns out (b, d) in x's dtype."""
    dtype_in = x.dtype
    ct = state.dtype if state.dtype == torch.float64 else torch.float32
    b, d = x.shape
    xf, dt = x.to(ct), dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    Bf = expand_groups(B.to(ct).unsqueeze(-1), d).squeeze(-1)              # (b, d, N)
    Cf = expand_groups(C.to(ct).unsqueeze(-1), d).squeeze(-1)
    new_state = torch.exp(dt.unsqueeze(-1) * A.to(ct)) * state.to(ct) + (dt * xf).unsqueeze(-1) * Bf
    state.copy_(new_state.to(state.dtype))
    y = (new_state * Cf).sum(-1)
    if D is not None:
        y = y + D.to(ct) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype_in)


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                 dt_multiplier=None, initial_states=None, return_final_states=False):
    """Sequential Mamba-2 recurrence with `mamba_chunk_scan_combined`'s layout.

    x, z: (b, L, h, p); dt, dt_multiplier: (b, L, h); A, dt_bias: (h,); B, C: (b, L, g, n);
    D: (h,) or (h, p); initial_states: (b, h, p, n). Returns y (b, L, h, p) [, final_states (b, h, p, n)].
    """
    dtype_in = x.dtype
    ct = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    xf, dt, A = x.to(ct), dt.to(ct), A.to(ct)
    if dt_multiplier is not None:
        dt = dt * dt_multiplier.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    Bh = B.to(ct).repeat_interleave(h // g, dim=2)                          # (b, L, h, n)
    Ch = C.to(ct).repeat_interleave(h // g, dim=2)
    S = xf.new_zeros(b, h, p, n) if initial_states is None else initial_states.to(ct)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)                                     # (b, h)
        S = decay[:, :, None, None] * S + (dt[:, t, :, None] * xf[:, t]).unsqueeze(-1) * Bh[:, t, :, None, :]
        ys.append((S * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if L > 0 else xf.new_zeros(b, 0, h, p)
    if D is not None:
        Df = D.to(ct)
        y = y + (Df[None, None, :, None] if Df.dim() == 1 else Df[None, None]) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, S) if return_final_states else y
