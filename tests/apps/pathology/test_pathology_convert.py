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
    model, config = C.mambamil_from_upstream({"state_dict": state}, mixer="SRMamba", rate=5)
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
        C.mambamil_from_upstream(broken, mixer="BiMamba")
    wrong = dict(state)
    wrong["layers.0.1.out_proj.weight"] = torch.zeros(16, 7)
    with pytest.raises(ValueError, match="shape"):
        C.mambamil_from_upstream(wrong, mixer="SRMamba", rate=5)
    with pytest.raises(ValueError, match="not a MambaMIL"):
        C.mambamil_from_upstream({"fc.weight": torch.zeros(2, 2)}, mixer="BiMamba")
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


def test_convert_verb_writes_a_loadable_pretrained_file(tmp_path, capsys):
    import argparse

    from mambakit.apps.pathology.app import APP
    from mambakit.zoo import load_pretrained

    shapes = _upstream_mambamil_shapes(in_dim=16, n_classes=2, layers=1, dim=16, d_state=4)
    state = _random_state(shapes)
    torch.save(state, tmp_path / "s_0_checkpoint.pt")
    verb = APP.verb("convert")
    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "s_0_checkpoint.pt"), "--mixer", "SRMamba",
                              "--rate", "3", "--out", str(tmp_path / "m.pt")])
    assert verb.run(args) == 0
    assert "mixer=SRMamba, rate=3" in capsys.readouterr().out          # says what it used
    model = load_pretrained(tmp_path / "m.pt")
    assert model.rate == 3
    torch.testing.assert_close(model.state_dict()["layers.0.1.A_b_log"], state["layers.0.1.A_b_log"])


def _sane(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "A_b_log")):
                p.copy_(p.abs().clamp(max=2))
    return model


def test_mixer_and_rate_are_required_because_the_state_dict_cannot_tell_them(tmp_path):
    """SRMamba at rates 5 and 10 and BiMamba load the same tensors strictly and give different outputs: no
    default may guess them (upstream main.py's rate default is 10, its scripts use 5)."""
    shapes = _upstream_mambamil_shapes(in_dim=16, n_classes=2, layers=1, dim=16, d_state=4)
    state = _random_state(shapes, seed=3)
    x = torch.randn(23, 16, generator=torch.Generator().manual_seed(0))
    outs = {}
    for mixer, rate in (("SRMamba", 5), ("SRMamba", 10), ("BiMamba", None)):
        model, config = C.mambamil_from_upstream(state, mixer=mixer, rate=rate)
        assert config["mixer"] == mixer
        with torch.no_grad():
            outs[mixer, rate] = _sane(model).eval()(x)
    assert not torch.allclose(outs["SRMamba", 5], outs["SRMamba", 10], atol=1e-4)
    assert not torch.allclose(outs["SRMamba", 5], outs["BiMamba", None], atol=1e-4)
    with pytest.raises(ValueError, match="mambamil_type"):
        C.mambamil_from_upstream(state)
    with pytest.raises(ValueError, match="mambamil_rate"):
        C.mambamil_from_upstream(state, mixer="SRMamba")


def test_convert_verb_refuses_without_mixer_and_rate(tmp_path):
    import argparse

    from mambakit.apps.pathology.app import APP

    shapes = _upstream_mambamil_shapes(in_dim=16, n_classes=2, layers=1, dim=16, d_state=4)
    torch.save(_random_state(shapes), tmp_path / "s_0_checkpoint.pt")
    verb = APP.verb("convert")
    parser = argparse.ArgumentParser()
    verb.add_arguments(parser)
    base = ["--checkpoint", str(tmp_path / "s_0_checkpoint.pt"), "--out", str(tmp_path / "m.pt")]
    with pytest.raises(ValueError, match="mambamil_type"):
        verb.run(parser.parse_args(base))
    with pytest.raises(ValueError, match="mambamil_rate"):
        verb.run(parser.parse_args(base + ["--mixer", "SRMamba"]))
    with pytest.raises(ValueError, match="mamba_mil only"):
        verb.run(parser.parse_args(base + ["--model", "mean_mil", "--rate", "5"]))
    assert not (tmp_path / "m.pt").exists()
