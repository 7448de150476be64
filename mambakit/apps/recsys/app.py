"""`mambakit recsys ...`: train / eval / finetune a sequential recommender, recommend for a history, quickstart.

    mambakit recsys train -c configs/recsys/mamba4rec_ml100k.yaml [train.seed=1 ...]
    mambakit recsys eval --checkpoint runs/<run> [--split test] [eval.mask_history=true] [data.path=MOVED/DATA]
    mambakit recsys recommend --checkpoint runs/<run> --history 50,172,133 [--k 10]
    mambakit quickstart recsys

Kept cheap to import (`mambakit --help` loads it): torch and pandas are imported inside the verbs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mambakit.engine.app import App, QuickstartResult, Verb
from mambakit.engine.runner import eval_verb, finetune_verb, format_table, train_verb

from .config import RecsysRecipe
from .datasets import DATASETS

__all__ = ["APP", "QUICK_RECIPE", "quickstart"]

QUICK_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recsys" / "quick_mamba4rec_ml100k.yaml"


def _task(config):
    from .task import RecsysTask

    return RecsysTask(config)


# --------------------------------------------------------------------------------------------------
# train: the standard verb, except that most-popular is evaluated directly (nothing to train)

def _train() -> Verb:
    base = train_verb("recsys", RecsysRecipe, _task)

    def run(args: argparse.Namespace) -> int:
        from mambakit.engine.config import load_config

        config = load_config(RecsysRecipe, args.config, args.overrides)
        if config.model.name != "mostpop":
            return base.run(args)
        return _run_mostpop(config, args)

    return Verb("train", base.help + "; model mostpop is evaluated directly", base.add_arguments, run)


def _run_mostpop(config: RecsysRecipe, args: argparse.Namespace) -> int:
    import datetime as dt

    from mambakit.engine.config import save_config

    from .task import popularity_metrics

    started = time.time()
    metrics = {}
    for split in ("val", "test"):
        metrics.update({f"{split}/{k}": v for k, v in popularity_metrics(config, split).items()})
    run_dir = Path(args.run_dir) if args.run_dir else \
        Path(config.run.out_dir) / f"recsys-{Path(args.config).stem}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    summary = {"app": "recsys", "model": "mostpop", "metrics": metrics, "wall_time_s": round(time.time() - started, 3)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nrun folder: {run_dir}")
    print(format_table([(k, f"{v:.6g}") for k, v in metrics.items()]))
    return 0


# --------------------------------------------------------------------------------------------------
# eval: the standard verb, with the checkpoint's item vocabulary (the data file must be its training data)

def _eval() -> Verb:
    def run(args: argparse.Namespace) -> int:
        from mambakit.engine.checkpoint import load_checkpoint, resolve_checkpoint

        from .models import stored_vocabulary
        from .task import RecsysTask

        path = resolve_checkpoint(args.checkpoint, prefer="best")
        vocabulary = stored_vocabulary(load_checkpoint(path)["model"], str(path))
        if vocabulary is None:
            raise ValueError(f"{path}: the checkpoint holds no item vocabulary (written by a mambakit older than "
                             f"the stored vocabularies): its item ids cannot be matched to a data file; retrain")
        return eval_verb("recsys", RecsysRecipe, lambda config: RecsysTask(config, vocabulary)).run(args)

    base = eval_verb("recsys", RecsysRecipe, _task)
    return Verb("eval", base.help + " (the data must be the checkpoint's training data: checked by fingerprint)",
                base.add_arguments, run)


# --------------------------------------------------------------------------------------------------
# recommend

def _recommend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT|RUN_DIR",
                        help="a training checkpoint, or a run folder (its best checkpoint)")
    parser.add_argument("--history", required=True, metavar="ITEM,ITEM,...",
                        help="the user's items in chronological order, as the dataset's original item tokens")
    parser.add_argument("--times", default=None, metavar="T,T,...",
                        help="unix timestamps of the history items (models that read time, e.g. TiM4Rec)")
    parser.add_argument("--k", type=int, default=10, help="how many items to recommend (default 10)")
    parser.add_argument("--keep-seen", action="store_true",
                        help="allow items already in the history (by default they are not recommended)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print the recommendations as JSON")


def _recommend_run(args: argparse.Namespace) -> int:
    from .recommend import format_recommendations, recommend

    history = [t.strip() for t in args.history.split(",") if t.strip()]
    times = None
    if args.times is not None:
        try:
            times = [float(t) for t in args.times.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--times: expected comma-separated numbers, got {args.times!r}") from None
    recs = recommend(args.checkpoint, history, k=args.k, times=times, exclude_seen=not args.keep_seen,
                     device=args.device)
    print(json.dumps(recs, indent=1) if args.json else format_recommendations(recs))
    return 0


RECOMMEND_VERB = Verb("recommend", "top-k next items for a history of item tokens (with titles when the data "
                                   "has an .item file)", _recommend_arguments, _recommend_run)


# --------------------------------------------------------------------------------------------------
# quickstart

def quickstart(recipe_path: str | Path = QUICK_RECIPE, overrides=(), run_dir: str | Path | None = None
               ) -> QuickstartResult:
    """Train Mamba4Rec on the embedded MovieLens-100k (quick recipe) and compare its test NDCG@10 / HR@10 with
    the most-popular ranking under the same leave-one-out full-ranking protocol."""
    from mambakit.engine.config import load_config
    from mambakit.engine.trainer import Trainer

    from .task import MODEL_TITLES

    started = time.time()
    path = Path(recipe_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the quick recipe is missing (it ships in the package, mambakit/configs/)")
    config = load_config(RecsysRecipe, path, list(overrides))
    if not config.eval.popularity_baseline or 10 not in config.eval.ks:
        raise ValueError(f"{path}: the quick recipe must keep eval.popularity_baseline true and 10 in eval.ks")
    result = Trainer(_task(config)).fit(run_dir, name_hint="recsys-quick")
    m = result.metrics
    print(f"recsys quickstart: test NDCG@10 {m['test/ndcg@10']:.4f} / HR@10 {m['test/hit@10']:.4f} vs most "
          f"popular NDCG@10 {m['test/pop_ndcg@10']:.4f} / HR@10 {m['test/pop_hit@10']:.4f}")
    return QuickstartResult(
        app="recsys", model=MODEL_TITLES.get(config.model.name, config.model.name),
        data=f"MovieLens-100k (RecBole atomic, 5-core, {_time_order(config)}), leave-one-out, full ranking; "
             f"HR@10 {m['test/hit@10']:.4f} vs {m['test/pop_hit@10']:.4f}",
        metric="test NDCG@10", value=float(m["test/ndcg@10"]),
        baseline="most popular", baseline_value=float(m["test/pop_ndcg@10"]),
        wall_time_s=time.time() - started, run_dir=str(result.run_dir))


def _time_order(config: RecsysRecipe) -> str:
    d = config.data
    if d.time_precision == "float32" and d.tie_break == "file":
        return "RecBole's time order"
    return f"{'exact' if d.time_precision == 'float64' else 'float32'} times, ties by {d.tie_break}"


# --------------------------------------------------------------------------------------------------
# mambakit.zoo.load_pretrained(RUN_DIR)

def _rebuild_model(config: dict, weights, source: str):
    """The recommender of a training checkpoint, without the interaction data: the item count (padding
    included) is the row count of `item_embedding.weight`, which every model here has, and the item
    vocabulary stored in the weights comes back with it (`models.stored_vocabulary(model)`)."""
    from mambakit.engine.config import from_dict

    from .models import attach_vocabulary, build_model, stored_vocabulary

    recipe = from_dict(RecsysRecipe, config, source)
    embedding = weights.get("item_embedding.weight")
    if embedding is None or embedding.ndim != 2:
        raise ValueError(f"{source}: cannot tell the number of items: no 2-d item_embedding.weight in the weights "
                         f"(model {recipe.model.name})")
    model = build_model(recipe.model, int(embedding.shape[0]), recipe.data.max_len)
    vocabulary = stored_vocabulary(weights, source)
    return model if vocabulary is None else attach_vocabulary(model, vocabulary)


APP = App(
    name="recsys",
    description="sequential recommendation: Mamba4Rec, TiM4Rec, SASRec, GRU4Rec on RecBole atomic data "
                "(leave-one-out, full ranking)",
    verbs=[_train(), _eval(), finetune_verb("recsys", RecsysRecipe, _task),
           RECOMMEND_VERB],
    quickstart=quickstart,
    datasets=DATASETS,
    rebuild_model=_rebuild_model,
)
