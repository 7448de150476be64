"""The recipe schema of the recommendation app: `data:`, `model:`, `eval:` plus the engine's `train:` / `run:`.

A recipe (configs/recsys/*.yaml) reads on its own; every key is checked against these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from mambakit.engine.schema import EarlyStoppingConfig, OptimizerConfig, RunConfig, TrainConfig

__all__ = ["Mamba4RecConfig", "TiM4RecConfig", "SASRecConfig", "GRU4RecConfig", "MostPopConfig", "ModelConfig",
           "RecsysData", "RecsysEval", "RecsysRecipe", "recbole_train_defaults"]


# model configs (defaults: the upstream configs for MovieLens)

@dataclass
class Mamba4RecConfig:
    """chengkai-liu/Mamba4Rec `config.yaml`."""
    name: Literal["mamba4rec"] = "mamba4rec"
    hidden_size: int = 64
    num_layers: int = 1
    dropout_prob: float = 0.2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    # "upstream": Mamba4Rec's `_init_weights` also re-initialises the Mamba mixer's Linear layers (N(0, 0.02),
    # zero biases, so dt_proj's inverse-softplus bias is zeroed). "mamba": keep mamba_ssm's mixer init.
    mixer_init: Literal["upstream", "mamba"] = "upstream"


@dataclass
class TiM4RecConfig:
    """AlwaysFHao/TiM4Rec `config/config4movie_64d.yaml`."""
    name: Literal["tim4rec"] = "tim4rec"
    hidden_size: int = 64
    num_layers: int = 2
    dropout_prob: float = 0.2
    time_dropout: float = 0.2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32
    chunk_size: int = 32
    norm_eps: float = 1e-12
    is_ffn: bool = True
    is_time: bool = True
    p2p_residual: bool = False
    kaiming_init: bool = True
    # Upstream's activation after the causal convolutions depends on its code path: SiLU through
    # causal_conv1d when n_heads % 8 == 0, Hardswish through nn.Conv1d otherwise (its environment has
    # causal_conv1d). "auto" reproduces that rule.
    conv_activation: Literal["auto", "silu", "hardswish"] = "auto"
    # Upstream takes time gaps of the zero-padded timestamp list, so the first padded position holds
    # 0 - t_last; true sets every gap at a padded position to 0 instead (not upstream).
    mask_padding_gaps: bool = False


@dataclass
class SASRecConfig:
    """RecBole 1.2.1 `properties/model/SASRec.yaml`."""
    name: Literal["sasrec"] = "sasrec"
    n_layers: int = 2
    n_heads: int = 2
    hidden_size: int = 64
    inner_size: int = 256
    hidden_dropout_prob: float = 0.5
    attn_dropout_prob: float = 0.5
    hidden_act: Literal["gelu", "relu", "swish", "tanh", "sigmoid"] = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02


@dataclass
class GRU4RecConfig:
    """RecBole 1.2.1 `properties/model/GRU4Rec.yaml`."""
    name: Literal["gru4rec"] = "gru4rec"
    embedding_size: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    dropout_prob: float = 0.3


@dataclass
class MostPopConfig:
    """Scores every item by how often it occurs in the training part; nothing to train."""
    name: Literal["mostpop"] = "mostpop"


ModelConfig = Union[Mamba4RecConfig, TiM4RecConfig, SASRecConfig, GRU4RecConfig, MostPopConfig]




@dataclass
class RecsysData:
    """Where the atomic files are and how they are prepared (RecBole's dataset options)."""
    dataset: str | None = "ml-100k"       # a registered dataset (mambakit data list), fetched into the cache
    # ... or your own files: a folder, a RecBole .zip, an .inter file, or a CSV with a header of column names
    # (MovieLens ratings.csv: userId,movieId,rating,timestamp; a folder holding ratings.csv works too)
    path: str | None = None
    name: str | None = None               # the atomic stem when the folder holds several .inter files
    user_field: str = "user_id"           # USER_ID_FIELD (CSV: userId is used when user_id is absent)
    item_field: str = "item_id"           # ITEM_ID_FIELD (CSV: movieId / itemId when item_id is absent)
    time_field: str = "timestamp"         # TIME_FIELD (type float: unix seconds; CSV: ISO dates too)
    title_field: str | None = "auto"      # .item column shown by `recommend` (auto: movie_title/title/name)
    user_min_interactions: int = 5        # user_inter_num_interval "[5,inf)"; 0 or 1 = no filter
    item_min_interactions: int = 5        # item_inter_num_interval "[5,inf)"
    max_len: int = 50                     # MAX_ITEM_LIST_LENGTH
    # float64: exact timestamps. float32: rounded as RecBole holds them (unix times 64-128 s apart tie).
    time_precision: Literal["float32", "float64"] = "float64"
    # Order of interactions with equal timestamps: "hash" = a fixed hash of (user, item), independent of the
    # file's row order and of the item ids; "file" = file order (RecBole). RecBole's own setting, to
    # reproduce published numbers: time_precision float32 with tie_break file. See data.py.
    tie_break: Literal["hash", "file"] = "hash"

    def __post_init__(self):
        if (self.dataset is None) == (self.path is None):
            raise ValueError("set exactly one of data.dataset (a registered name) and data.path (your files)")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.user_min_interactions < 0 or self.item_min_interactions < 0:
            raise ValueError("user_min_interactions and item_min_interactions must be >= 0")


@dataclass
class RecsysEval:
    """Full ranking over all items; one held-out item per user and split."""
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    # RecBole 1.2.1 does not mask already-seen items for sequential models (see metrics.py); true masks
    # every earlier item of the user except the target, as RecBole does for general models.
    mask_history: bool = False
    # Also rank by training popularity in every evaluation (logged as pop_hit@K, pop_ndcg@K, pop_mrr@K).
    popularity_baseline: bool = True

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be a non-empty list of positive integers, got {self.ks}")


def recbole_train_defaults() -> TrainConfig:
    """RecBole's training defaults for these models: Adam lr 1e-3, no weight decay, batch 2048, eval batch
    4096, every batch used (no drop_last), early stopping on val NDCG@10 with stopping_step 10 (RecBole stops
    after 11 evaluations without improvement, ties improving: patience 11 here)."""
    return TrainConfig(
        epochs=300, batch_size=2048, eval_batch_size=4096, drop_last=False,
        optimizer=OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0),
        early_stopping=EarlyStoppingConfig(monitor="val/ndcg@10", mode="max", patience=11),
    )


@dataclass
class RecsysRecipe:
    model: ModelConfig
    data: RecsysData = field(default_factory=RecsysData)
    eval: RecsysEval = field(default_factory=RecsysEval)
    train: TrainConfig = field(default_factory=recbole_train_defaults)
    run: RunConfig = field(default_factory=RunConfig)
