"""The channels-last 1x1 conv / BatchNorm layers against the channel-first formulation they replace (Conv1d /
Conv2d + BatchNorm on (B, C, L) / (B, C, S, K), same parameters), in float64: outputs, running statistics and
counters in train mode, outputs in eval mode, and gradients of the input and of every parameter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambakit.apps.pointcloud.baselines import SharedMLP
from mambakit.apps.pointcloud.heads import ConvBNReLU1D, ConvBNReLURes1D, PosExtraction, SegHead, pointwise_conv
from mambakit.apps.pointcloud.models import PreExtraction

TOL = dict(rtol=1e-10, atol=1e-12)


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, random parameters and running statistics, so that no identity hides a mistake."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    for name, t in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            t.fill_(3)
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
        else:
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5)
    return module


# -- the channel-first reference: upstream's formulation, reading the same modules' parameters ------------------
def _ref_seq(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Conv -> BN -> activation as nn.Sequential does on channel-first x (B, C, L...)."""
    for layer in layers:
        x = _ref_seq(layer, x) if isinstance(layer, nn.Sequential) else layer(x)
    return x


def _ref_conv_bn_relu(m: ConvBNReLU1D, x_cf: torch.Tensor) -> torch.Tensor:
    return _ref_seq(m.net, x_cf)


def _ref_res(m: ConvBNReLURes1D, x_cf: torch.Tensor) -> torch.Tensor:
    return torch.relu(_ref_seq(m.net2, _ref_seq(m.net1, x_cf)) + x_cf)


def _ref_pre_extraction(m: PreExtraction, x: torch.Tensor) -> torch.Tensor:
    b, s, k, d = x.shape
    y = _ref_conv_bn_relu(m.transfer, x.reshape(b * s, k, d).transpose(1, 2))
    for block in m.operation:
        y = _ref_res(block, y)
    return y.amax(dim=-1).view(b, s, -1)


def _ref_shared_mlp(m: SharedMLP, x: torch.Tensor) -> torch.Tensor:
    """PointNet++'s Conv2d + BatchNorm2d on (B, C, S, K), the Linear weights as (out, in, 1, 1) kernels."""
    y = x.permute(0, 3, 1, 2)
    for linear, norm, act in zip(m.linears, m.norms, m.acts):
        y = F.conv2d(y, linear.weight[:, :, None, None], linear.bias)
        if isinstance(norm, nn.BatchNorm1d):
            y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                             norm.training, norm.momentum, norm.eps)
            if norm.training:
                norm.num_batches_tracked += 1
        y = F.leaky_relu(y, act.negative_slope) if isinstance(act, nn.LeakyReLU) else (
            torch.relu(y) if isinstance(act, nn.ReLU) else y)
    return y.permute(0, 2, 3, 1)


def _check_against_reference(new: nn.Module, x_new: torch.Tensor, ref_fn, x_ref_of, to_new_layout, train: bool):
    """Run the module (channels-last) and a deep copy through the reference (channel-first); compare outputs,
    buffers (running stats, counters) and gradients of input and parameters."""
    ref = copy.deepcopy(new)
    new.train(train)
    ref.train(train)
    xa = x_new.clone().requires_grad_()
    xb = x_new.clone().requires_grad_()
    out_new = new(xa)
    out_ref = to_new_layout(ref_fn(ref, x_ref_of(xb)))
    torch.testing.assert_close(out_new, out_ref, **TOL)
    for (name, a), (_, b) in zip(new.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")
    weights = torch.randn_like(out_new)
    (out_new * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (name, a), (_, b) in zip(new.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
    norms = [m for m in new.modules() if isinstance(m, nn.BatchNorm1d)]
    if norms:   # train mode moved the counter (so the buffers compared above saw an update), eval did not
        assert int(norms[0].num_batches_tracked) == (4 if train else 3)


def _cf(x: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, C, L)."""
    return x.transpose(1, 2)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_relu_matches_channel_first(train, bias):
    torch.manual_seed(0)
    m = _randomise(ConvBNReLU1D(7, 5, bias=bias))
    _check_against_reference(m, torch.randn(3, 11, 7, dtype=torch.float64), _ref_conv_bn_relu, _cf, _cf, train)


@pytest.mark.parametrize("train", [True, False])
def test_residual_block_matches_channel_first(train):
    torch.manual_seed(1)
    m = _randomise(ConvBNReLURes1D(6, res_expansion=1.5, bias=True), seed=1)
    _check_against_reference(m, torch.randn(4, 9, 6, dtype=torch.float64), _ref_res, _cf, _cf, train)


@pytest.mark.parametrize("train", [True, False])
def test_pos_extraction_matches_channel_first(train):
    torch.manual_seed(2)
    m = _randomise(PosExtraction(5, blocks=2, bias=False), seed=2)

    def ref(mod, x_cf):
        for block in mod.operation:
            x_cf = _ref_res(block, x_cf)
        return x_cf

    _check_against_reference(m, torch.randn(2, 10, 5, dtype=torch.float64), ref, _cf, _cf, train)


@pytest.mark.parametrize("train", [True, False])
def test_pre_extraction_matches_upstream_layout(train):
    """(B, S, k, D) groups straight through the blocks and the max over k, against (B S, D, k) convs."""
    torch.manual_seed(3)
    m = _randomise(PreExtraction(4, 6, blocks=2, bias=False), seed=3)
    x = torch.randn(2, 5, 4, 2 * 4 + 3, dtype=torch.float64)
    _check_against_reference(m, x, _ref_pre_extraction, lambda t: t, lambda t: t, train)


@pytest.mark.parametrize("train", [True, False])
def test_seg_head_matches_channel_first(train):
    """forward keeps upstream's (B, C, N) interface (through forward_last); forward_last is its transpose."""
    torch.manual_seed(4)
    m = _randomise(SegHead(4, 3, dropout=0.0), seed=4)

    def ref(mod, x_cf):
        n = x_cf.shape[-1]
        pooled = torch.cat([x_cf.amax(-1, keepdim=True), x_cf.mean(-1, keepdim=True)], dim=1)
        return _ref_seq(mod.head, torch.cat([x_cf, pooled.expand(-1, -1, n)], dim=1))

    x = torch.randn(3, 4, 8, dtype=torch.float64)
    same = copy.deepcopy(m).train(train)
    _check_against_reference(m, x, ref, lambda t: t, lambda t: t, train)
    torch.testing.assert_close(same.forward_last(_cf(x)), _cf(m.train(train)(x)), **TOL)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("act", ["relu", "leaky"])
def test_shared_mlp_matches_conv2d_batchnorm2d(train, act):
    torch.manual_seed(5)
    kw = dict(act=lambda: nn.LeakyReLU(0.2), bias=False) if act == "leaky" else {}
    m = _randomise(SharedMLP([5, 7, 6], **kw), seed=5)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    _check_against_reference(m, x, _ref_shared_mlp, lambda t: t, lambda t: t, train)


def test_shared_mlp_without_norm_and_last_activation_matches_reference():
    torch.manual_seed(6)
    m = _randomise(SharedMLP([3, 8, 4], norm=False, last_act=False), seed=6)
    x = torch.randn(2, 1, 5, 3, dtype=torch.float64)
    _check_against_reference(m, x, _ref_shared_mlp, lambda t: t, lambda t: t, True)
    assert (m(x) < 0).any()          # no activation after the last layer


def test_parameter_names_and_shapes_are_upstreams():
    keys = {k: tuple(v.shape) for k, v in ConvBNReLURes1D(4, bias=True).state_dict().items()}
    assert keys == {"net1.0.weight": (4, 4, 1), "net1.0.bias": (4,), "net1.1.weight": (4,), "net1.1.bias": (4,),
                    "net1.1.running_mean": (4,), "net1.1.running_var": (4,), "net1.1.num_batches_tracked": (),
                    "net2.0.weight": (4, 4, 1), "net2.0.bias": (4,), "net2.1.weight": (4,), "net2.1.bias": (4,),
                    "net2.1.running_mean": (4,), "net2.1.running_var": (4,), "net2.1.num_batches_tracked": ()}


def test_pointwise_conv_rejects_grouped_and_wider_kernels():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="groups 1"):
        pointwise_conv(nn.Conv1d(4, 4, 1, groups=2), x)
    with pytest.raises(ValueError, match="1x1"):
        pointwise_conv(nn.Conv1d(4, 4, 3), x)
    with pytest.raises(ValueError, match="expects 3"):
        pointwise_conv(nn.Conv1d(3, 4, 1), x)
    conv = nn.Conv2d(4, 2, 1).double()
    xc = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(pointwise_conv(conv, xc.permute(0, 2, 3, 1)), conv(xc).permute(0, 2, 3, 1), **TOL)
