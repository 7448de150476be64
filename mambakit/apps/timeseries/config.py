"""The forecasting recipe as typed config sections: `data:`, `model:` (S-Mamba, iTransformer or DLinear, picked
by `name:`), `eval:`, and the engine's `train:` and `run:`. No torch here: `mambakit --help` imports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mambakit.engine.schema import RunConfig, TrainConfig

__all__ = ["SMambaConfig", "ITransformerConfig", "DLinearConfig", "ModelConfig", "ForecastData", "ForecastEval",
           "ForecastRecipe"]


# --------------------------------------------------------------------------------------------------
# model: (`name` picks the model)

@dataclass
class SMambaConfig:
    """S-Mamba. Defaults are upstream run.py's; the ETTh1 script sets d_model 256, d_ff 256, d_state 2."""
    name: Literal["smamba"] = "smamba"
    d_model: int = 512
    d_ff: int = 2048
    e_layers: int = 2
    d_state: int = 32
    d_conv: int = 2          # upstream hard-codes d_conv=2 and expand=1 in S_Mamba.py
    expand: int = 1
    dropout: float = 0.1
    activation: Literal["gelu", "relu"] = "gelu"
    use_norm: bool = True

    def __post_init__(self):
        _check_positive(self, "d_model", "d_ff", "e_layers", "d_state", "d_conv", "expand")
        _check_dropout(self.dropout)


@dataclass
class ITransformerConfig:
    """iTransformer. Defaults are upstream run.py's; the ETTh1 script sets d_model = d_ff = 256 (96, 192)
    or 512 (336, 720)."""
    name: Literal["itransformer"] = "itransformer"
    d_model: int = 512
    d_ff: int = 2048
    e_layers: int = 2
    n_heads: int = 8
    dropout: float = 0.1
    activation: Literal["gelu", "relu"] = "gelu"
    use_norm: bool = True

    def __post_init__(self):
        _check_positive(self, "d_model", "d_ff", "e_layers", "n_heads")
        _check_dropout(self.dropout)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")


@dataclass
class DLinearConfig:
    """DLinear (Zeng et al. 2023) as in Time-Series-Library `models/DLinear.py`: moving-average trend +
    remainder, one Linear(seq_len -> pred_len) each, shared over variates unless `individual`."""
    name: Literal["dlinear"] = "dlinear"
    moving_avg: int = 25
    individual: bool = False

    def __post_init__(self):
        if self.moving_avg < 1 or self.moving_avg % 2 == 0:
            raise ValueError(f"moving_avg must be an odd number >= 1, got {self.moving_avg}")


ModelConfig = SMambaConfig | ITransformerConfig | DLinearConfig


def _check_positive(cfg, *names):
    for n in names:
        if getattr(cfg, n) < 1:
            raise ValueError(f"{n} must be >= 1, got {getattr(cfg, n)}")


def _check_dropout(p):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")


# --------------------------------------------------------------------------------------------------
# the recipe

@dataclass
class ForecastData:
    """Where the series comes from and how it is cut into windows (TSLib's data arguments)."""
    dataset: str | None = None        # a registry name (etth1, elecdemand, ...); fetched into the cache
    path: str | None = None           # or a local CSV (wins over `dataset`)
    date_column: str = "date"
    # Long files: the column telling stacked series apart (a station, a meter). The series are pivoted into
    # variates named `column@id` (ids sorted), one model sees them all; the target then names one of them.
    id_column: str | None = None
    columns: list[str] | None = None  # value columns to use (default: all but the date and id columns)
    target: str | None = "OT"         # S / MS forecast it; for M it is moved last, as TSLib does
    features: Literal["M", "S", "MS"] = "M"
    split: Literal["ett_hour", "ett_minute", "ratio"] = "ratio"
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seq_len: int = 96                 # lookback
    # Kept in the windows for decoder-style models; unused by these models. Default: TSLib's 48, or seq_len if
    # that is shorter.
    label_len: int | None = None
    pred_len: int = 96                # horizon
    freq: str | None = None           # the series' step, pandas style ('h', '30min'; default: inferred)
    # Missing time steps and empty values: none = refuse them (naming the first), interpolate (linear in time),
    # ffill (last value before), zero. Recorded in the run: eval and forecast fill the same way.
    fill: Literal["none", "interpolate", "ffill", "zero"] = "none"
    timeenc: Literal["timeF", "none"] = "timeF"
    scale: bool = True                # standardise with the training part's mean / std

    def __post_init__(self):
        if self.dataset is None and self.path is None:
            raise ValueError("give data.path (a CSV file) or data.dataset (a registered dataset name)")
        for name in ("seq_len", "pred_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.label_len is None:
            self.label_len = min(48, self.seq_len)
        if not 0 <= self.label_len <= self.seq_len:
            raise ValueError(f"label_len must be in [0, seq_len={self.seq_len}], got {self.label_len}")


@dataclass
class ForecastEval:
    original_scale: bool = False          # also report orig_mse / orig_mae on the data's own scale
    seasonal_period: int | None = None    # also score a seasonal-naive forecast with this period (naive_*)
    plot_windows: int = 4                 # test windows drawn into test_forecast.png after training / eval


@dataclass
class ForecastRecipe:
    data: ForecastData
    model: SMambaConfig | ITransformerConfig | DLinearConfig = field(default_factory=SMambaConfig)
    eval: ForecastEval = field(default_factory=ForecastEval)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


