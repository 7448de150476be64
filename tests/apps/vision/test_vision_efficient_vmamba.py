"""EfficientVMamba: upstream key names and shapes (from the training logs' module printout), parameter counts
against the logs, and ES2D against a float64 reference of upstream's strided EfficientScan / EfficientMerge."""

import math

import pytest
import torch
import torch.nn.functional as F

import mambakit.apps.vision  # noqa: F401
import timm
from mambakit.apps.vision.efficient_vmamba import SS2D, EfficientVSSM, PatchMerging2D
from mambakit.kernels.reference import selective_scan_ref


def _bn(prefix, c):
    return {prefix + "weight": (c,), prefix + "bias": (c,), prefix + "running_mean": (c,),
            prefix + "running_var": (c,), prefix + "num_batches_tracked": ()}


def upstream_shapes(d: int, depths, num_classes=1000) -> dict:
    """Keys and shapes of TerryPei/EfficientVMamba's EfficientVSSM (MLP_RATIO 0, DOWNSAMPLE v1)."""
    dims = [d * 2 ** i for i in range(4)]
    s = {"patch_embed.0.weight": (d, 3, 4, 4), "patch_embed.0.bias": (d,), "patch_embed.2.weight": (d,),
         "patch_embed.2.bias": (d,), "classifier.norm.weight": (dims[3],), "classifier.norm.bias": (dims[3],),
         "classifier.head.weight": (num_classes, dims[3]), "classifier.head.bias": (num_classes,)}
    for i in range(2):
        C, di, R = dims[i], 2 * dims[i], math.ceil(dims[i] / 16)
        for j in range(depths[i]):
            p = f"layers.{i}.blocks.{j}."
            s.update({p + "norm.weight": (C,), p + "norm.bias": (C,),
                      p + "op.x_proj_weight": (4, R + 32, di), p + "op.dt_projs_weight": (4, di, R),
                      p + "op.dt_projs_bias": (4, di), p + "op.A_logs": (4 * di, 16), p + "op.Ds": (4 * di,),
                      p + "op.out_norm.weight": (di,), p + "op.out_norm.bias": (di,),
                      p + "op.in_proj.weight": (2 * di, C), p + "op.conv2d.weight": (di, 1, 3, 3),
                      p + "op.conv2d.bias": (di,), p + "op.out_proj.weight": (C, di),
                      p + "conv_branch.0.weight": (C, 1, 3, 3), p + "conv_branch.0.bias": (C,),
                      p + "conv_branch.3.weight": (C, C, 1, 1), p + "conv_branch.3.bias": (C,),
                      p + "se.norm.weight": (C,), p + "se.norm.bias": (C,),
                      p + "se.global_reduce.weight": (C // 8, C), p + "se.global_reduce.bias": (C // 8,),
                      p + "se.channel_select.weight": (C, C // 8), p + "se.channel_select.bias": (C,)})
            s.update(_bn(p + "conv_branch.1.", C))
        s.update({f"layers.{i}.downsample.reduction.weight": (2 * C, 4 * C),
                  f"layers.{i}.downsample.norm.weight": (4 * C,), f"layers.{i}.downsample.norm.bias": (4 * C,)})
    for i in (2, 3):
        C, M = dims[i], 4 * dims[i]
        for j in range(1, depths[i] + 1):
            p = f"layers.{i}.{j}."
            s.update({p + "conv_pw.0.weight": (M, C, 1, 1), p + "conv_dw.0.weight": (M, 1, 3, 3),
                      p + "se.conv_reduce.weight": (M // 8, M, 1, 1), p + "se.conv_reduce.bias": (M // 8,),
                      p + "se.conv_expand.weight": (M, M // 8, 1, 1), p + "se.conv_expand.bias": (M,),
                      p + "conv_pw2.0.weight": (C, M, 1, 1)})
            s.update(_bn(p + "conv_pw.1.", M) | _bn(p + "conv_dw.1.", M) | _bn(p + "conv_pw2.1.", C))
    p = f"layers.2.{depths[2] + 2}."
    s.update({p + "reduction.weight": (2 * dims[2], 4 * dims[2]), p + "norm.weight": (4 * dims[2],),
              p + "norm.bias": (4 * dims[2],)})
    return s


def test_state_dict_matches_upstream_names_and_shapes():
    model = timm.create_model("efficient_vmamba_tiny")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == upstream_shapes(48, (2, 2, 4, 2))


@pytest.mark.parametrize("name, log_millions", [("efficient_vmamba_tiny", 6.494), ("efficient_vmamba_small", 11.274),
                                                ("efficient_vmamba_base", 33.717)])
def test_parameter_counts_match_training_logs(name, log_millions):
    model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == log_millions


# ---------------------------------------------------------------------------------------------------------
# ES2D against upstream's strided scan and merge

def efficient_scan(x):
    """Upstream EfficientScan (step 2): (B, C, H, W) -> (B, 4, C, ceil(H/2) * ceil(W/2))."""
    B, C, H, W = x.shape
    x = F.pad(x, (0, W % 2, 0, H % 2))
    xt = x.transpose(2, 3)
    return torch.stack([x[:, :, ::2, ::2].reshape(B, C, -1), xt[:, :, ::2, 1::2].reshape(B, C, -1),
                        x[:, :, ::2, 1::2].reshape(B, C, -1), xt[:, :, 1::2, 1::2].reshape(B, C, -1)], dim=1)


def efficient_merge(ys, H, W):
    """Upstream EfficientMerge: (B, 4, C, h * w) -> (B, C, H * W)."""
    B, _, C, _ = ys.shape
    h, w = math.ceil(H / 2), math.ceil(W / 2)
    y = ys.new_zeros(B, C, 2 * h, 2 * w)
    y[:, :, ::2, ::2] = ys[:, 0].reshape(B, C, h, w)
    y[:, :, 1::2, ::2] = ys[:, 1].reshape(B, C, w, h).transpose(2, 3)
    y[:, :, ::2, 1::2] = ys[:, 2].reshape(B, C, h, w)
    y[:, :, 1::2, 1::2] = ys[:, 3].reshape(B, C, w, h).transpose(2, 3)
    return y[:, :, :H, :W].reshape(B, C, H * W)


def reference_es2d(op: SS2D, x):
    """Upstream cross_selective_scan, with K separate scans instead of one grouped scan."""
    B, d, H, W = x.shape
    xs = efficient_scan(x)
    R, N = op.dt_rank, op.d_state
    ys = []
    for k in range(4):
        x_dbl = op.x_proj_weight[k] @ xs[:, k]
        dt, Bk, Ck = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
        sl = slice(k * d, (k + 1) * d)
        ys.append(selective_scan_ref(xs[:, k], op.dt_projs_weight[k] @ dt, -torch.exp(op.A_logs[sl]), Bk, Ck,
                                     op.Ds[sl], delta_bias=op.dt_projs_bias[k], delta_softplus=True))
    y = efficient_merge(torch.stack(ys, dim=1), H, W).transpose(1, 2)
    return op.out_norm(y)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("hw", [(4, 6), (5, 7)])
def test_es2d_matches_upstream_strided_scan_forward_and_backward(hw, backend):
    """Both layouts: interleaved token-major cells (the fused CPU kernel, "auto") and channel-major ones."""
    op = SS2D(8, d_state=16, scan_backend=backend).double()
    with torch.no_grad():
        op.Ds.normal_()
        op.out_norm.weight.normal_()
    x = torch.randn(2, op.d_inner, *hw, dtype=torch.float64, requires_grad=True)
    out, ref = op.scan(x), reference_es2d(op, x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    params = [x, op.x_proj_weight, op.dt_projs_weight, op.dt_projs_bias, op.A_logs, op.Ds]
    for a, b, name in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g),
                          ["x", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")


def test_cpu_kernel_reads_the_interleaved_cells_in_place(monkeypatch):
    """On the CPU the K cells are gathered into one token-major buffer that the kernel reads and writes as it is,
    with a block-diagonal delta projection; the whole SS2D equals its channel-major form."""
    from mambakit.kernels import cpu_scan
    from mambakit.kernels.cpu_scan import is_token_major

    ok, why = cpu_scan.kernel_status(torch.float64)
    if not ok:
        pytest.skip(f"the fused CPU kernel cannot be built here: {why}")
    seen = []
    real = cpu_scan.selective_scan_cpu_projected

    def recording(u, dt_w, dt_in, *args, **kwargs):
        seen.append((is_token_major(u), u.untyped_storage().nbytes() // u.element_size(), tuple(dt_w.shape)))
        return real(u, dt_w, dt_in, *args, **kwargs)

    monkeypatch.setattr(cpu_scan, "selective_scan_cpu_projected", recording)
    torch.manual_seed(0)
    op = SS2D(8, d_state=4).double()
    ref = SS2D(8, d_state=4, scan_backend="reference").double()
    ref.load_state_dict(op.state_dict())
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)                      # (B, H, W, C): even sides, no padding
    out = op(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-10, atol=1e-12)
    K, d, P = 4, op.d_inner, 3 * 4
    assert seen == [(True, 2 * P * K * d, (K * d, K * op.dt_rank))]       # u is the gathered buffer itself
    weight = torch.randn_like(out)
    for (name, _), g, r in zip(op.named_parameters(),
                               torch.autograd.grad((out * weight).sum(), list(op.parameters())),
                               torch.autograd.grad((ref(x) * weight).sum(), list(ref.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def test_each_pixel_is_scanned_by_exactly_one_lattice_cell():
    op = SS2D(4).double()
    x = torch.zeros(1, op.d_inner, 5, 7, dtype=torch.float64, requires_grad=True)
    idxs = [o.indices(35, hw=(5, 7)) for o in op.orders]
    visits = torch.zeros(35)
    for idx in idxs:
        visits[idx.perm[idx.perm < 35]] += 1
    assert torch.all(visits == 1) and all(idx.scan_length == 12 for idx in idxs)   # 6x8 padded, 3x4 per cell


def test_patch_merging_pads_odd_sides():
    pm = PatchMerging2D(2)
    x = torch.randn(1, 3, 5, 2)
    assert pm(x).shape == (1, 2, 3, 4)


def test_model_runs_at_other_resolutions_and_head_replacement():
    model = EfficientVSSM(dims=8, depths=(1, 1, 1, 1), num_classes=4).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert model(torch.randn(1, 3, 20, 44)).shape == (1, 4)        # 5x11 grid: odd sides at every stage
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1, 1, 64)
    model.reset_classifier(9)
    assert model.get_classifier().out_features == 9 and model(torch.randn(1, 3, 32, 32)).shape == (1, 9)
    with pytest.raises(ValueError, match=r"expected images \(batch, 3, H, W\)"):
        model(torch.randn(1, 32, 32))


def test_drop_path_is_linear_over_all_blocks():
    model = EfficientVSSM(dims=8, depths=(2, 2, 4, 2), drop_path_rate=0.1)
    blocks = list(model.layers[0].blocks) + list(model.layers[1].blocks) + list(model.layers[2][1:5]) \
        + list(model.layers[3][1:3])
    rates = [getattr(b.drop_path, "p", 0.0) for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 10).tolist())
