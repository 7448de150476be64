"""Top-k recommendations for one history with a trained checkpoint: original item tokens in, tokens out.

The checkpoint holds the recipe; the item vocabulary is rebuilt from the recipe's data (deterministic: ids in
order of first appearance after filtering), so the data must be readable (it is in the cache after training).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch

from .config import RecsysRecipe
from .data import make_batch
from .models import build_model
from .task import RecsysTask, load_data

__all__ = ["load_recommender", "recommend", "format_recommendations"]


def load_recommender(checkpoint: str | Path, device: str = "cpu"):
    """(model in eval mode, recipe, SequenceData) from a checkpoint file or run folder."""
    from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint
    from mambakit.engine.config import from_dict
    from mambakit.engine.trainer import load_model_state

    path = resolve_checkpoint(checkpoint, prefer="best")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{path}: the checkpoint holds no recipe; it was not written by `mambakit recsys train`")
    config = from_dict(RecsysRecipe, state["config"], f"{path} (saved config)")
    data = load_data(config.data)
    model = build_model(config.model, data.n_items, config.data.max_len)
    load_model_state(model, state["model"], str(path))
    return model.to(device).eval(), config, data


def recommend(checkpoint: str | Path, history: list[str], k: int = 10, times: list[float] | None = None,
              exclude_seen: bool = True, device: str = "cpu") -> list[dict]:
    """The top-k items after `history` (original tokens, oldest first): a list of {rank, item, score, title}."""
    model, config, data = load_recommender(checkpoint, device)
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if not history:
        raise ValueError("--history is empty: give at least one item token")
    lookup = data.token_to_id()
    unknown = [t for t in history if t not in lookup]
    if unknown:
        hints = []
        for token in unknown[:5]:
            close = difflib.get_close_matches(token, list(lookup), n=3)
            hints.append(f"{token!r}" + (f" (close: {', '.join(close)})" if close else ""))
        raise ValueError(f"--history: {len(unknown)} item token(s) not in {data.name} after filtering: "
                         f"{'; '.join(hints)}")
    traits = RecsysTask.model_traits(config.model)
    if traits["uses_time"]:
        if times is None:
            raise ValueError(f"{config.model.name} reads interaction times: give --times T1,T2,... (unix "
                             f"seconds, one per history item)")
        if len(times) != len(history):
            raise ValueError(f"--times has {len(times)} values for {len(history)} history items")
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError("--times must be in chronological order (non-decreasing)")
    ids = [lookup[t] for t in history]
    batch = make_batch(ids, times if traits["uses_time"] else None, config.data.max_len, traits["fixed_length"])
    batch = {key: value.to(device) for key, value in batch.items()}
    with torch.no_grad():
        scores = model(batch["item_seq"], batch["item_seq_len"], batch.get("time_seq"), scores=True)[0].float()
    scores[0] = -math.inf
    if exclude_seen:
        scores[torch.tensor(ids, device=scores.device)] = -math.inf
    available = int(torch.isfinite(scores).sum())
    top = torch.topk(scores, min(k, available))
    titles = data.item_titles or {}
    return [{"rank": r + 1, "item": str(data.item_tokens[i]), "score": float(s), "title": titles.get(int(i))}
            for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]


def format_recommendations(recs: list[dict]) -> str:
    has_titles = any(r["title"] for r in recs)
    width = max([len("item")] + [len(r["item"]) for r in recs])
    lines = [f"{'rank':>4}  {'item':<{width}}  {'score':>8}" + ("  title" if has_titles else "")]
    for r in recs:
        lines.append(f"{r['rank']:>4}  {r['item']:<{width}}  {r['score']:>8.4f}"
                     + (f"  {r['title'] or ''}" if has_titles else ""))
    return "\n".join(lines)
