"""Point-cloud plots and files: PNGs written and showing the colours asked for, PLY files read back by trimesh
(binary and ASCII), scan-order ranks equal to the order's inverse permutation, a palette of distinct colours."""

import numpy as np
import pytest
import torch
import trimesh
from matplotlib import colormaps
from matplotlib.image import imread

from mambakit.apps.pointcloud.plots import (PATH_STEPS, label_palette, order_ranks, plot_confusion_matrix,
                                            point_colors, render_cloud, render_orders, render_panels, scan_path,
                                            write_ply)
from mambakit.core.orders import PointOrder


def sphere(n: int = 150, seed: int = 0) -> np.ndarray:
    pos = np.random.default_rng(seed).normal(size=(n, 3))
    return 0.8 * pos / np.linalg.norm(pos, axis=1, keepdims=True)


def read_rgb(path) -> np.ndarray:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return (image[..., :3] * 255).round().astype(np.int64)


def has_colour(image: np.ndarray, rgb) -> bool:
    return bool((np.abs(image - np.asarray(rgb)).sum(-1) == 0).any())


# ------------------------------------------------------------------------------------------ colours

def test_palette_is_distinct_and_stable():
    colours = label_palette(50).astype(np.float64)
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(50) * 1e9
    assert gaps.min() >= 60                                         # ShapeNetPart's 50 parts tell apart
    assert colours.dtype == np.float64 and label_palette(50).dtype == np.uint8
    np.testing.assert_array_equal(label_palette(7), label_palette(50)[:7])   # label i keeps its colour
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 1000\], got 0"):
        label_palette(0)


def test_point_colors_by_labels_values_and_rgb():
    labels = np.array([0, 2, 1, 2])
    np.testing.assert_allclose(point_colors(labels, 4)[:, :3], label_palette(3)[labels] / 255)
    values = np.array([3.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(point_colors(values, 4, "viridis"), colormaps["viridis"]((values - 1) / 4))
    rgb = np.array([[255, 0, 0], [0, 0, 0], [0, 128, 255], [1, 2, 3]], dtype=np.uint8)
    np.testing.assert_allclose(point_colors(rgb, 4)[:, :3], rgb / 255)
    with pytest.raises(ValueError, match=r"expected 5 values \(one per point\), got shape \(4,\)"):
        point_colors(labels, 5)
    with pytest.raises(ValueError, match=r"float colours must lie in \[0, 1\]"):
        point_colors(rgb / 100.0, 4)


# ------------------------------------------------------------------------------------------ scan orders

@pytest.mark.parametrize("order", ["hilbert", "z_trans", "yzx"])
def test_rank_colouring_is_the_orders_inverse_permutation(order):
    pos = sphere(300)
    ranks = order_ranks(torch.as_tensor(pos), order)
    idx = PointOrder(order).indices(300, coords=torch.as_tensor(pos)[None])
    np.testing.assert_array_equal(ranks, idx.inverse[0].numpy())
    np.testing.assert_array_equal(np.argsort(ranks), idx.perm[0].numpy())
    # colour = colormap at the rank: the first point of the scan is the darkest, the last the brightest
    colours = point_colors(ranks.astype(np.float64), 300)
    np.testing.assert_allclose(colours, colormaps["viridis"](ranks / 299))
    # the drawn path visits the first PATH_STEPS points of the scan in order
    np.testing.assert_array_equal(scan_path(pos, ranks), pos[idx.perm[0].numpy()[:PATH_STEPS]])


def test_scan_path_rejects_ranks_that_are_not_a_permutation():
    with pytest.raises(ValueError, match=r"ranks must be a permutation of 0..2"):
        scan_path(np.zeros((3, 3)), np.array([0, 0, 1]))


# ------------------------------------------------------------------------------------------ figures

def test_render_cloud_shows_the_label_colours(tmp_path):
    pos = sphere()
    labels = np.where(pos[:, 1] > 0, 1, 2)                           # upper half label 1, lower half 2
    path = render_cloud(pos, labels, tmp_path / "deep" / "cloud.png", "parts", point_size=30,
                        legend=["body", "top", "bottom"])
    image = read_rgb(path)
    palette = label_palette(3)
    assert has_colour(image, palette[1]) and has_colour(image, palette[2])
    assert has_colour(image, palette[0])                              # label 0 is in the legend only
    bare = read_rgb(render_cloud(pos, np.full(len(pos), 2), tmp_path / "one.png", point_size=30))
    assert has_colour(bare, palette[2]) and not has_colour(bare, palette[1])


def test_render_orders_and_panels_write_pngs(tmp_path):
    pos = sphere(200)
    path = render_orders(pos, ["xyz", "hilbert", "z", "zyx"], tmp_path / "orders.png", "four orders")
    image = read_rgb(path)
    assert has_colour(image, [255, 0, 0])                             # the red start dots of the paths
    assert image.shape[1] > image.shape[0]                            # panels side by side
    panels = [{"colors": np.arange(200) % 3, "title": "truth"}, {"colors": None, "title": "height"}]
    assert render_panels(pos, panels, tmp_path / "panels.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"panel 0 has unknown keys \['colour'\]"):
        render_panels(pos, [{"colour": None}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"pos must be a non-empty \(N, 3\) array"):
        render_cloud(np.zeros((5, 2)), None, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="finite"):
        render_cloud(np.full((5, 3), np.nan), None, tmp_path / "bad.png")


def test_confusion_matrix_png(tmp_path):
    matrix = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 0]])
    path = plot_confusion_matrix(matrix, ["chair", "table", "lamp"], tmp_path / "cm.png", "val")
    image = read_rgb(path)
    assert image.std() > 10                                           # not a blank canvas
    with pytest.raises(ValueError, match=r"matrix has shape \(3, 3\), expected \(2, 2\) for 2 class names"):
        plot_confusion_matrix(matrix, ["chair", "table"], tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------ PLY

@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip_through_trimesh(tmp_path, binary):
    pos = sphere(64).astype(np.float32)
    labels = np.arange(64) % 5
    colours = np.random.default_rng(1).integers(0, 256, (64, 3)).astype(np.uint8)
    path = write_ply(tmp_path / "cloud.ply", pos, colors=colours, labels=labels, binary=binary)
    header = path.read_bytes().split(b"end_header\n")[0].decode("ascii")
    assert ("binary_little_endian" in header) == binary and "property int label" in header
    cloud = trimesh.load(path)
    assert isinstance(cloud, trimesh.PointCloud)
    np.testing.assert_array_equal(cloud.vertices, pos)                # float32 exactly, also in ASCII
    np.testing.assert_array_equal(cloud.colors[:, :3], colours)
    read_labels = np.asarray(cloud.metadata["_ply_raw"]["vertex"]["data"]["label"]).reshape(-1)
    np.testing.assert_array_equal(read_labels, labels)


def test_ply_colours_default_to_the_label_palette_or_grey(tmp_path):
    pos = torch.rand(10, 3)
    labels = torch.tensor([0, 1, 2, 3, 4] * 2)
    cloud = trimesh.load(write_ply(tmp_path / "labels.ply", pos, labels=labels))
    np.testing.assert_array_equal(cloud.colors[:, :3], label_palette(5)[labels.numpy()])
    floats = write_ply(tmp_path / "floats.ply", pos, colors=np.full((10, 3), 0.5))
    np.testing.assert_array_equal(trimesh.load(floats).colors[:, :3], np.full((10, 3), 128))
    plain = trimesh.load(write_ply(tmp_path / "plain.ply", pos))
    assert (plain.colors[:, :3] == 200).all()
    assert not list(tmp_path.glob("*.tmp"))                           # written by rename, no leftovers


def test_ply_errors_name_the_argument(tmp_path):
    pos = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(4,\) integers"):
        write_ply(tmp_path / "x.ply", pos, labels=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"colors must be \(N, 3\) = \(4, 3\) RGB"):
        write_ply(tmp_path / "x.ply", pos, colors=np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"integer colours must lie in 0..255"):
        write_ply(tmp_path / "x.ply", pos, colors=np.full((4, 3), 300))
