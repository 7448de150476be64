"""mambakit.zoo.load_pretrained on a vision run folder: the classifier comes back from the checkpoint alone
(the class count read from the head), with the image folder gone, and classifies as the trained model."""

import shutil

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
