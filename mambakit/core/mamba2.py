"""`Mamba2`: `mamba_ssm.modules.mamba2.Mamba2`'s arguments, defaults, initialisation and parameter names, in
pure PyTorch on top of `ssd_scan`, with variable lengths and recurrent decoding.

    zxbcdt = in_proj(u)     [z0 | x0 | z | xBC | dt], widths d_mlp, d_mlp, d_ssm, d_ssm + 2 G N, nheads
    xBC = silu(causal depthwise conv(xBC));  x | B | C = xBC
    y = ssd_scan(x (b, L, h, p), dt, A=-exp(A_log), B (b, L, G, N), C, D, dt_bias, softplus, dt_limit)
    y = norm(y, z) (gated RMSNorm, per group)  or  y * silu(z) without rmsnorm
    out = out_proj([silu(z0) * x0 | y])        (d_mlp = 0 unless d_ssm < d_inner)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import mambakit.core.ssd as _ssd
from mambakit.core.cache import InferenceParams, states_from_cache
from mambakit.core.mamba import (causal_conv, check_hidden, check_lengths, compute_dtype, conv_step,
                                 last_conv_window, length_mask)
from mambakit.core.norm import RMSNormGated
from mambakit.core.ssd import ssd_scan
from mambakit.kernels.cpu_conv import causal_conv1d

__all__ = ["Mamba2"]

_NO_LIMIT = (0.0, float("inf"))


def _process_dt(dt, dt_bias, dt_limit, dt_multiplier, ct):
    """Raw dt -> clamp(softplus(dt * multiplier + dt_bias), dt_limit), in the compute dtype."""
    dt = dt.to(ct)
    if dt_multiplier is not None:
        dt = dt * dt_multiplier.to(ct)
    dt = F.softplus(dt + dt_bias.to(ct))
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def _ssd_step_local(state, x, dt, A, B, C, D=None, z=None):
    """One recurrent SSD step with dt already processed; updates state (b, h, p, n) in place, returns
    y (b, h, p). Used where `mambakit.core.ssd.ssd_state_update` is not available."""
    ct = state.dtype if state.dtype == torch.float64 else torch.float32
    h = x.shape[1]
    Bh = B.to(ct).repeat_interleave(h // B.shape[1], dim=1)                  # (b, h, n)
    Ch = C.to(ct).repeat_interleave(h // C.shape[1], dim=1)
    xf, dt = x.to(ct), dt.to(ct)
    new = (torch.exp(dt * A.to(ct))[..., None, None] * state.to(ct)
           + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :])
    state.copy_(new.to(state.dtype))
    y = (new * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        Df = D.to(ct)
        y = y + (Df[None, :, None] if Df.dim() == 1 else Df[None]) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 mixer (causal). u (b, L, d_model) -> (b, L, d_model).

    Arguments and defaults are mamba_ssm's (d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
    A_init_range=(1, 16), rmsnorm=True, norm_before_gate=False, dt_limit=(0, inf), chunk_size=256, ...).
    `use_mem_eff_path` and `sequence_parallel` are accepted for config compatibility and have no effect;
    tensor parallelism (`process_group`) is not supported. `scan_backend` goes to `ssd_scan`.

    forward(u, inference_params=None, lengths=None, dt_multiplier=None): as `Mamba.forward`;
    dt_multiplier (b, L, nheads) scales the raw dt before dt_bias and softplus (TiM4Rec).
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: float | None = None,
                 expand: int = 2, headdim: int = 64, d_ssm: int | None = None, ngroups: int = 1,
                 A_init_range: tuple[float, float] = (1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit: tuple[float, float] = _NO_LIMIT, bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: int | None = None, process_group=None, sequence_parallel: bool = True,
                 scan_backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if process_group is not None:
            raise ValueError("Mamba2: tensor parallelism (process_group) is not supported; use DDP/FSDP instead")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if self.d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} (expand * d_model unless given) must be a multiple "
                             f"of headdim={headdim}")
        self.nheads = self.d_ssm // headdim
        if ngroups < 1 or self.nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups={ngroups} must divide nheads={self.nheads}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.ngroups = ngroups
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend
        self.conv_init = conv_init

        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **fk)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **fk)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        dt = torch.exp(torch.rand(self.nheads, **fk) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))           # inverse softplus
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        D_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device, dtype=D_dtype))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    # -- helpers ----------------------------------------------------------------------------------------
    @property
    def _d_mlp(self) -> int:
        return self.d_inner - self.d_ssm

    def _split(self, zxbcdt: torch.Tensor):
        m = self._d_mlp
        return torch.split(zxbcdt, [m, m, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads],
                           dim=-1)

    def _D(self):
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.rmsnorm:
            y = self.norm(y, z)
        if self._d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _check_multiplier(self, dt_multiplier, shape):
        if dt_multiplier is not None and tuple(dt_multiplier.shape) != shape:
            raise ValueError(f"Mamba2: dt_multiplier has shape {tuple(dt_multiplier.shape)}, expected {shape}")

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, inference_params: InferenceParams | None = None,
                lengths: torch.Tensor | None = None, dt_multiplier: torch.Tensor | None = None) -> torch.Tensor:
        b, L = check_hidden("Mamba2", u, self.d_model)
        lengths = check_lengths("Mamba2", lengths, b, L, u.device)
        self._check_multiplier(dt_multiplier, (b, L, self.nheads))
        conv_state = ssm_state = None
        want_states = inference_params is not None
        if want_states:
            conv_state, ssm_state = states_from_cache(self, inference_params, b, self._allocate)
            if inference_params.seqlen_offset > 0:
                if L == 1 and lengths is None:
                    mult = dt_multiplier[:, 0] if dt_multiplier is not None else None
                    return self.step(u, conv_state, ssm_state, dt_multiplier=mult)[0]
            else:
                conv_state = ssm_state = None                   # prefill starts from zero states
        cache = inference_params.key_value_memory_dict[self.layer_idx] if want_states else None

        z0, x0, z, xBC, dt = self._split(self.in_proj(u))
        xBC_t = xBC.transpose(1, 2)
        new_conv = last_conv_window(xBC_t, conv_state, lengths, self.d_conv) if want_states else None
        prefix = conv_state[..., 1:] if conv_state is not None else None
        if prefix is None:                                  # fused conv + silu (kernels.cpu_conv on CPU)
            xBC = causal_conv1d(xBC_t, self.conv1d.weight, self.conv1d.bias, activation="silu").transpose(1, 2)
        else:
            xBC = F.silu(causal_conv(xBC_t, self.conv1d, prefix)).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        ct = compute_dtype(self.A_log)
        A = -torch.exp(self.A_log.to(ct))
        kw = dict(dt_bias=self.dt_bias.to(ct), dt_softplus=True, dt_limit=self.dt_limit, dt_multiplier=dt_multiplier)
        if want_states and lengths is not None:
            # dt = 0 past a sample's end leaves its state untouched, so the final state is its own.
            dt = _process_dt(dt, self.dt_bias, self.dt_limit, dt_multiplier, ct) * length_mask(lengths, L)[..., None]
            kw = dict(dt_bias=None, dt_softplus=False, dt_limit=_NO_LIMIT, dt_multiplier=None)
        out = ssd_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                       B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
                       chunk_size=self.chunk_size, D=self._D().to(ct),
                       z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)),
                       initial_states=ssm_state, return_final_states=want_states, backend=self.scan_backend, **kw)
        if want_states:
            out, last = out
            cache[0].copy_(new_conv)
            cache[1].copy_(last)
        y = self._output(out.flatten(-2), z, z0, x0)
        if lengths is not None:
            y = y.masked_fill(~length_mask(lengths, L)[..., None], 0.0)
        return y

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
             dt_multiplier: torch.Tensor | None = None):
        """One token per sequence: hidden_states (b, 1, d_model) -> (out (b, 1, d_model), conv_state, ssm_state),
        states updated in place. dt_multiplier: (b, nheads) for this token."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or hidden_states.shape[2] != self.d_model:
            raise ValueError(f"Mamba2.step: hidden_states has shape {tuple(hidden_states.shape)}, expected "
                             f"(batch, 1, {self.d_model}): one token at a time")
        b = hidden_states.shape[0]
        conv_dim = self.conv1d.weight.shape[0]
        for name, t, shape in (("conv_state", conv_state, (b, conv_dim, self.d_conv)),
                               ("ssm_state", ssm_state, (b, self.nheads, self.headdim, self.d_state))):
            if tuple(t.shape) != shape:
                raise ValueError(f"Mamba2.step: {name} has shape {tuple(t.shape)}, expected {shape}")
        self._check_multiplier(dt_multiplier, (b, self.nheads))
        z0, x0, z, xBC, dt = self._split(self.in_proj(hidden_states[:, 0]))
        xBC = conv_step(conv_state, xBC, self.conv1d)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        ct = compute_dtype(self.A_log)
        dt = _process_dt(dt, self.dt_bias, self.dt_limit, dt_multiplier, ct)
        args = (ssm_state, x.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(self.A_log.to(ct)),
                B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)))
        zh = None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim))
        update = getattr(_ssd, "ssd_state_update", None)
        if update is not None:
            y = update(*args, D=self._D().to(ct), z=zh)
        else:
            y = _ssd_step_local(*args, D=self._D().to(ct), z=zh)
        return self._output(y.flatten(-2), z, z0, x0).unsqueeze(1), conv_state, ssm_state

    def _allocate(self, batch_size: int, dtype=None):
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=self.in_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """(conv_state (b, conv_dim, d_conv), ssm_state (b, nheads, headdim, d_state)), zero-filled."""
        return self._allocate(batch_size, dtype)
