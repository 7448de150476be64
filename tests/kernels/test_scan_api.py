"""`mambakit.core.selective_scan` / `selective_state_update`: dispatch and input validation."""

import pytest
import torch

from mambakit.core import scan as scan_api
from mambakit.core.scan import available_backends, selective_scan, selective_state_update
from mambakit.kernels.cpu_scan import kernel_status, selective_scan_cpu
from mambakit.kernels.reference import selective_scan_ref, selective_state_update_ref


def inputs(b=2, d=8, L=5, N=4, G=None):
    BC = (lambda: torch.randn(b, N, L)) if G is None else (lambda: torch.randn(b, G, N, L))
    return dict(u=torch.randn(b, d, L), delta=torch.rand(b, d, L), A=-torch.rand(d, N), B=BC(), C=BC())


def test_backends_are_registered():
    assert {"reference", "cpu", "triton"} <= set(available_backends())


def test_auto_on_cpu_tensors_is_the_fused_kernel():
    if not kernel_status()[0]:
        pytest.skip("the fused CPU kernel cannot be built here")
    assert scan_api._resolve("auto", torch.device("cpu"), scan_api._BACKENDS) is selective_scan_cpu
    x = inputs(G=2)
    assert torch.equal(selective_scan(**x, delta_softplus=True), selective_scan_cpu(**x, delta_softplus=True))


def test_auto_falls_back_to_the_reference_when_a_backend_is_missing(monkeypatch):
    monkeypatch.delitem(scan_api._BACKENDS, "cpu")
    assert scan_api._resolve("auto", torch.device("cpu"), scan_api._BACKENDS) is selective_scan_ref


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_named_backends_agree_with_the_reference(backend):
    x = {k: v.double() for k, v in inputs(G=2).items()}
    x["D"] = torch.randn(8, dtype=torch.float64)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
    want, want_last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert out.shape == (2, 8, 5) and last.shape == (2, 8, 4)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, want_last, rtol=1e-10, atol=1e-10)


def test_return_last_state_false_returns_only_the_output():
    out = selective_scan(**inputs(), backend="reference")
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8, 5)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'; expected 'auto' or one of"):
        selective_scan(**inputs(), backend="fast")
    with pytest.raises(TypeError, match="backend must be a string"):
        selective_scan(**inputs(), backend=None)


def test_backend_device_mismatch():
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors, got tensors on cuda"):
        scan_api._resolve("cpu", torch.device("cuda"), scan_api._BACKENDS)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors, got tensors on cpu"):
        selective_scan(**inputs(), backend="triton")


def test_arguments_on_another_device_than_u():
    """(Checked on a CUDA device of u without making CUDA tensors: only devices are compared.)"""
    with pytest.raises(ValueError, match=r"selective_scan: C is on cpu, expected cuda:0 \(the device of u\)"):
        scan_api._expect("C", torch.randn(2, 4, 5), (2, 4, 5), torch.device("cuda:0"))


@pytest.mark.parametrize("name,value,error,match", [
    ("u", [[1.0]], TypeError, r"u must be a tensor of shape \(batch, dim, length\), got a list"),
    ("u", torch.randn(2, 8), ValueError, r"u has shape \(2, 8\), expected \(batch, dim, length\)"),
    ("delta", torch.rand(2, 8, 6), ValueError, r"delta has shape \(2, 8, 6\), expected \(2, 8, 5\)"),
    ("delta", None, ValueError, r"delta is required, expected a tensor of shape \(2, 8, 5\)"),
    ("A", torch.rand(7, 4), ValueError, r"A has shape \(7, 4\), expected \(8, N\)"),
    ("A", 3.0, TypeError, r"A must be a tensor of shape \(8, N\), got a float"),
    ("B", torch.randn(2, 4, 6), ValueError, r"B has shape \(2, 4, 6\), expected \(2, 4, 5\) or \(2, G, 4, 5\)"),
    ("B", torch.randn(2, 3, 5), ValueError, r"B has shape \(2, 3, 5\), expected \(2, 4, 5\) .*N = A.shape\[1\] = 4"),
    ("C", torch.randn(2, 3, 4, 5), ValueError, r"C has shape \(2, 3, 4, 5\): its 3 groups must divide dim = 8"),
    ("C", torch.randn(2, 2, 4, 6), ValueError, r"C has shape \(2, 2, 4, 6\), expected \(2, 4, 5\) or \(2, G, 4, 5\)"),
    ("C", torch.randn(4, 5), ValueError, r"C has shape \(4, 5\), expected"),
    ("B", "B", TypeError, r"B must be a tensor of shape \(2, 4, 5\) or \(2, G, 4, 5\), got a str"),
    ("D", torch.randn(4), ValueError, r"D has shape \(4,\), expected \(8,\)"),
    ("z", torch.randn(2, 8, 4), ValueError, r"z has shape \(2, 8, 4\), expected \(2, 8, 5\)"),
    ("delta_bias", torch.randn(8, 1), ValueError, r"delta_bias has shape \(8, 1\), expected \(8,\)"),
    ("initial_state", torch.randn(2, 8, 3), ValueError, r"initial_state has shape \(2, 8, 3\), expected \(2, 8, 4\)"),
    ("u", torch.randint(0, 3, (2, 8, 5)), TypeError, r"u has dtype torch.int64, expected float16, bfloat16"),
    ("A", -torch.rand(8, 4, dtype=torch.complex64), TypeError, r"A has dtype torch.complex64"),
])
def test_validation_names_the_argument_and_the_expected_shape(name, value, error, match):
    x = inputs()
    x[name] = value
    with pytest.raises(error, match="selective_scan: " + match):
        selective_scan(**x, backend="reference")


def test_B_and_C_must_have_the_same_groups():
    """As in mamba_ssm: the backends index B and C with one group layout."""
    x = inputs()
    x["C"] = torch.randn(2, 4, 4, 5)
    with pytest.raises(ValueError, match=r"selective_scan: B has shape \(2, 4, 5\) and C \(2, 4, 4, 5\); they must "
                                         r"have the same shape"):
        selective_scan(**x, backend="reference")


# ------------------------------------------------------------------------------------------------------
# selective_state_update

def step_inputs(b=2, d=8, N=4, G=None):
    BC = (lambda: torch.randn(b, N)) if G is None else (lambda: torch.randn(b, G, N))
    return dict(state=torch.randn(b, d, N), x=torch.randn(b, d), dt=torch.rand(b, d), A=-torch.rand(d, N), B=BC(),
                C=BC())


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_state_update_dispatch_on_cpu(backend):
    s = step_inputs(G=2)
    s_ref = dict(s, state=s["state"].clone())
    y = selective_state_update(**s, backend=backend)
    want = selective_state_update_ref(**s_ref)
    assert torch.equal(y, want) and torch.equal(s["state"], s_ref["state"])


@pytest.mark.parametrize("name,value,error,match", [
    ("state", torch.randn(2, 8), ValueError, r"state has shape \(2, 8\), expected \(batch, dim, N\)"),
    ("state", 1, TypeError, r"state must be a tensor of shape \(batch, dim, N\), got a int"),
    ("x", torch.randn(2, 7), ValueError, r"x has shape \(2, 7\), expected \(2, 8\)"),
    ("dt", None, ValueError, r"dt is required, expected a tensor of shape \(2, 8\)"),
    ("A", torch.randn(8, 3), ValueError, r"A has shape \(8, 3\), expected \(8, 4\)"),
    ("B", torch.randn(2, 3, 4), ValueError, r"B has shape \(2, 3, 4\): its 3 groups must divide dim = 8"),
    ("C", torch.randn(2, 5), ValueError, r"C has shape \(2, 5\), expected \(2, 4\)"),
    ("C", torch.randn(2, 2, 2, 4), ValueError, r"C has shape \(2, 2, 2, 4\), expected \(2, 4\) or \(2, G, 4\)"),
])
def test_state_update_validation(name, value, error, match):
    s = step_inputs()
    s[name] = value
    with pytest.raises(error, match="selective_state_update: " + match):
        selective_state_update(**s)


def test_state_update_optional_argument_shapes():
    s = step_inputs()
    with pytest.raises(ValueError, match=r"selective_state_update: D has shape \(4,\), expected \(8,\)"):
        selective_state_update(**s, D=torch.randn(4))
    with pytest.raises(ValueError, match=r"selective_state_update: z has shape \(2, 4\), expected \(2, 8\)"):
        selective_state_update(**s, z=torch.randn(2, 4))


def test_runs_fused_cpu_kernel_names_the_cpu_kernel_only():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert scan_api.runs_fused_cpu_kernel("auto", cpu) and scan_api.runs_fused_cpu_kernel("cpu", cpu)
    assert not scan_api.runs_fused_cpu_kernel("reference", cpu)
    assert not scan_api.runs_fused_cpu_kernel("auto", meta)                 # other devices: the reference
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        scan_api.runs_fused_cpu_kernel("nope", cpu)
