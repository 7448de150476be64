"""The app through the engine and the CLI: train on a tiny atomic dataset, evaluate, recommend (tokens in,
tokens and titles out), most-popular, errors; recipes in configs/recsys load; the slow quick run beats
most-popular."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mambakit import cli
from mambakit.apps import register_app, unregister_app
from mambakit.apps.recsys.app import APP, QUICK_RECIPE
from mambakit.apps.recsys.config import RecsysRecipe
from mambakit.engine.config import load_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "recsys"
N_ITEMS = 30


@pytest.fixture(autouse=True)
def _app():
    register_app(APP, replace=True)
    yield
    unregister_app("recsys")


@pytest.fixture(scope="module")
def cycle_data(tmp_path_factory):
    """Users walk a cycle of 30 items (i0 -> i1 -> ... -> i29 -> i0) from random starts: next = previous + 1."""
    import numpy as np

    folder = tmp_path_factory.mktemp("cycle")
    rng = np.random.default_rng(0)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(80):
        start, n = rng.integers(0, N_ITEMS), rng.integers(6, 16)
        t = 1_000_000_000 + rng.integers(0, 10**6)
        for k in range(n):
            t += int(rng.integers(60, 10**5))
            lines.append(f"u{u}\ti{(start + k) % N_ITEMS}\t4\t{t}")
    (folder / "cycle.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq"] + [f"i{i}\tMovie number {i}" for i in range(N_ITEMS)]
    (folder / "cycle.item").write_text("\n".join(items) + "\n")
    return folder


def recipe(tmp_path, data_path, model: dict, lr: float = 0.01, **train) -> Path:
    config = {
        "data": {"dataset": None, "path": str(data_path), "user_min_interactions": 0, "item_min_interactions": 0,
                 "max_len": 8},
        "model": model,
        "eval": {"ks": [1, 5, 10], "mask_history": False, "popularity_baseline": True},
        "train": {"epochs": 1, "batch_size": 64, "eval_batch_size": 256, "drop_last": False, "seed": 0,
                  "optimizer": {"name": "adam", "lr": lr}, "log_every_steps": 5,
                  "early_stopping": {"monitor": "val/ndcg@10", "mode": "max", "patience": 3}, **train},
        "run": {"out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False, "curves": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_eval_recommend_round_trip(tmp_path, cycle_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(cycle_data, data)
    path = recipe(tmp_path, data, {"name": "gru4rec", "embedding_size": 16, "hidden_size": 32,
                                         "dropout_prob": 0.0}, lr=0.03, epochs=4)
    run = tmp_path / "run"
    assert cli.main(["recsys", "train", "-c", str(path), "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    for key in ("test/hit@10", "test/ndcg@10", "test/mrr@10", "test/pop_ndcg@10", "val/ndcg@10", "test/hit@1"):
        assert key in m
    # next = previous + 1 is easy: the model must beat ranking by popularity by a wide margin.
    assert m["test/hit@1"] > 0.5 and m["test/ndcg@10"] > m["test/pop_ndcg@10"] + 0.3

    capsys.readouterr()
    assert cli.main(["recsys", "eval", "--checkpoint", str(run), "--split", "test", "--output",
                     str(tmp_path / "m.json")]) == 0
    assert "test/ndcg@10" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["test/ndcg@10"] == m["test/ndcg@10"]

    # The data moved and its rows re-sorted by time: the same interactions, the same numbers.
    moved = tmp_path / "moved"
    moved.mkdir()
    lines = (data / "cycle.inter").read_text().splitlines()
    body = sorted(lines[1:], key=lambda line: (float(line.split("\t")[3]), line))
    (moved / "cycle.inter").write_text("\n".join([lines[0], *body]) + "\n")
    shutil.rmtree(data)                                      # recommend needs only the checkpoint
    assert cli.main(["recsys", "eval", "--checkpoint", str(run), "--split", "test", f"data.path={moved}",
                     "--output", str(tmp_path / "m2.json")]) == 0
    assert json.loads((tmp_path / "m2.json").read_text()) == evaluated
    # Other data (one interaction fewer) is refused, naming the file and both sizes.
    (moved / "cycle.inter").write_text("\n".join([lines[0], *body[:-1]]) + "\n")
    capsys.readouterr()
    assert cli.main(["recsys", "eval", "--checkpoint", str(run), f"data.path={moved}"]) == 1
    err = capsys.readouterr().err
    assert "cycle.inter: not the data this model was trained on (872 interactions" in err
    assert "training had 873" in err

    assert cli.main(["recsys", "recommend", "--checkpoint", str(run), "--history", "i3,i4,i5", "--k", "3",
                     "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in recs] == [1, 2, 3]
    assert recs[0]["item"] == "i6" and recs[0]["title"] == "Movie number 6"
    assert not {"i3", "i4", "i5"} & {r["item"] for r in recs}
    assert cli.main(["recsys", "recommend", "--checkpoint", str(run), "--history", "i29", "--k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["rank", "item", "score", "title"]
    assert "i0" in table.splitlines()[1] and "Movie number 0" in table

    assert cli.main(["recsys", "recommend", "--checkpoint", str(run), "--history", "i3,nope"]) == 1
    assert ("--history: 1 item token(s) the model does not know: 'nope' (not in the training data)"
            in capsys.readouterr().err)


def test_tim4rec_trains_and_needs_times_to_recommend(tmp_path, cycle_data, capsys):
    path = recipe(tmp_path, cycle_data, {"name": "tim4rec", "hidden_size": 16, "d_state": 8, "head_dim": 8,
                                         "num_layers": 2}, max_steps=3)
    run = tmp_path / "run"
    assert cli.main(["recsys", "train", "-c", str(path), "--run-dir", str(run)]) == 0
    assert "test/ndcg@10" in json.loads((run / "summary.json").read_text())["metrics"]
    capsys.readouterr()
    assert cli.main(["recsys", "recommend", "--checkpoint", str(run), "--history", "i1,i2"]) == 1
    assert "tim4rec reads interaction times: give --times" in capsys.readouterr().err
    assert cli.main(["recsys", "recommend", "--checkpoint", str(run), "--history", "i1,i2",
                     "--times", "1000,2000", "--k", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


def test_mostpop_is_evaluated_without_training(tmp_path, cycle_data, capsys):
    path = recipe(tmp_path, cycle_data, {"name": "mostpop"})
    run = tmp_path / "pop"
    assert cli.main(["recsys", "train", "-c", str(path), "--run-dir", str(run)]) == 0
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert set(metrics) >= {"val/hit@10", "test/ndcg@10", "test/mrr@5"}
    assert 0 <= metrics["test/hit@10"] <= 1


def test_config_errors_name_the_key(tmp_path, cycle_data, capsys):
    path = recipe(tmp_path, cycle_data, {"name": "mamba4rec", "hidden_sise": 8})
    assert cli.main(["recsys", "train", "-c", str(path)]) == 1
    assert "unknown key 'model.hidden_sise' (did you mean 'hidden_size'?)" in capsys.readouterr().err
    path = recipe(tmp_path, cycle_data, {"name": "bert4rec"})
    assert cli.main(["recsys", "train", "-c", str(path)]) == 1
    assert "model.name: unknown name 'bert4rec'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(path):
    config = load_config(RecsysRecipe, path)
    assert config.train.early_stopping.monitor == "val/ndcg@10"
    assert config.eval.ks and 10 in config.eval.ks


@pytest.mark.slow
def test_quickstart_beats_most_popular(tmp_path):
    result = APP.quickstart(QUICK_RECIPE, overrides=[f"run.out_dir={tmp_path}", "run.progress=false"])
    assert result.metric == "test NDCG@10"
    assert result.value > result.baseline_value
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())["metrics"]
    assert summary["test/hit@10"] > summary["test/pop_hit@10"]


@pytest.mark.slow
def test_tim4rec_two_process_ddp_equals_one_process(tmp_path, cycle_data):
    """TiM4Rec's last layer has parameters without gradient (as upstream): DDP must still run, and end where a
    single process ends."""
    import os
    import subprocess
    import sys

    path = recipe(tmp_path, cycle_data, {"name": "tim4rec", "hidden_size": 16, "d_state": 8, "head_dim": 8,
                                         "dropout_prob": 0.0, "time_dropout": 0.0}, epochs=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = []
    for launcher, run in ((["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"], "ddp"),
                          ([], "one")):
        cmd = [sys.executable, *launcher, "-m", "mambakit", "recsys", "train", "-c", str(path),
               "--run-dir", str(tmp_path / run)]
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
        metrics.append(json.loads((tmp_path / run / "summary.json").read_text())["metrics"])
    for key in ("test/ndcg@10", "test/hit@1", "val/ndcg@10", "test/loss"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5, abs=1e-6), key
