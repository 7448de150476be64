"""Recipes wherever the user is: packaged recipes, `-c NAME` from any folder, `mambakit <app> recipes`, the
quickstart's output folder, `make demo`'s total time, the dataset / weight registries fed from the app layer,
and (slow) a built wheel in a fresh venv running the quickstart from an empty folder."""

import argparse
import fnmatch
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import mambakit
from mambakit import apps as app_registry
from mambakit.apps import register_app, unregister_app
from mambakit.cli import main
from mambakit.data import DatasetEntry, RemoteFile, UrlSource
from mambakit.data import registry as data_registry
from mambakit.engine import recipes
from mambakit.engine.app import App, QuickstartResult, Verb, run_quickstart
from mambakit.engine.config import ConfigError, load_config
from mambakit.engine.recipes import list_recipes, recipe_description, resolve_recipe
from mambakit.engine.runner import standard_verbs

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(mambakit.__file__).resolve().parent


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass
class Toy:
    lr: float = 0.1
    name: str = "toy"


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """A made-up packaged recipe tree: alpha/{smamba_custom,vim_mnist,quick}, beta/{smamba_custom,other}."""
    root = tmp_path / "pkg" / "configs"
    _write(root / "alpha" / "smamba_custom.yaml", "# S-Mamba on your own CSV: a date column. More.\nlr: 0.5\n")
    _write(root / "alpha" / "vim_mnist.yaml", "# A small Vim on MNIST.\nlr: 0.25\n")
    _write(root / "alpha" / "quick.yaml", "lr: 0.125\n")
    _write(root / "beta" / "smamba_custom.yaml", "# beta's own.\nlr: 2.0\n")
    _write(root / "beta" / "other.yaml", "# Other.\nlr: 3.0\n")
    monkeypatch.setattr(recipes, "RECIPES_DIR", root)
    monkeypatch.setattr(recipes, "_EXTRA_DIRS", {})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)          # the user is in another folder
    return root


# --------------------------------------------------------------------------------------------------
# resolution

def test_names_resolve_to_packaged_recipes_from_any_folder(packaged):
    expected = packaged / "alpha" / "smamba_custom.yaml"
    for spec in ("smamba_custom", "smamba_custom.yaml", "alpha/smamba_custom", "alpha/smamba_custom.yaml",
                 "configs/alpha/smamba_custom.yaml", "mambakit/configs/alpha/smamba_custom.yaml"):
        assert resolve_recipe(spec, "alpha") == expected, spec
    assert resolve_recipe("beta/smamba_custom") == packaged / "beta" / "smamba_custom.yaml"
    assert resolve_recipe("vim_mnist") == packaged / "alpha" / "vim_mnist.yaml"     # unique across apps
    assert load_config(Toy, "alpha/vim_mnist").lr == 0.25                           # load_config takes names too


def test_an_existing_path_wins_over_a_packaged_name(packaged):
    local = _write(Path("smamba_custom.yaml"), "lr: 9.0\n")
    assert resolve_recipe("smamba_custom.yaml", "alpha") == local
    assert load_config(Toy, "smamba_custom.yaml").lr == 9.0
    assert resolve_recipe("smamba_custom", "alpha") == packaged / "alpha" / "smamba_custom.yaml"   # no such file
    mine = _write(Path("configs/alpha/vim_mnist.yaml"), "lr: 7.0\n")       # a user's own configs/ folder
    assert load_config(Toy, "configs/alpha/vim_mnist.yaml").lr == 7.0 and mine.is_file()


def test_unknown_and_ambiguous_names_are_clear_errors(packaged):
    with pytest.raises(ConfigError) as info:
        resolve_recipe("smamba_custm", "alpha")
    message = str(info.value)
    assert message.startswith("smamba_custm: config file not found, and no recipe of app 'alpha' is named "
                              "'smamba_custm' (did you mean smamba_custom?)")
    assert "`mambakit alpha recipes` lists them" in message
    with pytest.raises(ConfigError, match=r"did you mean alpha/smamba_custom, beta/smamba_custom\?"):
        resolve_recipe("smamba_custm")
    with pytest.raises(ConfigError, match=r"exists in several apps \(alpha/smamba_custom, beta/smamba_custom\)"):
        load_config(Toy, "smamba_custom")
    with pytest.raises(ConfigError, match=r"beta/other: a recipe of app 'beta', not of 'alpha'"):
        resolve_recipe("beta/other", "alpha")
    # A path that is not a recipe name stays a plain missing file.
    for spec in ("no/such/dir/x.yaml", "/abs/x.yaml", "gamma/x.yaml"):
        with pytest.raises(ConfigError, match=rf"^{re.escape(spec)}: config file not found$"):
            resolve_recipe(spec, "alpha")


def test_recipe_dirs_of_other_packages(packaged, tmp_path):
    extra = tmp_path / "plugin_recipes"
    _write(extra / "vim_mnist.yaml", "# shadowed by the packaged one.\n")
    _write(extra / "zeta.yaml", "# From a plugin.\nlr: 4.0\n")
    recipes.add_recipe_dir("alpha", extra)
    recipes.add_recipe_dir("alpha", extra)                            # twice: no duplicates
    assert [r.name for r in list_recipes("alpha")] == ["quick", "smamba_custom", "vim_mnist", "zeta"]
    assert resolve_recipe("vim_mnist", "alpha") == packaged / "alpha" / "vim_mnist.yaml"
    assert resolve_recipe("zeta", "alpha") == extra / "zeta.yaml"
    # An App(recipe_dir=...) gets there through discovery.
    other = tmp_path / "gamma_recipes"
    _write(other / "g1.yaml", "lr: 1.0\n")
    register_app(App(name="gamma", description="g", recipe_dir=other))
    try:
        app_registry.discover()
        assert [r.name for r in list_recipes("gamma")] == ["g1"]
    finally:
        unregister_app("gamma")


def test_descriptions_are_the_first_sentence_of_the_leading_comment(tmp_path):
    cases = {
        "# Vim-Ti on ImageNet-1k: hustvl/Vim scripts. Published: top-1 76.1.\n#   mambakit vision train\nx: 1\n":
            "Vim-Ti on ImageNet-1k: hustvl/Vim scripts",
        "# iTransformer (Liu et al. 2024) on ETTh1,\n# lookback 96. Then more.\n": "iTransformer (Liu et al. 2024) "
                                                                               "on ETTh1, lookback 96",
        "# A first line that ends with a colon:\n# details that are not part of it\n": "A first line that ends "
                                                                                      "with a colon",
        "# Before a command line\n#   mambakit x train -c y\n# after it\n": "Before a command line",
        "#\n# After an empty comment line.\n": "After an empty comment line",
        "x: 1\n# a comment further down\n": "",
        "": "",
    }
    for i, (text, expected) in enumerate(cases.items()):
        assert recipe_description(_write(tmp_path / f"r{i}.yaml", text)) == expected, text
    long = recipe_description(_write(tmp_path / "long.yaml", "# " + "word " * 40 + "\n"))
    assert len(long) <= 100 and long.endswith("...") and long[:-3] == " ".join(["word"] * (len(long[:-3]) // 5 + 1))


# --------------------------------------------------------------------------------------------------
# `-c` in the standard verbs, `mambakit <app> recipes`

def _parser_of(verb: Verb) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x")
    verb.add_arguments(parser)
    return parser


def test_the_standard_verbs_resolve_c_while_parsing(packaged, capsys):
    train, evaluate, finetune = standard_verbs("alpha", Toy, lambda config: None)
    args = _parser_of(train).parse_args(["-c", "smamba_custom", "lr=1"])
    assert args.config == str(packaged / "alpha" / "smamba_custom.yaml") and args.overrides == ["lr=1"]
    assert _parser_of(finetune).parse_args(["--pretrained", "x", "-c", "alpha/quick"]).config.endswith("quick.yaml")
    assert _parser_of(evaluate).parse_args(["--checkpoint", "ck"]).config is None
    with pytest.raises(SystemExit) as info:
        _parser_of(train).parse_args(["-c", "vim_mnst"])
    assert info.value.code == 2
    assert "argument -c/--config: vim_mnst: config file not found, and no recipe of app 'alpha' is named " \
           "'vim_mnst' (did you mean vim_mnist?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):                   # beta's name is not alpha's
        _parser_of(train).parse_args(["-c", "other"])


@pytest.fixture
def toy_apps(monkeypatch):
    monkeypatch.setattr(app_registry, "_FROM_ENTRY_POINTS", {})      # the real apps stay out
    alpha = register_app(App(name="alpha", description="toy", verbs=standard_verbs("alpha", Toy, lambda c: None)))
    own = register_app(App(name="beta", description="toy with its own recipes verb", verbs=[
        Verb("recipes", "its own", lambda p: None, lambda a: 7)]))
    yield alpha, own
    unregister_app("alpha")
    unregister_app("beta")


def test_every_app_gets_a_recipes_verb(packaged, toy_apps, capsys):
    assert main(["alpha", "recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "DESCRIPTION"]
    assert [line.rstrip() for line in lines[1:4]] == [
        "quick",
        "smamba_custom  S-Mamba on your own CSV: a date column",
        "vim_mnist      A small Vim on MNIST"]
    assert lines[5] == f"from: {packaged / 'alpha'}"
    assert main(["alpha", "recipes", "vim_mnist"]) == 0
    assert capsys.readouterr().out == "# A small Vim on MNIST.\nlr: 0.25\n"
    assert main(["alpha", "recipes", "vim_mnst"]) == 2
    assert "did you mean vim_mnist?" in capsys.readouterr().err
    assert main(["beta", "recipes"]) == 7                             # an app's own verb of that name wins
    assert main(["alpha", "--help"]) == 0
    assert re.search(r"\n\s+recipes\s+list the recipes that ship", capsys.readouterr().out)


def test_the_real_apps_list_their_packaged_recipes_from_another_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mambakit", "timeseries", "recipes"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip() and not line.startswith(
        ("from:", "use:"))]
    assert names == sorted(p.stem for p in (PACKAGE / "configs" / "timeseries").glob("*.yaml"))
    assert "smamba_custom" in names and "quick_elecdemand" in names


# --------------------------------------------------------------------------------------------------
# what ships: every recipe in the package data, the quick recipes inside the package

def test_package_data_ships_every_recipe():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mambakit"]
    files = [p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "configs").rglob("*") if p.is_file()]
    assert len(files) >= 40

    def shipped(rel: str) -> bool:     # setuptools globs: '*' stays within one folder
        return any(len(pat.split("/")) == len(rel.split("/")) and
                   all(fnmatch.fnmatchcase(a, b) for a, b in zip(rel.split("/"), pat.split("/"))) for pat in patterns)

    assert [f for f in files if not shipped(f)] == []
    for path in (PACKAGE / "configs").rglob("*.yaml"):
        assert recipe_description(path), f"{path}: no leading comment to describe it"


def test_the_repository_configs_folder_is_the_packaged_one():
    link = REPO / "configs"
    if not (REPO / ".git").exists():
        pytest.skip("not a checkout")
    assert link.is_symlink() and link.resolve() == (PACKAGE / "configs").resolve()


def test_quick_recipes_live_inside_the_package():
    from mambakit.apps.pathology.app import COHORT_RECIPES, QUICK_RECIPES
    from mambakit.apps.recsys.app import QUICK_RECIPE as RECSYS
    from mambakit.apps.timeseries.app import QUICK_RECIPE as TIMESERIES
    from mambakit.apps.vision.app import FINETUNE_RECIPE, QUICK_RECIPE as VISION

    for path in (*QUICK_RECIPES, *COHORT_RECIPES, RECSYS, TIMESERIES, VISION, FINETUNE_RECIPE):
        # Not resolved: the repository's configs/ link would make a path outside the package look inside.
        assert path.is_file() and Path(os.path.abspath(path)).is_relative_to(PACKAGE / "configs"), path


# --------------------------------------------------------------------------------------------------
# quickstart --out-dir and the total time

def test_run_quickstart_passes_the_folder_in_every_accepted_form(tmp_path):
    seen = {}

    def new(out_dir):
        seen["new"] = out_dir

    def pathology_like(out_dir=None):
        seen["pathology_like"] = out_dir

    def legacy(recipe_path="x.yaml", overrides=(), run_dir=None):
        seen["legacy"] = run_dir

    def kwargs(**kw):
        seen["kwargs"] = kw["out_dir"]

    def bare():
        seen["bare"] = "called"

    for fn in (new, pathology_like, legacy, kwargs, bare):
        run_quickstart(fn, str(tmp_path / "x"))
    assert seen == {"new": tmp_path / "x", "pathology_like": tmp_path / "x", "legacy": tmp_path / "x",
                    "kwargs": tmp_path / "x", "bare": "called"}


def test_the_real_quickstarts_take_the_folder():
    from mambakit.apps.pathology.app import quickstart as pathology
    from mambakit.apps.recsys.app import quickstart as recsys
    from mambakit.apps.timeseries.app import quickstart as timeseries
    from mambakit.apps.vision.app import quickstart as vision

    for fn in (pathology, recsys, timeseries, vision):
        assert {"out_dir", "run_dir"} & set(inspect.signature(fn).parameters), fn.__module__


def _quick_writer(name):
    def quickstart(out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "metrics.jsonl").write_text("{}\n")
        return QuickstartResult(app=name, model="m", data="d", metric="mse", value=0.5, baseline="b",
                                baseline_value=1.0, wall_time_s=0.0, run_dir=str(out_dir))
    return quickstart


def _quick_legacy(recipe_path="q.yaml", overrides=(), run_dir=None):
    Path(run_dir).mkdir(parents=True)
    (Path(run_dir) / "checkpoint.pt").write_bytes(b"x")
    return QuickstartResult(app="legacy", model="m", data="d", metric="mse", value=0.25, baseline="b",
                            baseline_value=1.0, wall_time_s=0.0, run_dir=str(run_dir))


def test_quickstart_out_dir_holds_the_runs_and_the_total_is_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(app_registry, "_FROM_ENTRY_POINTS", {})
    register_app(App(name="qnew", description="q", quickstart=_quick_writer("qnew")))
    register_app(App(name="legacy", description="q", quickstart=_quick_legacy))
    try:
        assert main(["quickstart", "--out-dir", str(tmp_path / "mine")]) == 0
    finally:
        unregister_app("qnew")
        unregister_app("legacy")
    (folder,) = (tmp_path / "mine").glob("quickstart-*")
    assert (folder / "qnew" / "metrics.jsonl").is_file() and (folder / "legacy" / "checkpoint.pt").is_file()
    rows = {r["app"]: r for r in json.loads((folder / "results.json").read_text())}
    assert rows["qnew"]["run_dir"] == str(folder / "qnew") and rows["legacy"]["run_dir"] == str(folder / "legacy")
    captured = capsys.readouterr()
    assert captured.out.strip() == (folder / "results.md").read_text().strip()   # stdout: the table alone
    assert re.search(r"^total wall time: \d+\.\d s for 2 app\(s\)$", captured.err, re.M)


def test_make_demo_prints_the_total_wall_time(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    bin_dir = tmp_path / "bin"
    _write(bin_dir / "mambakit", "#!/bin/sh\nsleep 1\necho \"fake mambakit $*\"\nexit ${FAKE_RC:-0}\n").chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()
    future = time.time() + 3600
    os.utime(stamp, (future, future))     # newer than pyproject.toml: the venv counts as installed
    command = ["make", "--no-print-directory", "-C", str(REPO), "demo", f"BIN={bin_dir}", f"STAMP={stamp}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fake mambakit quickstart" in proc.stdout
    total = re.search(r"^make demo: total wall time (\d+) s \(venv included\)$", proc.stdout, re.M)
    assert total and 1 <= int(total.group(1)) <= 30
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "FAKE_RC": "3"})
    assert proc.returncode != 0 and "make demo: total wall time" in proc.stdout    # printed, and the failure kept


# --------------------------------------------------------------------------------------------------
# registries fed from the app layer

_PLUGIN_CALLS = []
_TOY_ENTRY = DatasetEntry("plugin-toy", "toyapp", "a toy", [RemoteFile("t.csv", None, [UrlSource("http://x/t.csv")])])


def _toy_plugin():
    _PLUGIN_CALLS.append(1)
    data_registry.add_dataset_provider(_toy_provider)


def _toy_provider():
    yield _TOY_ENTRY


def test_plugins_feed_the_dataset_registry_once(monkeypatch):
    import importlib.metadata

    group = data_registry.PLUGIN_GROUP
    fake = [EntryPoint("toy", f"{__name__}:_toy_plugin", group), EntryPoint("broken", "no_such_module_x:f", group)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [e for e in fake if e.group == group])
    monkeypatch.setattr(data_registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(data_registry, "_PROVIDERS", [])
    monkeypatch.setattr(data_registry, "_DATASETS", {})
    _PLUGIN_CALLS.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert data_registry.get_dataset("plugin-toy") is _TOY_ENTRY
    assert any("mambakit plugin broken = no_such_module_x:f failed: ModuleNotFoundError" in str(w.message)
               for w in caught)
    assert [e.name for e in data_registry.list_datasets()] == ["plugin-toy"]
    assert _PLUGIN_CALLS == [1]                                   # loaded once per process


def test_pyproject_names_the_app_layer_as_the_plugin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["mambakit.plugins"] == {"apps": "mambakit.apps:install"}
    from mambakit.zoo import registry as zoo_registry
    app_registry.install()
    assert app_registry._datasets_of_apps in data_registry._PROVIDERS
    assert app_registry._weights_of_apps in zoo_registry._PROVIDERS
    apps, broken = zoo_registry.installed_apps()
    assert apps == app_registry.discover() and broken == app_registry.broken_apps()


# --------------------------------------------------------------------------------------------------
# the wheel, in a fresh venv, from an empty folder

@pytest.mark.slow
def test_wheel_in_a_fresh_venv_has_recipes_and_a_quickstart(tmp_path):
    """Build the wheel from a copy of the tree, install it alone into a new venv (the dependencies come from
    this interpreter's site-packages through a .pth file: torch is not reinstalled), and from an empty folder
    list the recipes, resolve a name, look up a dataset in a process that imported only mambakit.data, and run
    the timeseries quickstart with its runs in --out-dir."""
    import sysconfig

    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache", "tests", "benchmarks"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("mambakit-*.whl")
    venv = tmp_path / "venv"
    # A venv of this interpreter's Python, so that its site-packages (torch & co.) fit the .pth below.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    venv_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args, timeout=120):
        proc = subprocess.run(list(args), cwd=empty, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
        return proc.stdout

    where = run(str(py), "-c", "import mambakit; print(mambakit.__file__)")
    assert where.strip().startswith(str(venv_site)), where
    listing = run(str(venv / "bin" / "mambakit"), "timeseries", "recipes")
    assert re.search(r"^smamba_custom\s+S-Mamba", listing, re.M) and f"from: {venv_site}" in listing
    assert run(str(venv / "bin" / "mambakit"), "timeseries", "recipes", "smamba_custom").startswith("# S-Mamba")
    # A process that imports neither the CLI nor an app: the plugin entry point feeds the registries.
    fresh = run(str(py), "-c", "from mambakit.data import get_dataset; print(get_dataset('etth1').app); "
                               "from mambakit.zoo import get_weights; "
                               "print(get_weights('vim_tiny_patch16_224.in1k').app)")
    assert fresh.split() == ["timeseries", "vision"]
    assert not (empty / "runs").exists()
    run(str(venv / "bin" / "mambakit"), "quickstart", "timeseries", "--out-dir", "out", timeout=1800)
    (folder,) = (empty / "out").glob("quickstart-*")
    assert (folder / "results.md").is_file() and (folder / "timeseries" / "config.yaml").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["out"]
