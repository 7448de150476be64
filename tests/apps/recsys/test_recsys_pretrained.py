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


def test_finetune_matches_item_rows_by_token(tmp_path):
    """Fine-tuning on other data: item embedding rows follow the item token, not the id (ids differ between
    datasets); new items keep their fresh rows; the new data's vocabulary stays."""
    from mambakit.apps.recsys.models import stored_vocabulary

    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    for folder, items in ((old_dir, ["a", "b", "c", "d"]), (new_dir, ["new", "d", "b", "a"])):
        folder.mkdir()
        rows = [f"u{u}\t{item}\t1\t{100 * u + k}" for u in range(3) for k, item in enumerate(items)]
        (folder / "x.inter").write_text("\n".join([header, *rows]) + "\n")
    model_cfg = {"name": "gru4rec", "embedding_size": 4, "hidden_size": 4}
    old_task = RecsysTask(load_config(RecsysRecipe, recipe(tmp_path, old_dir, model_cfg)))
    new_task = RecsysTask(load_config(RecsysRecipe, recipe(tmp_path, new_dir, model_cfg)))
    old_model, new_model = old_task.build_model(), new_task.build_model()
    fresh = new_model.item_embedding.weight.detach().clone()
    report = new_task.load_pretrained(new_model, old_model.state_dict())
    old_rows = dict(zip(stored_vocabulary(old_model, "old").item_tokens, old_model.item_embedding.weight[1:]))
    new_vocab = stored_vocabulary(new_model, "new")
    assert new_vocab.item_tokens == new_task.data.vocabulary().item_tokens        # not overwritten
    for item_id, token in enumerate(new_vocab.item_tokens, start=1):
        expected = old_rows[token] if token in old_rows else fresh[item_id]
        torch.testing.assert_close(new_model.item_embedding.weight[item_id], expected, rtol=0, atol=0)
    assert any("3 of 4 items matched by token" in key for key in report.loaded)
    torch.testing.assert_close(new_model.gru_layers.weight_hh_l0, old_model.gru_layers.weight_hh_l0)
