"""Triton selective scan (Mamba-1): forward, backward and the one-token state update, for CUDA tensors.

Semantics are those of `mambakit.kernels.reference.selective_scan_ref` (and of mamba_ssm's
`selective_scan_fn`): grouped B/C, D, z gating, delta_bias, softplus, an initial state, and the last state
returned with its gradient propagated. fp16/bf16 inputs are computed in float32 and the output is cast back to
u's dtype; float64 inputs are computed in float64 (the reference's rule), which is what the CPU tests under
`TRITON_INTERPRET=1` use to check the kernels exactly.

How the kernels work
--------------------
Forward. One program per (batch, block of BLOCK_D channels of one B/C group). The state (BLOCK_D, N) lives in
registers and the program streams over L in tiles of BLOCK_T steps. Inside a tile, every (channel, n) pair is
a first-order linear recurrence x_t = a_t x_{t-1} + b_t with a_t = exp(dt_t A), b_t = dt_t B_t u_t; it is
solved in parallel with `tl.associative_scan` over the (BLOCK_D, N, BLOCK_T) tile (the same block-scan that
mamba_ssm's CUDA kernel runs), then the carried state enters as x_t = (prod a) x_start + scan_b. Loads of u,
delta, z and B/C are tiles contiguous along L (coalesced). The state at the end of each tile is written to a
checkpoint buffer (b, d, n_tiles, N): extra memory O(b d N L / K) with K = BLOCK_T; its last slot is the
returned last state. When no input requires a gradient, only that last slot is kept.

Backward. The same grid walks the tiles in reverse. Each tile is recomputed from the checkpoint before it
(states are never stored per step), then the adjoint h_t = dL/dx_t obeys the reverse recurrence
h_t = a_{t+1} h_{t+1} + C_t dy_t, solved with a reverse associative scan; a_{t+1} comes from a second,
shifted load of delta (cache-resident). The carry between tiles is g = a_first h_first, the gradient that
reaches the state before the tile; it starts as the gradient of the last state and ends as the gradient of
the initial state. With x_{t-1} a_t = x_t - b_t (no division):

    dC[b,g,n,t] = sum_d dy x_t                 dB[b,g,n,t] = sum_d h dt u
    du = dt sum_n h B + D dy                    d dt = u sum_n h B + sum_n h (x_t - b_t) A
    dA[d,n] = sum_{b,t} h (x_t - b_t) dt        dD[d] = sum_{b,t} dy u,   d delta_bias = sum_{b,t} d delta

dB and dC are summed over the channel blocks of a group with `tl.atomic_add` into a zeroed (b, G, N, L)
buffer (each program first reduces its BLOCK_D channels in registers), as mamba_ssm's CUDA backward does;
the summation order is therefore not deterministic on a GPU. dA and dD are written per batch element and
summed over the batch afterwards (deterministic), and d delta_bias is the sum of d delta.

State update. One program per (batch, block of channels): loads the state (BLOCK_D, N), applies one step,
writes it back in place (any strides) and returns y. The headed Mamba-2 form (state (b, h, p, N)) is handled
by viewing it as the flat form (b, h*p, N), which is exact: each of G groups then serves h*p/G consecutive
channels, which is the Mamba-2 grouping of heads.

Interpreter. The device code calls only triton.language builtins and this module's own @triton.jit helpers,
none of triton's standard-library jit functions (tl.sum, tl.zeros, tl.sigmoid, tl.cdiv), whose interpreted
or compiled form is fixed when triton itself is imported. So a copy of this module loaded with
TRITON_INTERPRET=1 runs on CPU tensors even in a process that imported triton without it (the tests do that).

Block sizes and warps are heuristics (see `_launch_config`) chosen from ptxas register counts for sm_90a,
not yet timed on a GPU. Importing this module never needs CUDA; under TRITON_INTERPRET=1 (set before this
module is imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_triton", "selective_state_update_triton", "is_interpreted"]


# ----------------------------------------------------------------------------------------------- device code

@triton.jit
def _combine(a_left, b_left, a_right, b_right):
    """Compose two steps of x -> a x + b (left is applied first)."""
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _sum(x, axis):
    # tl.sum's own reduction (tl.sum is a jit function of triton's standard library, see "Interpreter" above);
    # its combine function is recognised by the interpreter, which then sums with numpy
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without a log1p primitive: log(u) * e / (u - 1) with u = 1 + e is exact to rounding
    # (Goldberg's trick), also where exp(x) is below float epsilon; x above the threshold passes through.
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, _sigmoid(x))


@triton.jit
def _load_dt(delta_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr):
    """Returns (dt, pre-softplus value); dt is 0 where masked, so masked steps keep the state unchanged."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(CDT)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr,
    out_ptr, ckpt_ptr,
    d, L, N, G, dpg, n_tiles, n_slots,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CDT: tl.constexpr,
):
    # one flat grid (no 65535 limit on the batch): consecutive programs are channel blocks of one batch
    # element, so they share its B/C tiles in L2
    blocks_per_group = (dpg + BLOCK_D - 1) // BLOCK_D
    bi = (tl.program_id(0) // (G * blocks_per_group)).to(tl.int64)
    pid = tl.program_id(0) % (G * blocks_per_group)
    grp = pid // blocks_per_group
    in_group = (pid % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = in_group < dpg
    chan = (grp * dpg + in_group).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    nmask = offs_n < N
    dn_mask = dmask[:, None] & nmask[None, :]

    A = tl.load(A_ptr + chan[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0).to(CDT)
    bias = tl.full([BLOCK_D], 0.0, CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=dmask, other=0.0).to(CDT)
    Dv = tl.full([BLOCK_D], 0.0, CDT)
    if HAS_D:
        Dv = tl.load(D_ptr + chan, mask=dmask, other=0.0).to(CDT)
    state_rows = (bi * d + chan) * N                      # (BLOCK_D,) start of (b, chan, :) in a (b, d, N) tensor
    x = tl.full([BLOCK_D, N_PAD], 0.0, CDT)
    if HAS_INIT:
        x = tl.load(init_ptr + state_rows[:, None] + offs_n[None, :], mask=dn_mask, other=0.0).to(CDT)

    rows = (bi * d + chan) * L                            # (BLOCK_D,) start of (b, chan, :) in (b, d, L)
    bc_base = (bi * G + grp) * N * L
    local_t = tl.arange(0, BLOCK_T)
    last = local_t == BLOCK_T - 1
    for k in range(0, n_tiles):
        t = k * BLOCK_T + local_t
        tmask = t < L
        m2 = dmask[:, None] & tmask[None, :]
        offs = rows[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=m2, other=0.0).to(CDT)
        dt, _ = _load_dt(delta_ptr, bias, offs, m2, HAS_BIAS, SOFTPLUS, CDT)
        bc_offs = bc_base + offs_n[:, None] * L + t[None, :]
        bc_mask = nmask[:, None] & tmask[None, :]
        Bt = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0).to(CDT)
        Ct = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0).to(CDT)

        a = tl.exp(dt[:, None, :] * A[:, :, None])       # (BLOCK_D, N_PAD, BLOCK_T)
        b = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((a, b), 2, _combine)
        xs = a_cum * x[:, :, None] + b_cum
        y = _sum(xs * Ct[None, :, :], axis=1)           # (BLOCK_D, BLOCK_T)
        x = _sum(tl.where(last[None, None, :], xs, 0.0), axis=2)   # masked steps carry the state to the end
        # n_slots is n_tiles when the backward will need every checkpoint, else 1 (only the last state)
        ckpt_offs = ((bi * d + chan) * n_slots + tl.minimum(k, n_slots - 1)) * N
        tl.store(ckpt_ptr + ckpt_offs[:, None] + offs_n[None, :], x, mask=dn_mask)

        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zt = tl.load(z_ptr + offs, mask=m2, other=0.0).to(CDT)
            y = y * zt * _sigmoid(zt)
        tl.store(out_ptr + offs, y, mask=m2)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dinit_ptr,
    d, L, N, G, dpg, n_tiles,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, CDT: tl.constexpr,
):
    # one flat grid (no 65535 limit on the batch): consecutive programs are channel blocks of one batch
    # element, so they share its B/C tiles in L2
    blocks_per_group = (dpg + BLOCK_D - 1) // BLOCK_D
    bi = (tl.program_id(0) // (G * blocks_per_group)).to(tl.int64)
    pid = tl.program_id(0) % (G * blocks_per_group)
    grp = pid // blocks_per_group
    in_group = (pid % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = in_group < dpg
    chan = (grp * dpg + in_group).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    nmask = offs_n < N
    dn_mask = dmask[:, None] & nmask[None, :]

    A = tl.load(A_ptr + chan[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0).to(CDT)
    bias = tl.full([BLOCK_D], 0.0, CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=dmask, other=0.0).to(CDT)
    Dv = tl.full([BLOCK_D], 0.0, CDT)
    if HAS_D:
        Dv = tl.load(D_ptr + chan, mask=dmask, other=0.0).to(CDT)
    state_offs = ((bi * d + chan) * N)[:, None] + offs_n[None, :]
    carry = tl.full([BLOCK_D, N_PAD], 0.0, CDT)         # gradient reaching the state before the tile
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + state_offs, mask=dn_mask, other=0.0).to(CDT)
    dA_acc = tl.full([BLOCK_D, N_PAD], 0.0, CDT)
    dD_acc = tl.full([BLOCK_D], 0.0, CDT)

    rows = (bi * d + chan) * L
    bc_base = (bi * G + grp) * N * L
    local_t = tl.arange(0, BLOCK_T)
    first = local_t == 0
    for kk in range(0, n_tiles):
        k = n_tiles - 1 - kk
        # state before this tile: the previous tile's checkpoint, or the initial state for the first tile
        ckpt_offs = ((bi * d + chan) * n_tiles + (k - 1)) * N
        x0 = tl.load(ckpt_ptr + ckpt_offs[:, None] + offs_n[None, :], mask=dn_mask & (k > 0), other=0.0).to(CDT)
        if HAS_INIT:
            x0 += tl.load(init_ptr + state_offs, mask=dn_mask & (k == 0), other=0.0).to(CDT)

        t = k * BLOCK_T + local_t
        tmask = t < L
        m2 = dmask[:, None] & tmask[None, :]
        offs = rows[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=m2, other=0.0).to(CDT)
        dt, raw = _load_dt(delta_ptr, bias, offs, m2, HAS_BIAS, SOFTPLUS, CDT)
        bc_offs = bc_base + offs_n[:, None] * L + t[None, :]
        bc_mask = nmask[:, None] & tmask[None, :]
        Bt = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0).to(CDT)
        Ct = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0).to(CDT)

        # recompute the tile's states from the checkpoint
        a = tl.exp(dt[:, None, :] * A[:, :, None])
        dtu = dt * u
        b = dtu[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((a, b), 2, _combine)
        xs = a_cum * x0[:, :, None] + b_cum

        dout = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(CDT)
        dy = dout
        if HAS_Z:
            y = _sum(xs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            zt = tl.load(z_ptr + offs, mask=m2, other=0.0).to(CDT)
            sz = _sigmoid(zt)
            dy = dout * zt * sz
            tl.store(dz_ptr + offs, dout * y * sz * (1.0 + zt * (1.0 - sz)), mask=m2)
        dy = tl.where(m2, dy, 0.0)

        # adjoint: h_t = a_{t+1} h_{t+1} + C_t dy_t inside the tile; a_{t+1} = 1 on the tile's last step
        # (the carry already holds a_{t+1} h_{t+1} there) and past L
        next_mask = dmask[:, None] & ((t + 1) < L)[None, :] & (local_t < BLOCK_T - 1)[None, :]
        dt_next, _ = _load_dt(delta_ptr, bias, offs + 1, next_mask, HAS_BIAS, SOFTPLUS, CDT)
        a_next = tl.exp(dt_next[:, None, :] * A[:, :, None])
        h_mul, h_add = tl.associative_scan((a_next, Ct[None, :, :] * dy[:, None, :]), 2, _combine, reverse=True)
        h = h_mul * carry[:, :, None] + h_add
        carry = _sum(tl.where(first[None, None, :], a * h, 0.0), axis=2)

        hx = h * (xs - b)                                  # h_t a_t x_{t-1}
        hB = _sum(h * Bt[None, :, :], axis=1)            # (BLOCK_D, BLOCK_T)
        du = dt * hB
        if HAS_D:
            du += Dv[:, None] * dy
        ddt = u * hB + _sum(hx * A[:, :, None], axis=1)
        if SOFTPLUS:
            ddt = ddt * _softplus_grad(raw)
        tl.store(du_ptr + offs, du, mask=m2)
        tl.store(ddelta_ptr + offs, ddt, mask=m2)
        dA_acc += _sum(hx * dt[:, None, :], axis=2)
        dD_acc += _sum(dy * u, axis=1)

        dC = _sum(dy[:, None, :] * xs, axis=0)           # (N_PAD, BLOCK_T), summed over this block's channels
        dB = _sum(h * dtu[:, None, :], axis=0)
        tl.atomic_add(dC_ptr + bc_offs, dC, mask=bc_mask)
        tl.atomic_add(dB_ptr + bc_offs, dB, mask=bc_mask)

    tl.store(dA_ptr + state_offs, dA_acc, mask=dn_mask)
    tl.store(dinit_ptr + state_offs, carry, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + bi * d + chan, dD_acc, mask=dmask)


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    stride_sb, stride_sd, stride_sn,
    d, N, G, dpg,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CDT: tl.constexpr,
):
    blocks = (d + BLOCK_D - 1) // BLOCK_D
    bi = (tl.program_id(0) // blocks).to(tl.int64)
    chan = ((tl.program_id(0) % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    dmask = chan < d
    grp = chan // dpg
    offs_n = tl.arange(0, N_PAD)
    nmask = offs_n < N
    dn_mask = dmask[:, None] & nmask[None, :]

    s_offs = bi * stride_sb + chan[:, None] * stride_sd + offs_n[None, :] * stride_sn
    state = tl.load(state_ptr + s_offs, mask=dn_mask, other=0.0).to(CDT)
    x = tl.load(x_ptr + bi * d + chan, mask=dmask, other=0.0).to(CDT)
    dt = tl.load(dt_ptr + bi * d + chan, mask=dmask, other=0.0).to(CDT)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + chan, mask=dmask, other=0.0).to(CDT)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + chan[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0).to(CDT)
    bc_offs = ((bi * G + grp) * N)[:, None] + offs_n[None, :]
    Bv = tl.load(B_ptr + bc_offs, mask=dn_mask, other=0.0).to(CDT)
    Cv = tl.load(C_ptr + bc_offs, mask=dn_mask, other=0.0).to(CDT)

    state = tl.exp(dt[:, None] * A) * state + (dt * x)[:, None] * Bv
    tl.store(state_ptr + s_offs, state, mask=dn_mask)
    y = _sum(state * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + chan, mask=dmask, other=0.0).to(CDT) * x
    if HAS_Z:
        zt = tl.load(z_ptr + bi * d + chan, mask=dmask, other=0.0).to(CDT)
        y = y * zt * _sigmoid(zt)
    tl.store(out_ptr + bi * d + chan, y, mask=dmask)


# ----------------------------------------------------------------------------------------------- host code

def is_interpreted() -> bool:
    """True when this module's kernels were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_scan_fwd_kernel).__name__ == "InterpretedFunction"


def _patch_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a runtime loop bound into int(1-element array), which numpy >= 2.4
    refuses (triton-lang/triton#9171, fixed upstream after 3.6): `for k in range(0, n)` then fails. Only
    under the interpreter, and only while the bug is present, give its tensors an __index__ that takes
    the element explicitly. Compiled (GPU) kernels are untouched."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1, dtype=np.int32))
        return                                                  # this numpy still converts: no bug
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor
    if getattr(original, "_mambakit_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._mambakit_fixed = True
    interpreter._patch_lang_tensor = patched


if is_interpreted():
    _patch_interpreter_loop_bounds()


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _LaunchConfig(NamedTuple):
    block_d: int
    n_pad: int
    block_t: int
    fwd_warps: int
    bwd_warps: int


_TILE = 2048  # elements of a (BLOCK_D, N_PAD, BLOCK_T) tile


def _launch_config(batch: int, d: int, G: int, N: int, L: int, device: torch.device,
                   block_t: int | None = None, block_d: int | None = None, num_warps=None) -> _LaunchConfig:
    """Block sizes and warps. A (BLOCK_D, N_PAD, BLOCK_T) tile holds about `_TILE` elements, 8 per thread in the
    forward and 4 in the backward (which keeps about twice as many tiles live): compiled for sm_90a, that is
    about 120 registers per thread in both, without spills (ptxas -v; 4096-element tiles at 4/8 warps need
    255 registers and spill in the backward). BLOCK_D shrinks while there are too few programs to fill the GPU.
    `num_warps` overrides both warp counts (an int) or each ((fwd, bwd))."""
    n_pad = triton.next_power_of_2(max(N, 1))
    if block_t is None:
        block_t = max(16, min(64, triton.next_power_of_2(max(L, 1)), _TILE // n_pad))
    dpg = d // G
    if block_d is None:
        block_d = max(1, min(16, triton.next_power_of_2(dpg), _TILE // (n_pad * block_t)))
        if device.type == "cuda":
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            while block_d > 1 and batch * G * triton.cdiv(dpg, block_d) < target:
                block_d //= 2
    for name, value in (("block_t", block_t), ("block_d", block_d)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"selective_scan_triton: {name} must be a power of two, got {value}")
    tile = block_d * n_pad * block_t
    if num_warps is None:
        fwd_warps, bwd_warps = max(1, min(16, tile // 256)), max(1, min(16, tile // 128))
    elif isinstance(num_warps, int):
        fwd_warps = bwd_warps = num_warps
    else:
        fwd_warps, bwd_warps = num_warps
    return _LaunchConfig(block_d, n_pad, block_t, fwd_warps, bwd_warps)


def _as_groups(BC: torch.Tensor, G: int) -> torch.Tensor:
    """(b, N, L) or (b, G', N, L) with G' dividing G -> contiguous (b, G, N, L) (group k of G' serves the
    channels of groups k*G/G' .. (k+1)*G/G' - 1)."""
    grouped = BC.unsqueeze(1) if BC.dim() == 3 else BC
    return grouped.repeat_interleave(G // grouped.shape[1], dim=1).contiguous()


def _sum_groups(dBC: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The adjoint of `_as_groups`: (b, G, N, L) -> `shape`, (b, N, L) or (b, G', N, L)."""
    b, G, N, L = dBC.shape
    G_out = 1 if len(shape) == 3 else shape[1]
    return dBC.view(b, G_out, G // G_out, N, L).sum(2).view(shape)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, block_t, block_d,
                num_warps):
        batch, d, L = u.shape
        N = A.shape[1]
        ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
        u_, delta_, A_, D_, z_, bias_, init_ = map(_contig, (u, delta, A, D, z, delta_bias, initial_state))
        # B and C may be grouped differently (the API allows it): run with lcm(G_B, G_C) groups
        G = math.lcm(*(1 if t.dim() == 3 else t.shape[1] for t in (B, C)))
        B_, C_ = _as_groups(B, G), _as_groups(C, G)
        cfg = _launch_config(batch, d, G, N, L, u.device, block_t, block_d, num_warps)
        BLOCK_D, N_PAD, BLOCK_T = cfg.block_d, cfg.n_pad, cfg.block_t
        n_tiles = triton.cdiv(L, BLOCK_T)
        training = any(ctx.needs_input_grad[:9])
        n_slots = n_tiles if training else 1        # without a backward, keep only the last state
        out = torch.empty(batch, d, L, device=u.device, dtype=u.dtype)
        ckpt = torch.empty(batch, d, n_slots, N, device=u.device, dtype=ct)
        dpg = d // G
        grid = (batch * G * triton.cdiv(dpg, BLOCK_D),)
        dummy = u_
        _scan_fwd_kernel[grid](
            u_, delta_, A_, B_, C_, D_ if D_ is not None else dummy, z_ if z_ is not None else dummy,
            bias_ if bias_ is not None else dummy, init_ if init_ is not None else dummy,
            out, ckpt, d, L, N, G, dpg, n_tiles, n_slots,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_INIT=initial_state is not None, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=BLOCK_D, N_PAD=N_PAD, BLOCK_T=BLOCK_T, CDT=_tl_dtype(ct),
            num_warps=cfg.fwd_warps,
        )
        last_state = ckpt[:, :, -1].clone()
        ctx.save_for_backward(u_, delta_, A_, B_, C_, D_, z_, bias_, init_, ckpt)
        ctx.meta = (delta_softplus, BLOCK_D, N_PAD, BLOCK_T, ct, cfg.bwd_warps)
        ctx.bc_shapes = (tuple(B.shape), tuple(C.shape))
        ctx.dtypes = tuple(None if t is None else t.dtype
                           for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
        ctx.set_materialize_grads(False)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias, init, ckpt = ctx.saved_tensors
        delta_softplus, BLOCK_D, N_PAD, BLOCK_T, ct, num_warps = ctx.meta
        batch, d, L = u.shape
        N, G = A.shape[1], B.shape[1]
        dpg, n_tiles = d // G, ckpt.shape[2]
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        kw = dict(device=u.device, dtype=ct)
        du, ddelta = torch.empty(batch, d, L, **kw), torch.empty(batch, d, L, **kw)
        dz = torch.empty(batch, d, L, **kw) if z is not None else None
        dB, dC = torch.zeros(batch, G, N, L, **kw), torch.zeros(batch, G, N, L, **kw)
        dA_part, dinit = torch.empty(batch, d, N, **kw), torch.empty(batch, d, N, **kw)
        dD_part = torch.empty(batch, d, **kw) if D is not None else None
        dummy = du
        grid = (batch * G * triton.cdiv(dpg, BLOCK_D),)
        _scan_bwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            bias if bias is not None else dummy, init if init is not None else dummy, ckpt, dout,
            dlast if dlast is not None else dummy,
            du, ddelta, dz if dz is not None else dummy, dB, dC, dA_part,
            dD_part if dD_part is not None else dummy, dinit,
            d, L, N, G, dpg, n_tiles,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, HAS_INIT=init is not None,
            HAS_DLAST=dlast is not None, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=BLOCK_D, N_PAD=N_PAD, BLOCK_T=BLOCK_T, CDT=_tl_dtype(ct), num_warps=num_warps,
        )
        (t_u, t_delta, t_A, t_B, t_C, t_D, t_z, t_bias, t_init) = ctx.dtypes
        dB, dC = _sum_groups(dB, ctx.bc_shapes[0]), _sum_groups(dC, ctx.bc_shapes[1])
        return (
            du.to(t_u), ddelta.to(t_delta), dA_part.sum(0).to(t_A), dB.to(t_B), dC.to(t_C),
            dD_part.sum(0).to(t_D) if D is not None else None,
            dz.to(t_z) if z is not None else None,
            ddelta.sum((0, 2)).to(t_bias) if bias is not None else None,
            dinit.to(t_init) if init is not None else None,
            None, None, None, None,
        )


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None, *, block_t=None, block_d=None,
                          num_warps=None):
    """The Mamba-1 selective scan in Triton; inputs as validated by `mambakit.core.scan.selective_scan`.

    u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (d,);
    initial_state: (b, d, N). Returns out (b, d, L) in u's dtype [, last_state (b, d, N) in float32, or
    float64 for float64 inputs]. `block_t` (the checkpoint interval K, a power of two) and `block_d` override
    the launch heuristics (tests use them to exercise several tiles and channel blocks at tiny sizes;
    benchmarks/scan_gpu.py --sweep uses them and `num_warps` to tune on a GPU).
    """
    if u.shape[-1] == 0:  # nothing to scan: the reference handles the empty case exactly
        from mambakit.kernels.reference import selective_scan_ref
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state,
                                  initial_state=initial_state)
    out, last_state = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                             bool(delta_softplus), block_t, block_d, num_warps)
    return (out, last_state) if return_last_state else out


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step; updates `state` in place and returns out in x's dtype. Forward only.

    Flat form (mamba_ssm's Mamba): state (b, d, N); x, dt, z: (b, d); A: (d, N); B, C: (b, N) or (b, G, N);
    D, dt_bias: (d,).
    Headed form (Mamba-2): state (b, h, p, N); x, z: (b, h, p); dt: (b, h) or (b, h, p); A: (h,) (one decay
    per head, shared over p and N) or (h, p, N); B, C: (b, N) or (b, G, N); D, dt_bias: (h,) or (h, p).
    It is computed as the flat form over d = h*p channels.
    """
    if state.dim() == 4:
        return _headed_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    batch, d, N = state.shape
    ct = torch.float64 if state.dtype == torch.float64 else torch.float32
    B3 = (B.unsqueeze(1) if B.dim() == 2 else B).contiguous()
    C3 = (C.unsqueeze(1) if C.dim() == 2 else C).contiguous()
    G = B3.shape[1]
    x_, dt_, A_, D_, z_, bias_ = map(_contig, (x, dt, A, D, z, dt_bias))
    out = torch.empty(batch, d, device=x.device, dtype=x.dtype)
    n_pad = triton.next_power_of_2(max(N, 1))
    block_d = max(1, min(64, triton.next_power_of_2(d), 4096 // n_pad))
    grid = (batch * triton.cdiv(d, block_d),)
    dummy = x_
    _state_update_kernel[grid](
        state, x_, dt_, A_, B3, C3, D_ if D_ is not None else dummy, z_ if z_ is not None else dummy,
        bias_ if bias_ is not None else dummy, out,
        state.stride(0), state.stride(1), state.stride(2), d, N, G, d // G,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, N_PAD=n_pad, CDT=_tl_dtype(ct),
    )
    return out


def _headed_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    batch, h, p, N = state.shape
    d = h * p

    def per_channel(t, name):
        """(h,) or (h, p) -> (h*p,)"""
        if t is None:
            return None
        if tuple(t.shape) == (h,):
            return t[:, None].expand(h, p).reshape(d)
        if tuple(t.shape) == (h, p):
            return t.reshape(d)
        raise ValueError(f"selective_state_update_triton: {name} has shape {tuple(t.shape)}, expected ({h},) or ({h}, {p})")

    if tuple(dt.shape) == (batch, h):
        dt = dt[:, :, None].expand(batch, h, p)
    A_flat = A[:, None, None].expand(h, p, N).reshape(d, N) if A.dim() == 1 else A.reshape(d, N)
    try:
        flat, copy_back = state.view(batch, d, N), False       # updated in place through the view
    except RuntimeError:                                        # (h, p) not mergeable: work on a copy
        flat, copy_back = state.reshape(batch, d, N).clone(), True
    out = selective_state_update_triton(
        flat, x.reshape(batch, d), dt.reshape(batch, d), A_flat, B, C, D=per_channel(D, "D"),
        z=None if z is None else z.reshape(batch, d), dt_bias=per_channel(dt_bias, "dt_bias"),
        dt_softplus=dt_softplus)
    if copy_back:
        state.copy_(flat.view(batch, h, p, N))
    return out.view(batch, h, p)
