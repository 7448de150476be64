"""mambakit.zoo.load_pretrained on a recsys run folder: the recommender comes back from the checkpoint alone
(the item count read from item_embedding.weight), with the interaction data gone, and scores as the trained
model."""

import shutil

import pytest
import torch
from test_recsys_app import N_ITEMS, cycle_data, recipe  # noqa: F401  (cycle_data is a fixture)

from mambakit.apps.recsys.config import RecsysRecipe
from mambakit.apps.recsys.task import RecsysTask
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer
from mambakit.zoo import load_pretrained


@pytest.mark.parametrize("model", [{"name": "mamba4rec", "hidden_size": 16, "num_layers": 1, "d_state": 4},
                                   {"name": "sasrec", "hidden_size": 16, "n_layers": 1, "n_heads": 2}])
def test_run_folder_loads_the_trained_recommender_without_the_data(tmp_path, cycle_data, model):
    torch.set_num_threads(1)
    data = tmp_path / "data"
    shutil.copytree(cycle_data, data)
    config = load_config(RecsysRecipe, recipe(tmp_path, data, model))
    trainer = Trainer(RecsysTask(config))
    trainer.fit(tmp_path / "run")
    trained = trainer.module.eval()
    seq = torch.tensor([[3, 4, 5, 6, 0, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 16]])
    lengths = torch.tensor([4, 8])
    with torch.no_grad():
        expected = trained(seq, lengths, None, scores=True)
    assert expected.shape == (2, N_ITEMS + 1)                 # the items and padding id 0
    shutil.rmtree(data)                                        # the checkpoint alone must do

    loaded = load_pretrained(tmp_path / "run")
    assert type(loaded) is type(trained) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq, lengths, None, scores=True), expected, rtol=0, atol=0)
