"""The evaluation protocol end to end against numpy by hand, and inference equal to evaluation.

- The engine's evaluation loop (`engine.trainer.evaluate`) with a model whose scores are a fixed table gives
  the HR / NDCG / MRR (and the cross-entropy loss) that numpy computes from the raw sequences, without
  masking by default (as documented: RecBole does not mask seen items for sequential models) and with
  `eval.mask_history=true`; the most-popular baseline likewise (training counts, equal counts by lower id).
- `recommend` ranks exactly as the evaluation loop does for the same histories, twice in a row.
- A history item that k-core filtering removed is reported as such.
"""

import shutil

import numpy as np
import pytest
import torch
from test_recsys_app import _app, recipe  # noqa: F401  (_app registers the app)
from test_recsys_metrics import np_mask, np_metrics, np_rank
from torch import nn

from mambakit import cli
from mambakit.apps.recsys.config import RecsysEval, RecsysRecipe
from mambakit.apps.recsys.models import attach_vocabulary
from mambakit.apps.recsys.recommend import load_recommender, recommend
from mambakit.apps.recsys.task import RecsysTask
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer, evaluate

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
KS = (1, 3, 5)


@pytest.fixture(scope="module")
def revisit_data(tmp_path_factory):
    """12 users x 9-14 interactions over 10 items with revisits (so masking can hit the target itself) and
    distinct times."""
    folder = tmp_path_factory.mktemp("revisit")
    rng = np.random.default_rng(7)
    lines, t = [HEADER], 1_000_000
    for u in range(12):
        for _ in range(rng.integers(9, 15)):
            t += int(rng.integers(1, 1000))
            lines.append(f"u{u}\ti{rng.integers(0, 10)}\t1\t{t}")
    (folder / "rv.inter").write_text("\n".join(lines) + "\n")
    return folder


class TableModel(nn.Module):
    """Scores = table[last item of the history]: known numbers for the evaluation loop to rank."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.n_items = table.shape[0]
        self.register_buffer("table", table)

    def forward(self, item_seq, item_seq_len, time_seq=None, scores=True):
        return self.table[item_seq[torch.arange(len(item_seq)), item_seq_len - 1]]


def reference(data, split_examples, table: np.ndarray, mask: bool, counts: np.ndarray | None = None):
    """numpy: per example, the scores of its last history item (or the counts), masked by hand, ranked by hand."""
    ranks = []
    for start, target_pos in zip(split_examples.start, split_examples.target):
        history = data.items[start:target_pos].tolist()
        target = int(data.items[target_pos])
        row = (table[history[-1]] if counts is None else counts).astype(np.float64).copy()
        row[0] = -np.inf
        if mask:
            row = np_mask(row, history, target)
        ranks.append(np_rank(row, target))
    return np_metrics(ranks, KS)


def np_counts(data, split) -> np.ndarray:
    held = set(split.val.target.tolist()) | set(split.test.target.tolist())
    counts = np.zeros(data.n_items)
    for pos, item in enumerate(data.items):
        if pos not in held:
            counts[item] += 1
    return counts


@pytest.mark.parametrize("mask", [None, False, True], ids=["default", "unmasked", "masked"])
def test_evaluation_loop_matches_numpy(tmp_path, revisit_data, mask):
    overrides = [] if mask is None else [f"eval.mask_history={str(mask).lower()}"]
    path = recipe(tmp_path, revisit_data, {"name": "mamba4rec"})
    config = load_config(RecsysRecipe, path, ["eval.ks=[1,3,5]", *overrides])
    assert RecsysEval().mask_history is False                     # the documented default protocol
    task = RecsysTask(config)
    data, split = task.data, task.split
    # A table with a coarse grid of values: ties inside and at the top-k boundary, and high scores on items
    # the users have seen, so that masking them changes the ranks.
    table = torch.from_numpy(np.random.default_rng(1).integers(0, 4, (data.n_items, data.n_items)).astype(np.float32))
    model = attach_vocabulary(TableModel(table), data.vocabulary())
    masked = bool(mask)
    for name in ("test", "val"):
        got = evaluate(task, model, split=name)
        want = reference(data, getattr(split, name), table.numpy(), masked)
        pop = reference(data, getattr(split, name), table.numpy(), masked, counts=np_counts(data, split))
        for key, value in want.items():
            assert got[f"{name}/{key}"] == pytest.approx(value, abs=1e-12), (name, key)
            assert got[f"{name}/pop_{key}"] == pytest.approx(pop[key], abs=1e-12), (name, "pop", key)
        # The loss: cross-entropy over every column of the raw scores (padding included, as upstream; never
        # the masked scores), by hand.
        losses = []
        for start, target_pos in zip(getattr(split, name).start, getattr(split, name).target):
            row = table.numpy()[data.items[target_pos - 1]].astype(np.float64)
            losses.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[data.items[target_pos]])
        assert got[f"{name}/loss"] == pytest.approx(float(np.mean(losses)), rel=1e-6)
    # The case is one where masking matters (else this test could not tell the protocols apart).
    test = split.test
    assert reference(data, test, table.numpy(), True) != reference(data, test, table.numpy(), False)


def test_recommend_equals_the_evaluation_loop_twice(tmp_path, revisit_data):
    data_dir = tmp_path / "data"
    shutil.copytree(revisit_data, data_dir)
    path = recipe(tmp_path, data_dir, {"name": "mamba4rec", "hidden_size": 16, "d_state": 4}, max_steps=3)
    config = load_config(RecsysRecipe, path, ["eval.ks=[1,3,5]", "train.early_stopping.monitor=val/ndcg@5"])
    Trainer(RecsysTask(config)).fit(tmp_path / "run")
    loaded = load_recommender(tmp_path / "run")
    model, saved, vocabulary = loaded
    task = RecsysTask(saved, vocabulary)
    examples = task.split.test
    collate = task.collator()
    evaluated = []                          # the evaluation loop's step on each example: (rank, scores)
    with torch.no_grad():
        for row in range(len(examples)):
            batch = collate.batch(examples, [row])
            evaluated.append((int(task.eval_step(model, batch)["rank"]),
                              model(batch["item_seq"], batch["item_seq_len"], None, scores=True)[0, 1:].tolist()))
    shutil.rmtree(data_dir)                                               # recommend reads no data
    data = task.data
    for run in range(2):
        for row, (start, target_pos) in enumerate(zip(examples.start, examples.target)):
            history = [vocabulary.item_tokens[i - 1] for i in data.items[start:target_pos]]
            recs = recommend(None, history, k=data.n_items - 1, exclude_seen=False, loaded=loaded)
            items = [r["item"] for r in recs]
            target = vocabulary.item_tokens[int(data.items[target_pos]) - 1]
            rank = items.index(target) + 1
            eval_rank, eval_scores = evaluated[row]
            assert (rank if rank <= 5 else 0) == eval_rank, (run, row)
            scores = {r["item"]: r["score"] for r in recs}
            assert [scores[t] for t in vocabulary.item_tokens] == eval_scores, (run, row)


def test_recommend_names_items_removed_by_kcore(tmp_path, revisit_data, capsys):
    data_dir = tmp_path / "data"
    shutil.copytree(revisit_data, data_dir)
    with open(data_dir / "rv.inter", "a") as f:
        f.write("u0\trare\t1\t5\n")
    path = recipe(tmp_path, data_dir, {"name": "gru4rec", "embedding_size": 8, "hidden_size": 8}, max_steps=1)
    config = load_config(RecsysRecipe, path, ["data.item_min_interactions=2"])
    Trainer(RecsysTask(config)).fit(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["recsys", "recommend", "--checkpoint", str(tmp_path / "run"), "--history", "i1,rare,zz"]) == 1
    err = capsys.readouterr().err
    assert ("2 item token(s) the model does not know: 'rare' (removed by k-core filtering: fewer than 2 "
            "interactions, data.item_min_interactions" in err)
    assert "'zz' (not in the training data)" in err
