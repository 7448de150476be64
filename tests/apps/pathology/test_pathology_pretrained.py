"""mambakit.zoo.load_pretrained on a pathology run folder: the MIL model comes back from the checkpoint
alone (the output count read from the classifier), with the features and label CSV gone, and scores bags as
the trained model (subtyping with MambaMIL; survival with mean pooling, whose head is head.N)."""

import shutil

import pytest
import torch
from test_pathology_app import DIM, _recipe, mil_data  # noqa: F401  (mil_data is a fixture)

from mambakit.apps.pathology.task import MILTask
from mambakit.engine.trainer import Trainer
from mambakit.zoo import load_pretrained


@pytest.mark.parametrize("task, model, outputs", [
    ("subtyping", "{name: mamba_mil, in_dim: 16, dim: 16, layer: 1, rate: 3, d_state: 4}", 2),
    ("survival", "{name: mean_mil, in_dim: 16}", 3),
])
def test_run_folder_loads_the_trained_mil_model_without_the_data(mil_data, tmp_path, task, model, outputs):
    torch.set_num_threads(1)
    config = _recipe(mil_data, f"model={model}", "train.epochs=1", "data.n_bins=3", task=task)
    trainer = Trainer(MILTask(config))
    trainer.fit(tmp_path / "run")
    trained = trainer.module.eval()
    bag = torch.randn(15, DIM)
    with torch.no_grad():
        expected = trained(bag)
    assert expected.shape == (1, outputs)
    shutil.rmtree(mil_data)                                    # the checkpoint alone must do

    loaded = load_pretrained(tmp_path / "run")
    assert type(loaded) is type(trained) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(bag), expected, rtol=0, atol=0)
