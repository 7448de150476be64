"""The standard verbs (train, eval, finetune) an app gets from engine.runner, driven through argparse as the
CLI drives them."""

from __future__ import annotations

import argparse
import json

import pytest
from engine_toy import ToyRecipe, ToyTask

from mambakit.engine.config import ConfigError
from mambakit.engine.runner import format_table, standard_verbs

VERBS = {v.name: v for v in standard_verbs("toy", ToyRecipe, ToyTask)}


def run_verb(name: str, argv: list[str]):
    parser = argparse.ArgumentParser(prog=f"mambakit toy {name}")
    VERBS[name].add_arguments(parser)
    return VERBS[name].run(parser.parse_args(argv))


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("train:\n  epochs: 2\n  batch_size: 8\nrun:\n  progress: false\n  curves: false\n")
    return path


def test_verbs_and_help():
    assert list(VERBS) == ["train", "eval", "finetune"]
    assert all(v.help for v in VERBS.values())


def test_train_then_eval_from_the_saved_config(tmp_path, recipe_file, capsys):
    run = tmp_path / "run"
    assert run_verb("train", ["-c", str(recipe_file), "train.optimizer.lr=3e-3", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "test/loss" in out and "best val/loss" in out
    summary = json.loads((run / "summary.json").read_text())
    # eval without -c rebuilds the model from the config saved in the checkpoint (overrides apply to it)
    assert run_verb("eval", ["--checkpoint", str(run), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["test/loss"] == pytest.approx(summary["metrics"]["test/loss"], rel=1e-6)
    assert "checkpoint:" in capsys.readouterr().out
    run_verb("eval", ["--checkpoint", str(run), "--split", "val", "--output", str(tmp_path / "v.json")])
    assert json.loads((tmp_path / "v.json").read_text())["val/loss"] == \
        pytest.approx(summary["metrics"]["val/loss"], rel=1e-6)
    with pytest.raises(Exception, match="does not match the model"):
        run_verb("eval", ["--checkpoint", str(run), "model.hidden=4"])
    with pytest.raises(Exception, match="holds no EMA weights"):
        run_verb("eval", ["--checkpoint", str(run), "--ema"])


def test_train_resume_continues_the_named_run(tmp_path, recipe_file):
    run = tmp_path / "run"
    run_verb("train", ["-c", str(recipe_file), "--run-dir", str(run)])
    run_verb("train", ["-c", str(recipe_file), "train.epochs=3", "--run-dir", str(run), "--resume"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["steps"] == 18


def test_default_run_folder_name(tmp_path, recipe_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_verb("train", ["-c", str(recipe_file), "train.epochs=1"])
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("toy-toy-") and (folder / "summary.json").exists()


def test_finetune_loads_matching_weights(tmp_path, recipe_file, capsys):
    run_verb("train", ["-c", str(recipe_file), "--run-dir", str(tmp_path / "pre")])
    run_verb("finetune", ["--pretrained", str(tmp_path / "pre"), "-c", str(recipe_file), "data.features=3",
                          "--run-dir", str(tmp_path / "ft")])
    notes = json.loads((tmp_path / "ft" / "summary.json").read_text())["notes"]
    assert any("pretrained weights from" in n and "inp.weight" in n for n in notes)
    assert f"run folder: {tmp_path / 'ft'}" in capsys.readouterr().out


def test_config_errors_surface_with_the_file_and_key(tmp_path, recipe_file):
    with pytest.raises(ConfigError, match=rf"{recipe_file}: unknown key 'train.epoch' \(did you mean 'epochs'\?\)"):
        run_verb("train", ["-c", str(recipe_file), "train.epoch=3"])
    with pytest.raises(SystemExit):
        run_verb("train", [])                          # -c is required


def test_format_table():
    assert format_table([("val/loss", "0.5"), ("a", "1")]) == \
        "metric    value\n--------  -----\nval/loss  0.5\na         1"
