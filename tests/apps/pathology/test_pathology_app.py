"""The app end to end on small synthetic data: recipes, training through the engine (subtyping, survival,
k folds), balanced sampling, the CLI verbs (tile, extract, train, eval, heatmap)."""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mambakit.apps.pathology.app import APP, CONFIG_DIR
from mambakit.apps.pathology.config import MILRecipe
from mambakit.engine.config import load_config

DIM = 16
N_BAGS = 32


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def mil_data(tmp_path):
    """32 bags of 12-20 instances; a positive bag holds 4 instances shifted by +2 in every feature.
    Two split files (folds 0, 1) and a survival CSV in which positives die earlier."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mil"
    (root / "pt_files").mkdir(parents=True)
    rows, surv = [], []
    for i in range(N_BAGS):
        label = i % 2
        x = rng.normal(size=(int(rng.integers(12, 21)), DIM)).astype(np.float32)
        if label:
            x[:4] += 2.0
        torch.save(torch.from_numpy(x), root / "pt_files" / f"s{i}.pt")
        rows.append([".", f"c{i}", f"s{i}", "tumour" if label else "normal"])
        months = rng.exponential(10 if label else 40) + 1
        surv.append([f"c{i}", f"s{i}", int(rng.random() < 0.25), round(months, 2)])
    _write_csv(root / "labels.csv", ["dir", "case_id", "slide_id", "label"], rows)
    _write_csv(root / "survival.csv", ["case_id", "slide_id", "censorship", "survival_months"], surv)
    (root / "splits").mkdir()
    (root / "splits_surv").mkdir()
    for k in range(2):
        order = np.random.default_rng(k).permutation(N_BAGS)
        parts = [sorted(order[j::3].tolist()) for j in range(3)]    # mixed labels in each part
        train, val, test = parts[0] + parts[1][:4], parts[1][4:], parts[2]
        cols = {"train": [f"s{i}" for i in train], "val": [f"s{i}" for i in val], "test": [f"s{i}" for i in test]}
        n = max(map(len, cols.values()))
        _write_csv(root / "splits" / f"splits_{k}.csv", ["", "train", "val", "test"],
                   [[j] + [cols[c][j] if j < len(cols[c]) else "" for c in ("train", "val", "test")] for j in range(n)])
        cases = {c: [v.replace("s", "c") for v in vals] for c, vals in cols.items()}
        _write_csv(root / "splits_surv" / f"splits_{k}.csv", ["", "train", "val"],
                   [[j] + [cases[c][j] if j < len(cases[c]) else "" for c in ("train", "val")] for j in range(n)])
    return root


def _recipe(root, *extra, task="subtyping"):
    base = [f"data.csv={root / ('labels.csv' if task == 'subtyping' else 'survival.csv')}", f"data.features={root}",
            f"data.split_dir={root / ('splits' if task == 'subtyping' else 'splits_surv')}", f"data.task={task}",
            "data.classes=null", f"model.in_dim={DIM}", "run.progress=false", "run.tensorboard=false",
            "run.curves=false", "train.log_every_steps=100"]
    return load_config(MILRecipe, CONFIG_DIR / "cohort_mambamil.yaml", base + list(extra))


def _run_verb(name, argv):
    verb = APP.verb(name)
    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    return verb.run(parser.parse_args([str(a) for a in argv]))


def test_every_recipe_loads():
    recipes = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(recipes) >= 16
    for path in recipes:
        config = load_config(MILRecipe, path)
        assert config.train.batch_size == 1, path
        # the quick recipes read the weight-free hed_stats features; the others CLAM's resnet50_trunc
        assert config.model.in_dim == (46 if path.name.startswith("quick_") else 1024), path


def test_subtyping_trains_to_separate_the_classes(mil_data, tmp_path):
    from mambakit.apps.pathology.task import MILTask
    from mambakit.engine.trainer import Trainer

    config = _recipe(mil_data, "model={name: abmil, in_dim: 16, gated: true}", "train.epochs=8",
                     "train.optimizer.lr=5e-4", "train.early_stopping.patience=null")
    task = MILTask(config)
    assert task.classes == ["normal", "tumour"]
    result = Trainer(task).fit(tmp_path / "run")
    m = result.metrics
    assert {"test/auc", "test/acc", "test/balanced_acc", "test/f1", "test/loss", "val/auc"} <= set(m)
    assert m["test/auc"] >= 0.9                               # 4 shifted instances in 12-20 are easy to find
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["classes"] == ["normal", "tumour"]


def test_survival_trains_with_accumulation_and_reports_c_index(mil_data, tmp_path):
    from mambakit.apps.pathology.task import MILTask
    from mambakit.engine.trainer import Trainer

    config = _recipe(mil_data, "model={name: mamba_mil, in_dim: 16, dim: 16, d_state: 4, dropout: 0.25}",
                     "train.epochs=2", "train.grad_accum=4", "train.early_stopping={monitor: val/c_index, mode: max}",
                     task="survival")
    task = MILTask(config)
    assert task.n_outputs == 4 and len(task.bin_edges) == 5 and task.splits["test"] == []
    result = Trainer(task).fit(tmp_path / "run")
    assert 0.0 <= result.metrics["val/c_index"] <= 1.0 and np.isfinite(result.metrics["val/loss"])
    assert result.steps == 2 * int(np.ceil(len(task.splits["train"]) / 4))


def test_train_order_is_class_balanced(mil_data):
    from mambakit.apps.pathology.task import MILTask

    task = MILTask(_recipe(mil_data))
    task._train_bags = task.splits["train"][:3] + [b for b in task.splits["train"] if b.label == 1][:1] * 0
    labels = np.array([b.label for b in task._train_bags])
    g = torch.Generator().manual_seed(0)
    drawn = np.concatenate([labels[task.train_order(e, g)] for e in range(2000)])
    share = {c: (labels == c).mean() for c in (0, 1)}
    assert share[0] != share[1]                                           # the split is imbalanced ...
    assert abs((drawn == 1).mean() - 0.5) < 0.02                          # ... the sampler is not
    task.config.data.weighted_sample = False
    assert task.train_order(0, g) is None


def test_kfold_train_verb_writes_summary(mil_data, tmp_path):
    overrides = [f"data.csv={mil_data / 'labels.csv'}", f"data.features={mil_data}",
                 f"data.split_dir={mil_data / 'splits'}", "data.classes=null", f"model.in_dim={DIM}",
                 "model={name: mean_mil, in_dim: 16}", "train.epochs=1", "run.progress=false", "run.curves=false",
                 "run.tensorboard=false"]
    code = _run_verb("train", ["-c", CONFIG_DIR / "cohort_meanmil.yaml", *overrides, "--folds", "all",
                               "--run-dir", tmp_path / "kfold"])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "kfold" / "summary.csv")))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std"]
    aucs = [float(r["test/auc"]) for r in rows[:2]]
    assert float(rows[2]["test/auc"]) == pytest.approx(np.mean(aucs))
    assert float(rows[3]["test/auc"]) == pytest.approx(np.std(aucs, ddof=1))
    assert "±" in (tmp_path / "kfold" / "summary.md").read_text()
    assert (tmp_path / "kfold" / "fold_1" / "summary.json").is_file()


def test_bad_fold_and_split_errors(mil_data):
    from mambakit.apps.pathology.task import MILTask

    with pytest.raises(ValueError, match="no splits_7.csv"):
        MILTask(_recipe(mil_data, "data.fold=7"))
    with pytest.raises(ValueError, match="--folds"):
        _run_verb("train", ["-c", CONFIG_DIR / "cohort_meanmil.yaml", f"data.csv={mil_data / 'labels.csv'}",
                            "--folds", "x,y"])


@pytest.mark.slow      # end to end through four CLI verbs (tens of seconds on a busy 2-core machine)
def test_tile_extract_heatmap_and_eval_verbs(mil_data, slide_factory, tmp_path, capsys):
    from mambakit.apps.pathology.task import MILTask
    from mambakit.engine.trainer import Trainer

    slides = tmp_path / "slides"
    slide_factory("wsi1", folder=slides, disks=[(400, 380, 300)])
    (slides / "bad.svs").write_bytes(b"nope")
    tiling = ["--magnification", 20, "--patch-size", 128, "--a-t", 0.05, "--a-h", 0.05, "--thumbnail-size", 128]
    assert _run_verb("tile", ["--slides", slides, "--out", tmp_path / "tiles", *tiling]) == 0
    assert (tmp_path / "tiles" / "patches" / "wsi1.h5").is_file() and (tmp_path / "tiles" / "thumbnails" / "wsi1.png").is_file()
    extract = ["--backbone", "timm:resnet18", "--random-weights", "--input-size", 32, "--num-workers", 0]
    assert _run_verb("extract", ["--slides", slides, "--out", tmp_path / "feats", "--coords", tmp_path / "tiles",
                                 *extract]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    # a model over 512-d features (resnet18's), trained briefly on synthetic bags of that size
    root = tmp_path / "mil512"
    (root / "pt_files").mkdir(parents=True)
    for i in range(N_BAGS):
        torch.save(torch.randn(10, 512) + (i % 2), root / "pt_files" / f"s{i}.pt")
    for name in ("labels.csv", "splits"):
        src = mil_data / name
        (root / name).symlink_to(src, target_is_directory=src.is_dir())
    # as if these bags came from that extraction: its record travels into the run at the end of training
    (root / "features_meta.json").write_text((tmp_path / "feats" / "features_meta.json").read_text())
    config = _recipe(root, "model={name: mamba_mil, in_dim: 512, dim: 16, d_state: 4}", "train.epochs=1")
    Trainer(MILTask(config)).fit(tmp_path / "run")
    assert (tmp_path / "run" / "features_meta.json").read_text() == (root / "features_meta.json").read_text()
    out = tmp_path / "heat.png"
    assert _run_verb("heatmap", ["--checkpoint", tmp_path / "run", "--slide", slides / "wsi1.tif",
                                 "--features", tmp_path / "feats", "--out", out, "--max-size", 256]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 100
    assert _run_verb("eval", ["--checkpoint", tmp_path / "run", "--split", "test"]) == 0
    assert "test/auc" in capsys.readouterr().out
    # no --features: the slide is tiled and extracted on the fly with the training run's extractor settings
    out2 = tmp_path / "heat2.png"
    assert _run_verb("heatmap", ["--checkpoint", tmp_path / "run", "--slide", slides / "wsi1.tif", "--out", out2,
                                 "--num-workers", 0, *tiling]) == 0
    assert out2.is_file()
    assert "training extractor (timm:resnet18, input 32 px" in capsys.readouterr().out
    # other extractor settings than the training ones are refused, by name
    with pytest.raises(ValueError, match="input_size: training 32 vs asked 224"):
        _run_verb("heatmap", ["--checkpoint", tmp_path / "run", "--slide", slides / "wsi1.tif", "--out", out2,
                              "--input-size", 224, *tiling])
    (tmp_path / "run" / "features_meta.json").unlink()
    (root / "features_meta.json").unlink()
    with pytest.raises(ValueError, match="cannot tell which extractor made the training features"):
        _run_verb("heatmap", ["--checkpoint", tmp_path / "run", "--slide", slides / "wsi1.tif", "--out", out2,
                              *extract, *tiling])


def test_extract_verb_fails_when_every_slide_fails(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.svs").write_bytes(b"nope")
    assert _run_verb("extract", ["--slides", slides, "--out", tmp_path / "f", "--backbone", "timm:resnet18",
                                 "--random-weights", "--magnification", 20]) == 1


def test_app_registers_datasets_and_weights():
    assert [d.name for d in APP.datasets] == ["wsi-sources"]
    names = {w.name for w in APP.weights}
    assert "resnet50_trunc.tv_in1k" in names
    entry = next(w for w in APP.weights if w.name == "resnet50_trunc.tv_in1k")
    assert entry.urls == ["https://download.pytorch.org/models/resnet50-0676ba61.pth"]
    assert all(w.urls[0].startswith("https://huggingface.co/timm/") for w in APP.weights if w.name.startswith("timm-"))
