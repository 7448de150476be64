"""Straightforward float64 re-statements of upstream's maths, written independently of mambakit.core (explicit
loops over time and conv taps), for the core tests to compare against."""

import torch
import torch.nn.functional as F


def causal_conv_loop(x, weight, bias):
    """x (b, L, c), weight (c, 1, k), bias (c,) -> (b, L, c): out_t = sum_j w_j x_{t-k+1+j} + bias."""
    b, L, c = x.shape
    k = weight.shape[-1]
    out = torch.zeros_like(x)
    for t in range(L):
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                out[:, t] = out[:, t] + weight[:, 0, j] * x[:, src]
    return out + (bias if bias is not None else 0)


def mamba1_branch(xz, conv, x_proj_w, dt_proj_w, dt_proj_b, A_log, D, d_state, dt_rank):
    """mamba_ssm Mamba's inner function without out_proj: xz (b, L, 2 d_inner) -> gated y (b, L, d_inner)."""
    di = xz.shape[-1] // 2
    x, z = xz[..., :di], xz[..., di:]
    x = F.silu(causal_conv_loop(x, conv.weight, conv.bias))
    dbl = x @ x_proj_w.T
    dt, B, C = dbl[..., :dt_rank], dbl[..., dt_rank:dt_rank + d_state], dbl[..., dt_rank + d_state:]
    dt = F.softplus(dt @ dt_proj_w.T + dt_proj_b)
    A = -torch.exp(A_log)
    h = x.new_zeros(x.shape[0], di, d_state)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        y = (h * C[:, t, None, :]).sum(-1) + D * x[:, t]
        ys.append(y * F.silu(z[:, t]))
    return torch.stack(ys, dim=1)


def mamba1_branch_of(m, xz, suffix=""):
    """The branch with module m's parameter set `suffix` (Vim / MambaMIL names)."""
    return mamba1_branch(xz, getattr(m, "conv1d" + suffix), getattr(m, "x_proj" + suffix).weight,
                         getattr(m, "dt_proj" + suffix).weight, getattr(m, "dt_proj" + suffix).bias,
                         getattr(m, f"A{suffix}_log"), getattr(m, "D" + suffix), m.d_state, m.dt_rank)


def mamba1(m, h):
    """A full mamba_ssm Mamba forward with module m's parameters."""
    return m.out_proj(mamba1_branch_of(m, m.in_proj(h)))


def mamba2(m, u):
    """mamba_ssm Mamba2's forward (non-fused path) with module m's parameters, as an explicit recurrence."""
    b, L, _ = u.shape
    zxbcdt = m.in_proj(u)
    d_mlp = m.d_inner - m.d_ssm
    G, N, H, P = m.ngroups, m.d_state, m.nheads, m.headdim
    z0, x0 = zxbcdt[..., :d_mlp], zxbcdt[..., d_mlp:2 * d_mlp]
    z = zxbcdt[..., 2 * d_mlp:2 * d_mlp + m.d_ssm]
    xBC = zxbcdt[..., 2 * d_mlp + m.d_ssm:2 * d_mlp + 2 * m.d_ssm + 2 * G * N]
    dt = zxbcdt[..., -H:]
    xBC = F.silu(causal_conv_loop(xBC, m.conv1d.weight, m.conv1d.bias))
    x = xBC[..., :m.d_ssm].reshape(b, L, H, P)
    B = xBC[..., m.d_ssm:m.d_ssm + G * N].reshape(b, L, G, N)
    C = xBC[..., m.d_ssm + G * N:].reshape(b, L, G, N)
    dt = F.softplus(dt + m.dt_bias).clamp(*m.dt_limit)
    A = -torch.exp(m.A_log)
    D = m.D.reshape(H, P) if m.D_has_hdim else m.D[:, None]
    Bh = B.repeat_interleave(H // G, dim=2)                          # (b, L, H, N): head hh uses group hh // (H/G)
    Ch = C.repeat_interleave(H // G, dim=2)
    S = u.new_zeros(b, H, P, N)
    ys = []
    for t in range(L):
        S = torch.exp(dt[:, t] * A)[:, :, None, None] * S \
            + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((S * Ch[:, t, :, None, :]).sum(-1) + D * x[:, t])
    y = torch.stack(ys, dim=1)                                          # (b, L, H, P)
    if not m.rmsnorm:
        y = y * F.silu(z.reshape(b, L, H, P))
    y = y.reshape(b, L, m.d_ssm)
    if m.rmsnorm:
        gs = m.d_ssm // G
        yg = (y if m.norm_before_gate else y * F.silu(z)).reshape(b, L, G, gs)
        y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(b, L, m.d_ssm) * m.norm.weight
        if m.norm_before_gate:
            y = y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return m.out_proj(y)


def randomize(m):
    """Move every parameter off its structured init (A_log, A_b_log, A_k_log: log of U(0.2, 3.2); D: N(0, 1);
    the rest: + 0.2 N(0, 1)) so that tests see generic values. Returns m."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("A") and name.endswith("log"):
                p.copy_(torch.log(torch.rand_like(p) * 3 + 0.2))
            elif name.startswith("D"):
                p.copy_(torch.randn_like(p))
            else:
                p.add_(0.2 * torch.randn_like(p))
    return m
