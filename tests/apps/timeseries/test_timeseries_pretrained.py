"""mambakit.zoo.load_pretrained on a timeseries run folder: the Forecaster (network, training scaler, data
description) comes back from the checkpoint alone, with the CSV gone, and forecasts as the trained model."""

import torch
from test_timeseries_app import daily_csv, write_recipe
from torch.utils.data import default_collate

from mambakit.apps.timeseries.config import ForecastRecipe
from mambakit.apps.timeseries.task import Forecaster, ForecastTask
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer
from mambakit.zoo import load_pretrained


def test_run_folder_loads_the_trained_forecaster_without_the_csv(tmp_path):
    torch.set_num_threads(1)
    csv = tmp_path / "series.csv"
    daily_csv(csv, n=300)
    recipe = write_recipe(tmp_path / "recipe.yaml", csv, model="smamba")
    config = load_config(ForecastRecipe, recipe, ["train.epochs=1", "run.curves=false", "eval.plot_windows=0"])
    task = ForecastTask(config)
    trainer = Trainer(task)
    trainer.fit(tmp_path / "run")
    batch = default_collate([task.splits.test[i] for i in range(3)])
    trained = trainer.module.eval()
    with torch.no_grad():
        expected = trained(batch["x"], batch["x_mark"])
    csv.unlink()                                               # the checkpoint alone must do

    model = load_pretrained(tmp_path / "run")
    assert isinstance(model, Forecaster) and not model.training
    assert model.info["columns"] == trained.info["columns"] == ["load", "temp", "price"]
    torch.testing.assert_close(model.scaler_mean, trained.scaler_mean, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(batch["x"], batch["x_mark"]), expected, rtol=0, atol=0)
