"""The fused CPU selective scan: a C kernel compiled on first use, loaded with ctypes, wrapped in autograd.

Semantics are `mambakit.kernels.reference.selective_scan_ref`'s (mamba_ssm's `selective_scan_fn` plus an
initial state and a gradient through the last state). The kernel (csrc/selective_scan_cpu.c) streams over
time with the state of W channels x N in vector registers/L1, parallel over (batch, channel block) with
pthreads, and its backward recomputes states from checkpoints taken every `chunk` steps, so the memory it
adds is O(b * d * N * L / chunk), never O(b * d * N * L).

Build: no build step at install time. On the first call per process the source is compiled with the system C
compiler (`$CC`, else cc/gcc/clang) into `$MAMBAKIT_HOME/kernels/` (default ~/.cache/mambakit/kernels),
keyed by a hash of the source, the flags, the compiler's version and the CPU; later calls and processes load
the cached library. The file is written to a temporary name and renamed into place, so processes that
compile at the same time never see a partial file. Where no kernel can be built (no compiler, compile error,
unsupported platform), or `MAMBAKIT_DISABLE_CPU_KERNEL=1` is set, the reference scan runs instead after a
one-line warning (once per process).

Precision: float32 and float64 inputs are computed natively; float16/bfloat16 inputs in float32 and cast
back. With mixed dtypes the compute dtype is float64 if any input is float64, else float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from mambakit.kernels.reference import _compute_dtype, selective_scan_ref

__all__ = ["selective_scan_cpu", "selective_scan_cpu_projected", "kernel_status", "load_library", "set_threading",
           "KernelUnavailable", "DEFAULT_CHUNK", "vexp_bench"]

#: Checkpoint interval of the backward (steps). Measured on AMD EPYC (Zen) with 2 threads; see
#: benchmarks/README.md ("Selective scan (CPU)"): 32..128 are within noise, 64 keeps the per-thread
#: recompute tiles (K x N x 8 floats, twice) in L2 for N <= 64.
DEFAULT_CHUNK = 64

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("selective_scan_cpu.c", "vmath.h")
_ABI_VERSION = 7
# No -ffast-math: reassociation would break exp's range reduction, and finite-math-only would turn NaN
# inputs into garbage instead of NaN outputs. Contraction into FMA is allowed (it only adds accuracy).
_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-fno-trapping-math",
          "-ffp-contract=fast")
_NATIVE_FLAGS = ("-march=native",)
# Compiling takes about 5 s on a quiet 2-core machine, but a minute and more while other jobs load the cores;
# a timeout that gives up then would leave the whole process on the reference loop, tens of times slower, for a
# compile that was nearly done. So the limit only guards against a compiler that hangs.
_COMPILE_TIMEOUT_S = float(os.environ.get("MAMBAKIT_COMPILE_TIMEOUT_S", 900))
_DISABLE_ENV = "MAMBAKIT_DISABLE_CPU_KERNEL"


class KernelUnavailable(RuntimeError):
    """The fused CPU kernel cannot be used here; the message says why."""


class Stride(ctypes.Structure):
    """Mirror of `mk_stride`: elements between batch elements, channels and time steps of a (b, d, L) tensor."""

    _fields_ = [("b", ctypes.c_int64), ("c", ctypes.c_int64), ("t", ctypes.c_int64)]


#: The strided (b, d, L) tensors of `mk_scan_args`, in the order of its `st` array.
_STRIDED = ("u", "delta", "z", "out", "dout", "du", "ddelta", "dz")


class _ScanArgs(ctypes.Structure):
    """Mirror of `mk_scan_args` in csrc/selective_scan_cpu.c (field order matters)."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "u", "delta", "A", "B", "C", "D", "delta_bias", "z", "init", "out", "ckpt", "last", "dout", "dlast",
        "du", "ddelta", "dz", "dA", "dB", "dC", "dD", "dbias", "dinit", "dt_w", "dt_in", "ddt_w", "ddt_in")]
    _fields_ += [(name, ctypes.c_int64) for name in ("batch", "dim", "len", "dstate", "groups", "chunk", "dt_rank",
                                                     "dt_in_bstride")]
    _fields_ += [("st", Stride * len(_STRIDED)), ("softplus", ctypes.c_int32), ("nthreads", ctypes.c_int32),
                 ("accumulate", ctypes.c_int32)]


def strided(t: torch.Tensor | None, reverse: bool = False) -> tuple[int | None, Stride]:
    """A (b, d, L) tensor as the kernels read it in place: (address of its first step, strides). With
    `reverse`, the first step is the last one and the time stride is negated: the kernel walks time backwards."""
    if t is None:
        return None, Stride(0, 0, 0)
    sb, sc, st = t.stride()
    ptr = t.data_ptr()
    if reverse and t.shape[2] > 1:
        ptr += (t.shape[2] - 1) * st * t.element_size()
        st = -st
    return ptr, Stride(sb, sc, st)


def is_token_major(x: torch.Tensor) -> bool:
    """Whether a (b, channels, L) tensor has token-major memory: the transposed view of a (b, L, channels) one
    (possibly every other row of it, as the halves of in_proj's output are), rather than channel-major rows."""
    return x.dim() == 3 and x.shape[2] > 1 and x.stride(2) != 1 and (x.stride(1) == 1 or x.shape[1] == 1)


def empty_like_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (b, d, L) tensor laid out as t: token-major memory (the transposed view of (b, L, d))
    when t's channels are adjacent, channel-major otherwise."""
    b, d, L = t.shape
    if is_token_major(t):
        return torch.empty(b, L, d, dtype=dtype).transpose(1, 2)
    return torch.empty(b, d, L, dtype=dtype)


def _scan_args(reverse: bool, **kw) -> _ScanArgs:
    """_ScanArgs with the strided tensors (given as tensors under their field names) turned into addresses
    and strides, the rest passed through (tensors as addresses)."""
    st = (Stride * len(_STRIDED))()
    for i, name in enumerate(_STRIDED):
        kw[name], st[i] = strided(kw.get(name), reverse)
    for name, value in kw.items():
        if isinstance(value, torch.Tensor):
            kw[name] = value.data_ptr()
    return _ScanArgs(st=st, **kw)


# ------------------------------------------------------------------------------------------------------
# Building and loading

def _kernel_dir() -> Path:
    home = os.environ.get("MAMBAKIT_HOME", "").strip() or "~/.cache/mambakit"
    return Path(home).expanduser().resolve() / "kernels"


def _find_compiler() -> list[str]:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise KernelUnavailable("no C compiler found (looked for $CC, cc, gcc, clang); "
                            "install one (e.g. `apt install gcc`) or set CC")


def _compiler_version(cc: list[str]) -> str:
    try:
        res = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KernelUnavailable(f"C compiler {cc[0]!r} does not run: {err}") from err
    if res.returncode != 0:
        raise KernelUnavailable(f"`{' '.join(cc)} --version` failed: {res.stderr.strip()[:200]}")
    return res.stdout.strip().splitlines()[0] if res.stdout.strip() else cc[0]


def _cpu_id() -> str:
    """What -march=native depends on: the machine, the CPU model and its feature flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":
                    break                       # the first processor describes them all
    except OSError:
        pass
    return "\n".join(parts)


def _compile(cc: list[str], flags: tuple[str, ...], double: bool, target: Path) -> str | None:
    """Compile into `target` atomically. Returns None on success, else the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    cmd = [*cc, *flags, *(["-DMK_DOUBLE"] if double else []), "-o", tmp,
           str(_CSRC / "selective_scan_cpu.c"), "-lm"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
            return (lines[0] if lines else f"exit status {res.returncode}")[:300]
        os.replace(tmp, target)
        return None
    except subprocess.TimeoutExpired:
        return f"compiling took more than {_COMPILE_TIMEOUT_S:g} s (MAMBAKIT_COMPILE_TIMEOUT_S)"
    except OSError as err:
        return str(err)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path, double: bool) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.mk_abi_version.restype = ctypes.c_int
    lib.mk_args_size.restype = ctypes.c_int64
    want = _ABI_VERSION * 100 + (8 if double else 4)
    if lib.mk_abi_version() != want or lib.mk_args_size() != ctypes.sizeof(_ScanArgs):
        raise OSError(f"{path} has ABI {lib.mk_abi_version()}, expected {want}")
    for fn in (lib.mk_scan_fwd, lib.mk_scan_bwd):
        fn.argtypes = [ctypes.POINTER(_ScanArgs)]
        fn.restype = ctypes.c_int
    for fn in (lib.mk_vexp, lib.mk_vexp_decay, lib.mk_vsoftplus):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    lib.mk_vexp_bench.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.mk_vexp_bench.restype = None
    lib.mk_use_openmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.mk_use_openmp.restype = None
    lib.mk_threading.restype = ctypes.c_int
    set_threading("openmp", lib)
    return lib


def _torch_openmp() -> tuple[int, int] | None:
    """GOMP_parallel and omp_get_thread_num of the OpenMP runtime torch runs its ops on, if it does (torch
    loads it into the global namespace); None otherwise."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        everything = ctypes.CDLL(None)
        return tuple(ctypes.cast(getattr(everything, name), ctypes.c_void_p).value
                     for name in ("GOMP_parallel", "omp_get_thread_num"))
    except (AttributeError, OSError):
        return None


def set_threading(mode: str, lib: ctypes.CDLL | None = None) -> str:
    """Run the kernel's threads on torch's OpenMP pool ("openmp", the default where torch uses libgomp or
    a GOMP-compatible runtime) or on threads it starts per call ("pthreads"). Returns the mode in effect.

    Sharing torch's pool matters on machines with few cores: after every torch op its workers spin-wait
    for a while, and separate threads would compete with them for the cores."""
    if mode not in ("openmp", "pthreads"):
        raise ValueError(f"set_threading: mode must be 'openmp' or 'pthreads', got {mode!r}")
    libs = [lib] if lib is not None else [x for x in _libs.values() if not isinstance(x, KernelUnavailable)]
    fns = _torch_openmp() if mode == "openmp" else None
    for one in libs:
        one.mk_use_openmp(*(fns or (None, None)))
    return "openmp" if fns else "pthreads"


def _build_and_load(double: bool) -> ctypes.CDLL:
    if not sys.platform.startswith(("linux", "darwin", "freebsd")):
        raise KernelUnavailable(f"the fused CPU kernel needs a POSIX platform, this is {sys.platform}")
    cc = _find_compiler()
    version = _compiler_version(cc)
    source = b"".join((_CSRC / name).read_bytes() for name in _SOURCES)
    errors = []
    for flags in (_FLAGS + _NATIVE_FLAGS, _FLAGS):          # portable retry where -march=native is refused
        key = hashlib.sha256(b"\0".join([
            source, " ".join(cc).encode(), " ".join(flags).encode(), version.encode(), _cpu_id().encode(),
            b"double" if double else b"float", str(_ABI_VERSION).encode()])).hexdigest()[:20]
        path = _kernel_dir() / f"selective_scan_cpu_{'f64' if double else 'f32'}_{key}.so"
        if path.is_file():
            try:
                return _open(path, double)
            except OSError:
                path.unlink(missing_ok=True)                 # damaged cache entry: rebuild it below
        err = _compile(cc, flags, double, path)
        if err is None:
            return _open(path, double)
        errors.append(err)
    raise KernelUnavailable(f"compiling {_CSRC / 'selective_scan_cpu.c'} with {cc[0]} failed: {errors[-1]}")


_libs: dict[bool, ctypes.CDLL | KernelUnavailable] = {}
_lock = threading.Lock()
_warned = False


def load_library(dtype: torch.dtype = torch.float32) -> ctypes.CDLL:
    """The compiled kernel for float32 or float64 compute; raises KernelUnavailable saying why not."""
    if os.environ.get(_DISABLE_ENV, "").strip() not in ("", "0"):
        raise KernelUnavailable(f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}")
    double = dtype == torch.float64
    with _lock:
        if double not in _libs:
            try:
                _libs[double] = _build_and_load(double)
            except KernelUnavailable as err:
                _libs[double] = err
            except OSError as err:
                _libs[double] = KernelUnavailable(f"loading the compiled kernel failed: {err}")
        lib = _libs[double]
    if isinstance(lib, KernelUnavailable):
        raise lib
    return lib


def kernel_status(dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """(True, path of the library) when the kernel is usable, else (False, why not)."""
    try:
        return True, load_library(dtype)._name
    except KernelUnavailable as err:
        return False, str(err)


def _warn_fallback(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        fix = (f"unset {_DISABLE_ENV} to use it" if _DISABLE_ENV in reason else
               "install a C compiler (e.g. `apt install gcc`) or set CC to one")
        warnings.warn(f"mambakit: fused CPU selective-scan kernel unavailable ({reason}); running the slow "
                      f"reference scan instead; to fix: {fix}", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------------
# Autograd

def _grouped(BC: torch.Tensor, G: int) -> torch.Tensor:
    """(b, N, L) or (b, G', N, L), G' dividing G -> (b, G, N, L) serving the same channels."""
    BC = BC.unsqueeze(1) if BC.dim() == 3 else BC
    return BC if BC.shape[1] == G else BC.repeat_interleave(G // BC.shape[1], dim=1)


def _ungrouped(dBC: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The adjoint of `_grouped`: (b, G, N, L) -> `shape`."""
    b, G, N, L = dBC.shape
    G_in = 1 if len(shape) == 3 else shape[1]
    if G_in != G:
        dBC = dBC.view(b, G_in, G // G_in, N, L).sum(2)
    return dBC.reshape(shape)


def _prep(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype).contiguous()


def _as_is(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A (b, d, L) input in the compute dtype, its layout kept (the kernel reads it through its strides)."""
    return None if t is None else t.detach().to(dtype)


def _prep_BC(B: torch.Tensor, C: torch.Tensor, ct: torch.dtype, reverse: bool = False):
    """B and C as contiguous (b, G, N, L) in the compute dtype, G the common grouping (they may be grouped
    differently), in the kernel's time order (reversed with `reverse`); returns (B_, C_, G)."""
    G = math.lcm(*(1 if t.dim() == 3 else t.shape[1] for t in (B, C)))
    B_, C_ = (_grouped(t, G) for t in (B, C))
    if reverse:
        B_, C_ = B_.flip(-1), C_.flip(-1)
    return _prep(B_, ct), _prep(C_, ct), G


def _dt_rows(dt_in: torch.Tensor, ct: torch.dtype, reverse: bool) -> torch.Tensor:
    """dt_in (b, R, L) as the kernel reads it: rows of L contiguous steps in its own time order (flipped with
    `reverse`), batch elements any distance apart; a view whose rows are contiguous is passed as it is."""
    rows = dt_in.detach().to(ct)
    rows = rows.flip(-1) if reverse else rows
    R, L = rows.shape[1], rows.shape[2]
    if rows.stride(2) != 1 or (R > 1 and rows.stride(1) != L):
        rows = rows.contiguous()
    return rows


def _run_forward(lib, ct, out, u, delta, dt_w, dt_in, A, B, C, D, z, delta_bias, initial_state, softplus, chunk,
                 reverse, *, ckpt=None, last=None, accumulate=False):
    """Runs the forward kernel into `out` (overwritten, or added to with `accumulate`), with the checkpoints
    and last state where given; returns the inputs as the kernel read them (u, delta, dt_w, dt_in rows, A, B,
    C, D, z, delta_bias), which is what the backward keeps."""
    b, d, L = u.shape
    # every tensor the kernel reads stays referenced here until it returns (the args hold bare addresses)
    u_, delta_, z_ = (_as_is(t, ct) for t in (u, delta, z))
    A_, D_, bias_, init_, w_ = (_prep(t, ct) for t in (A, D, delta_bias, initial_state, dt_w))
    rows = None if dt_in is None else _dt_rows(dt_in, ct, reverse)
    B_, C_, G = _prep_BC(B, C, ct, reverse)
    args = _scan_args(reverse, u=u_, delta=delta_, A=A_, B=B_, C=C_, D=D_, delta_bias=bias_, z=z_, init=init_,
                      out=out, ckpt=ckpt, last=last, batch=b, dim=d, len=L, dstate=A.shape[1], groups=G,
                      chunk=chunk, **_projection_args(w_, rows), softplus=int(bool(softplus)),
                      nthreads=torch.get_num_threads(), accumulate=int(accumulate))
    _check(lib.mk_scan_fwd(ctypes.byref(args)), "forward")
    return u_, delta_, w_, rows, A_, B_, C_, D_, z_, bias_


class _SelectiveScanCPU(torch.autograd.Function):
    """Inputs as validated by `selective_scan`; returns (out in u's dtype, last_state in compute dtype).

    Either delta is given, or its projection delta = dt_w @ dt_in (dt_w (d, R), dt_in (b, R, L)), which the
    kernel computes chunk by chunk in the forward and again in the backward, so no (b, d, L) delta is written,
    read or kept between the passes. The backward projects ddelta back onto dt_w and dt_in chunk by chunk as
    well, so no (b, d, L) gradient of delta is written either (on a long sequence it was one of the largest
    buffers of the backward's peak)."""

    @staticmethod
    def forward(ctx, u, delta, dt_w, dt_in, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk,
                reverse):
        tensors = (u, delta, dt_w, dt_in, A, B, C, D, z, delta_bias, initial_state)
        ct = _compute_dtype(*tensors)
        b, d, L = u.shape
        N = A.shape[1]
        shapes = (tuple(B.shape), tuple(C.shape))
        out = empty_like_layout(u, ct)
        last = torch.empty(b, d, N, dtype=ct)
        needs_grad = any(ctx.needs_input_grad)
        ckpt = torch.empty(b, d, -(-L // chunk), N, dtype=ct) if needs_grad else None
        read = _run_forward(load_library(ct), ct, out, u, delta, dt_w, dt_in, A, B, C, D, z, delta_bias,
                            initial_state, delta_softplus, chunk, reverse, ckpt=ckpt, last=last)
        if needs_grad:
            ctx.save_for_backward(*read, ckpt)
            ctx.info = (shapes, delta_softplus, chunk, initial_state is not None, reverse,
                        [None if t is None else t.dtype for t in tensors])
        ctx.set_materialize_grads(False)
        return (out if u.dtype == ct else out.to(u.dtype)), last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u_, delta_, w_, rows, A_, B_, C_, D_, z_, bias_, ckpt = ctx.saved_tensors
        shapes, softplus, chunk, has_init, reverse, dtypes = ctx.info
        ct = u_.dtype
        lib = load_library(ct)
        b, d, L = u_.shape
        N, G = A_.shape[1], B_.shape[1]
        dout_ = torch.zeros(b, d, L, dtype=ct) if dout is None else dout.to(ct)
        dlast_ = None if dlast is None else dlast.to(ct).contiguous()
        du = empty_like_layout(u_, ct)
        ddelta = empty_like_layout(delta_, ct) if delta_ is not None else None
        # projected: the kernel sums dt_in's gradient per (batch, group) (a group's channels meet only its own
        # share of it where dt_w is block-diagonal) and dt_w's over the batch
        ddt_w = torch.empty(d, w_.shape[1], dtype=ct) if w_ is not None else None
        ddt_in = torch.empty(b, G, w_.shape[1], L, dtype=ct) if w_ is not None else None
        dz = empty_like_layout(z_, ct) if z_ is not None else None
        dA = torch.empty(d, N, dtype=ct)
        dB, dC = torch.empty(b, G, N, L, dtype=ct), torch.empty(b, G, N, L, dtype=ct)
        dD = torch.empty(d, dtype=ct) if D_ is not None else None
        dbias = torch.empty(d, dtype=ct) if bias_ is not None else None
        dinit = torch.empty(b, d, N, dtype=ct) if has_init else None
        args = _scan_args(reverse, u=u_, delta=delta_, A=A_, B=B_, C=C_, D=D_, delta_bias=bias_, z=z_, ckpt=ckpt,
                          dout=dout_, dlast=dlast_, du=du, ddelta=ddelta, dz=dz, dA=dA, dB=dB, dC=dC, dD=dD,
                          dbias=dbias, dinit=dinit, ddt_w=ddt_w, ddt_in=ddt_in, batch=b, dim=d, len=L, dstate=N,
                          groups=G, chunk=chunk, **_projection_args(w_, rows), softplus=int(bool(softplus)),
                          nthreads=torch.get_num_threads())
        _check(lib.mk_scan_bwd(ctypes.byref(args)), "backward")
        if ddt_in is not None:
            ddt_in = ddt_in[:, 0] if G == 1 else ddt_in.sum(1)
        if reverse:                                   # the kernel's time order back to the tokens'
            dB, dC = dB.flip(-1), dC.flip(-1)
            ddt_in = ddt_in.flip(-1) if ddt_in is not None else None
        dB, dC = _ungrouped(dB, shapes[0]), _ungrouped(dC, shapes[1])
        grads = [du, ddelta, ddt_w, ddt_in, dA, dB, dC, dD, dz, dbias, dinit]
        grads = [None if g is None or not need else g.to(dt)
                 for g, need, dt in zip(grads, ctx.needs_input_grad, dtypes)]
        return (*grads, None, None, None)


def _projection_args(w_: torch.Tensor | None, rows: torch.Tensor | None) -> dict:
    """The kernel's fields for delta = dt_w @ dt_in (none when delta is given)."""
    if w_ is None:
        return {}
    return dict(dt_w=w_, dt_in=rows, dt_rank=w_.shape[1], dt_in_bstride=rows.stride(0))


def _check(rc: int, what: str) -> None:
    if rc == 1:
        raise MemoryError(f"selective_scan (cpu): the {what} kernel could not allocate its workspace")
    if rc != 0:
        raise RuntimeError(f"selective_scan (cpu): the {what} kernel rejected its arguments (code {rc})")


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, *, reverse: bool = False,
                       chunk: int = DEFAULT_CHUNK):
    """The fused CPU selective scan; inputs as validated by `mambakit.core.scan.selective_scan`.

    u, delta, z: (b, d, L) in any layout (channel-major rows, and token-major memory, the transposed view of a
    (b, L, d) tensor, are read in place; the output and the gradients take u's, delta's and z's layouts);
    A: (d, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (d,); initial_state: (b, d, N). With `reverse`
    the scan runs from the last step to the first without copying its inputs: the result is
    `flip(scan(flip(inputs)))`, and initial_state / last_state are the states before step L-1 / after step 0.
    Returns out (b, d, L) in u's dtype [, last_state (b, d, N) in float32, or float64 for float64 inputs].
    `chunk` is the backward's checkpoint interval K (memory O(b d N L / K)).
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"selective_scan_cpu: chunk must be a positive int, got {chunk!r}")
    ct = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    try:
        load_library(ct)
        usable = u.shape[0] > 0 and u.shape[1] > 0 and A.shape[1] > 0
    except KernelUnavailable as err:
        _warn_fallback(str(err))
        usable = False
    if not usable:
        return flipped(selective_scan_ref, reverse, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                       delta_softplus=delta_softplus, return_last_state=return_last_state,
                       initial_state=initial_state)
    out, last = _SelectiveScanCPU.apply(u, delta, None, None, A, B, C, D, z, delta_bias, initial_state,
                                        bool(delta_softplus), chunk, bool(reverse))
    return (out, last) if return_last_state else out


def flipped(scan, reverse: bool, u, delta, A, B, C, D=None, z=None, **kwargs):
    """`scan` (a selective scan that walks time forwards only) with the semantics of `reverse`: run on the
    time-reversed inputs, its output reversed back."""
    if not reverse:
        return scan(u, delta, A, B, C, D=D, z=z, **kwargs)
    u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
    res = scan(u, delta, A, B, C, D=D, z=None if z is None else z.flip(-1), **kwargs)
    return (res[0].flip(-1), res[1]) if isinstance(res, tuple) else res.flip(-1)


def selective_scan_cpu_projected(u, dt_weight, dt_in, A, B, C, D=None, z=None, delta_bias=None,
                                 delta_softplus=False, *, reverse: bool = False, chunk: int = DEFAULT_CHUNK,
                                 accumulate_into: torch.Tensor | None = None):
    """`selective_scan_cpu` with delta = dt_weight @ dt_in (per batch element) computed inside the kernel, chunk
    by chunk, instead of materialised (Mamba's dt_proj without its bias, which stays the scan's delta_bias).
    dt_weight: (d, R); dt_in: (b, R, L), e.g. the first R rows of x_proj's output (a view whose rows are
    contiguous is read in place). Differentiable: the backward recomputes delta the same way and returns the
    gradients of dt_weight and dt_in, so training neither writes nor keeps a (b, d, L) delta. Where the kernel
    is unavailable, delta is computed explicitly and the ordinary scan runs. `reverse`, `chunk` and layouts as
    in `selective_scan_cpu`. Returns out (b, d, L) in u's dtype.

    accumulate_into: a (b, d, L) tensor in the compute dtype (any layout) that the output is added to in place,
    and returned: how a multi-order mixer sums its orders at inference without writing each order's output and
    adding them up afterwards. Not differentiable: only where no gradient is being recorded.
    """
    tensors = (u, dt_weight, dt_in, A, B, C, D, z, delta_bias)
    b, d, L = u.shape
    if (dt_weight.dim() != 2 or dt_weight.shape[0] != d or dt_in.dim() != 3
            or tuple(dt_in.shape) != (b, dt_weight.shape[1], L)):
        raise ValueError(f"selective_scan_cpu_projected: dt_weight {tuple(dt_weight.shape)} and dt_in "
                         f"{tuple(dt_in.shape)} must be (d, R) and (b, R, L) for u of shape {tuple(u.shape)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"selective_scan_cpu_projected: chunk must be a positive int, got {chunk!r}")
    if accumulate_into is not None:
        return _accumulate_projected(accumulate_into, u, dt_weight, dt_in, A, B, C, D, z, delta_bias,
                                     delta_softplus, reverse, chunk)
    usable = b > 0 and d > 0 and L > 0 and A.shape[1] > 0 and dt_weight.shape[1] > 0
    if usable:
        try:
            load_library(_compute_dtype(*tensors))
        except KernelUnavailable:
            usable = False
    if not usable:
        delta = torch.matmul(dt_weight.to(dt_in.dtype), dt_in)
        return selective_scan_cpu(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  reverse=reverse, chunk=chunk)
    with torch.profiler.record_function("SelectiveScanCPUProjected"):   # its own name in the profiles
        out, _ = _SelectiveScanCPU.apply(u, None, dt_weight, dt_in, A, B, C, D, z, delta_bias, None,
                                         bool(delta_softplus), chunk, bool(reverse))
    return out


def _accumulate_projected(acc, u, dt_weight, dt_in, A, B, C, D, z, delta_bias, softplus, reverse, chunk):
    tensors = (u, dt_weight, dt_in, A, B, C, D, z, delta_bias)
    ct = _compute_dtype(*tensors)
    if not isinstance(acc, torch.Tensor) or acc.shape != u.shape or acc.dtype != ct:
        raise ValueError(f"selective_scan_cpu_projected: accumulate_into must be {tuple(u.shape)} in {ct}, got "
                         + (f"{tuple(acc.shape)} in {acc.dtype}" if isinstance(acc, torch.Tensor) else
                            f"a {type(acc).__name__}"))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors + (acc,)):
        raise RuntimeError("selective_scan_cpu_projected: accumulate_into is not differentiable; use it under "
                           "torch.no_grad() or on tensors that do not require grad")
    b, d, L = u.shape
    try:
        lib = load_library(ct)
        usable = b > 0 and d > 0 and L > 0 and A.shape[1] > 0 and dt_weight.shape[1] > 0
    except KernelUnavailable:
        usable = False
    if not usable:
        return acc.add_(selective_scan_cpu_projected(u, dt_weight, dt_in, A, B, C, D, z, delta_bias, softplus,
                                                     reverse=reverse, chunk=chunk))
    with torch.profiler.record_function("SelectiveScanCPUProjected"):
        _run_forward(lib, ct, acc, u, None, dt_weight, dt_in, A, B, C, D, z, delta_bias, None, softplus, chunk,
                     reverse, accumulate=True)
    return acc


def vexp_bench(n: int = 4096, reps: int = 10000, dtype: torch.dtype = torch.float32) -> float:
    """Seconds for `reps` passes of the exp the kernel computes its decays with, over n elements (one thread,
    cache-resident inputs): the kernel's per-core exp throughput is n * reps / seconds."""
    import time
    lib = load_library(dtype)
    x = -torch.rand(n, dtype=dtype) * 10
    y = torch.empty_like(x)
    lib.mk_vexp_bench(x.data_ptr(), y.data_ptr(), n, 10)
    t0 = time.perf_counter()
    lib.mk_vexp_bench(x.data_ptr(), y.data_ptr(), n, reps)
    return time.perf_counter() - t0
