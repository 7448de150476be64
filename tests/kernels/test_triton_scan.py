"""Triton selective scan, backward and state update against the float64 reference, run on CPU under
TRITON_INTERPRET=1 at tiny sizes (the interpreter is slow), and on CUDA at real sizes when a GPU is present.

The interpreted copy of the module comes from tests/triton_interpreted.py (the shared
`mambakit.kernels.triton_scan` is left compiled).
"""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import mambakit.kernels.triton_scan as compiled_module
from mambakit.kernels.reference import expand_groups, selective_scan_ref, selective_state_update_ref
from triton_interpreted import load_interpreted_triton_scan


ts = load_interpreted_triton_scan()
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b, d, L, N, G=None, *, dtype=torch.float64, D=True, z=True, bias=True, init=True,
                delta_scale=0.5):
    """Fresh random inputs; A < 0 as in Mamba (A = -exp(A_log))."""
    BC = (b, G, N, L) if G else (b, N, L)
    return dict(
        u=torch.randn(b, d, L, dtype=dtype),
        delta=torch.randn(b, d, L, dtype=dtype) * delta_scale,
        A=-(torch.rand(d, N, dtype=dtype) * 2 + 0.05),
        B=torch.randn(*BC, dtype=dtype),
        C=torch.randn(*BC, dtype=dtype),
        D=torch.randn(d, dtype=dtype) if D else None,
        z=torch.randn(b, d, L, dtype=dtype) if z else None,
        delta_bias=torch.randn(d, dtype=dtype) * 0.5 if bias else None,
        initial_state=torch.randn(b, d, N, dtype=dtype) if init else None,
    )


def run_both(inputs, softplus, loss_on=("out", "last"), per_channel_ref=False, **block):
    """Forward and gradients of sum(out * g_out) + sum(last * g_last) through Triton and the float64 reference
    (with `per_channel_ref`, the reference gets B and C expanded to one group per channel)."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    results = []
    g_out = g_last = None
    for fn, args in ((ts.selective_scan_triton, leaves), (selective_scan_ref, leaves64)):
        kwargs = dict(block) if fn is ts.selective_scan_triton else {}
        B, C = args["B"], args["C"]
        if per_channel_ref and fn is selective_scan_ref:
            B, C = expand_groups(B, args["u"].shape[1]), expand_groups(C, args["u"].shape[1])
        out, last = fn(args["u"], args["delta"], args["A"], B, C, D=args.get("D"), z=args.get("z"),
                       delta_bias=args.get("delta_bias"), delta_softplus=softplus, return_last_state=True,
                       initial_state=args.get("initial_state"), **kwargs)
        if g_out is None:
            g_out, g_last = torch.randn(out.shape, dtype=torch.float64), torch.randn(last.shape, dtype=torch.float64)
        loss = 0
        if "out" in loss_on:
            loss = loss + (out.double() * g_out).sum()
        if "last" in loss_on:
            loss = loss + (last.double() * g_last).sum()
        grads = torch.autograd.grad(loss, list(args.values()), allow_unused=True)  # D, z: unused by `last`
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(args.values(), grads)]
        results.append((out, last, dict(zip(args, grads))))
    return results


def assert_close_to_ref(results, rtol, atol):
    (out, last, grads), (out_ref, last_ref, grads_ref) = results
    torch.testing.assert_close(out.double(), out_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.double(), last_ref, rtol=rtol, atol=atol)
    for name in grads_ref:
        scale = grads_ref[name].abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name].double() / scale, grads_ref[name] / scale, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


# (b, d, L, N, G, features, block_t, block_d, softplus): L=1, L not a multiple of the checkpoint interval
# block_t, N in {1, 16}, G > 1 with a channel block wider than the group's tail (masked channels), z on/off.
CASES = {
    "all_features": (2, 8, 20, 16, None, dict(), 8, 4, True),
    "all_features_raw_dt": (2, 8, 20, 16, None, dict(), 8, 4, False),
    "groups_masked_channels": (1, 6, 13, 4, 2, dict(z=False, bias=False), 4, 2, True),
    "groups_raw_dt": (1, 6, 13, 4, 2, dict(D=False, init=False), 8, 2, False),
    "L1_N1_bare": (2, 4, 1, 1, None, dict(D=False, z=False, bias=False, init=False), 8, 4, True),
    "N1_groups": (1, 4, 9, 1, 4, dict(), 4, 1, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_all_gradients_float64(case):
    b, d, L, N, G, features, block_t, block_d, softplus = CASES[case]
    inputs = make_inputs(b, d, L, N, G, **features)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # a raw step size is positive
    results = run_both(inputs, softplus, block_t=block_t, block_d=block_d)
    assert_close_to_ref(results, rtol=1e-10, atol=1e-10)
    assert set(results[0][2]) == {k for k, v in inputs.items() if v is not None}


def test_float32_inputs_against_float64_reference_with_large_and_tiny_steps():
    inputs = make_inputs(1, 8, 19, 16, 2, dtype=torch.float32)
    # softplus inputs from -30 (dt ~ 1e-13: the state barely moves) to +30 (past softplus's threshold)
    inputs["delta"] = torch.linspace(-30, 30, 8 * 19).reshape(1, 8, 19)[:, torch.randperm(8)]
    results = run_both(inputs, softplus=True, block_t=16, block_d=4)
    out, last, grads = results[0]
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert_close_to_ref(results, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [(None, 2), (2, 4)], ids=["B_ungrouped_C_2", "B_2_C_4"])
def test_B_and_C_grouped_differently(groups):
    """Allowed by the API (each is validated alone), unlike mamba_ssm; the reference then sees per-channel B/C."""
    inputs = make_inputs(1, 8, 7, 3, z=False)
    for name, G in zip("BC", groups):
        inputs[name] = torch.randn(1, 3, 7, dtype=torch.float64) if G is None else torch.randn(1, G, 3, 7,
                                                                                                 dtype=torch.float64)
    results = run_both(inputs, softplus=True, per_channel_ref=True, block_t=4, block_d=2)
    assert_close_to_ref(results, rtol=1e-10, atol=1e-10)
    assert results[0][2]["B"].shape == inputs["B"].shape and results[0][2]["C"].shape == inputs["C"].shape


@pytest.mark.parametrize("loss_on", [("last",), ("out",)], ids=["last_state_only", "output_only"])
def test_gradient_from_one_output_alone(loss_on):
    """The backward gets None for the unused output: the last state's gradient alone must still reach
    every input (upstream drops it), and the output's alone must not need it."""
    results = run_both(make_inputs(1, 4, 11, 4), softplus=True, loss_on=loss_on, block_t=4, block_d=2)
    assert_close_to_ref(results, rtol=1e-10, atol=1e-10)
    assert results[0][2]["B"].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32_and_returned_in_input_dtype(dtype):
    inputs = make_inputs(2, 4, 10, 8, dtype=torch.float32)
    half = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    out, last = ts.selective_scan_triton(**half, delta_softplus=True, return_last_state=True, block_t=4)
    ref, ref_last = selective_scan_ref(**{k: None if v is None else v.double() for k, v in half.items()},
                                       delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=2 * eps, atol=2 * eps * ref.abs().max().item())
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-5, atol=1e-5)


def test_inference_keeps_only_the_last_state_and_matches_training_forward():
    inputs = make_inputs(1, 4, 12, 4)
    with torch.no_grad():
        out, last = ts.selective_scan_triton(**inputs, delta_softplus=True, return_last_state=True, block_t=4)
    ref, ref_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, ref_last, rtol=1e-12, atol=1e-12)


def test_checkpoints_every_block_t_steps_and_nothing_per_step():
    inputs = {k: v.requires_grad_() if v is not None else None for k, v in make_inputs(1, 4, 20, 4).items()}
    out = ts.selective_scan_triton(**inputs, delta_softplus=True, block_t=8)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    ckpt = saved[-1]
    assert tuple(ckpt.shape) == (1, 4, 3, 4)  # ceil(20 / 8) states of (b, d, N), not L of them
    assert max(t.numel() for t in saved) == 1 * 4 * 20  # nothing larger than an input


# --------------------------------------------------------------------------------------- state update

def _state_update_inputs(b, d, N, G, dtype):
    BC = (b, G, N) if G else (b, N)
    return dict(x=torch.randn(b, d, dtype=dtype), dt=torch.randn(b, d, dtype=dtype),
                A=-(torch.rand(d, N, dtype=dtype) + 0.1), B=torch.randn(*BC, dtype=dtype),
                C=torch.randn(*BC, dtype=dtype), D=torch.randn(d, dtype=dtype), z=torch.randn(b, d, dtype=dtype),
                dt_bias=torch.randn(d, dtype=dtype))


@pytest.mark.parametrize("G", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_update_matches_reference_and_updates_in_place(G, dtype):
    b, d, N = 2, 8, 16
    inputs = _state_update_inputs(b, d, N, G, dtype)
    state = torch.randn(b, d, N, dtype=dtype)
    state_ref = state.clone()
    ptr = state.data_ptr()
    y = ts.selective_state_update_triton(state, **inputs, dt_softplus=True)
    y_ref = selective_state_update_ref(state_ref, **inputs, dt_softplus=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert state.data_ptr() == ptr and y.dtype == dtype
    torch.testing.assert_close(state, state_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)


def test_state_update_non_contiguous_state_and_no_optional_inputs():
    b, d, N = 2, 5, 3
    state = torch.randn(b, N, d).transpose(1, 2)  # (b, d, N) with strides of another layout
    state_ref = state.clone()
    x, dt, A = torch.randn(b, d), torch.rand(b, d), -torch.rand(d, N)
    B, C = torch.randn(b, N), torch.randn(b, N)
    y = ts.selective_state_update_triton(state, x, dt, A, B, C)
    y_ref = selective_state_update_ref(state_ref, x, dt, A, B, C)
    torch.testing.assert_close(state, state_ref)
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("per_dim", [False, True], ids=["per_head", "per_head_dim"])
def test_headed_state_update_equals_ssd_step(per_dim):
    """The Mamba-2 form (b, h, p, N) with one dt and A per head equals the SSD recurrence's step."""
    from mambakit.kernels.ssd import ssd_step
    b, h, p, N, g = 2, 4, 3, 5, 2
    dtype = torch.float64
    state = torch.randn(b, h, p, N, dtype=dtype)
    state_ref = state.clone()
    x, z = torch.randn(b, h, p, dtype=dtype), torch.randn(b, h, p, dtype=dtype)
    dt, A, dt_bias = torch.randn(b, h, dtype=dtype), -torch.rand(h, dtype=dtype), torch.randn(h, dtype=dtype)
    B, C = torch.randn(b, g, N, dtype=dtype), torch.randn(b, g, N, dtype=dtype)
    D = torch.randn(h, p, dtype=dtype) if per_dim else torch.randn(h, dtype=dtype)
    y = ts.selective_state_update_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    y_ref = ssd_step(state_ref, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=1e-12, atol=1e-12)


def test_core_ssd_state_update_triton_path_with_multiplier_and_limit():
    """core.ssd's CUDA path (dt_multiplier and dt_limit applied around the kernel) against its torch path."""
    from mambakit.core.ssd import _ssd_state_update_triton, ssd_state_update
    b, h, p, N = 2, 4, 2, 3
    state = torch.randn(b, h, p, N)
    args = (torch.randn(b, h, p), torch.randn(b, h), -torch.rand(h), torch.randn(b, 1, N), torch.randn(b, 1, N))
    mult = torch.rand(b, h) + 0.5
    for limit in ((0.0, float("inf")), (0.2, 0.9)):
        s1, s2 = state.clone(), state.clone()
        kw = dict(D=torch.randn(h), z=None, dt_bias=torch.randn(h), dt_softplus=True)
        y1 = _ssd_state_update_triton(ts.selective_state_update_triton, s1, *args, kw["D"], None, kw["dt_bias"],
                                      True, limit, mult)
        y2 = ssd_state_update(s2, *args, **kw, dt_limit=limit, dt_multiplier=mult, backend="torch")
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(s1, s2)


def test_ssd_via_the_triton_scan_matches_the_ssd_reference():
    """ssd_scan(backend="triton") runs Mamba-2 as the Mamba-1 Triton scan over h*p channels."""
    import functools

    from mambakit.kernels.reference import ssd_scan_ref
    from mambakit.kernels.ssd import ssd_via_selective_scan
    b, L, h, p, g, n = 1, 11, 4, 2, 2, 3
    dtype = torch.float64
    inputs = dict(x=torch.randn(b, L, h, p, dtype=dtype), dt=torch.randn(b, L, h, dtype=dtype),
                  A=-torch.rand(h, dtype=dtype) - 0.1, B=torch.randn(b, L, g, n, dtype=dtype),
                  C=torch.randn(b, L, g, n, dtype=dtype), D=torch.randn(h, p, dtype=dtype),
                  z=torch.randn(b, L, h, p, dtype=dtype), dt_bias=torch.randn(h, dtype=dtype),
                  dt_multiplier=torch.rand(b, L, h, dtype=dtype) + 0.5, initial_states=torch.randn(b, h, p, n, dtype=dtype))
    g_y, g_s = torch.randn(b, L, h, p, dtype=dtype), torch.randn(b, h, p, n, dtype=dtype)
    scan = functools.partial(ts.selective_scan_triton, block_t=4, block_d=2)
    results = []
    for fn in (functools.partial(ssd_via_selective_scan, scan), ssd_scan_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, final = fn(**leaves, dt_softplus=True, dt_limit=(0.05, 2.0), return_final_states=True)
        grads = torch.autograd.grad((y * g_y).sum() + (final * g_s).sum(), list(leaves.values()))
        results.append((y, final, grads))
    (y, final, grads), (y_ref, final_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    for name, grad, grad_ref in zip(inputs, grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9, msg=lambda m, k=name: f"gradient of {k}: {m}")


# --------------------------------------------------------------------------------------- packaging / GPU

def test_module_imports_without_cuda_and_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import mambakit.kernels.triton_scan as m; "
            "assert callable(m.selective_scan_triton) and callable(m.selective_state_update_triton); "
            "assert not m.is_interpreted(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _compile_for_sm90(kernel, constexprs, ptr_type, num_warps):
    """Compile a kernel to a cubin for an H100 (sm_90) on this machine: no GPU or driver needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {name: "constexpr" if name in constexprs else (ptr_type if name.endswith("_ptr") else "i32")
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def _nvidia_backend_available():
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except ImportError:
        return False


@pytest.mark.skipif(compiled_module.is_interpreted() or not _nvidia_backend_available(),
                    reason="needs triton's NVIDIA backend and compiled (not interpreted) kernels")
@pytest.mark.parametrize("compute", [
    "float32",
    pytest.param("float64", marks=pytest.mark.slow),
])
def test_kernels_compile_for_h100_without_a_gpu(compute):
    """The interpreter accepts code the compiler rejects (types, layouts, scalar/block mixes): compile the
    kernels the GPU will run, at the launch configuration of the Vim-Ti shape (N=16) with every feature on."""
    cdt, ptr = (tl.float32, "*fp32") if compute == "float32" else (tl.float64, "*fp64")
    cfg = compiled_module._launch_config(8, 384, 1, 16, 197, torch.device("cpu"))
    features = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_INIT=True, SOFTPLUS=True,
                    BLOCK_D=cfg.block_d, N_PAD=cfg.n_pad, BLOCK_T=cfg.block_t, CDT=cdt)
    kernels = [
        _compile_for_sm90(compiled_module._scan_fwd_kernel, features, ptr, cfg.fwd_warps),
        _compile_for_sm90(compiled_module._scan_bwd_kernel, dict(features, HAS_DLAST=True), ptr, cfg.bwd_warps),
        _compile_for_sm90(compiled_module._state_update_kernel,
                          dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=64, N_PAD=16, CDT=cdt),
                          ptr, 4),
    ]
    assert all(len(k.asm["cubin"]) > 0 for k in kernels)


cuda = pytest.mark.skipif(not torch.cuda.is_available() or compiled_module.is_interpreted(),
                          reason="needs a CUDA GPU (compiled Triton kernels)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", [(2, 64, 300, 16, None), (3, 96, 1000, 16, 4), (1, 32, 77, 64, None),
                                   (2, 16, 1, 1, None)])
def test_compiled_kernels_on_gpu_float32(shape):
    b, d, L, N, G = shape
    inputs = {k: None if v is None else v.float().cuda() for k, v in make_inputs(b, d, L, N, G).items()}
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = compiled_module.selective_scan_triton(**inputs, delta_softplus=True, return_last_state=True)
    ref_in = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref, ref_last = selective_scan_ref(**ref_in, delta_softplus=True, return_last_state=True)
    g_out, g_last = torch.randn_like(ref), torch.randn_like(ref_last)
    grads = torch.autograd.grad((out.double() * g_out).sum() + (last.double() * g_last).sum(), list(leaves.values()))
    grads_ref = torch.autograd.grad((ref * g_out).sum() + (ref_last * g_last).sum(), list(ref_in.values()))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for name, g, g_ref in zip(leaves, grads, grads_ref):
        scale = g_ref.abs().max().item() + 1e-12
        torch.testing.assert_close(g.double() / scale, g_ref / scale, rtol=1e-3, atol=1e-4,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.gpu
@cuda
def test_compiled_state_update_on_gpu():
    inputs = {k: v.cuda() for k, v in _state_update_inputs(4, 64, 16, 4, torch.float32).items()}
    state = torch.randn(4, 64, 16, device="cuda")
    state_ref = state.clone()
    y = compiled_module.selective_state_update_triton(state, **inputs, dt_softplus=True)
    y_ref = selective_state_update_ref(state_ref, **inputs, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    """benchmarks/scan_gpu.py cannot be timed here; its --dry-run mode runs every code path at tiny shapes
    under the interpreter and checks the Triton peers against the reference."""
    import json
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "scan_gpu.py"
    proc = subprocess.run([sys.executable, str(script), "--dry-run", "--sweep", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_scan.json").read_text())
    assert (tmp_path / "gpu_scan.md").read_text().startswith("# GPU scan benchmark")
    kinds = {r["kind"] for r in report["results"]}
    assert kinds == {"selective_scan", "state_update", "ssd", "sweep"}
    for row in report["results"]:
        if row["kind"] == "selective_scan":
            assert row["peers"]["triton"]["max_rel_err_out_vs_reference"] < 1e-5
            assert row["peers"]["triton"]["max_rel_err_grads_vs_reference"] < 1e-4
        if row["kind"] == "state_update":
            assert row["peers"]["triton"]["max_rel_err_vs_reference"] < 1e-5
        if row["kind"] == "ssd":
            assert row["peers"]["chunked"]["max_rel_err_grads_vs_reference"] < 1e-4


def test_gpu_benchmark_without_cuda_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "scan_gpu.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "CUDA is not available" in proc.stdout, proc.stderr
