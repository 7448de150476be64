"""mambakit.zoo.load_pretrained on a vision run folder: the classifier comes back from the checkpoint alone
(the class count read from the head), with the image folder gone, and classifies as the trained model."""

import shutil

import pytest
import torch
from test_vision_app import color_folder, tiny_recipe

from mambakit.apps.vision.config import VisionRecipe
from mambakit.apps.vision.task import VisionTask
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer
from mambakit.zoo import load_pretrained


def test_run_folder_loads_the_trained_classifier_without_the_images(tmp_path):
    torch.set_num_threads(1)
    root = color_folder(tmp_path / "imgs", classes=("red", "blue"), n=4)
    config = load_config(VisionRecipe, tiny_recipe(tmp_path, root), ["augment.mixup=0", "augment.cutmix=0"])
    trainer = Trainer(VisionTask(config))
    trainer.fit(tmp_path / "run")
    trained = trainer.module.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = trained(x)
    assert expected.shape == (2, 2)
    shutil.rmtree(root)                                        # the checkpoint alone must do

    model = load_pretrained(tmp_path / "run")
    assert type(model) is type(trained) and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_pretrained_name_whose_host_cannot_be_reached_says_how_to_get_the_file(tmp_path, capsys, monkeypatch):
    """`vision predict --pretrained vim_tiny_patch16_224.in1k` with the weights' host unreachable (here: its URL
    moved to a closed port on loopback): the one-line error names the URL, the exact cache path and
    `mambakit zoo download NAME --from FILE`; after that command with a file, the same predict works."""
    import dataclasses
    import socket

    from mambakit.apps.vision.config import DataConfig, ModelConfig
    from mambakit.apps.vision.models import create_model
    from mambakit.cli import main as cli
    from mambakit.data import UnverifiedDownloadWarning
    from mambakit.zoo import get_weights, register_weights, weights_path

    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAMBAKIT_OFFLINE", raising=False)
    name = "vim_tiny_patch16_224.in1k"
    real = get_weights(name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/{real.filename}"
    register_weights(dataclasses.replace(real, urls=[url]), replace=True)
    try:
        image = next((color_folder(tmp_path / "imgs", n=1) / "test" / "red").glob("*.png"))
        assert cli(["vision", "predict", str(image), "--pretrained", name]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"mambakit: error: weights '{name}': could not reach {url}")
        assert f"download {url} on a machine that can reach it" in err and str(weights_path(real)) in err
        assert f"`mambakit zoo download {name} --from FILE`" in err and "Traceback" not in err
        # a file in upstream's layout (random weights of the same architecture), given with --from
        model = create_model(ModelConfig(), DataConfig(source="imagefolder"), 1000, load_pretrained=False)
        torch.save({"model": model.state_dict()}, tmp_path / real.filename)
        with pytest.warns(UnverifiedDownloadWarning, match="no sha256|pin no sha256"):     # Vim's files are unpinned
            assert cli(["zoo", "download", name, "--from", str(tmp_path / real.filename)]) == 0
        assert capsys.readouterr().out.strip() == str(weights_path(real))
        assert cli(["vision", "predict", str(image), "--pretrained", name, "--topk", "1", "--json"]) == 0
    finally:
        register_weights(real, replace=True)
