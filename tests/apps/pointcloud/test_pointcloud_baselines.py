"""PointNet++ SSG, Point Transformer and DGCNN: the calling convention, gradients, batch independence, published
parameter counts re-derived from the reference layer lists, and layers against plain loop references."""

import pytest
import torch

from mambakit.apps.pointcloud import baselines
from mambakit.apps.pointcloud.baselines import BASELINES, EdgeConv, _knn_edges

TINY = {
    "pointnet2_ssg": dict(npoints=(16, 8), radii=(0.3, 0.6), nsamples=(6, 4),
                          sa_widths=((8, 8), (8, 16), (16, 32)), fp_widths=((16,), (16,), (8, 8)),
                          head_widths=(16,)),
    "point_transformer": dict(dims=(8, 16, 16), k=4),
    "dgcnn": dict(k=5, edge_widths=(8, 8), emb_dims=16, head_widths=(16, 8)),
}
SEG = ["pointnet2_ssg", "point_transformer"]


def _inputs(b=2, n=40, c=3):
    pos = torch.rand(b, n, 3)
    x = torch.cat([pos, torch.randn(b, n, c - 3)], -1) if c > 3 else pos.clone()
    return pos, x


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_classification_shapes_gradients_and_batch_independence(name):
    model = BASELINES[name](5, in_channels=4, **TINY[name])
    pos, x = _inputs(c=4)
    logits = model(pos, x)
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    model.eval()
    with torch.no_grad():
        both = model(pos, x)
        assert torch.equal(both, model(pos, x))                                 # deterministic in eval
        torch.testing.assert_close(model(pos[1:], x[1:]), both[1:], rtol=1e-5, atol=1e-5)  # clouds don't mix


@pytest.mark.parametrize("name", SEG)
def test_segmentation_shapes_gradients_and_category_effect(name):
    model = BASELINES[name](7, in_channels=6, task="seg", n_categories=3, **TINY[name])
    pos, x = _inputs(c=6)
    category = torch.tensor([0, 2])
    logits = model(pos, x, category)
    assert logits.shape == (2, 40, 7)
    logits.square().sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    model.eval()
    with torch.no_grad():
        out = model(pos, x, category)
        assert torch.equal(out, model(pos, x, category))
        torch.testing.assert_close(model(pos[:1], x[:1], category[:1]), out[:1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(pos, x, torch.tensor([1, 2]))[0], out[0])   # the category is used


def test_pointnet2_default_size_follows_a_cloud_smaller_than_its_centre_counts():
    model = BASELINES["pointnet2_ssg"](40).eval()             # 512 and 128 centres asked of 100 points
    pos, x = _inputs(n=100)
    with torch.no_grad():
        assert model(pos, x).shape == (2, 40)


def test_point_transformer_tiny_clouds_run_down_to_one_point():
    model = BASELINES["point_transformer"](3, dims=(8, 8, 8, 8), k=16).eval()   # 9 -> 3 -> 1 -> 1 points
    pos, x = _inputs(n=9)
    with torch.no_grad():
        assert model(pos, x).shape == (2, 3)


def test_parameter_counts_at_published_sizes():
    counts = {name: sum(p.numel() for p in build(40).parameters()) for name, build in BASELINES.items()}
    lin = lambda a, b, bias=True: a * b + (b if bias else 0)      # noqa: E731
    bn = lambda c: 2 * c                                          # noqa: E731
    # PointNet++ SSG cls (1x1 conv with bias + BN per layer; the first layer sees relative xyz + x = 6 channels)
    mlp = lambda ch: sum(lin(a, b) + bn(b) for a, b in zip(ch[:-1], ch[1:]))   # noqa: E731
    pn2 = (mlp([6, 64, 64, 128]) + mlp([131, 128, 128, 256]) + mlp([259, 256, 512, 1024])
           + lin(1024, 512) + bn(512) + lin(512, 256) + bn(256) + lin(256, 40))
    assert counts["pointnet2_ssg"] == pn2 == 1475880
    # DGCNN (conv1..conv5 without bias, bn1..bn7, linear1 without bias)
    dg = (lin(6, 64, False) + lin(128, 64, False) + lin(128, 128, False) + lin(256, 256, False)
          + bn(64) + bn(64) + bn(128) + bn(256) + lin(512, 1024, False) + bn(1024)
          + lin(2048, 512, False) + bn(512) + lin(512, 256) + bn(256) + lin(256, 40))
    assert counts["dgcnn"] == dg == 1809576
    # Point Transformer (PyG example): per block lin_in, lin_out, pos_nn 3-64-C, attn_nn C-64-C, 3 bias-free C x C
    block = lambda c: 2 * lin(c, c) + lin(3, 64) + lin(64, c) + lin(c, 64) + lin(64, c) + 3 * c * c  # noqa: E731
    dims = [32, 64, 128, 256, 512]
    pt = (lin(3, 32) + bn(32) + sum(block(c) for c in dims)
          + sum(lin(a, b) + bn(b) for a, b in zip(dims[:-1], dims[1:])) + lin(512, 64) + lin(64, 40))
    assert counts["point_transformer"] == pt


def test_edge_conv_equals_a_loop_reference():
    conv = EdgeConv(3, 4).double().eval()
    with torch.no_grad():
        conv.mlp.norms[0].running_mean.uniform_(-0.5, 0.5)
        conv.mlp.norms[0].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    nbr = torch.randint(0, 7, (2, 7, 3))
    got = conv(x, nbr)
    lin, norm = conv.mlp.linears[0], conv.mlp.norms[0]
    for b in range(2):
        for i in range(7):
            edges = torch.stack([torch.cat([x[b, j] - x[b, i], x[b, i]]) for j in nbr[b, i].tolist()])
            h = (lin(edges) - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
            torch.testing.assert_close(got[b, i], torch.nn.functional.leaky_relu(h, 0.2).amax(0))


def test_knn_edges_are_each_points_k_nearest_others_per_cloud():
    pos = torch.rand(2, 9, 3, dtype=torch.float64)
    edges = _knn_edges(pos, 3)
    for b in range(2):
        for i in range(9):
            d = ((pos[b] - pos[b, i]) ** 2).sum(-1)
            nearest_others = sorted(range(9), key=lambda j: (d[j].item(), j))[:4]
            sources = edges[0, edges[1] == b * 9 + i].tolist()
            assert sorted(sources) == sorted(b * 9 + j for j in nearest_others)   # self + 3 others


def test_bad_inputs_get_clear_errors():
    model = BASELINES["pointnet2_ssg"](5, **TINY["pointnet2_ssg"])
    pos, x = _inputs()
    with pytest.raises(ValueError, match=r"pointnet2_ssg: pos must have shape \(batch, points, 3\), got \(40, 3\)"):
        model(pos[0], x)
    with pytest.raises(ValueError, match=r"x must have shape \(batch=2, points=40, in_channels=3\), got \(2, 40, 4\)"):
        model(pos, torch.rand(2, 40, 4))
    seg = BASELINES["point_transformer"](4, task="seg", n_categories=3, **TINY["point_transformer"])
    with pytest.raises(ValueError, match=r"point_transformer: category must be int64 of shape \(batch=2,\), got None"):
        seg(pos, x)
    with pytest.raises(ValueError, match=r"category values must lie in \[0, 3\), got 0..3"):
        seg(pos, x, torch.tensor([0, 3]))
    with pytest.raises(NotImplementedError, match="dgcnn: part segmentation is not implemented"):
        BASELINES["dgcnn"](4, task="seg", n_categories=3)
    with pytest.raises(ValueError, match=r"task must be one of \('cls', 'seg'\), got 'det'"):
        BASELINES["point_transformer"](4, task="det")
    with pytest.raises(ValueError, match="npoints, radii, nsamples need one entry per local set abstraction"):
        BASELINES["pointnet2_ssg"](4, npoints=(16,))
    with pytest.raises(TypeError, match="unexpected keyword argument 'widths'"):
        BASELINES["dgcnn"](4, widths=(8,))
