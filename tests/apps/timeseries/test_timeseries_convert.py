"""Upstream (S-D-Mamba / iTransformer) state dicts load into our models: keys, the 1x1-conv FFN, dead modules."""

import torch
from torch import nn

from mambakit.apps.timeseries.convert import convert_upstream_state_dict, is_upstream_state_dict
from mambakit.apps.timeseries.models import ITransformer, SMamba


def to_upstream(model: nn.Module) -> dict:
    """Our keys -> upstream's, as S_Mamba.py / iTransformer.py name them (the inverse of the converter)."""
    out = {}
    for key, value in model.state_dict().items():
        k = key.replace("encoder.layers.", "encoder.attn_layers.")
        k = k.replace(".mixer.mixers.0.", ".attention.").replace(".mixer.mixers.1.", ".attention_r.")
        k = k.replace(".mixer.", ".attention.")
        if ".linear1." in k or ".linear2." in k:
            k = k.replace(".linear1.", ".conv1.").replace(".linear2.", ".conv2.")
            value = value.unsqueeze(-1) if k.endswith("weight") else value
        out[k] = value.clone()
    return out


def test_smamba_upstream_weights_give_the_same_forecast():
    torch.manual_seed(0)
    ours = SMamba(24, 12, d_model=16, d_ff=32, e_layers=2, d_state=2).eval()
    upstream = to_upstream(ours)
    # upstream S-Mamba layers also carry three never-used modules; the converter drops them
    upstream["encoder.attn_layers.0.man.in_proj.weight"] = torch.randn(22, 11)
    upstream["encoder.attn_layers.1.a.query_projection.weight"] = torch.randn(11, 11)
    upstream = {"module." + k: v for k, v in upstream.items()}          # saved from DataParallel
    assert is_upstream_state_dict(upstream)
    fresh = SMamba(24, 12, d_model=16, d_ff=32, e_layers=2, d_state=2).eval()
    fresh.load_state_dict(convert_upstream_state_dict(upstream, prefix=""), strict=True)
    x, marks = torch.randn(3, 24, 4), torch.rand(3, 24, 4) - 0.5
    torch.testing.assert_close(fresh(x, marks), ours(x, marks), rtol=0, atol=0)


def test_conv1x1_ffn_weights_compute_what_upstream_computes():
    torch.manual_seed(1)
    conv = nn.Conv1d(16, 32, kernel_size=1)                             # upstream EncoderLayer.conv1
    state = {"encoder.attn_layers.0.conv1.weight": conv.weight, "encoder.attn_layers.0.conv1.bias": conv.bias}
    converted = convert_upstream_state_dict(state, prefix="")
    linear = nn.Linear(16, 32)
    linear.load_state_dict({"weight": converted["encoder.layers.0.linear1.weight"],
                            "bias": converted["encoder.layers.0.linear1.bias"]})
    y = torch.randn(2, 7, 16)                                           # (batch, tokens, d_model)
    torch.testing.assert_close(linear(y), conv(y.transpose(-1, 1)).transpose(-1, 1), rtol=1e-6, atol=1e-6)


def test_itransformer_upstream_keys():
    torch.manual_seed(0)
    ours = ITransformer(24, 12, d_model=16, d_ff=16, e_layers=1, n_heads=2).eval()
    upstream = to_upstream(ours)
    assert "encoder.attn_layers.0.attention.query_projection.weight" in upstream
    fresh = ITransformer(24, 12, d_model=16, d_ff=16, e_layers=1, n_heads=2).eval()
    fresh.load_state_dict(convert_upstream_state_dict(upstream, prefix=""), strict=True)
    x = torch.randn(2, 24, 3)
    torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)


def test_finetune_loads_upstream_weights_but_keeps_the_new_data_scaler(tmp_path):
    import numpy as np
    import pandas as pd

    from mambakit.apps.timeseries.config import ForecastRecipe
    from mambakit.apps.timeseries.task import ForecastTask
    from mambakit.engine.config import from_dict

    n = 300
    pd.DataFrame({"date": pd.date_range("2020-01-01", periods=n, freq="h").astype(str),
                  "a": np.sin(np.arange(n) / 5.0) * 3 + 7, "OT": np.cos(np.arange(n) / 7.0)}).to_csv(
        tmp_path / "s.csv", index=False)
    recipe = from_dict(ForecastRecipe, {"data": {"path": str(tmp_path / "s.csv"), "seq_len": 24, "label_len": 12,
                                                 "pred_len": 12},
                                        "model": {"name": "smamba", "d_model": 16, "d_ff": 16, "d_state": 2}})
    task = ForecastTask(recipe)
    torch.manual_seed(0)
    pretrained = task.build_model()
    torch.manual_seed(1)
    fresh = task.build_model()
    scaler_before = fresh.scaler_mean.clone()
    report = task.load_pretrained(fresh, to_upstream(pretrained.net))
    assert sorted(report.missing) == ["meta", "scaler_mean", "scaler_std"] and not report.unexpected
    for key, value in pretrained.net.state_dict().items():
        torch.testing.assert_close(fresh.net.state_dict()[key], value, rtol=0, atol=0)
    assert torch.equal(fresh.scaler_mean, scaler_before)
