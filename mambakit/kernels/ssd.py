"""Mamba-2 SSD (state space duality) in PyTorch: the chunked scan and the one-step recurrent update.

Both follow `mambakit.kernels.reference.ssd_scan_ref` (the sequential recurrence, with
`mamba_chunk_scan_combined`'s layout) and are differentiable by autograd. Per head h, with
dt = clamp(softplus(dt * dt_multiplier + dt_bias), dt_limit) (each part optional):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        S: (p, n)
    y_t = S_t C_t + D x_t,  then * silu(z_t)

The chunked algorithm (Dao & Gu 2024, as in mamba_ssm's `ssd_minimal_discrete`) splits L into equal chunks
of at most `chunk_size` steps:

1. intra-chunk output, the quadratic (attention-like) form: y_diag = (C B^T * exp(segsum(dt A))) (dt x),
   where segsum[i, j] = sum_{k=j+1..i} dt_k A is computed as a masked cumulative sum (stable: no difference
   of two cumulative sums, so no cancellation) and is -inf above the diagonal;
2. chunk states: the state each chunk contributes at its end, sum_s exp(segsum[last, s]) dt_s x_s B_s^T;
3. inter-chunk recurrence over chunks, S_k = exp(sum of dt A over chunk k) S_{k-1} + state_k, started from
   `initial_states` (it is itself a scalar-decay linear recurrence, solved the same way: blocks of up to 64
   chunks in quadratic form, a short loop across blocks);
4. state to output: y_off = C S_{k-1} exp(cumsum(dt A)).

Memory is O(b L chunk_size h) for the intra-chunk part, never O(L^2). L need not divide by the chunk length:
inputs are zero-padded to a multiple of it (fewer than one step per chunk) with dt = 0 on the padded steps
(applied after softplus), so they neither decay nor feed the state and the final state is the state at L.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunked", "ssd_via_selective_scan", "ssd_step", "process_dt"]

_INTER_CHUNK_BLOCK = 64  # chunks per block of the inter-chunk recurrence's quadratic form


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")), dt_multiplier=None):
    """dt -> clamp(softplus(dt * dt_multiplier + dt_bias), dt_limit), each part optional (dt_bias broadcasts
    over the last dim, the heads). Computed in dt's dtype."""
    if dt_multiplier is not None:
        dt = dt * dt_multiplier.to(dt.dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[..., i, j] = sum_{k=j+1..i} a_k for i >= j (0 on the diagonal), -inf above."""
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, T).masked_fill(~ones.tril(-1), 0.0)   # [i, j] = a_i if i > j
    return terms.cumsum(-2).masked_fill(~ones.tril(0), -math.inf)


def _decay_recurrence(log_decay: torch.Tensor, inputs: torch.Tensor, init: torch.Tensor):
    """S_k = exp(log_decay_k) S_{k-1} + inputs_k for k < c, S_{-1} = init.

    log_decay: (b, g, r, c); inputs: (b, c, g, r, p, n); init: (b, g, r, p, n).
    Returns (S_{k-1} for every k: (b, c, g, r, p, n), S_{c-1}: (b, g, r, p, n)).
    Blocks of up to `_INTER_CHUNK_BLOCK` steps are solved in quadratic form, blocks are chained by a loop.
    """
    b, g, r, c = log_decay.shape
    m = min(c, _INTER_CHUNK_BLOCK)
    pad = (-c) % m
    if pad:  # identity steps: decay exp(0) = 1, no input
        log_decay = F.pad(log_decay, (0, pad))
        inputs = F.pad(inputs, (0, 0, 0, 0, 0, 0, 0, 0, 0, pad))
    nb = (c + pad) // m
    log_decay = log_decay.reshape(b, g, r, nb, m)
    inputs = inputs.reshape(b, nb, m, *inputs.shape[2:])
    within = torch.exp(_segsum(log_decay))                                      # (b, g, r, nb, m, m)
    local = torch.einsum("bgrzkj,bzjgrpn->bzkgrpn", within, inputs)            # block-local inclusive states
    from_start = torch.exp(log_decay.cumsum(-1))                                # (b, g, r, nb, m)
    starts, state = [], init
    for z in range(nb):
        starts.append(state)
        state = from_start[:, :, :, z, -1, None, None] * state + local[:, z, -1]
    start = torch.stack(starts, dim=1)                                          # (b, nb, g, r, p, n)
    inclusive = local + from_start.permute(0, 3, 4, 1, 2)[..., None, None] * start[:, :, None]
    inclusive = inclusive.reshape(b, nb * m, *inclusive.shape[3:])[:, :c]
    before = torch.cat([init[:, None], inclusive[:, :-1]], dim=1)
    return before, inclusive[:, -1]


def ssd_chunked(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, float("inf")), dt_multiplier=None, initial_states=None, return_final_states=False):
    """The chunked SSD scan; arguments and result as `ssd_scan_ref` (inputs assumed validated).

    x, z: (b, L, h, p); dt, dt_multiplier: (b, L, h); A, dt_bias: (h,); B, C: (b, L, g, n);
    D: (h,) or (h, p); initial_states: (b, h, p, n). Returns y (b, L, h, p) in x's dtype
    [, final_states (b, h, p, n) in float32, or float64 for float64 inputs].
    """
    dtype_in = x.dtype
    ct = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, dt_multiplier, initial_states)
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    if L == 0:  # nothing to scan: the loop's result (empty y, the initial state)
        from mambakit.kernels.reference import ssd_scan_ref
        return ssd_scan_ref(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            dt_multiplier=dt_multiplier, initial_states=initial_states,
                            return_final_states=return_final_states)
    # chunk_size is the longest chunk; equal chunks of at most that length minimise the padding (any chunk
    # length gives the same result)
    n_chunks = -(-L // int(chunk_size))
    cs = -(-L // n_chunks)
    xf = x.to(ct)
    dtf = process_dt(dt.to(ct), dt_bias, dt_softplus, dt_limit, dt_multiplier)
    pad = (-L) % cs
    Bf, Cf, xp = B.to(ct), C.to(ct), xf
    if pad:  # dt = 0 on padded steps (after softplus): no decay, no input, so the final state is S_L
        xp = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (L + pad) // cs
    xdt = (xp * dtf[..., None]).reshape(b, c, cs, g, r, p)                    # dt-scaled input
    Bc = Bf.reshape(b, c, cs, g, n)
    Cc = Cf.reshape(b, c, cs, g, n)
    log_a = (dtf * A.to(ct)).reshape(b, c, cs, g, r).permute(0, 3, 4, 1, 2)    # (b, g, r, c, l)

    seg = torch.exp(_segsum(log_a))                                             # (b, g, r, c, l, s)
    # 1. intra-chunk (quadratic) part
    CB = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)                            # (b, g, c, l, s)
    y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", CB[:, :, None] * seg, xdt)
    # 2. each chunk's contribution to the state at its end (the last row of the segment sums)
    states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", Bc, seg[..., -1, :], xdt)
    # 3. states entering each chunk
    init = (torch.zeros(b, g, r, p, n, dtype=ct, device=x.device) if initial_states is None
            else initial_states.to(ct).reshape(b, g, r, p, n))
    log_a_cum = log_a.cumsum(-1)
    entering, final = _decay_recurrence(log_a_cum[..., -1], states, init)
    # 4. entering state to output, decayed up to each step
    y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, entering, torch.exp(log_a_cum))

    y = (y_diag + y_off).reshape(b, c * cs, h, p)[:, :L]
    if D is not None:
        Df = D.to(ct)
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, final.reshape(b, h, p, n)) if return_final_states else y


def ssd_via_selective_scan(scan, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           dt_limit=(0.0, float("inf")), dt_multiplier=None, initial_states=None,
                           return_final_states=False):
    """The SSD scan computed by a Mamba-1 selective scan `scan` (e.g. the fused CPU or the Triton kernel).

    Mamba-2 is Mamba-1 over d = h*p channels with A[h] repeated over (p, n), dt[h] repeated over p, and each
    of g groups of B/C serving (h/g)*p consecutive channels, which is the Mamba-1 grouping. The layout is
    transposed to the scan's (b, d, L); dt_multiplier is applied here (before dt_bias and softplus, which the
    scan applies), and with a dt_limit the whole dt processing is done here, the clamp being after softplus.
    Arguments and result as `ssd_chunked`; differentiable through the scan's autograd.
    """
    ct = _compute_dtype(x, dt, A, B, C, D, z, dt_bias, dt_multiplier, initial_states)
    b, L, h, p = x.shape
    n = B.shape[3]
    d = h * p
    dt = dt.to(ct)
    if dt_multiplier is not None:
        dt = dt * dt_multiplier.to(ct)
    delta_bias, softplus = dt_bias, dt_softplus
    if tuple(dt_limit) != (0.0, float("inf")):
        dt, delta_bias, softplus = process_dt(dt, dt_bias, dt_softplus, dt_limit), None, False

    def per_channel(t):  # (h,) or (h, p) -> (d,)
        return None if t is None else (t.to(ct).repeat_interleave(p) if t.dim() == 1 else t.to(ct).reshape(d))

    out = scan(x.reshape(b, L, d).transpose(1, 2), dt.repeat_interleave(p, dim=2).transpose(1, 2),
               A.to(ct).repeat_interleave(p)[:, None].expand(d, n), B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1),
               D=per_channel(D), z=None if z is None else z.reshape(b, L, d).transpose(1, 2),
               delta_bias=per_channel(delta_bias), delta_softplus=softplus, return_last_state=return_final_states,
               initial_state=None if initial_states is None else initial_states.reshape(b, d, n))
    y, final = out if return_final_states else (out, None)
    y = y.transpose(1, 2).reshape(b, L, h, p)
    return (y, final.reshape(b, h, p, n)) if return_final_states else y


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), dt_multiplier=None):
    """One Mamba-2 decoding step; updates `state` in place and returns y in x's dtype.

    state: (b, h, p, n); x, z: (b, h, p); dt, dt_multiplier: (b, h); A, dt_bias: (h,); B, C: (b, g, n);
    D: (h,) or (h, p). Computed in float32 (float64 when any input is float64).
    """
    ct = _compute_dtype(state, x, dt, A, B, C, D, z, dt_bias, dt_multiplier)
    h = x.shape[1]
    xf = x.to(ct)
    dtf = process_dt(dt.to(ct), dt_bias, dt_softplus, dt_limit, dt_multiplier)         # (b, h)
    Bh = B.to(ct).repeat_interleave(h // B.shape[1], dim=1)                             # (b, h, n)
    Ch = C.to(ct).repeat_interleave(h // C.shape[1], dim=1)
    new_state = (torch.exp(dtf * A.to(ct))[..., None, None] * state.to(ct)
                 + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :])
    state.copy_(new_state)
    y = (new_state * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        Df = D.to(ct)
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)
