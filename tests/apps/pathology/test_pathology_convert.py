"""Upstream MambaMIL-repository state dicts (built here with upstream key names and shapes) load by key."""

import pytest
import torch

from mambakit.apps.pathology import convert as C
from mambakit.apps.pathology.models import ABMIL

from test_pathology_models import _upstream_mambamil_shapes


def _random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def test_mambamil_state_dict_converts_and_runs():
    shapes = _upstream_mambamil_shapes(in_dim=64, n_classes=4, layers=3, dim=32, d_state=8)
    state = {f"module.{k}": v for k, v in _random_state(shapes).items()}     # saved from DataParallel
    model, config = C.mambamil_from_upstream({"state_dict": state}, rate=5)
    assert config == {"name": "mamba_mil", "in_dim": 64, "dropout": 0.0, "act": "gelu", "layer": 3, "rate": 5,
                      "mixer": "SRMamba", "dim": 32, "d_state": 8, "d_conv": 4, "expand": 2, "n_classes": 4}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[f"module.{k}"])
    with torch.no_grad():
        A_log = model.layers[0][1].A_log
        A_log.copy_(A_log.abs().clamp(max=2))                 # a sane decay for the run below
        assert model(torch.randn(10, 64)).shape == (1, 4)


def test_mambamil_conversion_errors():
    shapes = _upstream_mambamil_shapes(in_dim=16, n_classes=2, layers=1, dim=16, d_state=4)
    state = _random_state(shapes)
    with pytest.raises(ValueError, match="not Mamba"):
        C.mambamil_from_upstream(state, mixer="Mamba")
    broken = dict(state)
    broken.pop("layers.0.1.dt_proj_b.bias")
    with pytest.raises(ValueError, match="missing"):
        C.mambamil_from_upstream(broken)
    wrong = dict(state)
    wrong["layers.0.1.out_proj.weight"] = torch.zeros(16, 7)
    with pytest.raises(ValueError, match="shape"):
        C.mambamil_from_upstream(wrong)
    with pytest.raises(ValueError, match="not a MambaMIL"):
        C.mambamil_from_upstream({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="state dict"):
        C.unwrap_state_dict({"epoch": 3})


def test_baselines_convert_by_key():
    datt = {"feature.0.weight": torch.randn(512, 32), "feature.0.bias": torch.randn(512),
            "attention.0.weight": torch.randn(128, 512), "attention.0.bias": torch.randn(128),
            "attention.2.weight": torch.randn(1, 128), "attention.2.bias": torch.randn(1),
            "classifier.0.weight": torch.randn(3, 512), "classifier.0.bias": torch.randn(3)}
    model, config = C.from_upstream(datt, "att_mil")
    assert isinstance(model, ABMIL) and config["gated"] is False and config["n_classes"] == 3
    mean = {"head.0.weight": torch.randn(512, 32), "head.0.bias": torch.randn(512),
            "head.3.weight": torch.randn(2, 512), "head.3.bias": torch.randn(2)}
    model, config = C.from_upstream(mean, "mean_mil")
    assert config["dropout"] == 0.25 and model(torch.randn(5, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match="unknown model_type"):
        C.from_upstream(mean, "clam_sb")


def test_convert_verb_writes_a_loadable_pretrained_file(tmp_path):
    import argparse

    from mambakit.apps.pathology.app import APP
    from mambakit.zoo import load_pretrained

    shapes = _upstream_mambamil_shapes(in_dim=16, n_classes=2, layers=1, dim=16, d_state=4)
    state = _random_state(shapes)
    torch.save(state, tmp_path / "s_0_checkpoint.pt")
    verb = APP.verb("convert")
    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "s_0_checkpoint.pt"), "--rate", "3",
                              "--out", str(tmp_path / "m.pt")])
    assert verb.run(args) == 0
    model = load_pretrained(tmp_path / "m.pt")
    assert model.rate == 3
    torch.testing.assert_close(model.state_dict()["layers.0.1.A_b_log"], state["layers.0.1.A_b_log"])
