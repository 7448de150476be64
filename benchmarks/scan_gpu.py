"""GPU benchmark of the Triton selective scan (and the one-token state update and the chunked SSD) against the
reference loop and, where it imports, mamba_ssm, at issue 3's shapes. One command on a CUDA machine:

    .venv/bin/python benchmarks/scan_gpu.py                 # writes benchmarks/results/gpu_scan.{json,md}
    .venv/bin/python benchmarks/scan_gpu.py --sweep         # also times block-size/warp variants per shape
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/scan_gpu.py --dry-run   # CPU, tiny shapes, checks the script

Without CUDA (and without --dry-run) it says so and exits 0. Timings are medians of CUDA-event-timed runs
after warm-up (compilation excluded); peak memory is torch.cuda.max_memory_allocated above what the inputs
already hold. Every ratio compares peers measured in the same run on the same card, whose name is recorded.
Each peer's output (and gradients, where both ran a backward) is checked against the reference before timing.
The reference loop is skipped where it would take too long (--ref-budget-s) and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Shapes of issue 3: (name, b, d, L, N)
SCAN_SHAPES = [
    ("vim_ti_layer", 8, 384, 197, 16),
    ("long_bag", 1, 1024, 20000, 16),
    ("recommendation", 256, 128, 50, 32),
    ("very_long", 1, 512, 100000, 16),
]
DRY_SCAN_SHAPES = [("tiny", 1, 4, 20, 4), ("tiny_groups", 2, 4, 9, 8)]
# Decoding: (name, b, d, N); Mamba-130m/370m/2.8b-like inner widths
STATE_UPDATE_SHAPES = [("decode_d1536", 64, 1536, 16), ("decode_d2048", 64, 2048, 16), ("decode_d5120", 16, 5120, 16)]
DRY_STATE_UPDATE_SHAPES = [("tiny_decode", 2, 8, 4)]
# SSD: (name, b, L, h, p, g, n, chunk); TiM4Rec's config and a Mamba2-130m layer
SSD_SHAPES = [("tim4rec", 256, 50, 4, 32, 1, 32, 32), ("mamba2_130m_layer", 2, 2048, 24, 64, 1, 128, 256)]
DRY_SSD_SHAPES = [("tiny_ssd", 1, 19, 2, 4, 1, 4, 8)]

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------- timing

class Timer:
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter on CPU (--dry-run)."""

    def __init__(self, device, repeats: int, budget_s: float):
        self.device, self.repeats, self.budget_s = device, repeats, budget_s

    def __call__(self, fn) -> float:
        import torch
        fn()  # warm-up (and compile)
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        once = time.perf_counter() - start
        if once >= self.budget_s:  # a slow peer (the reference loop at long L): one timed run is enough
            return once * 1e3
        n = max(1, min(self.repeats, int(self.budget_s / max(once, 1e-6))))
        times = []
        for _ in range(n):
            if self.device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def _sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def peak_mib(device, fn) -> float | None:
    """Peak allocated memory of one call of fn above what was allocated before it, in MiB."""
    import torch
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ----------------------------------------------------------------------------------------------- peers

def load_mamba_ssm(source: str | None = None):
    """(selective_scan_fn, selective_state_update, mamba_chunk_scan_combined, version) or the reason it fails.

    source: a folder holding an unpacked mamba_ssm sdist's `mamba_ssm` package, used where mamba_ssm cannot be
    built (no network, no time for its CUDA build): its Triton kernels (state update, SSD) run as published;
    its CUDA-only selective scan has no extension behind it, so that peer reports an error instead of a time.
    The language-model module is not loaded (it imports transformers' generation API)."""
    if source is not None:
        import types
        sys.path.insert(0, str(Path(source).resolve()))
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        lm = types.ModuleType("mamba_ssm.models.mixer_seq_simple")
        lm.MambaLMHeadModel = None
        sys.modules.setdefault("mamba_ssm.models.mixer_seq_simple", lm)
    try:
        import mamba_ssm
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return (selective_scan_fn, selective_state_update, mamba_chunk_scan_combined,
                getattr(mamba_ssm, "__version__", "?")), None
    except Exception as exc:  # ImportError, or RuntimeError when selective_scan_cuda was not built
        return None, f"{type(exc).__name__}: {exc}"[:300]


def scan_inputs(b, d, L, N, device, dtype, groups=None):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    BC = (b, groups, N, L) if groups else (b, N, L)
    return dict(u=rnd(b, d, L), delta=rnd(b, d, L, scale=0.5) - 2.0,
                A=-torch.exp(torch.rand(d, N, generator=g) * 2).to(device), B=rnd(*BC), C=rnd(*BC),
                D=torch.randn(d, generator=g).to(device), z=rnd(b, d, L),
                delta_bias=(torch.rand(d, generator=g) * 2 - 4).to(device))


def max_rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12))


def bench_scan_shape(name, b, d, L, N, args, device, triton_mod, ref_fn, mamba, timer, groups=None):
    import torch
    dtype = getattr(torch, args.dtype)
    inputs = scan_inputs(b, d, L, N, device, dtype, groups)
    row = dict(kind="selective_scan", shape=name, b=b, d=d, L=L, N=N, G=groups or 1, dtype=args.dtype, peers={})

    peers = {"triton": lambda **kw: triton_mod.selective_scan_triton(**kw, delta_softplus=True)}
    elems = b * d * L * N
    if elems <= args.ref_max_elems:
        peers["reference"] = lambda **kw: ref_fn(**kw, delta_softplus=True)
    else:
        row["peers"]["reference"] = dict(skipped=f"b*d*L*N = {elems:.3g} > --ref-max-elems {args.ref_max_elems:.3g}")
    if mamba is not None:
        peers["mamba_ssm"] = lambda **kw: mamba[0](**kw, delta_softplus=True)

    grads_ref = out_ref = None
    g_out = torch.randn(b, d, L, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    for peer, fn in peers.items():
        try:
            row["peers"][peer] = res = {}
            leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

            def fwd():
                with torch.no_grad():
                    return fn(**inputs)

            def fwd_bwd():
                out = fn(**leaves)
                return out, torch.autograd.grad(out, list(leaves.values()), g_out)

            out, grads = fwd_bwd()
            if peer == "reference":
                out_ref, grads_ref = out, grads
            res["fwd_ms"] = timer(fwd)
            res["fwd_bwd_ms"] = timer(fwd_bwd)
            res["fwd_bwd_peak_mib"] = peak_mib(device, fwd_bwd)
            res["fwd_peak_mib"] = peak_mib(device, fwd)
            res["_out"], res["_grads"] = out.detach(), [g.detach() for g in grads]
        except Exception as exc:  # OOM or a peer's own limits: recorded, the run goes on
            row["peers"][peer] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    check_against(row, out_ref, grads_ref)
    return row


def check_against(row, out_ref, grads_ref):
    """Record each peer's largest relative error against the reference (or against triton when the reference
    was skipped: then only mamba_ssm is checked, against triton)."""
    peers = row["peers"]
    base_name = "reference" if out_ref is not None else "triton"
    base = peers.get(base_name, {})
    if "_out" not in base:
        return
    for name, res in peers.items():
        if name == base_name or "_out" not in res:
            continue
        res[f"max_rel_err_out_vs_{base_name}"] = max_rel_err(res["_out"], base["_out"])
        res[f"max_rel_err_grads_vs_{base_name}"] = max(max_rel_err(g, g0) for g, g0 in zip(res["_grads"], base["_grads"]))
    for res in peers.values():
        res.pop("_out", None)
        res.pop("_grads", None)


def bench_state_update(name, b, d, N, args, device, triton_mod, ref_fn, mamba, timer):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    x, dt, z = (torch.randn(b, d, generator=g).to(device) for _ in range(3))
    A, B, C = -torch.rand(d, N, generator=g).to(device), torch.randn(b, N, generator=g).to(device), \
        torch.randn(b, N, generator=g).to(device)
    D, dt_bias = torch.randn(d, generator=g).to(device), torch.randn(d, generator=g).to(device)
    state0 = torch.randn(b, d, N, generator=g).to(device)
    row = dict(kind="state_update", shape=name, b=b, d=d, N=N, dtype="float32", peers={})
    peers = {"triton": triton_mod.selective_state_update_triton, "reference": ref_fn}
    if mamba is not None:
        peers["mamba_ssm"] = mamba[1]
    expected = None
    for peer, fn in peers.items():
        try:
            state = state0.clone()
            y = fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
            res = row["peers"][peer] = {}
            if peer == "reference":
                expected = (y, state.clone())
            res["_check"] = (y, state.clone())
            res["step_us"] = 1e3 * timer(lambda: fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True))
        except Exception as exc:
            row["peers"][peer] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    for peer, res in row["peers"].items():
        check = res.pop("_check", None)
        if check is not None and expected is not None and peer != "reference":
            res["max_rel_err_vs_reference"] = max(max_rel_err(check[0], expected[0]), max_rel_err(check[1], expected[1]))
    return row


def bench_ssd(name, b, L, h, p, g, n, chunk, args, device, triton_mod, mamba, timer):
    import torch
    from mambakit.kernels.reference import ssd_scan_ref
    from mambakit.kernels.ssd import ssd_chunked, ssd_via_selective_scan
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(x=torch.randn(b, L, h, p, generator=gen), dt=torch.randn(b, L, h, generator=gen) - 2,
                  A=-torch.exp(torch.rand(h, generator=gen) * 2), B=torch.randn(b, L, g, n, generator=gen),
                  C=torch.randn(b, L, g, n, generator=gen), D=torch.randn(h, generator=gen),
                  dt_bias=torch.rand(h, generator=gen) - 2)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    row = dict(kind="ssd", shape=name, b=b, L=L, h=h, p=p, g=g, n=n, chunk=chunk, dtype="float32", peers={})
    peers = {"chunked": lambda **kw: ssd_chunked(**kw, chunk_size=chunk, dt_softplus=True),
             "triton_mamba1_scan": lambda **kw: ssd_via_selective_scan(triton_mod.selective_scan_triton, **kw,
                                                                       dt_softplus=True),
             "reference": lambda **kw: ssd_scan_ref(**kw, dt_softplus=True)}
    if mamba is not None:
        peers["mamba_ssm"] = lambda **kw: mamba[2](**kw, chunk_size=chunk, dt_softplus=True)
    out_ref = grads_ref = None
    g_out = torch.randn(b, L, h, p, generator=torch.Generator().manual_seed(1)).to(device)
    for peer, fn in peers.items():
        try:
            res = row["peers"][peer] = {}
            leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

            def fwd():
                with torch.no_grad():
                    return fn(**inputs)

            def fwd_bwd():
                out = fn(**leaves)
                return out, torch.autograd.grad(out, list(leaves.values()), g_out)

            out, grads = fwd_bwd()
            if peer == "reference":
                out_ref, grads_ref = out, grads
            res["fwd_ms"] = timer(fwd)
            res["fwd_bwd_ms"] = timer(fwd_bwd)
            res["fwd_bwd_peak_mib"] = peak_mib(device, fwd_bwd)
            res["_out"], res["_grads"] = out.detach(), [gr.detach() for gr in grads]
        except Exception as exc:
            row["peers"][peer] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    check_against(row, out_ref, grads_ref)
    return row


def sweep_configs(N, default, dry_run):
    """(block_t, block_d, (fwd_warps, bwd_warps)) variants with tiles of at most 8192 elements, default first."""
    n_pad = 1 << max(N - 1, 0).bit_length()
    configs = [(default.block_t, default.block_d, (default.fwd_warps, default.bwd_warps))]
    grid = [(16, 1), (32, 2)] if dry_run else [(t, d) for t in (32, 64, 128) for d in (1, 2, 4, 8)]
    for block_t, block_d in grid:
        tile = block_d * n_pad * block_t
        if tile > 8192:
            continue
        warp_options = [(4, 8)] if dry_run else [(tile // 256, tile // 128), (tile // 512, tile // 256), (4, 8)]
        for fwd_w, bwd_w in warp_options:
            config = (block_t, block_d, (min(max(fwd_w, 1), 16), min(max(bwd_w, 1), 16)))
            if config not in configs:
                configs.append(config)
    return configs


def sweep_scan_shape(name, b, d, L, N, args, device, triton_mod, timer):
    """fwd+bwd time of launch-configuration variants of the Triton scan, best first."""
    import torch
    inputs = scan_inputs(b, d, L, N, device, getattr(torch, args.dtype))
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    g_out = torch.randn(b, d, L, device=device, dtype=inputs["u"].dtype)
    default = triton_mod._launch_config(b, d, 1, N, L, device)
    variants = []
    for block_t, block_d, warps in sweep_configs(N, default, args.dry_run):
        def fwd_bwd(bt=block_t, bd=block_d, w=warps):
            out = triton_mod.selective_scan_triton(**leaves, delta_softplus=True, block_t=bt, block_d=bd,
                                                   num_warps=w)
            return torch.autograd.grad(out, list(leaves.values()), g_out)

        try:
            variants.append(dict(block_t=block_t, block_d=block_d, warps=list(warps), fwd_bwd_ms=timer(fwd_bwd)))
        except Exception as exc:
            variants.append(dict(block_t=block_t, block_d=block_d, warps=list(warps),
                                 error=f"{type(exc).__name__}: {exc}"[:200]))
    ok = sorted((v for v in variants if "fwd_bwd_ms" in v), key=lambda v: v["fwd_bwd_ms"])
    return dict(kind="sweep", shape=name, default=dict(block_t=default.block_t, block_d=default.block_d,
                                                       warps=[default.fwd_warps, default.bwd_warps]),
                variants=ok + [v for v in variants if "error" in v])


# ----------------------------------------------------------------------------------------------- report

def machine_info(device, mamba_version, mamba_error):
    import torch
    import triton
    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                host=platform.node(), cpu=platform.processor() or platform.machine(),
                triton_interpret=os.environ.get("TRITON_INTERPRET", ""), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
    else:
        info.update(gpu=None, note="dry run on CPU under the Triton interpreter: timings mean nothing")
    info["mamba_ssm"] = mamba_version if mamba_version else f"unavailable ({mamba_error})"
    return info


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _ratio(peers, peer, key, base="triton"):
    a, b = peers.get(peer, {}).get(key), peers.get(base, {}).get(key)
    return f"{a / b:.3g}x" if a and b else "-"


def markdown(report) -> str:
    m = report["machine"]
    lines = [f"# GPU scan benchmark", "",
             f"Machine: {m.get('gpu') or 'CPU (dry run)'}"
             + (f" ({m['gpu_memory_gib']} GiB, {m['sm_count']} SMs, sm_{m['capability'].replace('.', '')}, "
                f"CUDA {m['cuda']})" if m.get("gpu") else "")
             + f"; torch {m['torch']}, triton {m['triton']}, mamba_ssm: {m['mamba_ssm']}; {m['date']}.", ""]
    if not m.get("gpu"):
        lines += ["**Dry run on CPU under TRITON_INTERPRET=1: the numbers only show that the script works.**", ""]
    scan = [r for r in report["results"] if r["kind"] == "selective_scan"]
    if scan:
        lines += ["## Selective scan (Mamba-1), delta_softplus, D, z, delta_bias", "",
                  "Times are medians in ms; 'x' columns are the peer's time over Triton's (higher = Triton faster); "
                  "memory is the fwd+bwd peak above the inputs, MiB; err is the largest relative error of the "
                  "output / any gradient against the reference loop (against Triton where the loop was skipped).",
                  "",
                  "| shape (b, d, L, N) | dtype | peer | fwd ms | fwd+bwd ms | fwd x | fwd+bwd x | peak MiB | "
                  "err out | err grads |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in scan:
            for peer, res in r["peers"].items():
                shape = f"{r['shape']} ({r['b']}, {r['d']}, {r['L']}, {r['N']})"
                if "skipped" in res or "error" in res:
                    lines.append(f"| {shape} | {r['dtype']} | {peer} | {res.get('skipped') or res.get('error')} "
                                 f"| | | | | | |")
                    continue
                err_out = next((v for k, v in res.items() if k.startswith("max_rel_err_out")), None)
                err_g = next((v for k, v in res.items() if k.startswith("max_rel_err_grads")), None)
                lines.append(f"| {shape} | {r['dtype']} | {peer} | {_fmt(res['fwd_ms'])} | {_fmt(res['fwd_bwd_ms'])} "
                             f"| {_ratio(r['peers'], peer, 'fwd_ms')} | {_ratio(r['peers'], peer, 'fwd_bwd_ms')} "
                             f"| {_fmt(res.get('fwd_bwd_peak_mib'))} | {_fmt(err_out, 2)} | {_fmt(err_g, 2)} |")
        lines.append("")
    su = [r for r in report["results"] if r["kind"] == "state_update"]
    if su:
        lines += ["## One-token state update (decoding)", "", "| shape (b, d, N) | peer | us / step | x | err |",
                  "|---|---|---|---|---|"]
        for r in su:
            for peer, res in r["peers"].items():
                if "error" in res:
                    lines.append(f"| {r['shape']} ({r['b']}, {r['d']}, {r['N']}) | {peer} | {res['error']} | | |")
                    continue
                lines.append(f"| {r['shape']} ({r['b']}, {r['d']}, {r['N']}) | {peer} | {_fmt(res['step_us'])} | "
                             f"{_ratio(r['peers'], peer, 'step_us')} | {_fmt(res.get('max_rel_err_vs_reference'), 2)} |")
        lines.append("")
    ssd = [r for r in report["results"] if r["kind"] == "ssd"]
    if ssd:
        lines += ["## SSD (Mamba-2): PyTorch chunked scan (ssd_scan's 'auto')", "",
                  "'x' columns are the peer's time over the chunked scan's; triton_mamba1_scan is "
                  "ssd_scan(backend='triton'), Mamba-2 run as the Mamba-1 Triton scan over h*p channels.", "",
                  "| shape (b, L, h, p, g, n, chunk) | peer | fwd ms | fwd+bwd ms | fwd x | fwd+bwd x | peak MiB | "
                  "err out | err grads |", "|---|---|---|---|---|---|---|---|---|"]
        for r in ssd:
            shape = f"{r['shape']} ({r['b']}, {r['L']}, {r['h']}, {r['p']}, {r['g']}, {r['n']}, {r['chunk']})"
            for peer, res in r["peers"].items():
                if "error" in res:
                    lines.append(f"| {shape} | {peer} | {res['error']} | | | | | | |")
                    continue
                err_out = next((v for k, v in res.items() if k.startswith("max_rel_err_out")), None)
                err_g = next((v for k, v in res.items() if k.startswith("max_rel_err_grads")), None)
                lines.append(f"| {shape} | {peer} | {_fmt(res['fwd_ms'])} | {_fmt(res['fwd_bwd_ms'])} | "
                             f"{_ratio(r['peers'], peer, 'fwd_ms', 'chunked')} | "
                             f"{_ratio(r['peers'], peer, 'fwd_bwd_ms', 'chunked')} | "
                             f"{_fmt(res.get('fwd_bwd_peak_mib'))} | {_fmt(err_out, 2)} | {_fmt(err_g, 2)} |")
        lines.append("")
    sweeps = [r for r in report["results"] if r["kind"] == "sweep"]
    if sweeps:
        lines += ["## Launch-configuration sweep (Triton scan, fwd+bwd)", "",
                  "| shape | default (block_t, block_d, warps) | best (block_t, block_d, warps) | default ms | best ms |",
                  "|---|---|---|---|---|"]
        for r in sweeps:
            dflt = r["default"]
            match = [v for v in r["variants"] if "fwd_bwd_ms" in v and v["block_t"] == dflt["block_t"]
                     and v["block_d"] == dflt["block_d"] and v["warps"] == dflt["warps"]]
            best = r["variants"][0] if r["variants"] and "fwd_bwd_ms" in r["variants"][0] else None
            lines.append(f"| {r['shape']} | ({dflt['block_t']}, {dflt['block_d']}, {dflt['warps']}) | "
                         + (f"({best['block_t']}, {best['block_d']}, {best['warps']})" if best else "-")
                         + f" | {_fmt(match[0]['fwd_bwd_ms']) if match else '-'} | "
                         f"{_fmt(best['fwd_bwd_ms']) if best else '-'} |")
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (set automatically): checks the script only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="input dtype of the selective-scan rows (default float32)")
    ap.add_argument("--only", default="scan,state_update,ssd",
                    help="comma-separated subset of scan,state_update,ssd (default: all)")
    ap.add_argument("--shapes", default=None, help="comma-separated scan shape names (default: all of issue 3's)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (default 20)")
    ap.add_argument("--budget-s", type=float, default=3.0,
                    help="time per measurement: fewer repeats for slow peers (default 3 s)")
    ap.add_argument("--ref-max-elems", type=float, default=1e9,
                    help="skip the reference loop above this b*d*L*N (default 1e9: it runs at every issue-3 "
                         "shape; the very long one takes minutes and tens of GiB there)")
    ap.add_argument("--sweep", action="store_true", help="also time launch-configuration variants per scan shape")
    ap.add_argument("--mamba-ssm-src", default=None,
                    help="folder with an unpacked mamba_ssm source package to compare against where mamba_ssm is "
                         "not installed (its Triton kernels run; its CUDA selective scan is not built)")
    ap.add_argument("--out", default=None,
                    help="output folder (default benchmarks/results; a temporary folder for --dry-run)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (and triton, if first)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("scan_gpu: CUDA is not available; nothing to measure (use --dry-run to check the script on CPU).")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mambakit.kernels.triton_scan as triton_mod
    from mambakit.kernels.reference import selective_scan_ref, selective_state_update_ref
    if args.dry_run and not triton_mod.is_interpreted():
        print("scan_gpu: --dry-run needs the Triton interpreter, but triton_scan was imported compiled")
        return 1

    device = torch.device("cpu" if args.dry_run else "cuda")
    mamba, mamba_error = (None, "not tried in a dry run") if args.dry_run else load_mamba_ssm(args.mamba_ssm_src)
    from_sources = " (Python/Triton sources from --mamba-ssm-src; its CUDA selective scan not built)"
    mamba_label = None if mamba is None else mamba[3] + (from_sources if args.mamba_ssm_src else "")
    timer = Timer(device, 1 if args.dry_run else args.repeats, 0.0 if args.dry_run else args.budget_s)
    only = set(args.only.split(","))
    scan_shapes = DRY_SCAN_SHAPES if args.dry_run else SCAN_SHAPES
    if args.shapes:
        wanted = set(args.shapes.split(","))
        scan_shapes = [s for s in scan_shapes if s[0] in wanted]
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="scan_gpu_dry_")) if args.dry_run
                                               else RESULTS)
    results = []

    def write_report() -> str:
        """Rewritten after every measured shape, so a run cut short (a lease's time limit) keeps what it measured."""
        report = dict(machine=machine_info(device, mamba_label, mamba_error),
                      args=vars(args), results=results)
        write_atomic(out_dir / "gpu_scan.json", json.dumps(report, indent=1))
        text = markdown(report)
        write_atomic(out_dir / "gpu_scan.md", text)
        return text

    for name, b, d, L, N in scan_shapes if "scan" in only else []:
        groups = 2 if name == "tiny_groups" else None
        print(f"scan {name} (b={b}, d={d}, L={L}, N={N}) ...", flush=True)
        results.append(bench_scan_shape(name, b, d, L, N, args, device, triton_mod, selective_scan_ref, mamba, timer,
                                        groups))
        write_report()
        if args.sweep:
            results.append(sweep_scan_shape(name, b, d, L, N, args, device, triton_mod, timer))
            write_report()
    for name, b, d, N in (DRY_STATE_UPDATE_SHAPES if args.dry_run else STATE_UPDATE_SHAPES) \
            if "state_update" in only else []:
        print(f"state update {name} (b={b}, d={d}, N={N}) ...", flush=True)
        results.append(bench_state_update(name, b, d, N, args, device, triton_mod, selective_state_update_ref, mamba,
                                          timer))
        write_report()
    for shape in (DRY_SSD_SHAPES if args.dry_run else SSD_SHAPES) if "ssd" in only else []:
        print(f"ssd {shape[0]} ...", flush=True)
        results.append(bench_ssd(*shape, args, device, triton_mod, mamba, timer))
        write_report()

    print(write_report())
    print(f"wrote {out_dir / 'gpu_scan.json'} and {out_dir / 'gpu_scan.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
