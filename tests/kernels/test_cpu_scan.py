"""The fused CPU kernel against the float64 reference (outputs and every gradient), its build cache, its
fallback, its memory, and the accuracy of its vector math.

Tolerances, chosen from measurement: errors are max |kernel - reference| divided by max |reference| per tensor.
Over 5 seeds of this file's cases the worst float32 errors were 5.2e-7 (outputs, last state) and 1.6e-6
(gradients, dA), so float32 uses 1e-5; float64 reached 4.2e-15, so it uses 5e-13.
"""

import contextlib
import math
import os
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mambakit.kernels import cpu_scan
from mambakit.kernels.cpu_scan import DEFAULT_CHUNK, kernel_status, load_library, selective_scan_cpu
from mambakit.kernels.reference import selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
TOL = {torch.float32: 1e-5, torch.float64: 5e-13}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    ok, why = kernel_status(torch.float32)
    if not ok:
        pytest.skip(f"the fused CPU kernel cannot be built here: {why}")


def make_inputs(b, d, L, N, GB=None, GC=None, extras=True, delta_scale=0.5):
    def bc(G):
        return torch.randn(b, N, L) if G is None else torch.randn(b, G, N, L)
    inputs = dict(u=torch.randn(b, d, L), delta=torch.randn(b, d, L) * delta_scale, A=-torch.rand(d, N) * 2 - 0.05,
                  B=bc(GB), C=bc(GC), D=None, z=None, delta_bias=None, initial_state=None)
    if extras:
        inputs.update(D=torch.randn(d), z=torch.randn(b, d, L), delta_bias=torch.randn(d) * 0.3,
                      initial_state=torch.randn(b, d, N))
    return inputs


def run(fn, inputs, dtype, softplus, weights, **kwargs):
    """out, last and the float64 gradients of sum(out * w_out) + sum(last * w_last) for every given input."""
    x = {k: (None if v is None else v.detach().to(dtype).requires_grad_()) for k, v in inputs.items()}
    out, last = fn(**x, delta_softplus=softplus, return_last_state=True, **kwargs)
    loss = 0
    if weights[0] is not None:
        loss = loss + (out.double() * weights[0]).sum()
    if weights[1] is not None:
        loss = loss + (last.double() * weights[1]).sum()
    given = [k for k in NAMES if x[k] is not None]
    grads = torch.autograd.grad(loss, [x[k] for k in given], allow_unused=True)   # z, D: unused by the last state
    return out, last, {k: torch.zeros_like(x[k]) if g is None else g for k, g in zip(given, grads)}


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check_against_reference(inputs, dtype, softplus=True, weights="both", **kwargs):
    b, d, L = inputs["u"].shape
    N = inputs["A"].shape[1]
    w_out = torch.randn(b, d, L, dtype=torch.float64) if weights in ("both", "out") else None
    w_last = torch.randn(b, d, N, dtype=torch.float64) if weights in ("both", "last") else None
    out, last, grads = run(selective_scan_cpu, inputs, dtype, softplus, (w_out, w_last), **kwargs)
    ref_out, ref_last, ref_grads = run(selective_scan_ref, inputs, torch.float64, softplus, (w_out, w_last))
    assert out.dtype == dtype and last.dtype == dtype
    errors = {"out": rel_err(out, ref_out), "last": rel_err(last, ref_last)}
    for k, g in ref_grads.items():
        assert grads[k].shape == inputs[k].shape and grads[k].dtype == dtype, k
        errors["d" + k] = rel_err(grads[k], g)
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad}"
    return grads


SHAPES = {
    # (b, d, L, N, GB, GC)
    "L1": (2, 16, 1, 16, None, None),
    "N1_d9_L130": (1, 9, 130, 1, None, None),
    "N64_G3": (2, 24, 69, 64, 3, 3),
    "N16_G5_L129": (3, 40, 129, 16, 5, 5),
    "groups_of_3": (1, 6, 70, 4, 2, 2),
    "B_plain_C_G3": (2, 12, 70, 5, None, 3),
    "B_G2_C_G4": (1, 8, 33, 3, 2, 4),
    "N13_d10": (2, 10, 75, 13, None, None),   # a full group of 8 states, then one of 5; a 2-lane block
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference_with_every_option(shape, dtype):
    b, d, L, N, GB, GC = shape
    check_against_reference(make_inputs(b, d, L, N, GB, GC), dtype, softplus=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [SHAPES["L1"], SHAPES["N16_G5_L129"], SHAPES["groups_of_3"]],
                         ids=["L1", "N16_G5_L129", "groups_of_3"])
def test_matches_reference_without_optional_inputs_or_softplus(shape, dtype):
    b, d, L, N, GB, GC = shape
    inputs = make_inputs(b, d, L, N, GB, GC, extras=False)
    inputs["delta"] = inputs["delta"].abs()              # without softplus a negative step would blow up
    check_against_reference(inputs, dtype, softplus=False)


@pytest.mark.parametrize("missing", ["D", "z", "delta_bias", "initial_state"])
def test_matches_reference_with_one_optional_input_missing(missing):
    inputs = make_inputs(2, 16, 40, 8, 2, 2)
    inputs[missing] = None
    check_against_reference(inputs, torch.float32)


def test_large_and_tiny_steps():
    inputs = make_inputs(1, 16, 37, 16)
    inputs["delta"] = torch.linspace(-30, 30, 16 * 37).reshape(1, 16, 37)[:, torch.randperm(16)]
    check_against_reference(inputs, torch.float32, softplus=True)
    tiny = make_inputs(1, 16, 37, 16)
    tiny["delta"] = torch.rand(1, 16, 37) * 1e-6
    tiny["delta_bias"] = None
    check_against_reference(tiny, torch.float32, softplus=False)
    check_against_reference(tiny, torch.float64, softplus=False)


@pytest.mark.parametrize("weights", ["last", "out"])
def test_gradient_from_one_output_alone(weights):
    """The gradient reaching the last state alone flows to every input (upstream drops it)."""
    grads = check_against_reference(make_inputs(2, 8, 50, 4), torch.float32, weights=weights)
    assert grads["B"].abs().max() > 0 and grads["initial_state"].abs().max() > 0


@pytest.mark.parametrize("chunk", [1, 5, DEFAULT_CHUNK, 1000])
def test_checkpoint_interval_does_not_change_results(chunk):
    check_against_reference(make_inputs(2, 8, 67, 4), torch.float64, chunk=chunk)


def test_gradcheck_float64():
    inputs = {k: v.double().requires_grad_() for k, v in make_inputs(1, 4, 5, 3, GB=2, GC=None).items()}

    def f(*tensors):
        return selective_scan_cpu(**dict(zip(NAMES, tensors)), delta_softplus=True, return_last_state=True, chunk=2)

    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in NAMES))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    inputs = make_inputs(2, 8, 30, 4)
    half = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z", "initial_state") else v) for k, v in inputs.items()}
    x = {k: v.requires_grad_() for k, v in half.items()}
    out, last = selective_scan_cpu(**x, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    (out.float().sum() + last.sum()).backward()
    for k, v in x.items():
        assert v.grad.dtype == v.dtype, k
    ref_out, ref_last = selective_scan_ref(**{k: v.detach().double() for k, v in half.items()},
                                           delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out.double(), ref_out.to(dtype).double(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs_give_the_same_result():
    inputs = make_inputs(2, 16, 40, 8, 2, 2)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() >= 2 else v)
               for k, v in inputs.items()}
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    a = selective_scan_cpu(**inputs, delta_softplus=True)
    b = selective_scan_cpu(**strided, delta_softplus=True)
    assert torch.equal(a, b)


def test_inference_mode_matches_grad_mode():
    inputs = make_inputs(2, 16, 40, 8)
    with torch.no_grad():
        out, last = selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True)
    out2, last2, _ = run(selective_scan_cpu, inputs, torch.float32, True, (torch.ones(1), None))
    assert torch.equal(out, out2.detach()) and torch.equal(last, last2.detach())


@contextlib.contextmanager
def threading(mode: str):
    """The kernel on torch's OpenMP pool or on its own pthreads; the thread count and mode restored after."""
    old = torch.get_num_threads()
    try:
        assert cpu_scan.set_threading(mode) in (mode, "pthreads")
        yield
    finally:
        torch.set_num_threads(old)
        cpu_scan.set_threading("openmp")


@pytest.mark.parametrize("mode", ["openmp", "pthreads"])
def test_one_and_several_threads_agree(mode):
    """One thread owns each (batch, group) unit; with few units, threads split the blocks of a unit and
    sum private copies of dB/dC: the paths must agree, on torch's OpenMP pool and on our own threads.
    (2^18 state updates: calls under 2^17 updates per thread stay on one thread.)"""
    inputs = make_inputs(1, 64, 512, 8)
    with threading(mode):
        torch.set_num_threads(1)
        one = run(selective_scan_cpu, inputs, torch.float32, True, (torch.ones(1), torch.ones(1)))
        torch.set_num_threads(2)
        two = run(selective_scan_cpu, inputs, torch.float32, True, (torch.ones(1), torch.ones(1)))
    assert torch.equal(one[0], two[0])
    for k in one[2]:
        torch.testing.assert_close(one[2][k], two[2][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["openmp", "pthreads"])
def test_several_threads_give_the_same_gradients_on_every_run(mode):
    """With a unit split across threads, dB and dC are sums over the unit's channel ranges; the ranges are
    dealt to the threads in a fixed way and the per-thread sums added in a fixed order, so every run gives
    the same bits (claiming ranges first-come-first-served made about half the runs differ)."""
    inputs = make_inputs(1, 256, 1500, 16)
    with threading(mode):
        torch.set_num_threads(2)
        first = run(selective_scan_cpu, inputs, torch.float32, True, (torch.ones(1), torch.ones(1)))
        for _ in range(10):
            again = run(selective_scan_cpu, inputs, torch.float32, True, (torch.ones(1), torch.ones(1)))
            assert torch.equal(first[0], again[0])
            for k in first[2]:
                assert torch.equal(first[2][k], again[2][k]), k


def test_slots_the_runtime_gives_no_thread_for_run_on_the_caller(tmp_path):
    """The backward deals a split unit's ranges to one slot per requested thread; where OpenMP gives fewer
    threads (here OMP_THREAD_LIMIT=1 against two asked for), the caller runs the slots left over afterwards,
    and the gradients are the same bits as with two threads (skipping them would drop their dB, dC terms)."""
    code = textwrap.dedent("""
        import sys, torch
        torch.get_num_threads = lambda: 2          # the kernel asks for two threads
        from mambakit.kernels.cpu_scan import selective_scan_cpu
        torch.manual_seed(0)
        u, delta = torch.randn(1, 256, 1500), torch.randn(1, 256, 1500)
        B, C = torch.randn(1, 16, 1500, requires_grad=True), torch.randn(1, 16, 1500, requires_grad=True)
        A = -torch.rand(256, 16) - 0.5
        selective_scan_cpu(u, delta, A, B, C, delta_softplus=True).sum().backward()
        torch.save([B.grad, C.grad], sys.argv[1])
    """)
    grads = []
    for limit in (None, "1"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_THREAD_LIMIT"}
        if limit:
            env["OMP_THREAD_LIMIT"] = limit
        out = tmp_path / f"grads_{limit}.pt"
        proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        grads.append(torch.load(out))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_threading_mode_is_validated():
    with pytest.raises(ValueError, match="mode must be 'openmp' or 'pthreads', got 'tbb'"):
        cpu_scan.set_threading("tbb")


@pytest.mark.parametrize("threads", [1, 2])
def test_wide_groups_are_walked_in_sub_ranges(threads):
    """A thread walks at most 64 blocks (512 channels) chunk by chunk at once: 2 groups of 520 channels
    take two sub-ranges each on one thread; on two threads (enough work: 2.66e5 state updates) each group is
    split into ranges."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_against_reference(make_inputs(1, 1040, 64, 4, GB=2, GC=2), torch.float32, chunk=16)
    finally:
        torch.set_num_threads(old)


def test_saved_state_is_checkpoints_only():
    """What the backward keeps beyond the inputs is the state every `chunk` steps: b*d*N*ceil(L/K)
    numbers, not the b*d*N*L of all states."""
    b, d, L, N, K = 2, 16, 1000, 16, 64
    inputs = {k: (None if v is None else v.requires_grad_()) for k, v in make_inputs(b, d, L, N).items()}
    input_storages = {v.untyped_storage().data_ptr() for v in inputs.values() if v is not None}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = selective_scan_cpu(**inputs, delta_softplus=True, chunk=K)
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in input_storages]
    assert sum(t.numel() for t in extra) == b * d * N * math.ceil(L / K)
    assert sum(t.numel() for t in extra) < b * d * N * L / 50
    out.sum().backward()                                   # and the saved tensors suffice for the backward
    assert inputs["A"].grad is not None


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        selective_scan_cpu(**make_inputs(1, 8, 4, 2), chunk=0)


# ------------------------------------------------------------------------------------------------------
# Vector math

def test_vector_exp_and_softplus_accuracy():
    """Measured: exp 8e-8 relative (1.3 ulp); the decays' 2^(x log2 e) 1.1e-7 * max(1, |x|) (the product x log2 e
    is rounded once more than x itself); softplus 1.9e-7. Bounds below leave ~2x headroom."""
    lib = load_library(torch.float32)

    def apply(fn, x):
        y = torch.empty_like(x)
        fn(x.data_ptr(), y.data_ptr(), x.numel())
        return y
    x = torch.cat([torch.linspace(-87, 88, 200001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    assert rel_err_each(apply(lib.mk_vexp, x), torch.exp(x.double())) < 1.5e-7
    x = torch.linspace(-80, 1, 100003)
    err = (apply(lib.mk_vexp_decay, x).double() / torch.exp(x.double()) - 1).abs() / x.double().abs().clamp_min(1)
    assert err.max() < 2.5e-7
    x = torch.linspace(-80, 40, 120001)
    assert rel_err_each(apply(lib.mk_vsoftplus, x), torch.nn.functional.softplus(x.double())) < 4e-7
    special = apply(lib.mk_vexp, torch.tensor([float("nan"), -200.0, 200.0, -1e30, 1e30, 0.0, 0.0]))
    assert math.isnan(special[0]) and 0 <= special[1] < 1e-37 and math.isfinite(special[2]) and special[2] > 1e38


@pytest.mark.parametrize("softplus, delta, A, h0, expected", [
    (False, -200.0, -1.0, 2.0 ** -126, 1.0),      # dt < 0: dt A log2 e = 288.5, clamped to 2^126
    (True, 200.0, 1.0, 2.0 ** -126, 1.0),         # A > 0: the same through softplus
    (True, 200.0, -1.0, 2.0 ** 100, 2.0 ** -25),  # dt > 0, A < 0 (every Mamba layer): -288.5, clamped to 2^-125
])
def test_decays_beyond_the_exponent_range_are_clamped(softplus, delta, A, h0, expected):
    """The decay 2^(dt A log2 e) is clamped to [2^-125, 2^126]; the kernel drops the upper clamp only where
    softplus and A <= 0 make every argument <= 0. One step, B = 0: y = C decay h0, exact powers of two."""
    b, d, N = 1, 8, 4
    out = selective_scan_cpu(torch.zeros(b, d, 1), torch.full((b, d, 1), delta), torch.full((d, N), A),
                             torch.zeros(b, N, 1), torch.full((b, N, 1), 1.0 / N), delta_softplus=softplus,
                             initial_state=torch.full((b, d, N), h0))
    assert torch.equal(out, torch.full((b, d, 1), expected))


def test_vector_exp_float64_accuracy():
    lib = load_library(torch.float64)
    x = torch.linspace(-700, 700, 100001, dtype=torch.float64)
    y = torch.empty_like(x)
    lib.mk_vexp(x.data_ptr(), y.data_ptr(), x.numel())
    assert rel_err_each(y, torch.exp(x)) < 1e-15


def rel_err_each(got, want):
    return ((got.double() - want).abs() / want.abs()).max().item()


# ------------------------------------------------------------------------------------------------------
# Build, cache and fallback

@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A new MAMBAKIT_HOME and an empty in-process library cache and warning flag."""
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cpu_scan, "_libs", {})
    monkeypatch.setattr(cpu_scan, "_warned", False)
    return tmp_path / "home" / "kernels"


def test_library_is_compiled_once_and_cached_on_disk(fresh_build, monkeypatch):
    path = Path(load_library(torch.float32)._name)
    assert path.parent == fresh_build.resolve() and path.suffix == ".so"
    assert sorted(p.name for p in fresh_build.iterdir()) == [path.name]      # no temporary files left
    monkeypatch.setattr(cpu_scan, "_libs", {})
    monkeypatch.setattr(cpu_scan, "_compile", lambda *a: pytest.fail("compiled again instead of loading"))
    assert Path(load_library(torch.float32)._name) == path


def test_concurrent_compiles_into_one_target_leave_one_valid_library(fresh_build):
    """Each compile writes a private temporary file and renames it into place, so simultaneous builders
    (threads here; processes below) never expose a partial library."""
    cc = cpu_scan._find_compiler()
    target = fresh_build / "concurrent.so"
    quick = ("-O0", "-std=gnu11", "-fPIC", "-shared", "-pthread")     # the race is the point, not the code
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cpu_scan._compile(cc, quick, False, target), range(2)))
    assert results == [None, None]
    assert sorted(p.name for p in fresh_build.iterdir()) == ["concurrent.so"]
    assert cpu_scan._open(target, False).mk_lanes() >= 1


@pytest.mark.slow
def test_concurrent_first_calls_in_two_processes(fresh_build):
    code = textwrap.dedent("""
        import torch
        from mambakit.kernels.cpu_scan import selective_scan_cpu
        x = torch.randn(1, 8, 5)
        print(float(selective_scan_cpu(x, x.abs(), -torch.ones(8, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5)).sum()))
    """)
    env = {**os.environ, "MAMBAKIT_HOME": str(fresh_build.parent)}
    procs = [subprocess.Popen([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    files = sorted(p.name for p in fresh_build.iterdir())
    assert len(files) == 1 and files[0].endswith(".so"), files


def fake_compiler(tmp_path, version_ok=True):
    script = tmp_path / "fakecc"
    script.write_text("#!/bin/sh\n"
                      f"if [ \"$1\" = \"--version\" ]; then echo fakecc 1.0; exit {0 if version_ok else 1}; fi\n"
                      "echo 'fakecc: error: this compiler compiles nothing' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


def test_compile_error_falls_back_to_reference_with_one_warning(fresh_build, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", fake_compiler(tmp_path))
    inputs = make_inputs(1, 8, 6, 2)
    with pytest.warns(RuntimeWarning) as record:
        out = selective_scan_cpu(**inputs, delta_softplus=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and "fakecc: error: this compiler compiles nothing" in message
    assert "reference" in message and "C compiler" in message
    assert torch.equal(out, selective_scan_ref(**inputs, delta_softplus=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # a second call does not warn again
        selective_scan_cpu(**inputs, delta_softplus=True)
    assert not fresh_build.exists() or not any(fresh_build.iterdir())  # nothing half-written left behind


def test_missing_compiler_is_reported(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/bin/cc")
    ok, why = kernel_status(torch.float32)
    assert not ok and "/nonexistent/bin/cc" in why


def test_disable_variable_forces_the_reference(fresh_build, monkeypatch):
    monkeypatch.setenv("MAMBAKIT_DISABLE_CPU_KERNEL", "1")
    inputs = {k: (None if v is None else v.requires_grad_()) for k, v in make_inputs(1, 8, 6, 2).items()}
    with pytest.warns(RuntimeWarning, match=r"disabled by MAMBAKIT_DISABLE_CPU_KERNEL=1\).*unset MAMBAKIT_DISABLE_CPU_KERNEL"):
        out, last = selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert torch.equal(out, ref_out) and torch.equal(last, ref_last)
    out.sum().backward()                                   # the fallback is differentiable too
    assert inputs["delta_bias"].grad is not None
    assert not fresh_build.exists()                        # nothing was compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("b,d,L,N,R,G", [(1, 16, 100, 16, 12, None), (2, 13, 70, 5, 3, None), (3, 24, 129, 16, 1, 2),
                                         (2, 40, 257, 8, 33, 5)], ids=["vim", "partial_block", "R1_groups", "R33"])
def test_projected_delta_matches_the_reference_on_the_projection(b, d, L, N, R, G, dtype):
    """Inference with delta = W @ dt_in computed inside the kernel (dt_in a strided view of x_proj's output,
    as Mamba passes it) equals the reference scan on the explicitly projected delta."""
    inputs = make_inputs(b, d, L, N, G, G)
    x_dbl = torch.randn(b, R + 7, L)
    W = torch.randn(d, R) / math.sqrt(R)
    x = {k: (None if v is None else v.to(dtype)) for k, v in inputs.items() if k not in ("delta", "initial_state")}
    with torch.no_grad():
        got = cpu_scan.selective_scan_cpu_projected(x.pop("u"), W.to(dtype), x_dbl.to(dtype)[:, :R], **x,
                                                    delta_softplus=True)
    delta = W.double() @ x_dbl[:, :R].double()
    ref = selective_scan_ref(**{k: (None if v is None else v.double()) for k, v in inputs.items()
                                if k not in ("delta", "initial_state")}, delta=delta, delta_softplus=True)
    assert got.dtype == dtype and rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("b,d,L,N,R,G,reverse", [(1, 16, 100, 16, 12, None, False), (2, 13, 70, 5, 3, None, True),
                                                 (2, 40, 257, 8, 33, 5, False), (3, 24, 131, 4, 6, 3, True),
                                                 (1, 96, 700, 8, 7, None, True)],
                         ids=["vim", "reverse", "R33_groups", "groups_reverse", "split_units"])
def test_projected_delta_trains_against_the_reference(b, d, L, N, R, G, reverse, dtype):
    """Under autograd the kernel projects delta = W @ dt_in itself in the forward and again in the backward:
    the output and the gradients of every input (W and dt_in included, dt_in a strided view of x_proj's
    output as Mamba passes it) equal the float64 reference on the explicitly projected delta."""
    torch.manual_seed(b + d + L)
    inputs = {k: v for k, v in make_inputs(b, d, L, N, G, G).items() if k not in ("delta", "initial_state")}
    inputs.update(W=torch.randn(d, R) / math.sqrt(R), x_dbl=torch.randn(b, L, R + 7))
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)

    def scan(x, projected):
        dt_in = x["x_dbl"].transpose(1, 2)[:, :R]
        kw = {k: x[k] for k in ("A", "B", "C", "D", "z", "delta_bias")}
        if projected:
            return cpu_scan.selective_scan_cpu_projected(x["u"], x["W"], dt_in, **kw, delta_softplus=True,
                                                         reverse=reverse)
        kw.update({k: flip(kw[k]) for k in ("B", "C", "z")})
        return flip(selective_scan_ref(flip(x["u"]), flip(x["W"] @ dt_in), **kw, delta_softplus=True))

    weight = torch.randn(b, d, L, dtype=torch.float64)
    grads = {}
    for projected, dt in ((True, dtype), (False, torch.float64)):
        x = {k: v.detach().to(dt).requires_grad_() for k, v in inputs.items()}
        out = scan(x, projected)
        g = torch.autograd.grad((out.double() * weight).sum(), list(x.values()))
        grads[projected] = (out, dict(zip(x, g)))
    (got, got_g), (ref, ref_g) = grads[True], grads[False]
    assert got.dtype == dtype and rel_err(got, ref) <= TOL[dtype]
    for name in ref_g:
        assert rel_err(got_g[name], ref_g[name]) <= TOL[dtype] * 10, name


def _projected_grads(inputs, W, dt_in, reverse=False):
    """Gradients of every input of the projected scan (W and dt_in included) for a fixed output weighting."""
    x = {k: v.detach().clone().requires_grad_() for k, v in dict(inputs, W=W, dt_in=dt_in).items()}
    kw = {k: x[k] for k in ("A", "B", "C", "D", "z", "delta_bias")}
    out = cpu_scan.selective_scan_cpu_projected(x["u"], x["W"], x["dt_in"], **kw, delta_softplus=True,
                                                reverse=reverse)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return dict(zip(x, torch.autograd.grad((out * weight).sum(), list(x.values()))))


@pytest.mark.parametrize("mode", ["openmp", "pthreads"])
def test_projected_backward_threads_agree_and_repeat_bitwise(mode):
    """The kernel projects ddelta back onto W and dt_in itself; with a unit's channels split across threads,
    dt_in's gradient is summed over per-slot copies in a fixed order: one and two threads agree, and every
    two-thread run gives the same bits."""
    torch.manual_seed(0)
    inputs = {k: v for k, v in make_inputs(1, 256, 1500, 16).items() if k not in ("delta", "initial_state")}
    W, dt_in = torch.randn(256, 16) / 4, torch.randn(1, 16, 1500)
    with threading(mode):
        torch.set_num_threads(1)
        one = _projected_grads(inputs, W, dt_in, reverse=True)
        torch.set_num_threads(2)
        two = [_projected_grads(inputs, W, dt_in, reverse=True) for _ in range(4)]
    for k in one:
        torch.testing.assert_close(two[0][k], one[k], rtol=1e-4, atol=1e-5)
        assert all(torch.equal(two[0][k], again[k]) for again in two[1:]), k


def test_projected_backward_writes_no_delta_sized_gradient(monkeypatch):
    """The backward allocates du and dz, and no (b, d, L) gradient of delta: the kernel projects it back onto
    W and dt_in chunk by chunk."""
    sizes = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        sizes.append(tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
        return real_empty(*shape, **kw)
    inputs = {k: v for k, v in make_inputs(2, 24, 90, 4).items() if k not in ("delta", "initial_state")}
    x = {k: v.detach().clone().requires_grad_() for k, v in dict(inputs, W=torch.randn(24, 5),
                                                                 dt_in=torch.randn(2, 5, 90)).items()}
    kw = {k: x[k] for k in ("A", "B", "C", "D", "z", "delta_bias")}
    out = cpu_scan.selective_scan_cpu_projected(x["u"], x["W"], x["dt_in"], **kw, delta_softplus=True)
    monkeypatch.setattr(torch, "empty", spy)
    out.sum().backward()
    big = [s for s in sizes if math.prod(s) >= 2 * 24 * 90]
    assert len(big) == 2, sizes                                # du and dz


@pytest.mark.parametrize("layout", ["token_major", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("b,d,L,N,R,reverse", [(1, 16, 300, 16, 12, True), (2, 13, 70, 5, 3, False)],
                         ids=["vim_flip", "partial_block"])
def test_projected_scan_accumulates_into_a_given_output(b, d, L, N, R, reverse, dtype, layout):
    """accumulate_into adds the scan's output into the given tensor in place, bit for bit what adding the
    returned output would give, in either time direction and layout, and returns that tensor."""
    torch.manual_seed(b * d + L)
    inputs = make_inputs(b, d, L, N)
    kw = {k: inputs[k].to(dtype) for k in ("A", "B", "C", "D", "z", "delta_bias")}
    u, dt_in = inputs["u"].to(dtype), torch.randn(b, R, L, dtype=dtype)
    W = (torch.randn(d, R) / math.sqrt(R)).to(dtype)
    with torch.no_grad():
        y = cpu_scan.selective_scan_cpu_projected(u, W, dt_in, **kw, delta_softplus=True, reverse=reverse)
        base = torch.randn(b, d, L, dtype=dtype)
        acc = base.transpose(1, 2).contiguous().transpose(1, 2) if layout == "token_major" else base.clone()
        got = cpu_scan.selective_scan_cpu_projected(u, W, dt_in, **kw, delta_softplus=True, reverse=reverse,
                                                    accumulate_into=acc)
    assert got is acc and torch.equal(acc, base + y)


def test_projected_scan_accumulation_refuses_grad_and_mismatches():
    inputs = make_inputs(1, 8, 30, 4)
    kw = {k: inputs[k] for k in ("A", "B", "C", "D", "z", "delta_bias")}
    u, W, dt_in = inputs["u"], torch.randn(8, 3), torch.randn(1, 3, 30)
    with pytest.raises(RuntimeError, match="accumulate_into is not differentiable"):
        cpu_scan.selective_scan_cpu_projected(u, W.requires_grad_(), dt_in, **kw,
                                              accumulate_into=torch.zeros(1, 8, 30))
    with torch.no_grad(), pytest.raises(ValueError, match=r"accumulate_into must be \(1, 8, 30\) in torch.float32, "
                                                          r"got \(1, 8, 29\) in torch.float64"):
        cpu_scan.selective_scan_cpu_projected(u, W, dt_in, **kw,
                                              accumulate_into=torch.zeros(1, 8, 29, dtype=torch.float64))
    with torch.no_grad(), pytest.raises(ValueError, match=r"accumulate_into must be .* got a list"):
        cpu_scan.selective_scan_cpu_projected(u, W, dt_in, **kw, accumulate_into=[0.0])


def test_projected_scan_accumulation_falls_back_without_the_kernel(monkeypatch):
    inputs = make_inputs(2, 8, 40, 4)
    kw = {k: inputs[k] for k in ("A", "B", "C", "D", "z", "delta_bias")}
    u, W, dt_in = inputs["u"], torch.randn(8, 3), torch.randn(2, 3, 40)
    with torch.no_grad():
        want = cpu_scan.selective_scan_cpu_projected(u, W, dt_in, **kw, delta_softplus=True, reverse=True)

        def unavailable(dtype=torch.float32):
            raise cpu_scan.KernelUnavailable("disabled for the test")
        monkeypatch.setattr(cpu_scan, "load_library", unavailable)
        acc = torch.ones(2, 8, 40)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)         # the reference scan's one-time warning
            cpu_scan.selective_scan_cpu_projected(u, W, dt_in, **kw, delta_softplus=True, reverse=True,
                                                  accumulate_into=acc)
    assert rel_err(acc - 1, want) <= TOL[torch.float32]


def test_projected_delta_checks_its_shapes():
    inputs = make_inputs(1, 8, 30, 4)
    kw = {k: inputs[k] for k in ("A", "B", "C", "D", "z", "delta_bias")}
    with pytest.raises(ValueError, match=r"dt_weight \(8, 3\) and dt_in \(1, 2, 30\) must be \(d, R\) and \(b, R, L\)"):
        cpu_scan.selective_scan_cpu_projected(inputs["u"], torch.randn(8, 3), torch.randn(1, 2, 30), **kw)


def test_the_commands_openmp_setting_gives_the_same_bits(tmp_path):
    """`mambakit` limits how long torch's OpenMP threads spin (mambakit.runtime.configure_openmp): the kernel
    runs on that pool, so the setting may change its timing, never its results. Forward and every gradient,
    with two threads and a unit split across them (the backward's fixed slots), in a process with torch's
    stock settings and in one with the command's: the same bits."""
    code = textwrap.dedent("""
        import sys
        from mambakit.runtime import configure_openmp
        if sys.argv[2] == "new":
            configure_openmp()
        import torch
        torch.set_num_threads(2)
        from mambakit.kernels.cpu_scan import selective_scan_cpu
        torch.manual_seed(0)
        u, delta, z = (torch.randn(1, 256, 1500, requires_grad=True) for _ in range(3))
        B, C = torch.randn(1, 16, 1500, requires_grad=True), torch.randn(1, 16, 1500, requires_grad=True)
        A = (-torch.rand(256, 16) - 0.5).requires_grad_()
        D, bias = torch.randn(256, requires_grad=True), torch.randn(256, requires_grad=True)
        out = selective_scan_cpu(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
        out.backward(torch.randn_like(out))
        torch.save([out.detach()] + [t.grad for t in (u, delta, z, A, B, C, D, bias)], sys.argv[1])
    """)
    results = []
    for setting in ("old", "new"):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        out = tmp_path / f"{setting}.pt"
        proc = subprocess.run([sys.executable, "-c", code, str(out), setting], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(torch.load(out))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert results[0][5].abs().sum() > 0          # dB: the split unit's sum over the slots, not left empty
