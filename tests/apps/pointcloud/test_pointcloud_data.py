"""Point-cloud data: transforms against their formulas, batching, mesh sampling, and every reader on tiny fake
files of its format, including the bad inputs each must name."""

import json
import math
import warnings

import h5py
import numpy as np
import pytest
import torch

from mambakit.apps.pointcloud import data as pcd
from mambakit.apps.pointcloud.data import (CenterAndNormalize, Compose, FirstPoints, FPSThenRandom, Jitter,
                                           NormalizeUnitSphere, PointCloudDataset, RandomRotate, RandomScale,
                                           SamplePoints, ScaleAndTranslate, collate_points, make_cloud,
                                           read_mesh_folder, read_modelnet40_h5, read_modelnet_normal, read_off,
                                           read_point_file, read_scanobjectnn_h5, read_shapenetpart, sample_mesh)
from mambakit.apps.pointcloud.ops import farthest_point_sample
from mambakit.data import DataError


def cloud(n=20, seed=0, normals=False, per_point_y=False, name="c"):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, 3, generator=g)
    x = None
    if normals:
        x = torch.randn(n, 3, generator=g)
        x = x / x.norm(dim=1, keepdim=True)
    y = torch.arange(n) if per_point_y else [3]
    return make_cloud(pos, x=x, x_kind="normal" if normals else None, y=y, name=name)


# ----------------------------------------------------------------------------------------------- transforms

def test_first_and_sample_points_keep_per_point_fields_aligned():
    c = cloud(20, normals=True, per_point_y=True)
    first = FirstPoints(5)(c.clone())
    assert torch.equal(first.pos, c.pos[:5]) and torch.equal(first.y, torch.arange(5))
    torch.manual_seed(1)
    s = SamplePoints(8)(c.clone())
    torch.manual_seed(1)
    again = SamplePoints(8)(c.clone())
    assert torch.equal(s.pos, again.pos)                       # seeded through torch's RNG
    assert len(set(s.y.tolist())) == 8                         # without replacement
    assert torch.equal(s.pos, c.pos[s.y]) and torch.equal(s.x, c.x[s.y])


def test_too_few_points_names_the_cloud():
    with pytest.raises(DataError, match=r"chair_01.*needs 30 points, the cloud has 20"):
        SamplePoints(30)(cloud(20, name="chair_01"))
    with pytest.raises(DataError, match="chair_01"):
        FPSThenRandom(25, 10)(cloud(20, name="chair_01"))


def test_fps_then_random_draws_from_the_fps_set():
    c = cloud(64, per_point_y=True)
    fps = set(farthest_point_sample(c.pos[None], 30)[0].tolist())
    out = FPSThenRandom(30, 12)(c.clone())
    assert out.pos.shape == (12, 3) and set(out.y.tolist()) <= fps and len(set(out.y.tolist())) == 12


def test_scale_and_translate_matches_its_formula():
    c = cloud(10, normals=True)
    torch.manual_seed(3)
    out = ScaleAndTranslate((0.5, 2.0), shift=0.3)(c.clone())
    torch.manual_seed(3)
    s = torch.rand(3) * 1.5 + 0.5
    t = torch.rand(3) * 0.6 - 0.3
    torch.testing.assert_close(out.pos, c.pos * s + t)
    normals = c.x / s
    torch.testing.assert_close(out.x, normals / normals.norm(dim=1, keepdim=True))
    assert not torch.allclose(s, s[0].expand(3))               # anisotropic


def test_random_scale_and_center_normalize():
    c = cloud(15)
    torch.manual_seed(0)
    out = RandomScale((0.9, 1.1))(c.clone())
    torch.manual_seed(0)
    torch.testing.assert_close(out.pos, c.pos * (torch.rand(3) * 0.2 + 0.9))
    n = CenterAndNormalize()(cloud(15))
    torch.testing.assert_close(n.pos.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    assert n.pos.norm(dim=1).max().item() == pytest.approx(1.0)
    centred = CenterAndNormalize(normalize=False)(c.clone())
    torch.testing.assert_close(centred.pos, c.pos - c.pos.mean(0))
    torch.testing.assert_close(NormalizeUnitSphere()(c.clone()).pos, n.pos)
    with pytest.raises(DataError, match="coincide"):
        CenterAndNormalize()(make_cloud(torch.ones(4, 3), name="flat"))


def test_rotation_about_gravity_keeps_height_and_turns_normals():
    c = cloud(30, normals=True)
    torch.manual_seed(5)
    out = RandomRotate(axis=1)(c.clone())
    torch.testing.assert_close(out.pos[:, 1], c.pos[:, 1])
    torch.testing.assert_close(out.pos.norm(dim=1), c.pos.norm(dim=1))
    # the same rotation applied to positions and normals: dot products are preserved
    torch.testing.assert_close((out.pos * out.x).sum(1), (c.pos * c.x).sum(1))
    torch.manual_seed(5)
    angle = float(torch.rand(1) * 2 * math.pi - math.pi)
    expected_x = math.cos(angle) * c.pos[:, 0] + math.sin(angle) * c.pos[:, 2]
    torch.testing.assert_close(out.pos[:, 0], expected_x)


def test_jitter_is_clipped_and_compose_chains():
    c = cloud(200)
    torch.manual_seed(0)
    out = Jitter(sigma=0.02, clip=0.05)(c.clone())
    torch.manual_seed(0)
    noise = torch.randn(200, 3) * 0.02
    torch.testing.assert_close(out.pos, c.pos + noise.clamp(-0.05, 0.05))
    assert (noise.abs() > 0.05).any()                          # the clip was exercised
    chain = Compose([FirstPoints(10), CenterAndNormalize()])
    torch.testing.assert_close(chain(c.clone()).pos, CenterAndNormalize()(FirstPoints(10)(c.clone())).pos)


# --------------------------------------------------------------------------------------------------- batch

def test_collate_builds_features_and_labels():
    a, b = cloud(6, normals=True, name="a"), cloud(6, seed=1, normals=True, name="b")
    batch = collate_points([a, b], "xyz_height")
    assert batch["pos"].shape == (2, 6, 3) and batch["x"].shape == (2, 6, 4)
    torch.testing.assert_close(batch["x"][1, :, 3], b.pos[:, 1] - b.pos[:, 1].min())
    assert batch["y"].tolist() == [3, 3] and batch["name"] == ["a", "b"]
    normals = collate_points([a, b], "xyz_normals")["x"]
    torch.testing.assert_close(normals[0, :, 3:], a.x)
    seg = [make_cloud(torch.randn(5, 3), y=torch.arange(5), category=2, name=str(i)) for i in range(3)]
    batch = collate_points(seg, "xyz")
    assert batch["y"].shape == (3, 5) and batch["category"].tolist() == [2, 2, 2]


def test_collate_rejects_what_it_cannot_batch():
    with pytest.raises(DataError, match=r"plain.*normals"):
        collate_points([cloud(4, name="plain")], "xyz_normals")
    with pytest.raises(DataError, match=r"different sizes \[4, 5\]"):
        collate_points([cloud(4), cloud(5)], "xyz")
    with pytest.raises(ValueError, match="features must be one of"):
        collate_points([cloud(4)], "rgb")


def test_dataset_returns_transformed_copies():
    items = [cloud(10, seed=i) for i in range(3)]
    before = items[0].pos.clone()
    ds = PointCloudDataset(items, Compose([ScaleAndTranslate(), FirstPoints(4)]))
    out = ds[0]
    assert len(ds) == 3 and out.pos.shape == (4, 3)
    assert torch.equal(items[0].pos, before)


def test_nan_coordinates_are_named():
    pos = np.zeros((4, 3))
    pos[2, 1] = np.nan
    with pytest.raises(DataError, match=r"scan_7.*1 of 4 points.*NaN.*row 2"):
        make_cloud(pos, name="scan_7")
    with pytest.raises(DataError, match=r"3 labels for 4 points"):
        make_cloud(np.zeros((4, 3)), y=[0, 1, 2], name="x")


# ---------------------------------------------------------------------------------------------------- meshes

def write_off(path, vertices, faces, header_counts_on_first_line=False):
    head = f"OFF {len(vertices)} {len(faces)} 0\n" if header_counts_on_first_line else \
        f"OFF\n# a comment\n{len(vertices)} {len(faces)} 0\n"
    body = "".join(f"{v[0]} {v[1]} {v[2]}\n" for v in vertices)
    body += "".join(f"{len(f)} {' '.join(map(str, f))}\n" for f in faces)
    path.write_text(head + body)


CUBE_V = [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
CUBE_QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]


def test_read_off_fans_polygons(tmp_path):
    write_off(tmp_path / "cube.off", CUBE_V, CUBE_QUADS)
    v, f = read_off(tmp_path / "cube.off")
    assert v.shape == (8, 3) and f.shape == (12, 3)
    assert pcd.triangle_areas(v, f).sum() == pytest.approx(6.0)
    write_off(tmp_path / "one_line.off", CUBE_V, CUBE_QUADS, header_counts_on_first_line=True)
    assert read_off(tmp_path / "one_line.off")[1].shape == (12, 3)
    write_off(tmp_path / "bad.off", CUBE_V, [(0, 1, 9)])
    with pytest.raises(DataError, match=r"bad\.off.*outside 0\.\.7"):
        read_off(tmp_path / "bad.off")


def test_sample_mesh_is_on_the_surface_area_weighted_and_seeded():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 5], [3, 0, 5], [0, 2, 5]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])                      # areas 0.5 and 3
    points, normals, face = sample_mesh(v, f, 7000, seed=4)
    assert np.mean(face == 1) == pytest.approx(3 / 3.5, abs=0.02)
    on_first = points[face == 0]
    assert np.all(on_first[:, 2] == 0) and np.all(on_first[:, 0] + on_first[:, 1] <= 1 + 1e-6)
    assert np.all(points[face == 1][:, 2] == 5)
    np.testing.assert_allclose(np.abs(normals[:, 2]), 1, atol=1e-6)
    assert np.array_equal(points, sample_mesh(v, f, 7000, seed=4)[0])
    assert not np.array_equal(points, sample_mesh(v, f, 7000, seed=5)[0])


def test_degenerate_meshes_are_errors():
    v = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]], float)
    with pytest.raises(DataError, match=r"line\.off.*zero surface area"):
        sample_mesh(v, np.array([[0, 1, 2]]), 10, what="line.off")
    with pytest.raises(DataError, match="no faces"):
        sample_mesh(v, np.zeros((0, 3), int), 10, what="empty.off")
    v[1, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        sample_mesh(v, np.array([[0, 1, 2]]), 10, what="nan.off")


def test_point_files(tmp_path):
    xyz = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)
    np.savetxt(tmp_path / "a.xyz", xyz[:, :3])
    np.savetxt(tmp_path / "b.txt", xyz, delimiter=",")
    np.save(tmp_path / "c.npy", xyz)
    p, n = read_point_file(tmp_path / "a.xyz")
    assert n is None and np.allclose(p, xyz[:, :3], atol=1e-6)
    p, n = read_point_file(tmp_path / "b.txt")
    assert np.allclose(n, xyz[:, 3:], atol=1e-6)
    assert np.array_equal(read_point_file(tmp_path / "c.npy")[1], xyz[:, 3:])
    (tmp_path / "d.xyz").write_text("1 2\n3 4\n")
    with pytest.raises(DataError, match=r"d\.xyz.*rows of x y z"):
        read_point_file(tmp_path / "d.xyz")


# --------------------------------------------------------------------------------------------------- readers

def write_h5(path, data, label, normal=None):
    with h5py.File(path, "w") as f:
        f["data"] = data
        f["label"] = label
        if normal is not None:
            f["normal"] = normal


def test_modelnet40_h5(tmp_path):
    root = tmp_path / "modelnet40_ply_hdf5_2048"
    root.mkdir()
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 16, 3)).astype(np.float32)
    write_h5(root / "ply_data_train0.h5", data[:2], np.array([[5], [7]]))
    write_h5(root / "ply_data_train1.h5", data[2:], np.array([[1]]))
    write_h5(root / "ply_data_test0.h5", data[:1], np.array([[0]]))
    (root / "shape_names.txt").write_text("\n".join(pcd.MODELNET40_CLASSES))
    train = read_modelnet40_h5(tmp_path, "train")
    assert [int(c.y) for c in train] == [5, 7, 1] and train.classes[5] == "bottle"
    assert torch.equal(train[2].pos, torch.from_numpy(data[2])) and train[0].name == "ply_data_train0.h5[0]"
    assert len(read_modelnet40_h5(root, "test")) == 1
    bad = data.copy()
    bad[0, 3, 0] = np.nan
    write_h5(root / "ply_data_test0.h5", bad[:1], np.array([[0]]))
    with pytest.raises(DataError, match=r"ply_data_test0\.h5\[0\].*NaN"):
        read_modelnet40_h5(root, "test")
    write_h5(root / "ply_data_test0.h5", data[:1], np.array([[40]]))
    with pytest.raises(DataError, match=r"labels span 40\.\.40, expected 0\.\.39"):
        read_modelnet40_h5(root, "test")


def test_scanobjectnn_h5(tmp_path):
    root = tmp_path / "h5_files" / "main_split"
    root.mkdir(parents=True)
    data = np.random.default_rng(1).normal(size=(2, 12, 3)).astype(np.float32)
    write_h5(root / "training_objectdataset_augmentedrot_scale75.h5", data, np.array([14, 0]))
    clouds = read_scanobjectnn_h5(tmp_path / "h5_files", "train")
    assert [int(c.y) for c in clouds] == [14, 0] and clouds.classes[14] == "toilet"
    with pytest.raises(DataError, match=r"test_objectdataset_augmentedrot_scale75\.h5: not found"):
        read_scanobjectnn_h5(root, "test")


def test_modelnet_normal_resampled(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    (root / "chair").mkdir(parents=True)
    (root / "airplane").mkdir()
    (root / "modelnet40_shape_names.txt").write_text("airplane\nchair\n")
    (root / "modelnet40_train.txt").write_text("chair_0001\nairplane_0002\n")
    rows = np.random.default_rng(2).normal(size=(10, 6))
    np.savetxt(root / "chair" / "chair_0001.txt", rows, delimiter=",", fmt="%.6f")
    np.savetxt(root / "airplane" / "airplane_0002.txt", rows[:4], delimiter=",", fmt="%.6f")
    clouds = read_modelnet_normal(root, "train")
    assert len(clouds) == 2 and clouds.classes == ["airplane", "chair"]
    first = clouds[0]
    assert int(first.y) == 1 and first.x_kind == "normal"
    np.testing.assert_allclose(first.x.numpy(), rows[:, 3:], atol=1e-5)
    assert clouds[1].pos.shape == (4, 3)


def write_shapenetpart(root, rows_by_shape):
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text(
        "".join(f"{name}\t{synset}\n" for name, synset in pcd.SHAPENETPART_SYNSETS.items()))
    items = []
    for (synset, shape), rows in rows_by_shape.items():
        (root / synset).mkdir(exist_ok=True)
        np.savetxt(root / synset / f"{shape}.txt", rows, fmt="%.6f")
        items.append(f"shape_data/{synset}/{shape}")
    (root / "train_test_split" / "shuffled_train_file_list.json").write_text(json.dumps(items))


def test_shapenetpart_labels_and_bad_labels(tmp_path):
    rng = np.random.default_rng(3)
    mug = np.c_[rng.normal(size=(8, 6)), [36, 37] * 4]                 # Mug owns parts 36 and 37
    bad = np.c_[rng.normal(size=(8, 6)), [36] * 7 + [12]]              # 12 is a chair part
    write_shapenetpart(tmp_path, {("03797390", "good"): mug, ("03797390", "bad"): bad})
    clouds = read_shapenetpart(tmp_path, "train")
    good = clouds[0]
    assert good.y.tolist() == [36, 37] * 4 and int(good.category) == 11 and clouds.classes[11] == "Mug"
    assert clouds.parts["Mug"] == [36, 37] and sum(len(p) for p in pcd.SHAPENETPART_PARTS.values()) == 50
    with pytest.raises(DataError, match=r"bad\.txt: part label 12 is not a part of Mug \(parts 36\.\.37"):
        clouds[1]


def test_shapenetpart_row_without_label(tmp_path):
    write_shapenetpart(tmp_path, {("03797390", "short"): np.random.default_rng(0).normal(size=(5, 6))})
    with pytest.raises(DataError, match=r"short\.txt: expected rows of at least 7 numbers"):
        read_shapenetpart(tmp_path, "train")[0]


def box_mesh(path, size=(1, 1, 1)):
    write_off(path, [tuple(c * s for c, s in zip(v, size)) for v in CUBE_V], CUBE_QUADS)


def test_mesh_folder_pyg_modelnet_layout_and_cache(tmp_path, monkeypatch):
    cache, tmp_path = tmp_path / "cache", tmp_path / "ModelNet10"
    for cls in ("chair", "desk"):
        for split in ("train", "test"):
            (tmp_path / cls / split).mkdir(parents=True)
            box_mesh(tmp_path / cls / split / f"{cls}_{split}.off", (1, 2 if cls == "desk" else 1, 1))
    train = read_mesh_folder(tmp_path, "train", n_points=64, cache_dir=cache)
    assert train.classes == ["chair", "desk"] and [int(c.y) for c in train] == [0, 1]
    assert train[0].pos.shape == (64, 3) and train[0].x_kind == "normal"
    assert len(list(cache.glob("*.npy"))) == 2
    monkeypatch.setattr(pcd, "load_mesh", lambda path: pytest.fail("the cached samples were not used"))
    again = read_mesh_folder(tmp_path, "train", n_points=64, cache_dir=cache)
    assert torch.equal(again[1].pos, train[1].pos)
    monkeypatch.undo()
    test = read_mesh_folder(tmp_path, "test", n_points=64, cache_dir=cache)
    assert len(test) == 2 and test[1].pos[:, 1].max() > 1.9       # the desk box is 2 high


def test_user_folder_skips_bad_files_and_counts_them(tmp_path):
    (tmp_path / "train" / "box").mkdir(parents=True)
    (tmp_path / "train" / "scan").mkdir(parents=True)
    for i in range(3):
        box_mesh(tmp_path / "train" / "box" / f"b{i}.off", (1, 1 + i, 1))
    write_off(tmp_path / "train" / "box" / "flat.off", CUBE_V, [(0, 0, 1)])                   # zero area
    np.save(tmp_path / "train" / "scan" / "s.npy", np.random.default_rng(0).normal(size=(30, 3)))
    nan = np.ones((30, 3))
    nan[4] = np.nan
    np.savetxt(tmp_path / "train" / "scan" / "nan.xyz", nan)
    with pytest.warns(UserWarning) as caught:
        clouds = read_mesh_folder(tmp_path, "train", n_points=32, cache_dir=tmp_path / "cache")
    messages = [str(w.message) for w in caught]
    assert any("flat.off" in m and "zero surface area" in m for m in messages)
    assert any("nan.xyz" in m and "NaN" in m for m in messages)
    assert any("skipped 2 of 6 files" in m for m in messages)
    assert len(clouds) == 4 and sorted(p.rsplit("/", 1)[-1] for p, _ in clouds.skipped) == ["flat.off", "nan.xyz"]
    assert clouds.classes == ["box", "scan"]


def test_user_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        read_mesh_folder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    write_off(tmp_path / "a" / "flat.off", CUBE_V, [(0, 0, 1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"no usable mesh or point files \(1 skipped"):
            read_mesh_folder(tmp_path, cache_dir=tmp_path / "cache")
