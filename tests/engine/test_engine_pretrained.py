"""A run folder written by the Trainer loads through mambakit.zoo.load_pretrained: the toy app's rebuild_model
builds the MLP from the saved recipe, the best checkpoint's weights (the ones the Trainer restores at the end)
and its EMA copy come back exactly."""

import pytest
import torch
from engine_toy import MLP, ToyRecipe, ToyTask

from mambakit.apps import register_app, unregister_app
from mambakit.engine.app import App
from mambakit.engine.config import from_dict, load_config
from mambakit.engine.trainer import Trainer
from mambakit.zoo import load_pretrained


def _rebuild(config: dict, weights, source: str):
    recipe = from_dict(ToyRecipe, config, source)
    return MLP(recipe.data.features, recipe.model.hidden, recipe.model.dropout)


@pytest.fixture
def toy_app():
    register_app(App(name="toy", description="the engine's toy regression", rebuild_model=_rebuild), replace=True)
    yield
    unregister_app("toy")


def test_trained_run_folder_loads_best_and_ema_weights(tmp_path, toy_app):
    config = load_config(ToyRecipe, None, ["train.epochs=3", "train.batch_size=8", "train.ema_decay=0.5",
                                           "train.optimizer.lr=0.05", "model.dropout=0.2",
                                           "run.curves=false", "run.tensorboard=false"])
    trainer = Trainer(ToyTask(config))
    result = trainer.fit(tmp_path / "run")
    assert result.best_checkpoint is not None
    trained, ema = trainer.module.eval(), trainer.ema.module.eval()
    x = torch.randn(7, config.data.features)

    model = load_pretrained(tmp_path / "run")
    assert isinstance(model, MLP) and not model.training           # eval mode: dropout off
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
        torch.testing.assert_close(load_pretrained(tmp_path / "run", use_ema=True)(x), ema(x), rtol=0, atol=0)
        assert not torch.equal(ema(x), trained(x))                 # the EMA copy is a different model
