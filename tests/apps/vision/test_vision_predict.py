"""`vision predict` sees what the evaluation loop sees: the same images through the run's evaluation transform
(not the augmenting training one) give the probabilities and labels of the engine's `evaluate`, twice in a row.
Both data paths: image files (timm's resize + centre crop) and the embedded digits (resized in torch)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mambakit.apps.vision.config import VisionRecipe
from mambakit.apps.vision.data import stratified_split
from mambakit.apps.vision.predict import predict
from mambakit.apps.vision.task import VisionTask
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer, evaluate

from test_vision_app import color_folder


def _eval_loop_probs(config, run, split="test"):
    """softmax of the logits the engine's evaluation loop computes on `split`, and its metrics."""
    task = VisionTask(config, load_pretrained=False)
    seen = {}
    compute = task.compute_metrics

    def spy(outputs, name):
        seen[name] = outputs
        return compute(outputs, name)

    task.compute_metrics = spy
    metrics = evaluate(task, run, split=split)
    return torch.softmax(seen[split]["logits"].double(), dim=1).numpy(), seen[split]["target"].numpy(), metrics, task


def _prob_matrix(results, num_classes):
    probs = np.zeros((len(results), num_classes))
    for row, r in zip(probs, results):
        for t in r["top"]:
            row[t["index"]] = t["prob"]
    return probs


def _recipe(tmp_path, data: str, model: str, augment: str) -> VisionRecipe:
    path = tmp_path / "r.yaml"
    path.write_text(f"""
data: {data}
model: {{name: vim_tiny_patch16_224, kwargs: {model}}}
augment: {augment}
train: {{epochs: 1, batch_size: 8, optimizer: {{lr: 0.003}}}}
run: {{out_dir: {tmp_path / 'runs'}, progress: false, tensorboard: false, curves: false}}
""")
    return load_config(VisionRecipe, path)


def test_predict_on_image_files_equals_the_evaluation_loop(tmp_path):
    root = color_folder(tmp_path / "imgs", n=5)
    # strong augmentation, so that predicting through the training transform would change every number
    # classes in a fixed order that is not the sorted one: labels must follow the run's order
    config = _recipe(tmp_path, f"{{source: imagefolder, root: {root}, img_size: 16, val_fraction: 0.2, crop_pct: 0.8, "
                               f"class_names: [red, green, blue]}}",
                     "{patch_size: 4, embed_dim: 16, depth: 1}",
                     "{mixup: 0.0, cutmix: 0.0, hflip: 0.5, scale: [0.3, 1.0], reprob: 0.5, color_jitter: 0.4}")
    run = Trainer(VisionTask(config)).fit(tmp_path / "runs" / "files").run_dir
    probs, target, metrics, task = _eval_loop_probs(config, run)
    files = [path for path, _ in task.build_datasets().test.samples]
    first = predict(files, checkpoint=run, topk=3, batch_size=4)       # other batches than the loop's
    assert predict(files, checkpoint=run, topk=3) == first                # deterministic
    assert [r["image"] for r in first] == files
    np.testing.assert_allclose(_prob_matrix(first, 3), probs, atol=2e-6)
    assert [r["top"][0]["index"] for r in first] == probs.argmax(1).tolist()
    assert task.classes == ["red", "green", "blue"]
    assert all(t["label"] == task.classes[t["index"]] for r in first for t in r["top"])   # the run's class order
    assert metrics["test/acc"] == pytest.approx(float(np.mean(probs.argmax(1) == target)))


def test_predict_on_digit_images_equals_the_evaluation_loop(tmp_path, monkeypatch):
    import mambakit.apps.vision.data as data_mod

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100) % 10
    images = torch.randint(0, 60, (100, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):             # a bright bar whose row tells the class
        images[i, 0, 3 + 2 * c:5 + 2 * c, 4:24] = 250
    monkeypatch.setattr(data_mod, "load_mnist5k", lambda path=None: (images, labels))
    # img_size 20: digits are resized, the step where a PIL resize and the loop's torch resize would differ
    config = _recipe(tmp_path, "{source: mnist5k, img_size: 20, in_chans: 1, val_fraction: 0.1}",
                     "{patch_size: 5, embed_dim: 16, depth: 1}", "{mixup: 0.0, cutmix: 0.0, random_shift: 3}")
    run = Trainer(VisionTask(config)).fit(tmp_path / "runs" / "digits").run_dir
    probs, target, _, _ = _eval_loop_probs(config, run)
    test_idx = stratified_split(labels.tolist(), [0.2], config.data.split_seed)[0]   # the held-out fifth
    assert target.tolist() == labels[test_idx].tolist()
    files = []
    for i in test_idx:
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(images[i, 0].numpy(), "L").save(files[-1])
    first = predict(files, checkpoint=run, topk=10)
    assert predict(files, checkpoint=run, topk=10) == first
    np.testing.assert_allclose(_prob_matrix(first, 10), probs, atol=2e-6)
