"""The recipe schema of the point-cloud app: `data:`, `model:`, `augment:`, `eval:` plus the engine's `train:`
and `run:` sections. A recipe (configs/pointcloud/*.yaml) reads on its own; every key is checked here.

No torch import: `mambakit --help` imports this module. Upstream's training defaults (lr, epochs, batch size)
live in the recipes, not here; the augmentation presets are the published ones because a preset is a name
for exactly those values.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from mambakit.engine.schema import RunConfig, TrainConfig

__all__ = ["DATA_SOURCES", "SEG_SOURCES", "FEATURE_CHANNELS", "MODEL_NAMES", "POINT_ORDERS", "AUGMENT_PRESETS",
           "DataConfig", "ModelConfig", "AugmentSettings", "AugmentConfig", "EvalConfig", "PointCloudRecipe",
           "in_channels_of"]

DATA_SOURCES = ("cgal", "modelnet40_h5", "modelnet40_normal", "scanobjectnn", "shapenetpart", "pyg_modelnet",
                "folder")
SEG_SOURCES = ("shapenetpart",)              # part segmentation sets (cgal is either, by `cgal_task`)
SOURCES_WITHOUT_NORMALS = ("scanobjectnn",)  # ScanObjectNN's h5 files hold xyz only
# Input channels the model sees for each `features` choice (interfaces: xyz, + height, + normals).
FEATURE_CHANNELS = {"xyz": 3, "xyz_height": 4, "xyz_normals": 6, "xyz_normals_height": 7}
MODEL_NAMES = ("pcm", "pcm_tiny", "pointnet2_ssg", "point_transformer", "dgcnn")
# mambakit.core.orders.PointOrder.KINDS, repeated here so this module stays free of torch (a test checks it).
POINT_ORDERS = ("hilbert", "hilbert_trans", "z", "z_trans", "xyz", "xzy", "yxz", "yzx", "zxy", "zyx")

# Literal[tuple] lists the tuple's items: one list of names for the schema and for the code.
Source = Literal[DATA_SOURCES]
Features = Literal[tuple(FEATURE_CHANNELS)]
ModelName = Literal[MODEL_NAMES]
Task = Literal["cls", "seg"]


def in_channels_of(features: str) -> int:
    """The model's input channel count for a `data.features` choice (xyz 3, xyz_height 4, xyz_normals 6)."""
    if features not in FEATURE_CHANNELS:
        raise ValueError(f"unknown features {features!r}; expected one of {', '.join(FEATURE_CHANNELS)}")
    return FEATURE_CHANNELS[features]


def _check_fraction(name: str, value: float, upper_open: bool = True) -> None:
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must lie in [0, 1{')' if upper_open else ']'}, got {value}")


# --------------------------------------------------------------------------------------------------
# data:

@dataclass
class DataConfig:
    """Where the clouds come from and how they become model input.

    source:
      cgal               the embedded set built from the CGAL demo meshes (fetched once into the cache);
                         `cgal_task` picks its classification or its part-segmentation variant.
      modelnet40_h5      `root` holds modelnet40_ply_hdf5_2048/ply_data_{train,test}*.h5 (what PCM reads).
      modelnet40_normal  `root` holds modelnet40_normal_resampled/ (xyz + normals text files).
      scanobjectnn       `root` holds main_split/{training,test}_objectdataset_augmentedrot_scale75.h5.
      shapenetpart       `root` holds shapenetcore_partanno_segmentation_benchmark_v0_normal/ (part seg).
      pyg_modelnet       `root` holds PyG's ModelNet raw layout, <Class>/{train,test}/*.off.
      folder             `root` holds one subfolder of meshes / point files per class (optionally under
                         train/ and test/).
    n_points: points per cloud given to the model (every cloud of a batch has this many).
    features: the per-point input: "xyz" (3 channels), "xyz_height" (4: + height above the lowest point along
      the gravity axis y, as PCM's ScanObjectNN setup), "xyz_normals" (6), "xyz_normals_height" (7: PCM's
      ShapeNetPart input, `feature_keys: pos,x,heights`).
    val_fraction: share of the training split held out for validation, stratified by class with `split_seed`;
      0 = no validation split. A source with its own validation list (ShapeNetPart) uses that instead.
    class_names: fixes the class order (and count) instead of the reader's; with `folder`, only these
      subfolders are read.
    bad_files: a file that cannot be read: "error" refuses the data naming it, "skip" leaves it out and
      reports the count.
    cache_points: keep clouds sampled from meshes on disk, so later epochs and runs do not re-sample them.
    """
    source: Source = "cgal"
    root: str | None = None
    cgal_task: Task = "cls"
    n_points: int = 1024
    features: Features = "xyz"
    val_fraction: float = 0.1
    split_seed: int = 0
    class_names: list[str] | None = None
    bad_files: Literal["error", "skip"] = "error"
    cache_points: bool = True

    def __post_init__(self):
        if self.n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {self.n_points}")
        _check_fraction("val_fraction", self.val_fraction)
        if "normals" in self.features and self.source in SOURCES_WITHOUT_NORMALS:
            raise ValueError(f"features {self.features!r} needs normals, which source {self.source!r} does not have; "
                             f"use 'xyz' or 'xyz_height'")
        if self.class_names is not None:
            if not self.class_names:
                raise ValueError("class_names must list at least one class, or be null")
            repeated = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
            if repeated:
                raise ValueError(f"class_names lists {repeated} more than once")

    @property
    def task(self) -> str:
        """"seg" for a part-segmentation source, else "cls"."""
        if self.source == "cgal":
            return self.cgal_task
        return "seg" if self.source in SEG_SOURCES else "cls"

    @property
    def in_channels(self) -> int:
        return in_channels_of(self.features)


# --------------------------------------------------------------------------------------------------
# model:

@dataclass
class ModelConfig:
    """The network, built by `models.create_model(name, n_classes, in_channels, task, n_categories, **kwargs)`.

    kwargs: architecture overrides (embed_dim, mamba_blocks, reducers, k_neighbors, orders, drop_path, ...),
      so a recipe can build a small CPU variant. in_channels comes from `data.features`.
    pretrained: weights loaded after the model is built: a mambakit run folder or checkpoint, or an upstream
      PCM checkpoint file (converted by key mapping).
    task: "cls" or "seg"; null = the data's task (a mismatch with the data is an error).
    loss: "cross_entropy" (with augment.smoothing) or "poly1_focal" (openpoints' Poly1FocalLoss, which PCM's
      ShapeNetPart recipe trains with).
    """
    name: ModelName = "pcm"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    task: Task | None = None
    loss: Literal["cross_entropy", "poly1_focal"] = "cross_entropy"


# --------------------------------------------------------------------------------------------------
# augment:

@dataclass(frozen=True)
class AugmentSettings:
    """Fully resolved training augmentation (what a preset means; see `AugmentConfig`).

    scale: (low, high) random scale factor, (1, 1) = off; anisotropic: one factor per axis.
    shift: random translation, uniform in [-shift, shift] per axis.
    rotate_y: random rotation about the gravity axis y, uniform in [-rotate_y, rotate_y] degrees.
    jitter_sigma / jitter_clip: Gaussian noise per point, clipped to +-clip (sigma 0 = off).
    center_normalize: centre each cloud and scale it into the unit sphere, at training AND evaluation time.
    fps_presample: training clouds first go through farthest point sampling to this many points, then
      n_points are drawn at random among them (PCM's ScanObjectNN train.py: 1200); 0 = off.
    smoothing: label smoothing of the cross-entropy loss.
    """
    scale: tuple[float, float] = (1.0, 1.0)
    anisotropic: bool = True
    shift: float = 0.0
    rotate_y: float = 0.0
    jitter_sigma: float = 0.0
    jitter_clip: float = 0.0
    center_normalize: bool = False
    fps_presample: int = 0
    smoothing: float = 0.0

    def __post_init__(self):
        low, high = self.scale
        if not 0.0 < low <= high:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {tuple(self.scale)}")
        for name in ("shift", "jitter_sigma", "jitter_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.jitter_sigma > 0 and self.jitter_clip <= 0:
            raise ValueError(f"jitter_clip must be > 0 when jitter_sigma is set ({self.jitter_sigma}); "
                             f"got {self.jitter_clip}")
        if not 0.0 <= self.rotate_y <= 180.0:
            raise ValueError(f"rotate_y is a maximum angle in degrees within [0, 180], got {self.rotate_y}")
        if self.fps_presample < 0:
            raise ValueError(f"fps_presample must be >= 0 (0 = off), got {self.fps_presample}")
        _check_fraction("smoothing", self.smoothing)

    @property
    def scales(self) -> bool:
        return tuple(self.scale) != (1.0, 1.0)


# PCM's published transforms (cfgs/<dataset>/default.yaml and openpoints/transforms): ModelNet40
# PointCloudScaleAndTranslate(scale [2/3, 3/2], shift 0.2), smoothing 0.2; ScanObjectNN PointCloudScaling
# [0.9, 1.1] + CenterAndNormalize + rotation about y (angle [0, 1, 0] * pi), FPS 1200 -> 1024, smoothing 0.3;
# ShapeNetPart PointCloudScaling [0.8, 1.2] + CenterAndNormalize + jitter (0.001, clip 0.005), Poly1 focal
# loss rather than smoothing (its ChromaticDrop of the normals is not reproduced).
AUGMENT_PRESETS: dict[str, AugmentSettings] = {
    "modelnet": AugmentSettings(scale=(2 / 3, 3 / 2), shift=0.2, smoothing=0.2),
    "scanobjectnn": AugmentSettings(scale=(0.9, 1.1), rotate_y=180.0, center_normalize=True, fps_presample=1200,
                                    smoothing=0.3),
    "shapenetpart": AugmentSettings(scale=(0.8, 1.2), jitter_sigma=0.001, jitter_clip=0.005,
                                    center_normalize=True),
    "none": AugmentSettings(),
}


@dataclass
class AugmentConfig:
    """Training augmentation: a `preset` ("modelnet", "scanobjectnn", "shapenetpart" or "none"; see
    AUGMENT_PRESETS for their values) whose knobs can be overridden one by one. A knob left null takes the
    preset's value; `resolve()` gives the values in force. The knobs are those of `AugmentSettings`."""
    preset: Literal["modelnet", "scanobjectnn", "shapenetpart", "none"] = "modelnet"
    scale: tuple[float, float] | None = None
    anisotropic: bool | None = None
    shift: float | None = None
    rotate_y: float | None = None
    jitter_sigma: float | None = None
    jitter_clip: float | None = None
    center_normalize: bool | None = None
    fps_presample: int | None = None
    smoothing: float | None = None

    def __post_init__(self):
        self.resolve()          # checks the combined values now, not when training starts

    def resolve(self) -> AugmentSettings:
        """The preset with every knob that is set here replacing the preset's value."""
        overrides = {f.name: getattr(self, f.name) for f in fields(AugmentSettings)
                     if getattr(self, f.name) is not None}
        if "scale" in overrides:
            overrides["scale"] = tuple(overrides["scale"])
        return replace(AUGMENT_PRESETS[self.preset], **overrides)


# --------------------------------------------------------------------------------------------------
# eval:

@dataclass
class EvalConfig:
    """What evaluation writes beside the metrics.

    confusion_matrix: write confusion_<split>.png (classification).
    render_samples: render this many evaluated clouds coloured by truth and by prediction (0 = none).
    render_orders: also draw the first rendered cloud under these serialization orders, side by side, so a
      reader sees the scans the model runs over (empty = skip).
    """
    confusion_matrix: bool = True
    render_samples: int = 4
    render_orders: list[str] = field(default_factory=lambda: ["xyz", "hilbert", "z"])

    def __post_init__(self):
        if self.render_samples < 0:
            raise ValueError(f"render_samples must be >= 0, got {self.render_samples}")
        for name in self.render_orders:
            if name.lower().replace("-", "_") not in POINT_ORDERS:
                close = difflib.get_close_matches(name, POINT_ORDERS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"render_orders: unknown point order {name!r}{hint}; expected one of "
                                 f"{', '.join(POINT_ORDERS)}")


# --------------------------------------------------------------------------------------------------
# the recipe

@dataclass
class PointCloudRecipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.model.task is None:
            self.model.task = self.data.task
        elif self.model.task != self.data.task:
            raise ValueError(f"model.task is {self.model.task!r} but data source {self.data.source!r}"
                             f"{' (cgal_task ' + repr(self.data.cgal_task) + ')' if self.data.source == 'cgal' else ''}"
                             f" is a {'part-segmentation' if self.data.task == 'seg' else 'classification'} set; "
                             f"set model.task: {self.data.task} or leave it out")
        presample = self.augment.resolve().fps_presample
        if presample and presample < self.data.n_points:
            raise ValueError(f"augment.fps_presample ({presample}) must be 0 or at least data.n_points "
                             f"({self.data.n_points}): it picks the n_points among that many FPS points")
