"""What an app exposes to the command line: its verbs, its quick recipe, its datasets and its weights.

Each app's `app.py` builds one `App` and names it in pyproject's `mambakit.apps` entry-point group:

    [project.entry-points."mambakit.apps"]
    timeseries = "mambakit.apps.timeseries.app:APP"

`mambakit --help` lists every registered app with its one-line description; `mambakit <app> <verb>`
runs a verb. Keep `app.py` cheap to import: heavy imports go inside the verb functions. Every app also gets
`recipes` from the CLI (its packaged recipes, mambakit/configs/<name>/, plus `recipe_dir`).

`quickstart(out_dir=FOLDER) -> QuickstartResult` trains the quick recipe with its runs in FOLDER, which
`mambakit quickstart --out-dir DIR` sets to DIR/quickstart-<time>/<app>/ (`run_quickstart` calls it).

`rebuild_model` lets `mambakit.zoo.load_pretrained("runs/<x>")` turn the app's training checkpoints (format
"mambakit-checkpoint-v1", whose "app" names the app) back into models:

    def _rebuild_model(config: dict, weights: Mapping[str, Tensor], source: str) -> nn.Module:
        recipe = from_dict(MyRecipe, config, source)          # the checkpoint's saved recipe
        return build_net(recipe.model, n_classes=weights["head.weight"].shape[0])

It returns the network the task's `build_model()` would build for that recipe, with fresh weights (the caller
loads `weights` strictly). It must not need the training data: sizes that come from the data (classes, items,
variates) are read from the shapes in `weights`, which are the checkpoint's model (or EMA) state dict.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


@dataclass
class Verb:
    name: str
    help: str                                                   # one line, shown by `mambakit <app> --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]                    # returns an exit code or None


@dataclass
class QuickstartResult:
    """One row of `mambakit quickstart`'s table."""
    app: str
    model: str
    data: str
    metric: str
    value: float
    baseline: str              # what the baseline is, e.g. "seasonal naive"
    baseline_value: float
    wall_time_s: float
    run_dir: str | None = None


@dataclass
class App:
    name: str
    description: str                                            # one line for `mambakit --help`
    verbs: Sequence[Verb] = ()
    # quickstart(out_dir=FOLDER) trains the quick recipe (within 90 s on 2 cores) with its runs in FOLDER;
    # see run_quickstart for the older forms still accepted
    quickstart: Callable[..., QuickstartResult] | None = None
    datasets: Sequence[Any] = field(default_factory=tuple)      # mambakit.data.DatasetEntry
    weights: Sequence[Any] = field(default_factory=tuple)       # mambakit.zoo.WeightEntry
    # rebuild_model(saved recipe as a dict, state dict, source for messages) -> nn.Module; see the docstring
    rebuild_model: Callable[[dict, Mapping[str, Any], str], Any] | None = None
    # a folder of the app's recipes (*.yaml) besides mambakit/configs/<name>/ (third-party apps)
    recipe_dir: str | Path | None = None

    def verb(self, name: str) -> Verb:
        for v in self.verbs:
            if v.name == name:
                return v
        raise KeyError(f"app '{self.name}' has no verb '{name}'; verbs: {', '.join(v.name for v in self.verbs)}")


def run_quickstart(quickstart: Callable[..., QuickstartResult], out_dir: str | Path) -> QuickstartResult:
    """Call an app's quickstart so that its runs go into `out_dir` (`mambakit quickstart --out-dir`).

    The protocol is `quickstart(out_dir=FOLDER)`. Older forms still work: one that takes `run_dir` (its one
    run folder) gets the same folder there; one that takes neither is called bare, and its runs are wherever
    it puts them (its QuickstartResult.run_dir says where).
    """
    params = inspect.signature(quickstart).parameters
    if "out_dir" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return quickstart(out_dir=Path(out_dir))
    if "run_dir" in params:
        return quickstart(run_dir=Path(out_dir))
    return quickstart()
