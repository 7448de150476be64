"""The pathology recipe: `data:` (CSV, features, splits), `model:` (one of the MIL models, picked by
`name:`), `loss:`, `heatmaps:`, and the engine's `train:` / `run:` sections. See configs/pathology/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from mambakit.engine.schema import RunConfig, TrainConfig

__all__ = ["MILData", "MambaMILConfig", "ABMILConfig", "TransMILConfig", "PoolMILConfig", "SurvivalLossConfig",
           "HeatmapConfig", "MILRecipe", "MODEL_TITLES"]


@dataclass
class MILData:
    """Where bags come from (see apps/pathology/data.py for the formats)."""
    csv: str                                            # subtyping: dir,case_id,slide_id,label; survival:
                                                        # case_id,slide_id,censorship,survival_months
    task: Literal["subtyping", "survival"] = "subtyping"
    features: str | None = None                         # a folder with pt_files/ (mambakit / CLAM extract)
    layout: Literal["plain", "mambamil"] = "plain"      # mambamil: pt_files/<backbone>/ (+ <patch_size>/)
    backbone: str = "resnet50"                          # mambamil layout only
    patch_size: str = "512"                             # mambamil layout only ('512' sits at the root)
    data_root: str | None = None                        # mambamil layout: the root (survival; subtyping
                                                        # falls back to the CSV's dir column)
    format: Literal["pt", "h5"] = "pt"
    classes: list[str] | None = None                    # subtyping class order (default: sorted labels)
    n_bins: int = 4                                     # survival: quantile bins of uncensored times
    split_dir: str | None = None                        # a folder of splits_{k}.csv
    fold: int = 0                                       # which splits_{k}.csv (k-fold runs set it per fold)
    folds: list[int] | None = None                      # `train` runs these folds in turn and summarises
    val_share: float = 0.2                              # without split_dir: stratified random split
    test_share: float = 0.2
    split_seed: int = 0
    weighted_sample: bool = True                        # MambaMIL's --weighted_sample (class-balanced)
    cache: bool = False                                 # keep bags in memory after the first epoch

    def __post_init__(self):
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {self.n_bins}")
        if not (0 < self.val_share < 1 and 0 <= self.test_share < 1 and self.val_share + self.test_share < 1):
            raise ValueError(f"val_share and test_share must leave a training share, got "
                             f"{self.val_share} and {self.test_share}")


@dataclass
class MambaMILConfig:
    name: Literal["mamba_mil"] = "mamba_mil"
    in_dim: int = 1024
    dropout: float = 0.0          # upstream: 0 (subtyping scripts), 0.25 (survival scripts)
    act: Literal["gelu", "relu"] = "gelu"
    layer: int = 2                # upstream scripts: 2
    rate: int = 5                 # upstream scripts: 5 (argparse default 10)
    mixer: Literal["SRMamba", "Mamba", "BiMamba"] = "SRMamba"
    dim: int = 512                # upstream: 512
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    init: Literal["upstream", "mamba"] = "upstream"
    checkpoint_layers: bool = False   # activation checkpointing per block (memory for 100k-patch bags)


@dataclass
class ABMILConfig:
    name: Literal["abmil", "att_mil"] = "abmil"
    in_dim: int = 1024
    dropout: float = 0.0
    act: Literal["gelu", "relu"] = "relu"
    gated: bool = True            # False: MambaMIL's att_mil (DAttention)
    init: Literal["default", "xavier"] = "default"


@dataclass
class TransMILConfig:
    name: Literal["trans_mil"] = "trans_mil"
    in_dim: int = 1024
    dropout: float = 0.0
    act: Literal["gelu", "relu"] = "relu"


@dataclass
class PoolMILConfig:
    name: Literal["mean_mil", "max_mil"] = "mean_mil"
    in_dim: int = 1024
    dropout: float = 0.25         # MeanMIL/MaxMIL(in_dim, n_classes): dropout=True -> 0.25
    act: Literal["gelu", "relu"] = "relu"


@dataclass
class SurvivalLossConfig:
    alpha: float = 0.0            # MambaMIL's --alpha_surv (validation always uses 0)


@dataclass
class HeatmapConfig:
    """Attention heatmaps drawn at the end of training for the first `count` test bags that have slides."""
    count: int = 0
    slides: str | None = None     # the slides folder (heatmaps need the slide for its thumbnail)
    normalize: Literal["percentile", "minmax", "none"] = "percentile"
    max_size: int = 1024


MILModelConfig = Union[MambaMILConfig, ABMILConfig, TransMILConfig, PoolMILConfig]

MODEL_TITLES = {"mamba_mil": "MambaMIL (SR-Mamba)", "abmil": "ABMIL", "att_mil": "ABMIL (DAttention)",
                "trans_mil": "TransMIL", "mean_mil": "mean-pooling MIL", "max_mil": "max-pooling MIL"}


@dataclass
class MILRecipe:
    data: MILData
    model: MILModelConfig = field(default_factory=MambaMILConfig)
    loss: SurvivalLossConfig = field(default_factory=SurvivalLossConfig)
    heatmaps: HeatmapConfig = field(default_factory=HeatmapConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
