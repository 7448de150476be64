"""The MIL task the engine trains (subtyping or survival), k-fold runs, and heatmaps from a checkpoint.

Subtyping: cross-entropy; metrics AUC (MambaMIL's), accuracy, balanced accuracy, macro F1, loss.
Survival: MambaMIL's NLL survival loss on 4 discrete-time bins (alpha from the recipe for training, 0 for
validation as upstream); risk = -sum_t S(t); metric Harrell's C-index (scikit-survival's definition).
Batch size 1 (bags differ in length) with gradient accumulation from `train.grad_accum` (MambaMIL's --gc),
class-balanced sampling (MambaMIL's --weighted_sample) through `train_order`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mambakit.engine.task import Datasets, Task

from .config import MILRecipe
from .data import (BagDataset, FeatureLayout, collate_bag, list_split_files, make_splits, read_split,
                   read_subtyping_csv, read_survival_csv, select)
from .losses import hazards_and_survival, nll_surv_loss
from .metrics import classification_metrics, concordance_index_censored
from .models import build_mil_model

__all__ = ["MILTask", "run_folds", "fold_summary"]


def _layout(data) -> FeatureLayout:
    return FeatureLayout(features=data.features, layout=data.layout, backbone=data.backbone,
                         patch_size=str(data.patch_size), data_root=data.data_root, format=data.format)


class MILTask(Task):
    app = "pathology"

    def __init__(self, config: MILRecipe):
        super().__init__(config)
        data = config.data
        layout = _layout(data)
        if data.task == "subtyping":
            self.bags, self.classes = read_subtyping_csv(data.csv, layout, data.classes)
            self.n_outputs = len(self.classes)
            self.bin_edges = None
        else:
            self.bags, self.bin_edges = read_survival_csv(data.csv, layout, data.n_bins)
            self.classes = [f"bin{i}" for i in range(data.n_bins)]
            self.n_outputs = data.n_bins
        self.splits = self._splits()
        self._train_bags = self.splits["train"]

    # -- data -----------------------------------------------------------------------------------------
    def _splits(self) -> dict[str, list]:
        data = self.config.data
        if data.split_dir is not None:
            files = list_split_files(data.split_dir)
            if data.fold not in files:
                raise ValueError(f"data.fold={data.fold}: no splits_{data.fold}.csv in {data.split_dir} "
                                 f"(found folds {', '.join(map(str, files))})")
            ids = read_split(files[data.fold])
            where = str(files[data.fold])
        else:
            ids = make_splits(self.bags, n_folds=data.fold + 1, val_share=data.val_share,
                              test_share=data.test_share, seed=data.split_seed)[data.fold]
            where = "generated split"
        out = {name: select(self.bags, ids.get(name, []), f"{where} column '{name}'") for name in ("train", "val", "test")}
        if not out["train"] or not out["val"]:
            raise ValueError(f"{where}: the train and val splits must not be empty")
        return out

    def build_datasets(self) -> Datasets:
        data, in_dim = self.config.data, self.config.model.in_dim
        make = lambda bags: BagDataset(bags, in_dim=in_dim, cache=data.cache) if bags else None  # noqa: E731
        return Datasets(train=make(self.splits["train"]), val=make(self.splits["val"]),
                        test=make(self.splits["test"]), collate_fn=collate_bag)

    def train_order(self, epoch: int, generator: torch.Generator):
        """MambaMIL's WeightedRandomSampler: draw len(train) bags with replacement, weight N / n_class
        (survival: classes are (bin, censorship) pairs, as upstream's label_dict)."""
        if not self.config.data.weighted_sample:
            return None
        keys = [(b.label, int(b.censorship)) if self.config.data.task == "survival" else b.label
                for b in self._train_bags]
        counts = {k: keys.count(k) for k in set(keys)}
        weights = torch.tensor([len(keys) / counts[k] for k in keys], dtype=torch.float64)
        return torch.multinomial(weights, len(keys), replacement=True, generator=generator).tolist()

    # -- model ----------------------------------------------------------------------------------------
    def build_model(self):
        cfg = dict(vars(self.config.model))
        name = cfg.pop("name")
        in_dim = cfg.pop("in_dim")
        return build_mil_model(name, in_dim, self.n_outputs, **cfg)

    # -- steps ----------------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, batch: dict, alpha: float, reduce: bool = True) -> torch.Tensor:
        if self.config.data.task == "subtyping":
            return F.cross_entropy(logits, batch["label"], reduction="mean" if reduce else "none")
        hazards, survival = hazards_and_survival(logits)
        if reduce:
            return nll_surv_loss(hazards, survival, batch["label"], batch["censorship"], alpha)
        return torch.stack([nll_surv_loss(hazards[i:i + 1], survival[i:i + 1], batch["label"][i:i + 1],
                                          batch["censorship"][i:i + 1], alpha) for i in range(len(logits))])

    def training_step(self, model, batch):
        logits = model(batch["features"])
        return self._loss(logits, batch, self.config.loss.alpha)

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        logits = model(batch["features"]).float()
        out = {"loss": self._loss(logits, batch, 0.0, reduce=False), "index": batch["index"]}
        if self.config.data.task == "subtyping":
            out.update(prob=torch.softmax(logits, dim=1), label=batch["label"])
        else:
            _, survival = hazards_and_survival(logits)
            out.update(risk=-survival.sum(dim=1), time=batch["time"], censorship=batch["censorship"],
                       label=batch["label"])
        return out

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        metrics = {"loss": float(outputs["loss"].double().mean())}
        if self.config.data.task == "subtyping":
            metrics.update(classification_metrics(outputs["label"].cpu().numpy(), outputs["prob"].cpu().numpy()))
        else:
            event = (1 - outputs["censorship"].cpu().numpy()).astype(bool)
            metrics["c_index"] = concordance_index_censored(event, outputs["time"].cpu().numpy(),
                                                            outputs["risk"].cpu().numpy())
        return metrics

    # -- artefacts ------------------------------------------------------------------------------------
    def on_fit_end(self, model, run_dir) -> None:
        cfg = self.config.heatmaps
        (Path(run_dir) / "classes.json").write_text(json.dumps(
            {"classes": self.classes, "bin_edges": None if self.bin_edges is None else list(map(float, self.bin_edges))},
            indent=1) + "\n")
        meta = Path(self.config.data.features or "") / "features_meta.json"
        if self.config.data.features and meta.is_file():    # the extractor travels with the run (heatmap reads it)
            (Path(run_dir) / "features_meta.json").write_text(meta.read_text())
        if cfg.count <= 0:
            return
        if cfg.slides is None:
            print("[pathology] heatmaps.count > 0 but heatmaps.slides is not set; no heatmaps drawn")
            return
        from .inference import heatmap_for_bag

        bags = (self.splits["test"] or self.splits["val"])[: cfg.count]
        for bag in bags:
            try:
                heatmap_for_bag(model, bag, cfg.slides, Path(run_dir) / "heatmaps" / f"{bag.bag_id}.png",
                                classes=self.classes, normalize=cfg.normalize, max_size=cfg.max_size)
            except (FileNotFoundError, ValueError, NotImplementedError) as e:
                print(f"[pathology] heatmap for {bag.bag_id} skipped: {e}")


# --------------------------------------------------------------------------------------------------
# k-fold

def fold_summary(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Per-fold metric rows plus mean and std rows (sample std, ddof=1, as pandas in MambaMIL's summary),
    and a markdown table with `mean ± std`."""
    keys = [k for k in rows[0] if k != "fold" and isinstance(rows[0][k], (int, float))]
    table = [dict(r) for r in rows]
    mean = {"fold": "mean", **{k: float(np.nanmean([r[k] for r in rows])) for k in keys}}
    std = {"fold": "std", **{k: float(np.nanstd([r[k] for r in rows], ddof=1)) if len(rows) > 1 else float("nan")
                             for k in keys}}
    table += [mean, std]
    lines = ["| metric | " + " | ".join(f"fold {r['fold']}" for r in rows) + " | mean ± std |",
             "|---|" + "---|" * (len(rows) + 1)]
    for k in keys:
        cells = " | ".join(f"{r[k]:.4f}" for r in rows)
        lines.append(f"| {k} | {cells} | {mean[k]:.4f} ± {std[k]:.4f} |")
    return table, "\n".join(lines)


def run_folds(config: MILRecipe, folds: list[int], run_dir: str | Path | None, fit: Callable[[MILRecipe, Path | None], Any],
              name_hint: str = "pathology") -> tuple[list[dict[str, Any]], str]:
    """Train one run per fold (run_dir/fold_k), then write summary.csv and summary.md into run_dir."""
    import copy
    import csv
    import datetime as dt

    base = Path(run_dir) if run_dir is not None else \
        Path(config.run.out_dir) / f"{name_hint}-kfold-{dt.datetime.now():%Y%m%d-%H%M%S}"
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in folds:
        cfg = copy.deepcopy(config)
        cfg.data.fold = k
        cfg.data.folds = None
        result = fit(cfg, base / f"fold_{k}")
        row = {"fold": k}
        row.update({key: float(v) for key, v in result.metrics.items()
                    if isinstance(v, (int, float)) and (key.startswith("val/") or key.startswith("test/"))})
        rows.append(row)
    table, markdown = fold_summary(rows)
    with open(base / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (base / "summary.md").write_text(markdown + "\n")
    return table, markdown


def _isnan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
