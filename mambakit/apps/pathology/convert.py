"""Upstream MIL checkpoints -> mambakit models.

MambaMIL's training scripts save `model.state_dict()` as `s_{fold}_checkpoint.pt`. Our models keep
MambaMIL's module names (`_fc1`, `layers.{i}.0` LayerNorm, `layers.{i}.1` the mixer with `in_proj`,
`conv1d[_b]`, `x_proj[_b]`, `dt_proj[_b]`, `A[_b]_log`, `D[_b]`, `out_proj`, `norm`, `attention`,
`classifier`), so conversion is a check, not surgery: keys are matched one to one, shapes verified, the
architecture read off the tensors. What a state dict cannot tell must be given: SR-Mamba vs BiMamba (the
same tensors) and SR-Mamba's rate R have no default, since a wrong guess loads strictly and only changes the
outputs (upstream's main.py defaults to `--mambamil_rate 10`, its scripts pass 5); nor does upstream record
them next to the checkpoint (its `experiment.txt` settings hold model_type, lr, reg, drop_out, ... but not
mambamil_type / mambamil_rate). Dropout (0 subtyping, 0.25 survival in upstream's scripts) does not change
evaluation outputs.

The baselines of MambaMIL's harness convert the same way: `mean_mil` / `max_mil` (`head.*`), `att_mil`
(DAttention: `feature`, `attention`, `classifier`; GatedAttention: `attention_V`, `attention_U`,
`attention_weights`) and `trans_mil`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["unwrap_state_dict", "mambamil_config_from_state", "from_upstream", "load_upstream_checkpoint",
           "mambamil_from_upstream"]


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """A bare state dict from what torch.load returned: unwraps 'state_dict' / 'model' / 'net', strips a
    DataParallel 'module.' prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def mambamil_config_from_state(state: Mapping[str, torch.Tensor]) -> dict:
    """in_dim, n_classes, layer, d_state, d_conv, expand, dim and whether the mixer has a second order,
    read from a MambaMIL state dict."""
    need = ["_fc1.0.weight", "classifier.weight", "attention.0.weight", "norm.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a MambaMIL state dict: missing {', '.join(missing)}")
    dim, in_dim = state["_fc1.0.weight"].shape
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"MambaMIL state dict: layers must be numbered 0..N-1, found {layers}")
    prefix = "layers.0.1."
    d_inner, d_state = state[prefix + "A_log"].shape
    return {"in_dim": int(in_dim), "dim": int(dim), "n_classes": int(state["classifier.weight"].shape[0]),
            "layer": len(layers), "d_state": int(d_state), "d_conv": int(state[prefix + "conv1d.weight"].shape[-1]),
            "expand": d_inner // dim, "two_orders": prefix + "A_b_log" in state}


def _check_and_load(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: upstream {tuple(state[k].shape)} vs ours {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what}: the state dict does not match: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


MIXERS = ("SRMamba", "BiMamba", "Mamba")


def mambamil_from_upstream(state, mixer: str | None = None, rate: int | None = None, dropout: float = 0.0,
                           act: str = "gelu"):
    """(MambaMIL model with the upstream weights, its config dict). `mixer` (upstream --mambamil_type) and,
    for SRMamba, `rate` (--mambamil_rate) are required: the state dict cannot tell them."""
    from .models import MambaMIL

    if mixer not in MIXERS:
        raise ValueError(f"give the mixer the checkpoint was trained with (upstream --mambamil_type): one of "
                         f"{', '.join(MIXERS)}; got {mixer!r}. SRMamba and BiMamba have the same tensors")
    if mixer == "SRMamba" and (rate is None or rate < 1):
        raise ValueError(f"give SRMamba's rate (upstream --mambamil_rate: main.py defaults to 10, its scripts use "
                         f"5); got {rate!r}. The state dict does not record it")
    rate = rate if rate is not None else 10     # unused by Mamba / BiMamba; upstream's default is recorded
    state = unwrap_state_dict(state)
    cfg = mambamil_config_from_state(state)
    two = cfg.pop("two_orders")
    if two and mixer == "Mamba":
        raise ValueError("the state dict has second-order parameters (A_b_log, conv1d_b, ...): the mixer is "
                         "SRMamba or BiMamba, not Mamba")
    if not two and mixer != "Mamba":
        raise ValueError(f"the state dict has a single scan order (no A_b_log): the mixer is Mamba, not {mixer}")
    n_classes = cfg.pop("n_classes")
    model = MambaMIL(n_classes=n_classes, dropout=dropout, act=act, rate=rate, mixer=mixer, **cfg)
    config = {"name": "mamba_mil", "in_dim": cfg["in_dim"], "dropout": dropout, "act": act, "layer": cfg["layer"],
              "rate": rate, "mixer": mixer, "dim": cfg["dim"], "d_state": cfg["d_state"], "d_conv": cfg["d_conv"],
              "expand": cfg["expand"]}
    return _check_and_load(model, state, "MambaMIL"), config | {"n_classes": n_classes}


def from_upstream(state, model_type: str, **kwargs):
    """Any model of MambaMIL's harness by its model_type (mamba_mil, mean_mil, max_mil, att_mil, trans_mil).
    Returns (model, config dict)."""
    from .models import ABMIL, MaxMIL, MeanMIL, TransMIL

    state = unwrap_state_dict(state)
    if model_type == "mamba_mil":
        return mambamil_from_upstream(state, **kwargs)
    if model_type in ("mean_mil", "max_mil"):
        heads = sorted(int(k.split(".")[1]) for k in state if k.startswith("head.") and k.endswith(".weight"))
        if len(heads) != 2:
            raise ValueError(f"{model_type}: expected two Linear layers under head.*, found {heads}")
        dropout = 0.25 if heads[1] == 3 else 0.0
        in_dim, n_classes = state["head.0.weight"].shape[1], state[f"head.{heads[1]}.weight"].shape[0]
        cls = MeanMIL if model_type == "mean_mil" else MaxMIL
        act = kwargs.get("act", "relu")
        model = cls(in_dim=in_dim, n_classes=n_classes, dropout=dropout, act=act)
        config = {"name": model_type, "in_dim": in_dim, "dropout": dropout, "act": act}
    elif model_type == "att_mil":
        gated = "attention_V.0.weight" in state
        in_dim = state["feature.0.weight"].shape[1]
        n_classes = state["classifier.0.weight"].shape[0]
        dropout, act = kwargs.get("dropout", 0.0), kwargs.get("act", "relu")
        model = ABMIL(in_dim=in_dim, n_classes=n_classes, dropout=dropout, act=act, gated=gated)
        config = {"name": "abmil", "in_dim": in_dim, "dropout": dropout, "act": act, "gated": gated}
    elif model_type == "trans_mil":
        in_dim, n_classes = state["_fc1.0.weight"].shape[1], state["classifier.weight"].shape[0]
        dropout, act = kwargs.get("dropout", 0.0), kwargs.get("act", "relu")
        model = TransMIL(in_dim=in_dim, n_classes=n_classes, dropout=dropout, act=act)
        config = {"name": "trans_mil", "in_dim": in_dim, "dropout": dropout, "act": act}
    else:
        raise ValueError(f"unknown model_type {model_type!r}; expected mamba_mil, mean_mil, max_mil, att_mil or trans_mil")
    return _check_and_load(model, state, model_type), config | {"n_classes": int(n_classes)}


def load_upstream_checkpoint(path: str | Path, model_type: str = "mamba_mil", **kwargs):
    """Read MambaMIL's `s_{k}_checkpoint.pt` (weights only) and convert it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return from_upstream(torch.load(path, map_location="cpu", weights_only=True), model_type, **kwargs)
