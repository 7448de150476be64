"""Patch features: a backbone over every patch of every slide, in CLAM's output layout.

    pt_files/<slide_id>.pt     torch tensor (N, D) float32   (what MambaMIL and CLAM's MIL code read)
    h5_files/<slide_id>.h5     `features` (N, D) float32 and `coords` (N, 2) int64 with the tiling attributes
    features_meta.json         which backbone and which weights made these features
    extract_summary.csv        one row per slide: done / already done / failed (with the reason)

Backbones: `resnet50_trunc` (CLAM's: torchvision ResNet-50 cut after layer3, global average pool, 1024-d;
ImageNet mean/std; patches resized to 224) or `timm:<model name>` (any timm model, pooled features).
Weights: a registered zoo name (downloaded into the cache), a local file (`--weights PATH`), or, only when
asked explicitly, random weights (`--random-weights`), which is announced in the log and recorded in
features_meta.json and every h5 file, since such features mean nothing outside the run that made them.

Extraction reads patches with DataLoader worker processes (each opens its own OpenSlide handle), shows
progress per slide, skips slides whose outputs exist (resumable), and shards slides across `torchrun` ranks
(slide i goes to rank i % world_size). A slide that fails is recorded and the run continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mambakit.apps.pathology.weights import DEFAULT_WEIGHTS, TORCHVISION_RESNET50_HASH_PREFIX, zoo_weights
from mambakit.apps.pathology.wsi import (SlideError, TileParams, TileResult, geometry_from_attrs, list_slides,
                                         open_slide, read_coords_h5, read_patch, slide_id_of, summary_text,
                                         tile_slides, write_summary)

__all__ = ["ExtractParams", "Extractor", "StainTextureFeatures", "WEIGHT_FREE", "calibrate_standardization",
           "meta_differences", "extractor_from_meta", "requested_differences", "resnet50_trunc", "timm_backbone", "build_extractor",
           "resnet50_trunc_from_torchvision", "PatchDataset", "extract_slide", "extract_slides", "zoo_weights",
           "DEFAULT_WEIGHTS", "RANDOM_WEIGHTS_NOTE", "shard_for_rank"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: the backbone was not pretrained; these features only make sense for "
                       "tests and demos, never for a study")


# --------------------------------------------------------------------------------------------------
# backbones

class ResNet50Trunc(nn.Module):
    """CLAM's `resnet50_trunc`: torchvision ResNet-50 up to layer3, then global average pooling.
    Input (B, 3, H, W) normalised with ImageNet statistics; output (B, 1024). Parameter names are
    torchvision's, so its checkpoint loads after dropping `layer4.*` and `fc.*`."""

    out_dim = 1024

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        full = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def resnet50_trunc() -> ResNet50Trunc:
    return ResNet50Trunc()


@contextlib.contextmanager
def _one_thread():
    """Run torch ops on one thread: the descriptor is many small reductions, where intra-op threads gain
    little on a quiet machine and lose several times over on a loaded one (they wait at barriers for a
    thread that is not scheduled: 50 vs 6 ms per 64-pixel patch at a load of 11 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StainTextureFeatures(nn.Module):
    """`hed_stats`: a weight-free patch descriptor, the classical computational-pathology baseline.

    Colour deconvolution into haematoxylin / eosin / DAB optical densities (Ruifrok & Johnston; the matrix and
    the formula of scikit-image's `rgb2hed`), then per patch:
    - for H, E, D, R, G, B and HSV saturation: mean, std and the 10th / 50th / 90th percentiles (35);
    - texture of H and of the grey image: band-pass energy at 4 scales (a Laplacian pyramid: 1, 2, 4, 8 px)
      and the mean gradient magnitude (10);
    - the share of stained pixels (optical density above 0.15: tissue, not glass) (1).
    Input (B, 3, S, S) RGB in [0, 1] (mean 0, std 1 in `Extractor`); output (B, 46). The descriptors have
    very different scales: `Extractor.standardization` (estimated on patches of the slides, recorded in
    features_meta.json) brings each to mean 0, std 1. No weights: the same numbers on every machine."""

    out_dim = 46
    CHANNELS = ("H", "E", "D", "R", "G", "B", "S")
    QUANTILES = (0.1, 0.5, 0.9)

    def __init__(self):
        super().__init__()
        from skimage.color import hed_from_rgb

        self.register_buffer("hed_from_rgb", torch.tensor(hed_from_rgb, dtype=torch.float32))

    def hed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) H, E, D optical densities, as skimage's rgb2hed."""
        od = torch.log(x.clamp_min(1e-6)) / math.log(1e-6)
        return torch.einsum("bchw,cd->bdhw", od, self.hed_from_rgb).clamp_min(0)

    @staticmethod
    def _texture(x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, 5): band-pass RMS at scales 1, 2, 4, 8 px and the mean gradient magnitude."""
        import torch.nn.functional as F

        level = x[:, None]
        energies = []
        for _ in range(4):
            coarse = F.avg_pool2d(level, 2, ceil_mode=True)
            detail = level - F.interpolate(coarse, size=level.shape[-2:], mode="nearest")
            energies.append(detail.pow(2).mean(dim=(1, 2, 3)).sqrt())
            level = coarse
        gx, gy = x[:, :, 1:] - x[:, :, :-1], x[:, 1:] - x[:, :-1]
        gradient = gx[:, :-1].pow(2).add(gy[:, :, :-1].pow(2)).sqrt().mean(dim=(1, 2))
        return torch.stack(energies + [gradient], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _one_thread():
            return self._describe(x.float())

    def _describe(self, x: torch.Tensor) -> torch.Tensor:
        hed = self.hed(x)
        high, low = x.amax(dim=1), x.amin(dim=1)
        saturation = (high - low) / high.clamp_min(1e-6)
        channels = torch.cat([hed, x, saturation[:, None]], dim=1).flatten(2)        # (B, 7, HW)
        q = torch.quantile(channels, torch.tensor(self.QUANTILES, device=x.device), dim=2)   # (3, B, 7)
        stats = torch.cat([channels.mean(dim=2), channels.std(dim=2), *q], dim=1)        # (B, 35)
        grey = x.mean(dim=1)
        texture = torch.cat([self._texture(hed[:, 0]), self._texture(grey)], dim=1)      # (B, 10)
        stained = (-torch.log(x.clamp_min(1e-6))).sum(dim=1).gt(0.15).float().mean(dim=(1, 2))
        return torch.cat([stats, texture, stained[:, None]], dim=1)


WEIGHT_FREE = {"hed_stats": StainTextureFeatures}
WEIGHT_FREE_INPUT_SIZE = 64      # hed_stats' default: 256-pixel 20x patches seen at 2 um/px
WEIGHT_FREE_NOTE = "none (weight-free: stain deconvolution with colour and texture statistics)"


def resnet50_trunc_from_torchvision(state: dict) -> dict:
    """torchvision's ResNet-50 state dict -> ResNet50Trunc's (drops layer4 and fc, checks the rest)."""
    if not isinstance(state, dict):
        raise TypeError(f"expected a state dict, got {type(state).__name__}")
    state = state.get("state_dict", state.get("model", state))
    kept = {k.removeprefix("module."): v for k, v in state.items()
            if not k.removeprefix("module.").startswith(("layer4.", "fc."))}
    expected = set(ResNet50Trunc().state_dict())
    missing, unexpected = expected - set(kept), set(kept) - expected
    if missing or unexpected:
        raise ValueError(f"not a torchvision ResNet-50 state dict: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return kept


def timm_without_head(state: dict) -> dict:
    """A timm checkpoint without its classifier (the backbones are built with num_classes=0)."""
    state = state.get("state_dict", state.get("model", state))
    return {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier.", "head_dist."))}


def timm_backbone(model_name: str) -> nn.Module:
    """Any timm model as a feature extractor (num_classes=0: pooled features)."""
    import timm

    try:
        return timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise ValueError(f"timm does not know the model {model_name!r}: {e}") from None


@dataclass
class Extractor:
    """A backbone ready to run, and what it is (recorded next to the features)."""
    model: nn.Module
    name: str
    dim: int
    input_size: int
    mean: tuple
    std: tuple
    weights: str               # file path, zoo name, or RANDOM_WEIGHTS_NOTE
    random_weights: bool
    calibration: dict | None = None   # BatchNorm statistics estimated on patches (random weights only)
    standardization: dict | None = None   # {"mean", "std", "patches", "slides"}: per-feature, applied last

    def meta(self) -> dict:
        return {"backbone": self.name, "dim": self.dim, "input_size": self.input_size, "mean": list(self.mean),
                "std": list(self.std), "weights": self.weights, "random_weights": self.random_weights,
                "batchnorm_calibration": self.calibration, "standardization": self.standardization}

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a batch of normalised patches: the backbone, then the standardisation if any."""
        features = self.model(batch)
        if self.standardization is not None:
            mean = torch.tensor(self.standardization["mean"], dtype=features.dtype, device=features.device)
            std = torch.tensor(self.standardization["std"], dtype=features.dtype, device=features.device)
            features = (features - mean) / std
        return features


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_hash_prefix(path: Path, prefix: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise ValueError(f"{path}: sha256 {digest.hexdigest()} does not start with the published prefix {prefix}; "
                         f"the file is corrupt or not torchvision's resnet50-{prefix}.pth")


def _weights_state(backbone: str, weights: str) -> tuple[dict, str]:
    """(state dict for our module, description) from a zoo name or a file."""
    path = Path(weights)
    if path.is_file():
        state = _load_file(path)
        desc = str(path.resolve())
    else:
        from mambakit.zoo import download_weights, get_weights

        entry = get_weights(weights)   # raises with the registered names when unknown
        if entry.app != "pathology" or not _entry_matches(entry, backbone):
            raise ValueError(f"weights {weights!r} are for {entry.builder} {entry.config}, not backbone {backbone!r}")
        try:
            path = download_weights(weights)
        except Exception as e:
            from mambakit.data import DownloadError

            raise DownloadError(
                f"cannot obtain the weights {weights!r} ({type(e).__name__}: {e}). Download "
                f"{entry.urls[0]} on a machine with network access and pass it with --weights PATH, or pass "
                f"--random-weights for a test run (the features are then meaningless)") from None
        if entry.name == "resnet50_trunc.tv_in1k":
            _check_hash_prefix(path, TORCHVISION_RESNET50_HASH_PREFIX)
        state = _load_file(path)
        desc = f"zoo:{weights} ({path})"
    if isinstance(state, dict) and ("state_dict" in state or "model" in state):
        state = state.get("state_dict", state.get("model"))
    if backbone == "resnet50_trunc":
        state = resnet50_trunc_from_torchvision(state)
    return state, desc


def _entry_matches(entry, backbone: str) -> bool:
    if backbone == "resnet50_trunc":
        return entry.builder.endswith(":resnet50_trunc")
    return entry.config.get("model_name") == backbone.removeprefix("timm:")


def _backbone(backbone: str) -> nn.Module:
    if backbone == "resnet50_trunc":
        return resnet50_trunc()
    if backbone in WEIGHT_FREE:
        return WEIGHT_FREE[backbone]()
    if backbone.startswith("timm:"):
        return timm_backbone(backbone.removeprefix("timm:"))
    raise ValueError(f"unknown backbone {backbone!r}; expected 'resnet50_trunc', "
                     f"{', '.join(repr(k) for k in WEIGHT_FREE)} or 'timm:<model name>'")


def build_extractor(backbone: str = "resnet50_trunc", weights: str | None = None, random_weights: bool = False,
                    input_size: int | None = None, log: Callable = print) -> Extractor:
    """The backbone with its weights. Exactly one of: weights given, the backbone's default zoo weights,
    or `random_weights=True` (loud)."""
    if weights is not None and random_weights:
        raise ValueError("give either --weights or --random-weights, not both")
    if backbone in WEIGHT_FREE:
        if weights is not None or random_weights:
            raise ValueError(f"backbone {backbone!r} has no weights; drop --weights / --random-weights")
        model = _backbone(backbone).eval()
        return Extractor(model, backbone, model.out_dim, int(input_size or WEIGHT_FREE_INPUT_SIZE), (0.0, 0.0, 0.0),
                         (1.0, 1.0, 1.0), WEIGHT_FREE_NOTE, False)
    with torch.random.fork_rng(devices=[]):
        # Random weights are the same in every process (ranks, resumed runs, heatmaps) and every run.
        torch.manual_seed(0)
        model = _backbone(backbone)
    if backbone == "resnet50_trunc":
        dim, size, mean, std = 1024, 224, IMAGENET_MEAN, IMAGENET_STD
    else:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        dim = int(model.num_features)
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if random_weights:
        desc = RANDOM_WEIGHTS_NOTE
        banner = "!" * 100
        log(f"{banner}\n[extract] WARNING: {RANDOM_WEIGHTS_NOTE}\n{banner}")
        print(f"[extract] WARNING: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    else:
        if weights is None:
            if backbone not in DEFAULT_WEIGHTS:
                raise ValueError(f"backbone {backbone!r} has no registered weights; pass --weights PATH "
                                 f"(or --random-weights for a test run)")
            weights = DEFAULT_WEIGHTS[backbone]
        state, desc = _weights_state(backbone, weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if backbone.startswith("timm:"):   # the classifier head is dropped by num_classes=0
            unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier.", "head_dist."))]
        if missing or unexpected:
            raise ValueError(f"weights {weights!r} do not fit {backbone}: missing {list(missing)[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
    model.eval()
    return Extractor(model, backbone, dim, int(input_size or size), tuple(mean), tuple(std), desc, random_weights)


# --------------------------------------------------------------------------------------------------
# reading patches

class PatchDataset(torch.utils.data.Dataset):
    """The patches of one slide as normalised tensors (3, S, S). The OpenSlide handle is opened lazily in
    each worker process (handles cannot cross processes)."""

    def __init__(self, slide_path: str | Path, coords: np.ndarray, geometry, input_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.slide_path = str(slide_path)
        self.coords = np.asarray(coords)
        self.geometry = geometry
        self.input_size = int(input_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        if self._slide is None:
            self._slide = open_slide(self.slide_path)
        image = read_patch(self._slide, self.coords[index], self.geometry)
        if image.size != (self.input_size, self.input_size):
            image = image.resize((self.input_size, self.input_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __getstate__(self):   # workers get a copy without the parent's handle
        state = self.__dict__.copy()
        state["_slide"] = None
        return state


def _worker_init(_):
    torch.set_num_threads(1)


def _calibration_patches(extractor: Extractor, sources: Sequence[tuple[Path, Path]], n_patches: int,
                         per_slide: int = 32):
    """(dataset, patch count, slide ids): up to `per_slide` evenly spaced patches of each (slide, coordinate
    file) pair in the given order until `n_patches`. Deterministic, so every rank and every resumed run
    sees the same patches."""
    batches, used, total = [], [], 0
    for slide_path, coords_h5 in sources:
        if total >= n_patches:
            break
        coords, attrs = read_coords_h5(coords_h5)
        take = min(per_slide, n_patches - total, len(coords))
        picks = coords[np.linspace(0, len(coords) - 1, take).round().astype(int)]
        slide = open_slide(slide_path)
        try:
            geometry = geometry_from_attrs(attrs, slide)
        finally:
            slide.close()
        batches.append(PatchDataset(slide_path, picks, geometry, extractor.input_size, extractor.mean, extractor.std))
        used.append(slide_id_of(slide_path))
        total += take
    if total == 0:
        raise ValueError("no patches to calibrate on")
    return torch.utils.data.ConcatDataset(batches), total, used


@torch.no_grad()
def calibrate_batchnorm(extractor: Extractor, sources: Sequence[tuple[Path, Path]], n_patches: int,
                        batch_size: int, device: torch.device, per_slide: int = 32) -> dict:
    """Estimate a random-weight backbone's BatchNorm statistics on patches of the slides (an untrained
    network's activations otherwise grow layer after layer; with the statistics of real patches every
    normalisation is in range). `sources`: (slide, coordinate file) pairs in a fixed order (see
    `_calibration_patches`). Records what it used in `extractor.calibration`."""
    if not extractor.random_weights:
        raise ValueError("BatchNorm calibration is only for random weights: it would overwrite the statistics "
                         "of pretrained weights")
    norms = [m for m in extractor.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f"{extractor.name} has no BatchNorm layers to calibrate")
    data, total, used = _calibration_patches(extractor, sources, n_patches, per_slide)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # cumulative average over every calibration batch
    extractor.model.train()
    for batch in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False):
        extractor.model(batch.to(device))
    extractor.model.eval()
    extractor.calibration = {"patches": total, "slides": used}
    return extractor.calibration


@torch.no_grad()
def calibrate_standardization(extractor: Extractor, sources: Sequence[tuple[Path, Path]], n_patches: int,
                              batch_size: int, device: torch.device, per_slide: int = 32) -> dict:
    """Per-feature mean and std of the backbone's features on patches of the slides (see
    `_calibration_patches`), stored in `extractor.standardization` and applied by `Extractor.encode`:
    hand-made descriptors (`hed_stats`) differ in scale by orders of magnitude. A feature constant on these
    patches gets std 1 (it is then only shifted)."""
    data, total, used = _calibration_patches(extractor, sources, n_patches, per_slide)
    extractor.standardization = None
    features = torch.cat([extractor.encode(batch.to(device)).double().cpu()
                          for batch in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)])
    std = features.std(dim=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    extractor.standardization = {"mean": features.mean(dim=0).tolist(), "std": std.tolist(), "patches": total,
                                 "slides": used}
    return extractor.standardization


# --------------------------------------------------------------------------------------------------
# one slide

@dataclass
class ExtractParams:
    backbone: str = "resnet50_trunc"
    weights: str | None = None
    random_weights: bool = False
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    input_size: int | None = None       # pixels fed to the network; default: the backbone's (224)
    calibrate_bn: int = 0               # random weights: estimate BatchNorm statistics on this many patches
    standardize: int = 0                # standardise each feature with statistics of this many patches
    skip_existing: bool = True
    tile: TileParams = field(default_factory=TileParams)   # used when no coordinate folder is given

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.calibrate_bn < 0 or (self.calibrate_bn and not self.random_weights):
            raise ValueError("calibrate_bn (a number of patches) applies to --random-weights only")
        if self.standardize < 0:
            raise ValueError(f"standardize must be a number of patches >= 0, got {self.standardize}")


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_features_h5(path: Path, features: np.ndarray, coords: np.ndarray, coord_attrs: dict, meta: dict) -> None:
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32))
        dset = f.create_dataset("coords", data=coords.astype(np.int64))
        for key, value in coord_attrs.items():
            dset.attrs[key] = value
        for key, value in meta.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) or value is None else value
    os.replace(tmp, path)


def extract_slide(slide_path: str | Path, coords_h5: str | Path, out_dir: str | Path, extractor: Extractor,
                  params: ExtractParams, device: torch.device, progress: bool = True) -> int:
    """Features of one slide into `out_dir/pt_files` and `out_dir/h5_files`. Returns the patch count."""
    sid = slide_id_of(slide_path)
    try:
        coords, attrs = read_coords_h5(coords_h5)
    except (OSError, ValueError) as e:
        raise SlideError(sid, "bad_coords", str(e)) from None
    if len(coords) == 0:
        raise SlideError(sid, "no_tissue", f"{coords_h5} holds no coordinates")
    slide = open_slide(slide_path)   # fail early and clearly on an unreadable file
    try:
        geometry = geometry_from_attrs(attrs, slide)
        if geometry.level >= slide.level_count:
            raise SlideError(sid, "bad_coords", f"{coords_h5}: patch_level {geometry.level} but the slide has "
                                                f"{slide.level_count} level(s)")
    finally:
        slide.close()
    dataset = PatchDataset(slide_path, coords, geometry, extractor.input_size, extractor.mean, extractor.std)
    loader = torch.utils.data.DataLoader(dataset, batch_size=params.batch_size, shuffle=False,
                                         num_workers=params.num_workers, worker_init_fn=_worker_init,
                                         pin_memory=device.type == "cuda")
    chunks = []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"extract {sid}", unit="batch", leave=False)
    try:
        with torch.inference_mode():
            for batch in batches:
                chunks.append(extractor.encode(batch.to(device, non_blocking=True)).float().cpu())
    except SlideError:
        raise
    except Exception as e:   # OpenSlide errors surface here (from a worker) on corrupt tiles
        raise SlideError(sid, "unreadable", f"reading patches failed: {type(e).__name__}: {e}") from None
    features = torch.cat(chunks)
    if features.shape != (len(coords), extractor.dim):
        raise SlideError(sid, "error", f"features have shape {tuple(features.shape)}, expected "
                                       f"({len(coords)}, {extractor.dim})")
    out_dir = Path(out_dir)
    (out_dir / "pt_files").mkdir(parents=True, exist_ok=True)
    (out_dir / "h5_files").mkdir(parents=True, exist_ok=True)
    meta = extractor.meta()
    _write_features_h5(out_dir / "h5_files" / f"{sid}.h5", features.numpy(), coords, attrs, meta)
    _atomic_torch_save(features, out_dir / "pt_files" / f"{sid}.pt")   # written last: marks the slide done
    return len(coords)


# --------------------------------------------------------------------------------------------------
# many slides

def shard_for_rank(items: Sequence, rank: int, world_size: int) -> list:
    """Item i goes to rank i % world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return [item for i, item in enumerate(items) if i % world_size == rank]


def _calibration_sources(paths: Sequence[Path], patches_dir: Path, tile: TileParams, tile_into: Path | None):
    """(slide, coordinate file) in the global slide order, the same on every rank; slides another rank
    tiles are tiled here too when this run tiles (same parameters, same file)."""
    from mambakit.apps.pathology.wsi import tile_slide

    for path in paths:
        h5 = patches_dir / f"{slide_id_of(path)}.h5"
        if not h5.is_file() and tile_into is not None:
            try:
                tile_slide(path, tile_into, tile)
            except SlideError:
                continue
        if h5.is_file():
            yield path, h5


def _rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(spec)


def _is_done(out_dir: Path, sid: str) -> bool:
    return (out_dir / "pt_files" / f"{sid}.pt").is_file() and (out_dir / "h5_files" / f"{sid}.h5").is_file()


META_FIELDS = ("backbone", "dim", "input_size", "mean", "std", "weights", "random_weights",
               "batchnorm_calibration", "standardization")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def meta_differences(old: dict, new: dict, fields: Sequence[str] = META_FIELDS) -> list[str]:
    """'field: A vs B' for every extractor setting in which two features_meta.json records differ."""
    return [f"{k}: {_short(old.get(k))} vs {_short(new.get(k))}" for k in fields if old.get(k) != new.get(k)]


def extractor_from_meta(meta: dict, where: str = "features_meta.json", log: Callable = print) -> Extractor:
    """The extractor that wrote `meta` (a features_meta.json record), rebuilt so that a new slide's features
    are comparable with the training features; ValueError naming the setting that cannot be rebuilt."""
    backbone, weights = meta.get("backbone"), meta.get("weights")
    if not backbone:
        raise ValueError(f"{where}: no 'backbone' recorded")
    if meta.get("batchnorm_calibration"):
        cal = meta["batchnorm_calibration"]
        raise ValueError(f"{where}: batchnorm_calibration: the training extractor's random-weight BatchNorm "
                         f"statistics were estimated on {cal.get('patches')} patches of {len(cal.get('slides', []))} "
                         f"training slide(s) and are not stored, so features of another slide would not be "
                         f"comparable. Extract the slide together with the training slides and pass --features")
    random_weights = bool(meta.get("random_weights"))
    if backbone in WEIGHT_FREE or random_weights:
        name = None
    elif isinstance(weights, str) and weights.startswith("zoo:"):
        name = weights.removeprefix("zoo:").split(" ")[0]
    else:
        name = weights
        if not weights or not Path(weights).is_file():
            raise ValueError(f"{where}: weights: the training extractor's weights file {weights!r} is not here; "
                             f"copy it there or pass --features")
    extractor = build_extractor(backbone, name, random_weights, meta.get("input_size"), log)
    extractor.standardization = meta.get("standardization")
    diff = meta_differences(meta, extractor.meta())
    if diff:
        raise ValueError(f"{where}: the rebuilt extractor differs from the training one in {'; '.join(diff)}")
    return extractor


def requested_differences(meta: dict, backbone: str | None = None, weights: str | None = None,
                          random_weights: bool = False, input_size: int | None = None) -> list[str]:
    """Extractor settings asked for (None / False: not asked) that differ from a features_meta.json record."""
    diff = []
    if backbone is not None and backbone != meta.get("backbone"):
        diff.append(f"backbone: training {meta.get('backbone')!r} vs asked {backbone!r}")
    if input_size is not None and input_size != meta.get("input_size"):
        diff.append(f"input_size: training {meta.get('input_size')} vs asked {input_size}")
    if random_weights and not meta.get("random_weights"):
        diff.append(f"random_weights: training False (weights {meta.get('weights')!r}) vs asked True")
    if weights is not None:
        recorded = str(meta.get("weights"))
        same = recorded.startswith(f"zoo:{weights} ") or (Path(weights).is_file()
                                                          and recorded == str(Path(weights).resolve()))
        if not same:
            diff.append(f"weights: training {recorded!r} vs asked {weights!r}")
    return diff


def _stored_standardization(out_dir: Path, meta: dict) -> dict | None:
    """The standardisation recorded in `out_dir` by the same extractor: a resumed extraction, or one that adds
    slides, reuses it (every bag of a folder must share it; estimating it again would give other numbers)."""
    path = out_dir / "features_meta.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    same = not meta_differences(old, meta, [k for k in META_FIELDS if k != "standardization"])
    stored = old.get("standardization")
    return stored if same and stored else None


def _check_meta(out_dir: Path, meta: dict) -> None:
    """Refuse to mix features of different extractors in one folder, naming the settings that differ."""
    path = out_dir / "features_meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = meta_differences(old, meta)
        if diff:
            raise ValueError(f"{path} records features of another extractor; it differs from this run in "
                             f"{'; '.join(diff)} (folder vs this run). Use another --out folder (mixing "
                             f"extractors in one bag folder is never right)")
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def extract_slides(slides: str | Path | Sequence, out_dir: str | Path, params: ExtractParams | None = None,
                   coords_dir: str | Path | None = None, rank: int | None = None, world_size: int | None = None,
                   progress: bool = True, log: Callable = print, extractor: Extractor | None = None) -> list[TileResult]:
    """Extract features for every slide of this rank; see the module docstring. Without `coords_dir`, the
    slides are tiled first into `out_dir/patches` with `params.tile`."""
    params = params or ExtractParams()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list_slides(slides) if isinstance(slides, (str, os.PathLike)) else [Path(p) for p in slides]
    env_rank, env_world = _rank_and_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    mine = shard_for_rank(paths, rank, world_size)
    tag = f"[extract rank {rank}/{world_size}]" if world_size > 1 else "[extract]"
    log(f"{tag} {len(mine)} of {len(paths)} slide(s) on this rank")

    tile_failures: dict[str, TileResult] = {}
    coords_given = coords_dir
    if coords_dir is None:
        coords_dir = out_dir
        for r in tile_slides(mine, out_dir, params.tile, skip_existing=True, progress=progress, log=log):
            if r.status == "failed":
                tile_failures[r.slide_id] = r
    coords_dir = Path(coords_dir)
    patches_dir = coords_dir / "patches" if (coords_dir / "patches").is_dir() else coords_dir

    device = _device(params.device)
    if extractor is None:
        extractor = build_extractor(params.backbone, params.weights, params.random_weights, params.input_size, log)
    extractor.model.to(device)
    if params.calibrate_bn and extractor.calibration is None:
        sources = _calibration_sources(paths, patches_dir, params.tile, out_dir if coords_given is None else None)
        info = calibrate_batchnorm(extractor, sources, params.calibrate_bn, params.batch_size, device)
        log(f"{tag} BatchNorm statistics of the random backbone estimated on {info['patches']} patches of "
            f"{len(info['slides'])} slide(s)")
    if params.standardize and extractor.standardization is None:
        extractor.standardization = _stored_standardization(out_dir, extractor.meta())
        if extractor.standardization is None:
            sources = _calibration_sources(paths, patches_dir, params.tile, out_dir if coords_given is None else None)
            per_slide = max(4, -(-params.standardize // max(len(paths), 1)))     # spread over every slide
            info = calibrate_standardization(extractor, sources, params.standardize, params.batch_size, device,
                                             per_slide=per_slide)
            log(f"{tag} feature standardisation estimated on {info['patches']} patches of "
                f"{len(info['slides'])} slide(s)")
        else:
            log(f"{tag} feature standardisation read from {out_dir / 'features_meta.json'} (resumed folder)")
    _check_meta(out_dir, extractor.meta())

    results = []
    for index, path in enumerate(mine, start=1):
        sid = slide_id_of(path)
        if sid in tile_failures:
            results.append(tile_failures[sid])
            continue
        if params.skip_existing and _is_done(out_dir, sid):
            results.append(TileResult(sid, str(path), "skipped"))
            continue
        start = time.perf_counter()
        coords_h5 = patches_dir / f"{sid}.h5"
        try:
            open_slide(path).close()    # an unreadable slide has no coordinates either: name the real cause
            if not coords_h5.is_file():
                raise SlideError(sid, "no_coords", f"no coordinate file {coords_h5}; run `mambakit pathology tile` "
                                                   f"first or pass --coords")
            n = extract_slide(path, coords_h5, out_dir, extractor, params, device, progress)
            seconds = time.perf_counter() - start
            results.append(TileResult(sid, str(path), "ok", n, str(out_dir / "h5_files" / f"{sid}.h5"),
                                      seconds=seconds))
            log(f"{tag} [{index}/{len(mine)}] {sid}: {n} patches in {seconds:.1f}s ({n / max(seconds, 1e-9):.1f}/s)")
        except SlideError as e:
            results.append(TileResult(sid, str(path), "failed", error_kind=e.kind, error=e.message))
            log(f"{tag} {sid}: FAILED ({e.kind}): {e.message}")
        except Exception as e:   # keep going; the summary lists it
            results.append(TileResult(sid, str(path), "failed", error_kind="error", error=f"{type(e).__name__}: {e}"))
            log(f"{tag} {sid}: FAILED (error): {type(e).__name__}: {e}")
    name = "extract_summary.csv" if world_size == 1 else f"extract_summary.rank{rank}.csv"
    write_summary(out_dir / name, results)
    log(summary_text("extract" if world_size == 1 else f"extract rank {rank}", results))
    if extractor.random_weights:
        log(f"{tag} WARNING: {RANDOM_WEIGHTS_NOTE}")
    return results
