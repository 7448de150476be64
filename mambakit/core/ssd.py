"""`ssd_scan`: the one entry point to the Mamba-2 (SSD) scan, with `mamba_chunk_scan_combined`'s layout.

x, z: (b, L, h, p); dt, dt_multiplier: (b, L, h); A, dt_bias: (h,); B, C: (b, L, g, n); D: (h,) or (h, p);
initial_states: (b, h, p, n). `dt_multiplier` scales the raw dt before dt_bias and softplus (TiM4Rec's
time-aware mask). Returns y (b, L, h, p) [, final_states (b, h, p, n)].
"""

from __future__ import annotations

from mambakit.kernels.reference import ssd_scan_ref

__all__ = ["ssd_scan"]


def ssd_scan(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), dt_multiplier=None, initial_states=None, return_final_states=False,
             backend="auto"):
    # Placeholder dispatch: the chunked (PyTorch) and Triton backends land with the kernels issue.
    return ssd_scan_ref(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                        dt_multiplier=dt_multiplier, initial_states=initial_states,
                        return_final_states=return_final_states)
