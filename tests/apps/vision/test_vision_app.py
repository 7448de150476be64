"""The vision app end to end on a tiny image folder: train, eval (confusion matrix), predict, fine-tune with a
new head, pretrained weights by zoo name (served from 127.0.0.1) and by upstream file, the recipes."""

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mambakit.apps.vision.app import APP, CONFIGS
from mambakit.apps.vision.config import DataConfig, ModelConfig, VisionRecipe
from mambakit.apps.vision.models import create_model
from mambakit.apps.vision.predict import predict
from mambakit.apps.vision.task import VisionTask
from mambakit.cli import main as cli
from mambakit.data.testing import FileServer
from mambakit.engine.config import load_config
from mambakit.zoo import WeightEntry, register_weights, unregister_weights

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def color_folder(root: Path, classes=("red", "green", "blue"), n=6, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                a = np.clip(rng.normal(0, 20, (16, 16, 3)) + COLORS[c], 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    return root


def tiny_recipe(tmp_path, root, **extra) -> Path:
    text = f"""
data: {{source: imagefolder, root: {root}, img_size: 16, val_fraction: 0.34}}
model: {{name: vim_tiny_patch16_224, kwargs: {{patch_size: 8, embed_dim: 16, depth: 1}}}}
augment: {{mixup: 0.2, cutmix: 1.0}}
train: {{epochs: 1, batch_size: 4, optimizer: {{lr: 0.001}}, early_stopping: {{monitor: val/acc, mode: max}}}}
run: {{out_dir: {tmp_path / 'runs'}, progress: false, tensorboard: false, curves: false}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_train_eval_predict_finetune(tmp_path, capsys):
    root = color_folder(tmp_path / "imgs")
    recipe = tiny_recipe(tmp_path, root)
    run = tmp_path / "runs" / "t"
    assert cli(["vision", "train", "-c", str(recipe), "--run-dir", str(run)]) == 0
    assert json.loads((run / "classes.json").read_text()) == ["blue", "green", "red"]
    assert (run / "confusion_test.png").stat().st_size > 1000

    assert cli(["vision", "eval", "--checkpoint", str(run), "--split", "test", "--plot", str(tmp_path / "cm.png"),
                "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"test/loss", "test/acc", "test/balanced_acc", "test/macro_f1"} and 0 <= metrics["test/acc"] <= 1
    assert (tmp_path / "cm.png").is_file()

    capsys.readouterr()
    image = root / "test" / "red" / "0.png"
    assert cli(["vision", "predict", str(image), "--checkpoint", str(run), "--topk", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == str(image) and len(out[0]["top"]) == 2
    assert {t["label"] for t in out[0]["top"]} <= {"blue", "green", "red"}
    assert out[0]["top"][0]["prob"] >= out[0]["top"][1]["prob"]

    two = color_folder(tmp_path / "two", classes=("red", "blue"), splits=("train",))
    ft = tmp_path / "runs" / "ft"
    assert cli(["vision", "finetune", "--pretrained", str(run), "--data", str(two), "-c", str(recipe),
                "--run-dir", str(ft), "data.val_fraction=0.5"]) == 0
    assert json.loads((ft / "classes.json").read_text()) == ["blue", "red"]
    state = torch.load(next((ft / "checkpoints").glob("step-*.pt")), weights_only=True)["model"]
    assert state["head.weight"].shape == (2, 16)


def test_pretrained_by_zoo_name_and_upstream_file(tmp_path):
    data = DataConfig(source="imagefolder", root=str(color_folder(tmp_path / "imgs")), img_size=32)
    source = create_model(ModelConfig(kwargs=dict(patch_size=8, embed_dim=16, depth=1)), data, 1000)
    upstream = {"model": source.state_dict(), "model_ema": source.state_dict(), "epoch": 1,
                "args": argparse.Namespace(model="vim")}
    buf = io.BytesIO()
    torch.save(upstream, buf)
    raw = buf.getvalue()
    with FileServer({"vim.pth": raw}) as server:
        register_weights(WeightEntry(
            name="test-vim.tiny", app="vision", description="test", builder="mambakit.apps.vision.vim:vim_tiny_patch16_224",
            config={"num_classes": 1000, "img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1},
            urls=[server.url("vim.pth")], sha256=hashlib.sha256(raw).hexdigest(),
            filename="vim.pth", converter="mambakit.apps.vision.convert:vim_from_upstream"))
        try:
            model = create_model(ModelConfig(pretrained="test-vim.tiny", kwargs=dict(patch_size=8, embed_dim=16,
                                                                                    depth=1)), data, 3)
            image = next((Path(data.root) / "test" / "red").glob("*.png"))
            top = predict([image], pretrained="test-vim.tiny", topk=3)[0]["top"]
        finally:
            unregister_weights("test-vim.tiny")
    from timm.data import ImageNetInfo
    assert top[0]["label"] == ImageNetInfo().index_to_description(top[0]["index"])      # ImageNet class names
    assert len(top) == 3 and top[0]["prob"] >= top[2]["prob"]
    assert model.head.out_features == 3
    torch.testing.assert_close(model.layers[0].mixer.in_proj.weight, source.layers[0].mixer.in_proj.weight)
    # the same file from disk, at another resolution (pos_embed resized) and with its EMA weights
    (tmp_path / "vim.pth").write_bytes(raw)
    bigger = DataConfig(source="imagefolder", root=data.root, img_size=48)
    model = create_model(ModelConfig(pretrained=str(tmp_path / "vim.pth"), pretrained_ema=True,
                                     kwargs=dict(patch_size=8, embed_dim=16, depth=1)), bigger, 3)
    assert model.pos_embed.shape == (1, 37, 16)
    with pytest.raises(ValueError, match="not a timm model"):
        create_model(ModelConfig(name="vim_tinyy"), data, 3)


def test_mixup_training_step_and_odd_batches(tmp_path):
    root = color_folder(tmp_path / "imgs")
    config = load_config(VisionRecipe, tiny_recipe(tmp_path, root))
    task = VisionTask(config)
    model = task.build_model()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = task.training_step(model, (x, y))
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="mixup/cutmix need an even batch"):
        task.training_step(model, (x[:3], y[:3]))


def test_recipes_load_and_name_existing_models():
    import timm

    import mambakit.apps.vision  # noqa: F401

    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in recipes} >= {"quick_vim_mnist.yaml", "vim_mnist.yaml", "finetune_vim_tiny_folder.yaml"}
    for path in recipes:
        config = load_config(VisionRecipe, path)
        assert timm.is_model(config.model.name), path
    assert {v.name for v in APP.verbs} == {"train", "eval", "finetune", "predict"}
    assert {w.name for w in APP.weights} >= {"vim_tiny_patch16_224.in1k", "efficient_vmamba_base.in1k"}
