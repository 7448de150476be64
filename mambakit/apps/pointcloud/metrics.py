"""Point-cloud metrics as the papers report them (as fractions in [0, 1]; papers print percent).

Classification: overall accuracy (OA), mean class accuracy (mAcc: the mean over classes of the recall per
true class, over the classes that occur), per-class accuracy, confusion matrix (rows true, columns predicted).

Part segmentation (ShapeNetPart's protocol, PointNet's evaluation code): a shape of category c is scored over
c's parts only. Predictions are the argmax over c's part logits only (`restricted_predictions`); a part's IoU
is |pred = p and true = p| / |pred = p or true = p|, and a part absent from both prediction and truth counts
as IoU 1. A shape's IoU is the mean over its category's parts; instance mIoU is the mean over shapes, class
mIoU the mean over categories (present in the data) of their shapes' mean.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["confusion_matrix", "overall_accuracy", "per_class_accuracy", "mean_class_accuracy",
           "classification_metrics", "part_mask", "restricted_predictions", "shape_ious",
           "part_segmentation_metrics", "PartSegMeter"]


# --------------------------------------------------------------------------------------------------
# classification

def _check_pair(preds: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    if preds.shape != targets.shape or preds.dim() != 1:
        raise ValueError(f"{what}: preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must both be "
                         f"(N,) label vectors")


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) int64 counts: rows the true class, columns the predicted class."""
    preds, targets = torch.as_tensor(preds).long().flatten(), torch.as_tensor(targets).long().flatten()
    _check_pair(preds, targets, "confusion_matrix")
    for name, labels in (("preds", preds), ("targets", targets)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"confusion_matrix: {name} holds labels in [{int(labels.min())}, "
                             f"{int(labels.max())}], expected [0, {n_classes - 1}] for {n_classes} classes")
    index = targets * n_classes + preds
    return torch.bincount(index.cpu(), minlength=n_classes * n_classes).view(n_classes, n_classes)


def overall_accuracy(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """OA: the fraction of samples predicted right (nan for none)."""
    preds, targets = torch.as_tensor(preds).flatten(), torch.as_tensor(targets).flatten()
    _check_pair(preds, targets, "overall_accuracy")
    return (preds == targets).double().mean().item() if len(targets) else float("nan")


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """(C,) float64 recall of each true class from a confusion matrix; nan for a class with no samples."""
    cm = torch.as_tensor(cm).double()
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"per_class_accuracy: expected a square (C, C) confusion matrix, got {tuple(cm.shape)}")
    counts = cm.sum(1)
    return torch.where(counts > 0, cm.diag() / counts.clamp(min=1), torch.full_like(counts, float("nan")))


def mean_class_accuracy(cm: torch.Tensor) -> float:
    """mAcc: the mean of `per_class_accuracy` over the classes that occur (a class absent from the targets
    has no accuracy to average)."""
    acc = per_class_accuracy(cm)
    present = ~acc.isnan()
    return acc[present].mean().item() if present.any() else float("nan")


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """loss (plain cross-entropy, no smoothing), oa, macc of a split's logits (N, C) and targets (N,)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"classification_metrics: logits {tuple(logits.shape)} and targets "
                         f"{tuple(targets.shape)} do not match (expected (N, C) and (N,))")
    logits, targets = logits.float(), targets.long()
    preds = logits.argmax(1)
    cm = confusion_matrix(preds, targets, logits.shape[1])
    return {"loss": F.cross_entropy(logits, targets).item(), "oa": overall_accuracy(preds, targets),
            "macc": mean_class_accuracy(cm)}


# --------------------------------------------------------------------------------------------------
# part segmentation

def part_mask(parts_of_category: Sequence[Sequence[int]], n_parts: int, device=None) -> torch.Tensor:
    """(n_categories, n_parts) bool: mask[c, p] says part p belongs to category c. Checks the table."""
    if not parts_of_category:
        raise ValueError("parts_of_category is empty: expected one list of part ids per category")
    mask = torch.zeros(len(parts_of_category), n_parts, dtype=torch.bool)
    for c, parts in enumerate(parts_of_category):
        parts = list(parts)
        if not parts:
            raise ValueError(f"parts_of_category[{c}] is empty: every category needs at least one part")
        bad = [p for p in parts if not 0 <= int(p) < n_parts]
        if bad:
            raise ValueError(f"parts_of_category[{c}] has part ids {bad} outside [0, {n_parts - 1}] "
                             f"({n_parts} part labels)")
        mask[c, parts] = True
    return mask.to(device) if device is not None else mask


def _min_parts(parts_of_category: Sequence[Sequence[int]]) -> int:
    """The smallest part count the table fits in (1 + its largest part id)."""
    ids = [int(p) for parts in parts_of_category for p in parts]
    if not ids:
        raise ValueError("parts_of_category lists no parts: expected one list of part ids per category")
    return 1 + max(ids)


def _check_seg_inputs(targets: torch.Tensor, categories: torch.Tensor, n_categories: int, what: str) -> None:
    if targets.dim() != 2:
        raise ValueError(f"{what}: targets must be (B, N) part labels, got shape {tuple(targets.shape)}")
    if categories.shape != targets.shape[:1]:
        raise ValueError(f"{what}: categories must be (B,) = ({targets.shape[0]},), got {tuple(categories.shape)}")
    if categories.numel() and (categories.min() < 0 or categories.max() >= n_categories):
        raise ValueError(f"{what}: categories hold values in [{int(categories.min())}, {int(categories.max())}], "
                         f"expected [0, {n_categories - 1}] ({n_categories} categories in parts_of_category)")


def restricted_predictions(logits: torch.Tensor, categories: torch.Tensor,
                           parts_of_category: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, N) part predictions: for each shape the argmax over its own category's part logits only.
    logits (B, N, P), categories (B,)."""
    if logits.dim() != 3:
        raise ValueError(f"restricted_predictions: logits must be (B, N, P), got shape {tuple(logits.shape)}")
    categories = torch.as_tensor(categories, device=logits.device).long()
    mask = part_mask(parts_of_category, logits.shape[-1], logits.device)
    _check_seg_inputs(logits[..., 0], categories, len(mask), "restricted_predictions")
    allowed = mask[categories][:, None, :]                                   # (B, 1, P)
    return logits.masked_fill(~allowed, float("-inf")).argmax(-1)


def shape_ious(preds: torch.Tensor, targets: torch.Tensor, categories: torch.Tensor,
               parts_of_category: Sequence[Sequence[int]], n_parts: int | None = None) -> torch.Tensor:
    """(B,) float64 IoU of each shape, averaged over its category's parts (a part absent from both prediction
    and truth scores 1). preds, targets (B, N) part labels; categories (B,). A target label outside its
    category's parts is an error (a mislabelled file); a prediction outside them simply misses."""
    preds, targets = torch.as_tensor(preds).long(), torch.as_tensor(targets).long()
    categories = torch.as_tensor(categories).long().to(targets.device)
    if preds.shape != targets.shape:
        raise ValueError(f"shape_ious: preds {tuple(preds.shape)} and targets {tuple(targets.shape)} differ")
    if n_parts is None:
        n_parts = _min_parts(parts_of_category)
    mask = part_mask(parts_of_category, n_parts, targets.device)
    _check_seg_inputs(targets, categories, len(mask), "shape_ious")
    B = targets.shape[0]
    for name, labels in (("preds", preds), ("targets", targets)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= n_parts):
            raise ValueError(f"shape_ious: {name} hold labels in [{int(labels.min())}, {int(labels.max())}], "
                             f"expected [0, {n_parts - 1}]")
    allowed = mask[categories]                                               # (B, P)
    foreign = ~allowed.gather(1, targets)                                    # target outside its category
    if foreign.any():
        shape = int(foreign.any(1).nonzero()[0])
        labels = sorted(set(targets[shape][foreign[shape]].tolist()))
        own = mask[categories[shape]].nonzero().flatten().tolist()
        raise ValueError(f"shape_ious: shape {shape} (category {int(categories[shape])}) has target part labels "
                         f"{labels} that are not among its category's parts {own}")
    # Counts per (shape, part) by bincount over shape * P + label: O(B N) memory, any split size.
    row = torch.arange(B, device=targets.device)[:, None] * n_parts

    def count(index: torch.Tensor) -> torch.Tensor:
        return torch.bincount(index.flatten(), minlength=B * n_parts).view(B, n_parts).double()

    predicted, true = count(row + preds), count(row + targets)
    inter = count((row + targets)[preds == targets])
    union = predicted + true - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return (iou * allowed).sum(1) / allowed.sum(1)


def _summarise(ious: torch.Tensor, categories: torch.Tensor, n_categories: int,
               category_names: Sequence[str] | None) -> dict[str, float]:
    if category_names is not None and len(category_names) != n_categories:
        raise ValueError(f"category_names has {len(category_names)} names for {n_categories} categories")
    out = {"instance_miou": ious.mean().item() if len(ious) else float("nan")}
    per_category = {}
    for c in range(n_categories):
        picked = ious[categories == c]
        if len(picked):
            name = category_names[c] if category_names is not None else str(c)
            per_category[f"miou/{name}"] = picked.mean().item()
    out["class_miou"] = (sum(per_category.values()) / len(per_category)) if per_category else float("nan")
    out.update(per_category)
    return out


def part_segmentation_metrics(logits_or_preds: torch.Tensor, targets: torch.Tensor, categories: torch.Tensor,
                              parts_of_category: Sequence[Sequence[int]],
                              category_names: Sequence[str] | None = None) -> dict[str, float]:
    """instance_miou, class_miou, acc (point accuracy) and miou/<category> for each category present.
    logits_or_preds: (B, N, P) logits (restricted to each shape's category before the argmax) or (B, N)
    part predictions (used as given)."""
    targets = torch.as_tensor(targets).long()
    categories = torch.as_tensor(categories).long().to(targets.device)
    if logits_or_preds.dim() == 3:
        n_parts = logits_or_preds.shape[-1]
        preds = restricted_predictions(logits_or_preds, categories, parts_of_category)
    else:
        n_parts, preds = None, logits_or_preds.long()
    ious = shape_ious(preds, targets, categories, parts_of_category, n_parts)
    out = _summarise(ious, categories.cpu(), len(parts_of_category), category_names)
    out["acc"] = (preds == targets).double().mean().item() if targets.numel() else float("nan")
    return out


class PartSegMeter:
    """Accumulates per-shape IoUs batch by batch, so a split's (B, N, P) logits never need to be kept.

        meter = PartSegMeter(parts_of_category, category_names)
        for batch in loader: meter.update(model(pos, x, category), y, category)
        meter.compute()   # same keys as part_segmentation_metrics
    """

    def __init__(self, parts_of_category: Sequence[Sequence[int]], category_names: Sequence[str] | None = None):
        part_mask(parts_of_category, _min_parts(parts_of_category))         # check the table now
        self.parts_of_category = [list(map(int, parts)) for parts in parts_of_category]
        self.category_names = category_names
        self.reset()

    def reset(self) -> None:
        self._ious, self._categories, self._hits, self._points = [], [], 0, 0

    def update(self, logits_or_preds: torch.Tensor, targets: torch.Tensor, categories: torch.Tensor) -> None:
        with torch.no_grad():
            targets = torch.as_tensor(targets).long()
            categories = torch.as_tensor(categories).long().to(targets.device)
            if logits_or_preds.dim() == 3:
                n_parts = logits_or_preds.shape[-1]
                preds = restricted_predictions(logits_or_preds, categories, self.parts_of_category)
            else:
                n_parts, preds = None, logits_or_preds.long()
            self._ious.append(shape_ious(preds, targets, categories, self.parts_of_category, n_parts).cpu())
            self._categories.append(categories.cpu())
            self._hits += int((preds == targets).sum())
            self._points += targets.numel()

    def compute(self) -> dict[str, float]:
        ious = torch.cat(self._ious) if self._ious else torch.zeros(0, dtype=torch.float64)
        cats = torch.cat(self._categories) if self._categories else torch.zeros(0, dtype=torch.long)
        out = _summarise(ious, cats, len(self.parts_of_category), self.category_names)
        out["acc"] = self._hits / self._points if self._points else float("nan")
        return out
