"""load_pretrained on the engine's training checkpoints and run folders, with an in-process app whose
rebuild_model builds a Linear layer from the saved recipe (out_features read from the weights): run folders
follow best.json, then latest.json; use_ema; the sidecar check; unknown apps and apps without the hook."""

import pytest
import torch
from torch import nn

from mambakit.apps import discover, register_app, unregister_app
from mambakit.engine.app import App
from mambakit.engine.checkpoint import CHECKPOINT_FORMAT, checkpoint_name, save_checkpoint, write_pointer
from mambakit.zoo import load_pretrained

IN = 4


def _rebuild(config: dict, weights, source: str) -> nn.Module:
    if "in_features" not in config.get("model", {}):
        raise ValueError(f"{source}: model.in_features missing")
    return nn.Linear(config["model"]["in_features"], weights["weight"].shape[0])


@pytest.fixture(autouse=True)
def _toy_apps():
    register_app(App(name="zootoy", description="a linear layer", rebuild_model=_rebuild), replace=True)
    register_app(App(name="zoonohook", description="an app without rebuild_model"), replace=True)
    yield
    unregister_app("zootoy")
    unregister_app("zoonohook")


def _linear(seed: int, out: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, out)


def _save(folder, step: int, model: nn.Module, ema: nn.Module | None = None, app="zootoy", **extra):
    """A checkpoint laid out as the Trainer writes it (the keys load_pretrained reads), via save_checkpoint."""
    state = {"format": CHECKPOINT_FORMAT, "app": app, "model": model.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "optimizers": [], "progress": {"step": step},
             "config": {"model": {"in_features": IN}, "train": {"epochs": 1}}, **extra}
    path = folder / checkpoint_name(step)
    digest = save_checkpoint(state, path)
    return path, digest


def _same(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(6, IN)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_run_folder_prefers_best_then_latest(tmp_path):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    best, latest = _linear(1), _linear(2)
    best_path, best_digest = _save(ckpts, 10, best)
    latest_path, latest_digest = _save(ckpts, 20, latest)
    write_pointer(ckpts, "latest", {"file": latest_path.name, "sha256": latest_digest, "step": 20})

    model = load_pretrained(run)                                   # no best.json yet: latest
    assert isinstance(model, nn.Linear) and not model.training
    _same(model, latest)

    write_pointer(ckpts, "best", {"file": best_path.name, "sha256": best_digest, "step": 10})
    _same(load_pretrained(run), best)                              # the run folder: best.json
    _same(load_pretrained(str(ckpts)), best)                       # its checkpoints/ folder, as a str
    _same(load_pretrained(latest_path), latest)                    # one file


def test_use_ema_takes_the_ema_weights(tmp_path):
    model, ema = _linear(1), _linear(2)
    path, _ = _save(tmp_path, 5, model, ema)
    _same(load_pretrained(path), model)
    _same(load_pretrained(path, use_ema=True), ema)
    bare, _ = _save(tmp_path / "no_ema", 5, model)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_pretrained(bare, use_ema=True)


def test_corrupt_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    path, digest = _save(run / "checkpoints", 7, _linear(1))
    write_pointer(run / "checkpoints", "latest", {"file": path.name, "sha256": digest, "step": 7})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                                    # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint .*{path.name} is corrupt or truncated"):
        load_pretrained(run)


def test_unknown_app_names_it_and_the_installed_ones(tmp_path):
    path, _ = _save(tmp_path, 1, _linear(1), app="weather")
    installed = list(discover())
    assert {"zootoy", "timeseries"} <= set(installed)
    with pytest.raises(ValueError, match="app 'weather', and it is not installed; installed apps: ") as info:
        load_pretrained(path)
    assert ", ".join(installed) in str(info.value)
    with pytest.raises(ValueError, match="names no app"):
        load_pretrained(_save(tmp_path / "anon", 1, _linear(1), app=None)[0])


def test_app_without_rebuild_hook_and_explicit_builder(tmp_path):
    model = _linear(1)
    path, _ = _save(tmp_path, 1, model, app="zoonohook")
    with pytest.raises(ValueError, match="app 'zoonohook' cannot rebuild .* pass builder="):
        load_pretrained(path)
    _same(load_pretrained(path, builder="torch.nn:Linear", in_features=IN, out_features=3), model)


def test_weights_that_do_not_fit_and_misused_options(tmp_path):
    path, _ = _save(tmp_path, 1, _linear(1))
    with pytest.raises(ValueError, match="rebuilt from its saved recipe; out_features apply only together"):
        load_pretrained(path, out_features=3)
    with pytest.raises(ValueError, match="use_ema=True: .* not a mambakit training checkpoint"):
        sd = tmp_path / "sd.pt"
        torch.save(_linear(1).state_dict(), sd)
        load_pretrained(sd, builder="torch.nn:Linear", in_features=IN, out_features=3, use_ema=True)

    state = _linear(1).state_dict()
    state["extra"] = torch.zeros(1)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_checkpoint({"format": CHECKPOINT_FORMAT, "app": "zootoy", "model": state, "ema": None,
                     "config": {"model": {"in_features": IN}}}, bad / checkpoint_name(1))
    with pytest.raises(ValueError, match="do not fit the model app 'zootoy' rebuilt .*Unexpected key.*extra"):
        load_pretrained(bad)
