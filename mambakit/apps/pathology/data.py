"""MIL bags from the CSVs and split files MambaMIL (and CLAM) users already have.

Subtyping CSV: `dir,case_id,slide_id,label` (one bag per slide; `dir` may be absent when a features folder
is given). Survival CSV: `case_id,slide_id,censorship,survival_months` (one bag per patient: the patient's
slides concatenated, as MambaMIL does). Split files `splits_{k}.csv`: columns `train`, `val` and optionally
`test` holding slide ids (subtyping) or case ids (survival), shorter columns padded with empty cells.

Feature paths (first match wins):
- `features: DIR` -> `DIR/pt_files/<slide_id>.pt` (what `mambakit pathology extract` writes)
- `layout: mambamil` (subtyping) -> `{dir}/pt_files/{backbone}/{slide_id}.pt` when patch_size is '512',
  else `{dir}/{patch_size}/pt_files/{backbone}/{slide_id}.pt` (MambaMIL's `dataset_generic.py`)
- `layout: mambamil` (survival) -> `{data_root}/pt_files/{backbone}/{slide_id without .svs}.pt`
  (MambaMIL's `main_survival.py`; upstream strips with `rstrip('.svs')`, which removes characters, not the
  suffix; here the suffix is removed, which is the same for every TCGA slide name)
`format: h5` reads `h5_files/<slide_id>.h5` (`features`, and `coords` for heatmaps) instead of `.pt`.

Survival labels follow MambaMIL's `Generic_WSI_Survival_Dataset`: `n_bins` quantile bins of the uncensored
patients' `survival_months` (pd.qcut), the outer edges widened to the whole cohort's min - eps and
max + eps, then every patient binned with left-closed intervals (pd.cut, right=False).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["Bag", "BagDataset", "read_subtyping_csv", "read_survival_csv", "survival_bins", "read_split",
           "list_split_files", "feature_path", "load_bag", "collate_bag", "make_splits", "SLIDE_SUFFIXES"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")


@dataclass
class Bag:
    """One training example: the slides whose features form the bag, and its target."""
    bag_id: str                      # slide id (subtyping) or case id (survival)
    slide_ids: list[str]
    paths: list[Path]
    label: int                       # class (subtyping) or time bin (survival)
    censorship: float = 0.0          # survival: 1 = censored
    time: float = float("nan")       # survival: survival_months


def _read_csv(path: str | os.PathLike, required: Sequence[str]):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV {path} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)} "
                         f"(expected {', '.join(required)})")
    for col in required:
        empty = df.index[df[col].str.strip() == ""].tolist()
        if empty:
            raise ValueError(f"{path}: column '{col}' is empty on row(s) {', '.join(str(i + 2) for i in empty[:5])}")
    return df


def strip_slide_suffix(slide_id: str) -> str:
    for suffix in SLIDE_SUFFIXES:
        if slide_id.lower().endswith(suffix):
            return slide_id[: -len(suffix)]
    return slide_id


@dataclass
class FeatureLayout:
    features: str | None = None        # plain folder with pt_files/ (or h5_files/)
    layout: str = "plain"              # plain | mambamil
    backbone: str = "resnet50"         # mambamil layout: pt_files/<backbone>/
    patch_size: str = "512"            # mambamil layout: '512' at the root, else <dir>/<patch_size>/
    data_root: str | None = None       # survival (and subtyping without a dir column) in mambamil layout
    format: str = "pt"                 # pt | h5

    def __post_init__(self):
        if self.layout not in ("plain", "mambamil"):
            raise ValueError(f"layout must be 'plain' or 'mambamil', got {self.layout!r}")
        if self.format not in ("pt", "h5"):
            raise ValueError(f"format must be 'pt' or 'h5', got {self.format!r}")


def feature_path(slide_id: str, layout: FeatureLayout, row_dir: str | None = None, survival: bool = False,
                 base: Path | None = None) -> Path:
    """Where the features of `slide_id` live (see the module docstring)."""
    folder = "pt_files" if layout.format == "pt" else "h5_files"
    ext = ".pt" if layout.format == "pt" else ".h5"
    sid = strip_slide_suffix(slide_id)
    if layout.features is not None:
        root = _resolve(layout.features, base)
        return root / folder / f"{sid}{ext}"
    if layout.layout == "mambamil":
        if layout.format == "h5":
            root = _resolve(layout.data_root or row_dir or ".", base)
            return root / "h5_files" / f"{sid}.h5"
        if survival:
            if layout.data_root is None:
                raise ValueError("survival with layout 'mambamil' needs data.data_root")
            return _resolve(layout.data_root, base) / "pt_files" / layout.backbone / f"{sid}.pt"
        root = _resolve(layout.data_root or row_dir or ".", base)
        if str(layout.patch_size) == "512":
            return root / "pt_files" / layout.backbone / f"{sid}.pt"
        return root / str(layout.patch_size) / "pt_files" / layout.backbone / f"{sid}.pt"
    if row_dir:
        return _resolve(row_dir, base) / folder / f"{sid}{ext}"
    raise ValueError(f"no features folder for slide {slide_id!r}: set data.features (a folder with {folder}/) "
                     f"or give a 'dir' column in the CSV")


def _resolve(path: str, base: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def read_subtyping_csv(path: str | os.PathLike, layout: FeatureLayout, classes: Sequence[str] | None = None,
                       base: Path | None = None) -> tuple[list[Bag], list[str]]:
    """Bags (one per slide) and the class names (index = label). `classes` fixes the order (e.g.
    [LUAD, LUSC] as MambaMIL's label_dict); by default the sorted distinct labels."""
    df = _read_csv(path, ["case_id", "slide_id", "label"])
    labels = [str(v).strip() for v in df["label"]]
    if classes is None:
        classes = sorted(set(labels))
    classes = [str(c) for c in classes]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{path}: label(s) {', '.join(unknown)} are not among the classes {', '.join(classes)}")
    if len(classes) < 2:
        raise ValueError(f"{path}: need at least 2 classes, found {classes}")
    dupes = df["slide_id"][df["slide_id"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"{path}: slide id(s) {', '.join(dupes[:5])} appear more than once")
    has_dir = "dir" in df.columns
    bags = []
    for i, row in df.iterrows():
        sid = row["slide_id"].strip()
        fpath = feature_path(sid, layout, row["dir"].strip() if has_dir else None, base=base)
        bags.append(Bag(sid, [sid], [fpath], classes.index(labels[i])))
    return bags, classes


def survival_bins(times: np.ndarray, censorship: np.ndarray, n_bins: int = 4, eps: float = 1e-6) -> np.ndarray:
    """Bin edges as MambaMIL: quantiles of the uncensored times, outer edges at min - eps and max + eps."""
    import pandas as pd

    times = np.asarray(times, dtype=np.float64)
    censorship = np.asarray(censorship, dtype=np.float64)
    uncensored = times[censorship < 1]
    if len(uncensored) < n_bins:
        raise ValueError(f"{len(uncensored)} uncensored patient(s) cannot define {n_bins} quantile bins")
    _, edges = pd.qcut(uncensored, q=n_bins, retbins=True, labels=False)
    edges = np.asarray(edges, dtype=np.float64)
    edges[-1] = times.max() + eps
    edges[0] = times.min() - eps
    return edges


def _bin(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """pd.cut(times, edges, right=False, include_lowest=True, labels=False)."""
    import pandas as pd

    return pd.cut(times, bins=edges, right=False, include_lowest=True, labels=False).astype(int)


def read_survival_csv(path: str | os.PathLike, layout: FeatureLayout, n_bins: int = 4,
                      base: Path | None = None) -> tuple[list[Bag], np.ndarray]:
    """Bags (one per patient, slides concatenated in CSV order) and the bin edges."""
    df = _read_csv(path, ["case_id", "slide_id", "censorship", "survival_months"])
    try:
        df["censorship"] = df["censorship"].astype(float)
        df["survival_months"] = df["survival_months"].astype(float)
    except ValueError as e:
        raise ValueError(f"{path}: censorship and survival_months must be numbers: {e}") from None
    bad = df.index[~df["censorship"].isin([0.0, 1.0])].tolist()
    if bad:
        raise ValueError(f"{path}: censorship must be 0 or 1 (row(s) {', '.join(str(i + 2) for i in bad[:5])})")
    if (df["survival_months"] < 0).any():
        raise ValueError(f"{path}: survival_months must be >= 0")
    patients = df.drop_duplicates("case_id")
    for case, group in df.groupby("case_id", sort=False):
        if group["censorship"].nunique() > 1 or group["survival_months"].nunique() > 1:
            raise ValueError(f"{path}: case {case} has slides with different censorship / survival_months")
    edges = survival_bins(patients["survival_months"].to_numpy(), patients["censorship"].to_numpy(), n_bins)
    labels = _bin(patients["survival_months"].to_numpy(), edges)
    bags = []
    for (case, c, t), label in zip(patients[["case_id", "censorship", "survival_months"]].itertuples(index=False),
                                   labels):
        slides = [s.strip() for s in df.loc[df["case_id"] == case, "slide_id"]]
        paths = [feature_path(s, layout, survival=True, base=base) for s in slides]
        bags.append(Bag(case, slides, paths, int(label), float(c), float(t)))
    return bags, edges


def list_split_files(split_dir: str | os.PathLike) -> dict[int, Path]:
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist")
    found = {}
    for p in split_dir.glob("splits_*.csv"):
        tail = p.stem.removeprefix("splits_")
        if tail.isdigit():
            found[int(tail)] = p
    if not found:
        raise FileNotFoundError(f"no splits_<k>.csv in {split_dir}")
    return dict(sorted(found.items()))


def read_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """{'train': [...], 'val': [...], 'test': [...]} from a MambaMIL/CLAM split file."""
    import pandas as pd

    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("train", "val") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected train, val (and test)")
    out = {}
    for col in ("train", "val", "test"):
        if col in df.columns:
            out[col] = [v.strip() for v in df[col] if v.strip()]
    seen = {}
    for col, ids in out.items():
        for i in ids:
            if i in seen and seen[i] != col:
                raise ValueError(f"{path}: id {i} is in both '{seen[i]}' and '{col}'")
            seen[i] = col
    return out


def select(bags: list[Bag], ids: Sequence[str], where: str) -> list[Bag]:
    """The bags named in a split column, in the split's order; unknown ids are an error."""
    by_id = {b.bag_id: b for b in bags}
    # survival split files list case ids; subtyping ones slide ids (possibly with an extension)
    unknown = [i for i in ids if i not in by_id and strip_slide_suffix(i) not in by_id]
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} id(s) not in the label CSV, e.g. {', '.join(unknown[:5])}")
    return [by_id.get(i) or by_id[strip_slide_suffix(i)] for i in ids]


def make_splits(bags: list[Bag], n_folds: int = 5, val_share: float = 0.2, test_share: float = 0.2,
                seed: int = 0) -> list[dict[str, list[str]]]:
    """Stratified random splits (by label), one per fold, for data without split files."""
    rng = np.random.default_rng(seed)
    folds = []
    for _ in range(n_folds):
        split = {"train": [], "val": [], "test": []}
        for label in sorted({b.label for b in bags}):
            ids = [b.bag_id for b in bags if b.label == label]
            ids = [ids[j] for j in rng.permutation(len(ids))]
            n_val = int(round(val_share * len(ids)))
            n_test = int(round(test_share * len(ids)))
            split["val"] += ids[:n_val]
            split["test"] += ids[n_val:n_val + n_test]
            split["train"] += ids[n_val + n_test:]
        folds.append(split)
    return folds


# --------------------------------------------------------------------------------------------------
# loading bags

def load_features(path: Path, with_coords: bool = False):
    """(N, D) float32 features (and (N, 2) coords when asked; needs an h5 file)."""
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist")
    coords = None
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path}: no 'features' dataset")
            feats = torch.from_numpy(np.asarray(f["features"][:], dtype=np.float32))
            if with_coords:
                if "coords" not in f:
                    raise ValueError(f"{path}: no 'coords' dataset")
                coords = np.asarray(f["coords"][:])
    else:
        feats = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(feats, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor (N, D), got {type(feats).__name__}")
        if with_coords:
            h5 = path.parent.parent / "h5_files" / f"{path.stem}.h5"
            _, coords = load_features(h5, with_coords=True)
    if feats.dim() != 2 or feats.shape[0] == 0:
        raise ValueError(f"{path}: expected features of shape (N, D) with N >= 1, got {tuple(feats.shape)}")
    if coords is not None and len(coords) != feats.shape[0]:
        raise ValueError(f"{path}: {feats.shape[0]} feature rows but {len(coords)} coordinates")
    return (feats.float(), coords) if with_coords else feats.float()


def load_bag(bag: Bag, in_dim: int | None = None) -> torch.Tensor:
    parts = [load_features(p) for p in bag.paths]
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise ValueError(f"bag {bag.bag_id}: slides have different feature sizes {sorted(dims)}")
    feats = torch.cat(parts, dim=0)
    if in_dim is not None and feats.shape[1] != in_dim:
        raise ValueError(f"bag {bag.bag_id}: features are {feats.shape[1]}-d ({bag.paths[0]}), but the model "
                         f"expects in_dim={in_dim}")
    return feats


class BagDataset(torch.utils.data.Dataset):
    """Items: {'features': (N, D), 'label': int64 scalar, 'censorship', 'time' (float32), 'index'}."""

    def __init__(self, bags: list[Bag], in_dim: int | None = None, cache: bool = False):
        if not bags:
            raise ValueError("empty split: no bags")
        self.bags = bags
        self.in_dim = in_dim
        self.cache = {} if cache else None

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict:
        bag = self.bags[index]
        if self.cache is not None and index in self.cache:
            feats = self.cache[index]
        else:
            feats = load_bag(bag, self.in_dim)
            if self.cache is not None:
                self.cache[index] = feats
        return {"features": feats, "label": torch.tensor(bag.label, dtype=torch.long),
                "censorship": torch.tensor(bag.censorship, dtype=torch.float32),
                "time": torch.tensor(bag.time, dtype=torch.float32), "index": torch.tensor(index)}

    def labels(self) -> np.ndarray:
        return np.array([b.label for b in self.bags])


def collate_bag(items: list[dict]) -> dict:
    """Batch size 1, as MIL bags differ in length: features (1, N, D), the rest (1,)."""
    if len(items) != 1:
        raise ValueError(f"MIL bags have different lengths, so batch_size must be 1 (use train.grad_accum "
                         f"to accumulate gradients over bags); got a batch of {len(items)}")
    item = items[0]
    return {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
