"""The point-cloud app end to end on a tiny folder of meshes: train (labels, confusion matrix), eval with
renders, predict (classes, a folder, a bad file), render by order, fine-tune onto new classes with a new head,
rebuilding from a checkpoint through the zoo, and the packaged recipes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from mambakit.apps.pointcloud.app import APP, CONFIGS
from mambakit.apps.pointcloud.config import PointCloudRecipe
from mambakit.apps.pointcloud.inference import predict, read_input, rebuild_model
from mambakit.apps.pointcloud.splits import build_splits, carve, group_of
from mambakit.cli import main as cli
from mambakit.engine.config import load_config

SHAPES = {
    "box": lambda s: trimesh.creation.box(extents=s),
    "ball": lambda s: trimesh.creation.icosphere(subdivisions=2, radius=1.0).apply_scale(s),
    "ring": lambda s: trimesh.creation.torus(1.0, 0.3).apply_scale(s),
}


def mesh_folder(root: Path, classes=("box", "ball", "ring"), n_train=4, n_test=2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                SHAPES[c](rng.uniform(0.6, 1.6, 3)).export(root / split / c / f"{c}{i}.off")
    return root


def tiny_recipe(tmp_path: Path, root: Path, **extra) -> Path:
    text = f"""
data: {{source: folder, root: {root}, n_points: 128, val_fraction: 0.25}}
model: {{name: pcm_tiny, kwargs: {{embed_dim: 16, mamba_blocks: [1, 1, 1, 1], orders: [xyz, zxy, hilbert, z]}}}}
augment: {{preset: modelnet}}
eval: {{render_samples: 2, render_orders: [xyz, hilbert]}}
train: {{epochs: 1, batch_size: 4, optimizer: {{lr: 0.001}}, early_stopping: {{monitor: val/oa, mode: max}}}}
run: {{out_dir: {tmp_path / 'runs'}, progress: false, tensorboard: false, curves: false}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_splits_carve_by_group_and_keep_labels(tmp_path):
    root = mesh_folder(tmp_path / "meshes")
    config = load_config(PointCloudRecipe, tiny_recipe(tmp_path, root))
    splits = build_splits(config.data, config.augment.resolve())
    assert splits.classes == ["ball", "box", "ring"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    cloud = splits.train[0]
    assert cloud.pos.shape == (128, 3) and cloud.y.shape == (1,)
    # one cloud per file here: carving keeps every group on one side and carves from each class
    names = ["cow#0", "cow#1", "pig#0", "pig#1", "bear#0", "bear_bis#2", "knot#0", "eight#0"]
    items = [type("C", (), {"name": n, "y": torch.tensor([0 if i < 6 else 1])})() for i, n in enumerate(names)]
    kept, carved = carve(items, 0.5, seed=0, seg=False, what="test")
    assert {group_of(names[i]) for i in kept}.isdisjoint({group_of(names[i]) for i in carved})
    assert group_of("bear_bis#2") == group_of("bear#0") == "bear"
    assert {int(items[i].y) for i in carved} == {0, 1}


def test_train_eval_predict_render_finetune(tmp_path, capsys):
    root = mesh_folder(tmp_path / "meshes")
    run = tmp_path / "runs" / "t"
    assert cli(["pointcloud", "train", "-c", str(tiny_recipe(tmp_path, root)), "--run-dir", str(run)]) == 0
    labels = json.loads((run / "labels.json").read_text())
    assert labels == {"task": "cls", "classes": ["ball", "box", "ring"]}
    assert (run / "confusion_test.png").stat().st_size > 1000

    plots = tmp_path / "plots"
    assert cli(["pointcloud", "eval", "--checkpoint", str(run), "--plot-dir", str(plots),
                "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"test/oa", "test/macc", "test/acc/ball", "test/acc/box", "test/acc/ring"} <= set(metrics)
    assert sorted(p.name for p in plots.glob("*.png")) == ["confusion_test.png", "render_test_0.png",
                                                           "render_test_1.png", "render_test_orders.png"]

    bad = tmp_path / "broken.off"
    bad.write_text("OFF\n3 1 0\n0 0 0\n")
    results = predict([root / "test" / "ring", bad], run, topk=2)
    assert [Path(r["file"]).name for r in results] == ["ring0.off", "ring1.off", "broken.off"]
    assert "error" in results[-1] and "broken.off" in results[-1]["error"]
    for r in results[:2]:
        assert r["label"] in labels["classes"] and len(r["topk"]) == 2
        assert r["probability"] == pytest.approx(r["topk"][0][1]) and r["topk"][0][1] >= r["topk"][1][1]
    assert cli(["pointcloud", "predict", str(root / "test" / "box" / "box0.off"), "--checkpoint", str(run)]) == 0
    assert "box0.off:" in capsys.readouterr().out
    assert cli(["pointcloud", "predict", str(bad), "--checkpoint", str(run)]) == 1

    png = tmp_path / "orders.png"
    assert cli(["pointcloud", "render", str(root / "test" / "ring" / "ring0.off"), "--orders", "xyz,z",
                "--points", "256", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000

    # fine-tune onto two new classes: the head is fresh, everything else loaded
    new = mesh_folder(tmp_path / "new", classes=("box", "ring"))
    ft = tmp_path / "runs" / "ft"
    assert cli(["pointcloud", "finetune", "--pretrained", str(run), "--data", str(new), "-c",
                str(tiny_recipe(tmp_path, new)), "--run-dir", str(ft)]) == 0
    assert "left fresh" in capsys.readouterr().out
    assert json.loads((ft / "labels.json").read_text())["classes"] == ["box", "ring"]

    # a checkpoint alone rebuilds the network (no data needed), through the zoo too
    from mambakit.zoo import load_pretrained

    model = load_pretrained(str(run))
    assert sum(p.numel() for p in model.parameters()) > 0
    cloud = read_input(root / "test" / "ball" / "ball0.off", 128)
    assert cloud.pos.norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)      # unit sphere, as the training sets


def test_rebuild_needs_class_names(tmp_path):
    config = {"data": {"source": "cgal"}, "model": {"name": "pcm_tiny"}}
    with pytest.raises(ValueError, match="names no classes"):
        rebuild_model(config, {"head.weight": torch.zeros(3, 4)}, "ckpt.pt")


def test_packaged_recipes_load_and_name_registered_models():
    from mambakit.apps.pointcloud.models import model_names

    recipes = sorted(CONFIGS.glob("*.yaml"))
    names = {p.stem for p in recipes}
    for model in ("pcm", "pcm_tiny", "pointnet2_ssg", "point_transformer"):
        for data in ("modelnet40", "scanobjectnn", "shapenetpart"):
            assert f"{model}_{data}" in names
    for path in recipes:
        config = load_config(PointCloudRecipe, path)
        assert config.model.name in model_names(), path
    assert {v.name for v in APP.verbs} == {"train", "eval", "finetune", "predict", "render"}
    assert [d.name for d in APP.datasets] == ["cgal-meshes"]


def shapenetpart_folder(root: Path) -> Path:
    """A tiny ShapeNetPart-layout folder: Mugs (parts 36, 37: top / bottom half) and Caps (6, 7), normals
    included, with train / val / test lists."""
    from mambakit.apps.pointcloud.data import SHAPENETPART_SYNSETS

    rng = np.random.default_rng(0)
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text(
        "".join(f"{name}\t{synset}\n" for name, synset in SHAPENETPART_SYNSETS.items()))
    lists = {"train": [], "val": [], "test": []}
    for name, parts in (("Mug", (36, 37)), ("Cap", (6, 7))):
        synset = SHAPENETPART_SYNSETS[name]
        (root / synset).mkdir()
        for i, split in enumerate(["train"] * 4 + ["val", "test"]):
            pos = rng.normal(size=(160, 3))
            normals = pos / np.linalg.norm(pos, axis=1, keepdims=True)
            labels = np.where(pos[:, 1] > 0, parts[0], parts[1])
            np.savetxt(root / synset / f"s{i}.txt", np.c_[pos, normals, labels], fmt="%.6f")
            lists[split].append(f"shape_data/{synset}/s{i}")
    for split, items in lists.items():
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(items))
    return root


def test_part_segmentation_train_eval_predict_render(tmp_path):
    root = shapenetpart_folder(tmp_path / "snp")
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(f"""
data: {{source: shapenetpart, root: {root}, n_points: 128, features: xyz_normals_height}}
model: {{name: pcm_tiny, loss: poly1_focal, kwargs: {{embed_dim: 16, mamba_blocks: [1, 1, 1, 1], orders: [xyz, zxy, hilbert, z]}}}}
augment: {{preset: shapenetpart}}
eval: {{render_samples: 1, render_orders: []}}
train: {{epochs: 1, batch_size: 4, optimizer: {{lr: 0.001}}, early_stopping: {{monitor: val/instance_miou, mode: max}}}}
run: {{out_dir: {tmp_path / 'runs'}, progress: false, tensorboard: false, curves: false}}
""")
    run = tmp_path / "runs" / "seg"
    assert cli(["pointcloud", "train", "-c", str(recipe), "--run-dir", str(run)]) == 0
    labels = json.loads((run / "labels.json").read_text())
    assert labels["task"] == "seg" and labels["parts_of_category"][11] == [36, 37]
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert {"test/instance_miou", "test/class_miou", "test/miou/Mug", "test/miou/Cap"} <= set(summary)
    assert cli(["pointcloud", "eval", "--checkpoint", str(run), "--plot-dir", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "render_test_0.png").is_file()

    # a Mug's points are predicted among the Mug's own parts and written as a labelled PLY
    mug = root / "03797390" / "s5.txt"
    results = predict([mug], run, category="Mug", out_dir=tmp_path / "out")
    assert set(results[0]["parts"]) == {"Mug 0", "Mug 1"} and sum(results[0]["parts"].values()) == 128
    cloud = trimesh.load(results[0]["ply"])
    ply_labels = cloud.metadata["_ply_raw"]["vertex"]["data"]["label"]
    assert len(ply_labels) == 128 and set(ply_labels.tolist()) <= {36, 37}
    with pytest.raises(ValueError, match="needs the shape category"):
        predict([mug], run)
    png = tmp_path / "parts.png"
    assert cli(["pointcloud", "render", str(mug), "--by", "prediction", "--checkpoint", str(run), "--category",
                "Mug", "--out", str(png)]) == 0 and png.is_file()


def test_pretrained_upstream_checkpoint_loads_all_but_a_resized_head(tmp_path, capsys):
    from mambakit.apps.pointcloud.models import create_model
    from mambakit.apps.pointcloud.task import PointCloudTask

    root = mesh_folder(tmp_path / "meshes")
    small = dict(embed_dim=16, mamba_blocks=[1, 1, 1, 1], orders=["xyz", "zxy", "hilbert", "z"])
    upstream = create_model("pcm_tiny", 40, **small).state_dict()           # a 40-class "ModelNet40" model
    path = tmp_path / "pcm_upstream.pth"                                     # openpoints' layout: DDP-wrapped
    torch.save({"model": {f"module.{k}": v for k, v in upstream.items()}, "epoch": 250}, path)
    config = load_config(PointCloudRecipe, tiny_recipe(tmp_path, root), [f"model.pretrained={path}"])
    model = PointCloudTask(config).build_model()                           # 3 classes here
    out = capsys.readouterr().out
    assert f"pretrained weights from {path}: loaded 176 tensors" in out
    assert "left fresh (as initialised): 2: prediction.head.4.0.weight, prediction.head.4.0.bias" in out
    own = model.state_dict()
    assert torch.equal(own["encoder.embedding.net.0.weight"], upstream["encoder.embedding.net.0.weight"])
    assert own["prediction.head.4.0.weight"].shape[0] == 3
