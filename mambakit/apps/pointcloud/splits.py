"""A recipe's `data:` and `augment:` sections -> the train / val / test datasets and what their labels mean.

Sources and their splits:
    cgal               the embedded CGAL sets (cgal.py): train / test by mesh family; val carved from train
                       by family
    modelnet40_h5      ply_data_train / ply_data_test; val carved from train
    modelnet40_normal  modelnet40_train / modelnet40_test; val carved from train
    scanobjectnn       training / test; val carved from train
    shapenetpart       its own train / val / test lists
    pyg_modelnet       <Class>/train, <Class>/test; val carved from train
    folder             <class>/ (or train/ test/ levels): test and val carved from train when absent
Carving is stratified by class and grouped: clouds of one group (one mesh's samples: the name before '#',
one CGAL mesh family) stay on one side, so validation never scores a shape the model trained on.

Upstream PCM evaluates on the test split after every epoch and keeps the best (its "val" is the test set);
here the best epoch is chosen on a validation split carved from training, and test is scored once.

Transforms (training): sampling to n_points (random subset; FPS to `fps_presample` first when set), the
preset's scale (with a shift: openpoints' ScaleAndTranslate), centre + unit sphere, rotation about y,
jitter: the order of PCM's pipelines. Evaluation: the first n_points, centre + unit sphere when the preset
normalises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mambakit.data.errors import DataError

from .config import AugmentSettings, DataConfig

__all__ = ["PointCloudSplits", "build_splits", "train_transform", "eval_transform", "group_of"]

#: the parts of a CGAL category, by their index within it (cgal.py's slab rule)
CGAL_PART_NAMES = ("centre", "beside centre", "ends")


@dataclass
class PointCloudSplits:
    train: object
    val: object | None
    test: object | None
    classes: list[str]                                   # classification: class names; seg: category names
    parts_of_category: list[list[int]] | None = None      # seg: the part ids of each category
    part_names: list[str] | None = None                   # seg: a name per part id
    skipped: list = field(default_factory=list)           # (file, reason) of inputs left out

    @property
    def categories(self) -> list[str]:
        return self.classes


def train_transform(data: DataConfig, aug: AugmentSettings):
    from .data import (CenterAndNormalize, Compose, FPSThenRandom, Jitter, RandomRotate, RandomScale, SamplePoints,
                       ScaleAndTranslate)

    steps = [FPSThenRandom(aug.fps_presample, data.n_points) if aug.fps_presample else SamplePoints(data.n_points)]
    if aug.shift > 0:
        steps.append(ScaleAndTranslate(aug.scale, aug.shift, aug.anisotropic))
    elif aug.scales:
        steps.append(RandomScale(aug.scale, aug.anisotropic))
    if aug.center_normalize:
        steps.append(CenterAndNormalize())
    if aug.rotate_y > 0:
        steps.append(RandomRotate(axis=1, max_angle=math.radians(aug.rotate_y)))
    if aug.jitter_sigma > 0:
        steps.append(Jitter(aug.jitter_sigma, aug.jitter_clip))
    return Compose(steps)


def eval_transform(data: DataConfig, aug: AugmentSettings):
    from .data import CenterAndNormalize, Compose, FirstPoints

    steps = [FirstPoints(data.n_points)]
    if aug.center_normalize:
        steps.append(CenterAndNormalize())
    return Compose(steps)


def group_of(name: str) -> str:
    """The group a cloud belongs to for splitting: a CGAL mesh's family, else its name before '#'."""
    from .cgal import MESH_TABLE

    stem = str(name).split("#")[0]
    return MESH_TABLE[stem][1] if stem in MESH_TABLE else stem


def _labels_of(items: Sequence, seg: bool) -> np.ndarray:
    key = "category" if seg else "y"
    return np.array([int(getattr(items[i], key).reshape(-1)[0]) for i in range(len(items))])


def carve(items: Sequence, fraction: float, seed: int, seg: bool, what: str) -> tuple[list[int], list[int]]:
    """Split indices of `items` into (kept, carved): about `fraction` of each class's groups are carved."""
    if fraction <= 0:
        return list(range(len(items))), []
    labels = _labels_of(items, seg)
    groups = [group_of(getattr(items[i], "name", str(i))) for i in range(len(items))]
    rng = np.random.default_rng(seed)
    carved_groups = set()
    for label in np.unique(labels):
        own = sorted({g for g, lab in zip(groups, labels) if lab == label})
        if len(own) < 2:
            continue                    # a class with one group stays in training
        take = max(1, int(round(fraction * len(own))))
        carved_groups.update(rng.choice(own, size=min(take, len(own) - 1), replace=False).tolist())
    kept = [i for i, g in enumerate(groups) if g not in carved_groups]
    carved = [i for i, g in enumerate(groups) if g in carved_groups]
    if not carved:
        warnings.warn(f"{what}: no class has two groups to carve a {fraction:.0%} split from; none carved")
    return kept, carved


class _Subset(Sequence):
    def __init__(self, items: Sequence, indices: list[int]):
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.items[self.indices[i]]


def _read_source(data: DataConfig) -> dict:
    """{"train": items, "test": items or None, "val": items or None, "classes", "parts" (seg), "skipped"}."""
    from . import data as D

    src, root = data.source, data.root
    if src != "cgal" and not root:
        raise DataError(f"data.source {src!r} reads files from disk: set data.root to the folder that holds them "
                        f"(only source 'cgal' needs no root)")
    if src == "cgal":
        from .cgal import build_cgal_classification, build_cgal_partseg

        build = build_cgal_partseg if data.cgal_task == "seg" else build_cgal_classification
        sets = build(n_points=max(data.n_points, 1024), seed=data.split_seed)
        return {"train": sets["train"], "test": sets["test"], "val": None, "classes": list(sets["train"].classes),
                "parts": getattr(sets["train"], "parts", None), "skipped": list(getattr(sets["train"], "skipped", []))}
    if src == "modelnet40_h5":
        train, test = D.read_modelnet40_h5(root, "train"), D.read_modelnet40_h5(root, "test")
    elif src == "modelnet40_normal":
        train, test = D.read_modelnet_normal(root, "train"), D.read_modelnet_normal(root, "test")
    elif src == "scanobjectnn":
        train, test = D.read_scanobjectnn_h5(root, "train"), D.read_scanobjectnn_h5(root, "test")
    elif src == "shapenetpart":
        train = D.read_shapenetpart(root, "train")
        return {"train": train, "val": D.read_shapenetpart(root, "val"), "test": D.read_shapenetpart(root, "test"),
                "classes": list(train.classes), "parts": train.parts, "skipped": []}
    elif src in ("pyg_modelnet", "folder"):
        return _read_folder(data)
    else:
        raise DataError(f"data.source {src!r} is not one of the known sources")
    return {"train": train, "test": test, "val": None, "classes": list(train.classes), "parts": None, "skipped": []}


def _read_folder(data: DataConfig) -> dict:
    from pathlib import Path

    from .data import read_mesh_folder

    root = Path(data.root)
    has_test = (root / "test").is_dir() or any((d / "test").is_dir() for d in root.iterdir() if d.is_dir())
    n = max(data.n_points, 1024)
    train = read_mesh_folder(root, "train" if has_test else None, n_points=n, seed=data.split_seed,
                             classes=data.class_names)
    test = read_mesh_folder(root, "test", n_points=n, seed=data.split_seed, classes=train.classes) if has_test else None
    skipped = list(train.skipped) + list(test.skipped if test is not None else [])
    if skipped and data.bad_files == "error":
        raise DataError(f"{root}: {len(skipped)} file(s) could not be used, first {skipped[0][0]}: {skipped[0][1]} "
                        f"(set data.bad_files=skip to leave them out)")
    return {"train": train, "test": test, "val": None, "classes": list(train.classes), "parts": None,
            "skipped": skipped}


def _select_classes(read: dict, names: list[str] | None) -> None:
    if names is None or read["parts"] is not None:
        return
    missing = [n for n in names if n not in read["classes"]]
    if missing:
        raise DataError(f"data.class_names: {missing} not among the data's classes {read['classes']}")
    if names != read["classes"]:
        raise DataError(f"data.class_names {names} must list the data's classes in its order {read['classes']} "
                        f"(a subset or reordering of a labelled set is not supported; for a folder, only the named "
                        f"subfolders are read)")


def build_splits(data: DataConfig, aug: AugmentSettings) -> PointCloudSplits:
    from .data import PointCloudDataset

    seg = data.task == "seg"
    read = _read_source(data)
    _select_classes(read, data.class_names)
    train, val, test = read["train"], read["val"], read["test"]
    if test is None:                        # a folder without a test split: carve one (20%), then val
        kept, carved = carve(train, 0.2, data.split_seed + 1, seg, "test split")
        train, test = _Subset(train, kept), _Subset(train, carved)
    if val is None and data.val_fraction > 0:
        kept, carved = carve(train, data.val_fraction, data.split_seed, seg, "validation split")
        train, val = _Subset(train, kept), (_Subset(train, carved) if carved else None)
    train_tf, eval_tf = train_transform(data, aug), eval_transform(data, aug)
    out = PointCloudSplits(train=PointCloudDataset(train, train_tf),
                           val=PointCloudDataset(val, eval_tf) if val is not None and len(val) else None,
                           test=PointCloudDataset(test, eval_tf) if test is not None and len(test) else None,
                           classes=read["classes"], skipped=read["skipped"])
    if seg:
        parts = read["parts"]
        out.parts_of_category = [list(parts[c]) for c in read["classes"]]
        n_parts = 1 + max(p for ps in out.parts_of_category for p in ps)
        out.part_names = [f"part {p}" for p in range(n_parts)]
        for c, ps in zip(read["classes"], out.parts_of_category):
            for k, p in enumerate(ps):
                out.part_names[p] = (f"{c}: {CGAL_PART_NAMES[k]}" if data.source == "cgal" else f"{c} {k}")
    return out
