"""Top-k recommendations for one history with a trained checkpoint: original item tokens in, tokens out.

Everything comes from the checkpoint: the recipe, the weights and the item vocabulary (tokens, titles, and
which tokens k-core filtering removed), so no data file is read. Scores are computed by `task.score_items`,
the function evaluation ranks with.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch

from .config import RecsysRecipe
from .data import Vocabulary, make_batch
from .models import build_model, stored_vocabulary
from .task import RecsysTask, score_items

__all__ = ["load_recommender", "recommend", "format_recommendations", "history_ids"]


def load_recommender(checkpoint: str | Path, device: str = "cpu"):
    """(model in eval mode, recipe, Vocabulary) from a checkpoint file or run folder; no data file is read."""
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint
    from mambakit.engine.config import from_dict
    from mambakit.engine.trainer import load_model_state

    from .models import attach_vocabulary

    path = resolve_checkpoint(checkpoint, prefer="best")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{path}: the checkpoint holds no recipe; it was not written by `mambakit recsys train`")
    config = from_dict(RecsysRecipe, state["config"], f"{path} (saved config)")
    vocabulary = stored_vocabulary(state["model"], str(path))
    if vocabulary is None:
        raise ValueError(f"{path}: the checkpoint holds no item vocabulary (written by a mambakit older than the "
                         f"stored vocabularies); retrain it to recommend with it")
    model = attach_vocabulary(build_model(config.model, vocabulary.n_items, config.data.max_len), vocabulary)
    load_model_state(model, state["model"], str(path))
    return model.to(device).eval(), config, vocabulary


def history_ids(history: list[str], vocabulary: Vocabulary, config: RecsysRecipe) -> list[int]:
    """Item ids of the history tokens; an unknown token is an error that says whether k-core filtering removed
    it (with the thresholds) or the training data never had it (with close matches)."""
    lookup = vocabulary.token_to_id()
    unknown = [t for t in history if t not in lookup]
    if unknown:
        removed = set(vocabulary.removed_items)
        d = config.data
        hints = []
        for token in unknown[:5]:
            if token in removed:
                hints.append(f"{token!r} (removed by k-core filtering: fewer than {d.item_min_interactions} "
                             f"interactions, data.item_min_interactions, or only from users with fewer than "
                             f"{d.user_min_interactions})")
                continue
            close = difflib.get_close_matches(token, list(lookup), n=3)
            hints.append(f"{token!r} (not in the training data" + (f"; close: {', '.join(close)})" if close else ")"))
        raise ValueError(f"--history: {len(unknown)} item token(s) the model does not know: {'; '.join(hints)}")
    return [lookup[t] for t in history]


def recommend(checkpoint: str | Path, history: list[str], k: int = 10, times: list[float] | None = None,
              exclude_seen: bool = True, device: str = "cpu", *, loaded=None) -> list[dict]:
    """The top-k items after `history` (original tokens, oldest first): a list of {rank, item, score, title}.
    `loaded`: the result of `load_recommender` to reuse."""
    model, config, vocabulary = loaded or load_recommender(checkpoint, device)
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if not history:
        raise ValueError("--history is empty: give at least one item token")
    ids = history_ids(history, vocabulary, config)
    traits = RecsysTask.model_traits(config.model)
    if traits["uses_time"]:
        if times is None:
            raise ValueError(f"{config.model.name} reads interaction times: give --times T1,T2,... (unix "
                             f"seconds, one per history item)")
        if len(times) != len(history):
            raise ValueError(f"--times has {len(times)} values for {len(history)} history items")
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError("--times must be in chronological order (non-decreasing)")
    batch = make_batch(ids, times if traits["uses_time"] else None, config.data.max_len, traits["fixed_length"])
    batch = {key: value.to(device) for key, value in batch.items()}
    with torch.no_grad():
        scores = score_items(model, batch)[0]
    if exclude_seen:
        scores[torch.tensor(ids, device=scores.device)] = -math.inf
    available = int(torch.isfinite(scores).sum())
    # Equal scores: the lower item id first, as evaluation's target_rank counts them.
    order = torch.sort(scores, descending=True, stable=True)
    top_values, top_ids = order.values[:min(k, available)], order.indices[:min(k, available)]
    return [{"rank": r + 1, "item": vocabulary.item_tokens[i - 1], "score": float(s), "title": vocabulary.title(i)}
            for r, (s, i) in enumerate(zip(top_values.tolist(), top_ids.tolist()))]


def format_recommendations(recs: list[dict]) -> str:
    has_titles = any(r["title"] for r in recs)
    width = max([len("item")] + [len(r["item"]) for r in recs])
    lines = [f"{'rank':>4}  {'item':<{width}}  {'score':>8}" + ("  title" if has_titles else "")]
    for r in recs:
        lines.append(f"{r['rank']:>4}  {r['item']:<{width}}  {r['score']:>8.4f}"
                     + (f"  {r['title'] or ''}" if has_titles else ""))
    return "\n".join(lines)
