"""The `mambakit` command: app discovery, help, verb dispatch, errors and exit codes, data/zoo commands,
quickstart's table. Run through `mambakit.cli.main([...])`, and once as a real `python -m mambakit`."""

import hashlib
import io
import json
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
import torch

from mambakit import apps as app_registry
from mambakit.apps import register_app, unregister_app
from mambakit.cli import main
from mambakit.data import DatasetEntry, DownloadError, RemoteFile, UrlSource
from mambakit.data.testing import FileServer
from mambakit.engine.app import App, QuickstartResult, Verb
from mambakit.engine.config import ConfigError
from mambakit.zoo import WeightEntry

CALLS = []


def _add_train_args(parser):
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("overrides", nargs="*")


def _train(args):
    CALLS.append(("train", args.config, args.epochs, args.overrides))


def _fail_config(args):
    raise ConfigError("configs/toy.yaml: train.lrr: unknown key (did you mean 'lr'?)")


def _fail_download(args):
    raise DownloadError("http://127.0.0.1:1/x: HTTP 404 Not Found")


def _exit_code(args):
    return 3


def _quick_ok():
    return QuickstartResult(app="okapp", model="toy-mamba", data="toy", metric="mse", value=0.123456,
                            baseline="mean", baseline_value=1.0, wall_time_s=0.01, run_dir="runs/x")


def _quick_fail():
    raise RuntimeError("out of cheese\nsecond line")


OK_APP = App(name="okapp", description="a toy app that trains", quickstart=_quick_ok, verbs=[
    Verb("train", "train a toy model", _add_train_args, _train),
    Verb("evaluate", "fail with a config error", lambda p: None, _fail_config),
    Verb("fetch", "fail with a download error", lambda p: None, _fail_download),
    Verb("code", "return exit code 3", lambda p: None, _exit_code)])
BAD_APP = App(name="badapp", description="a toy app whose quick recipe fails", quickstart=_quick_fail)


@pytest.fixture(autouse=True)
def _apps(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAMBAKIT_DEBUG", raising=False)
    monkeypatch.delenv("MAMBAKIT_OFFLINE", raising=False)
    CALLS.clear()
    # Only the toy apps: the real apps installed through entry points must not run here (their quick
    # recipes train for minutes).
    monkeypatch.setattr(app_registry, "_FROM_ENTRY_POINTS", {})
    register_app(OK_APP)
    register_app(BAD_APP)
    yield
    unregister_app("okapp")
    unregister_app("badapp")


def test_help_lists_registered_apps_and_builtins(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "okapp" in out and "a toy app that trains" in out
    assert "badapp" in out and "a toy app whose quick recipe fails" in out
    for command in ("data", "zoo", "quickstart"):
        assert f"\n  {command} " in out


def test_no_arguments_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: mambakit" in capsys.readouterr().err


def test_app_help_lists_verbs(capsys):
    assert main(["okapp", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: mambakit okapp" in out
    for verb, text in (("train", "train a toy model"), ("evaluate", "fail with a config error")):
        assert verb in out and text in out


def test_verb_dispatch_passes_arguments():
    assert main(["okapp", "train", "-c", "configs/toy.yaml", "--epochs", "4", "train.lr=1e-3"]) == 0
    assert CALLS == [("train", "configs/toy.yaml", 4, ["train.lr=1e-3"])]
    assert main(["okapp", "code"]) == 3


def test_unknown_verb_and_app_suggest_close_matches(capsys):
    assert main(["okapp", "trian"]) == 2
    err = capsys.readouterr().err
    assert "no verb 'trian'" in err and "did you mean 'train'" in err and "verbs: train, evaluate, fetch, code" in err
    assert main(["okap", "train"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'okap'" in err and "did you mean 'okapp'" in err and "badapp, okapp" in err


def test_bad_verb_arguments_are_usage_errors(capsys):
    assert main(["okapp", "train"]) == 2           # -c is required
    assert "the following arguments are required: -c/--config" in capsys.readouterr().err


def test_errors_print_one_line_without_traceback(capsys, monkeypatch):
    assert main(["okapp", "evaluate"]) == 1
    err = capsys.readouterr().err
    assert err == "mambakit: error: configs/toy.yaml: train.lrr: unknown key (did you mean 'lr'?)\n"
    assert main(["okapp", "fetch"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("MAMBAKIT_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["okapp", "evaluate"])


def test_quickstart_table_with_a_passing_and_a_failing_app(tmp_path, capsys):
    assert main(["quickstart", "--out-dir", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").glob("quickstart-*")
    table = (run_dir / "results.md").read_text()
    assert out.strip() == table.strip()               # one table, printed and written
    lines = table.strip().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "app", "model", "data", "metric", "value", "baseline", "baseline value", "wall time", "error"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert rows["okapp"][1:7] == ["toy-mamba", "toy", "mse", "0.1235", "mean", "1"] and rows["okapp"][8] == ""
    assert rows["badapp"][8] == "RuntimeError: out of cheese"
    records = {r["app"]: r for r in json.loads((run_dir / "results.json").read_text())}
    assert records["okapp"]["value"] == pytest.approx(0.123456) and records["okapp"]["error"] is None
    assert records["badapp"]["error"] == "RuntimeError: out of cheese"
    assert "out of cheese" in (run_dir / "badapp-error.txt").read_text()


def test_quickstart_of_one_app(tmp_path, capsys):
    assert main(["quickstart", "okapp", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "okapp" in out and "badapp" not in out and "error" not in out
    assert main(["quickstart", "nosuchapp", "--out-dir", str(tmp_path)]) == 2


def _served_dataset(server):
    data = b"x,y\n1,2\n"
    server.files["toy.csv"] = data
    return DatasetEntry("cli-toy", "okapp", "a toy table",
                        [RemoteFile("toy.csv", hashlib.sha256(data).hexdigest(), [UrlSource(server.url("toy.csv"))])])


def test_data_list_and_fetch(capsys, monkeypatch):
    from mambakit.data import registry
    monkeypatch.setattr(registry, "_DATASETS", {})
    with FileServer() as server:
        monkeypatch.setattr(OK_APP, "datasets", [_served_dataset(server)])
        assert main(["data", "list"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].split() == ["NAME", "APP", "FILES", "CACHED", "DESCRIPTION"]
        assert out.splitlines()[1].split()[:4] == ["cli-toy", "okapp", "1", "no"]
        assert main(["data", "fetch", "cli-toy"]) == 0
        folder = capsys.readouterr().out.strip()
        assert open(f"{folder}/toy.csv").read() == "x,y\n1,2\n"
        assert main(["data", "list"]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["cli-toy", "okapp", "1", "yes"]
        assert main(["data", "info", "cli-toy"]) == 0
        assert server.url("toy.csv") in capsys.readouterr().out
        assert main(["data", "fetch", "cli-toi"]) == 2
        assert "did you mean 'cli-toy'" in capsys.readouterr().err


def test_zoo_list_and_download(capsys, monkeypatch):
    from mambakit.zoo import registry
    monkeypatch.setattr(registry, "_WEIGHTS", {})
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2).state_dict(), buffer)
    with FileServer({"w.pt": buffer.getvalue()}) as server:
        entry = WeightEntry("cli-linear", "okapp", "a 2x2 linear", "torch.nn:Linear", {"in_features": 2,
                            "out_features": 2}, [server.url("w.pt")], hashlib.sha256(buffer.getvalue()).hexdigest(),
                            "w.pt", licence="MIT", metrics={"acc": 0.5})
        monkeypatch.setattr(OK_APP, "weights", [entry])
        assert main(["zoo", "list"]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:5] == ["cli-linear", "okapp", "MIT", "acc=0.5", "no"]
        assert main(["zoo", "download", "cli-linear"]) == 0
        assert open(capsys.readouterr().out.strip(), "rb").read() == buffer.getvalue()
        monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
        entry2 = WeightEntry("cli-linear2", "okapp", "", "torch.nn:Linear", {}, [server.url("w.pt")], None, "w.pt")
        monkeypatch.setattr(OK_APP, "weights", [entry, entry2])
        assert main(["zoo", "download", "cli-linear2"]) == 1
        assert "MAMBAKIT_OFFLINE=1" in capsys.readouterr().err


def test_entry_point_discovery_reports_broken_apps(capsys, monkeypatch):
    eps = [EntryPoint("okapp2", "tests_cli_apps:APP", "mambakit.apps"),
           EntryPoint("lazyapp", "tests_cli_apps:make_app", "mambakit.apps"),
           EntryPoint("brokenapp", "no_such_module_xyz:APP", "mambakit.apps")]
    monkeypatch.setattr(app_registry, "entry_points", lambda group: eps if group == "mambakit.apps" else [])
    module = type(sys)("tests_cli_apps")
    module.APP = App(name="okapp2", description="from an entry point")
    module.make_app = lambda: App(name="lazyapp", description="built by a function")
    monkeypatch.setitem(sys.modules, "tests_cli_apps", module)
    try:
        app_registry.discover(refresh=True)
        assert main(["--help"]) == 0
        out = capsys.readouterr().out
        assert "from an entry point" in out and "built by a function" in out
        assert "brokenapp" in out and "failed to load: ModuleNotFoundError" in out
        assert main(["brokenapp", "train"]) == 2
        assert "failed to load" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        app_registry.discover(refresh=True)


def test_reserved_and_duplicate_names():
    with pytest.raises(ValueError, match="reserved"):
        register_app(App(name="data", description=""))
    with pytest.raises(ValueError, match="already registered"):
        register_app(App(name="okapp", description="another"))


def test_python_dash_m_mambakit_help():
    proc = subprocess.run([sys.executable, "-m", "mambakit", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: mambakit" in proc.stdout and "quickstart" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "mambakit", "nosuchcommand"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown command 'nosuchcommand'" in proc.stderr


class _BadItems(torch.utils.data.Dataset):
    """Item 2 fails as a bad file does when it is loaded."""

    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise self.error
        return torch.zeros(1)


def _load_all(error, workers: int):
    def run(args):
        for _ in torch.utils.data.DataLoader(_BadItems(error), batch_size=1, num_workers=workers):
            pass
    return run


def test_data_errors_print_one_line_also_from_a_dataloader_worker(capsys, monkeypatch):
    """OSError (PIL's UnidentifiedImageError, a truncated file) and DataError, raised while loading data in the
    main process or in a DataLoader worker (which puts the worker's traceback into the message): one line."""
    from PIL import UnidentifiedImageError

    from mambakit.data import DataError

    cases = {"pil": UnidentifiedImageError("cannot identify image file 'x.jpg'"),
             "oserror": OSError("/d/a.jpg: image file is truncated (3 bytes not processed)"),
             "data": DataError("/d/b.png: cannot read the image (OSError: broken data stream)")}
    runs = [(name, 0) for name in cases] + [("pil", 1)]          # a worker's start costs a second or two
    verbs = [Verb(f"{name}{w}", "load a bad item", lambda p: None, _load_all(cases[name], w)) for name, w in runs]
    register_app(App(name="loadapp", description="loads a dataset with a bad item", verbs=verbs))
    try:
        for name, workers in runs:
            assert main(["loadapp", f"{name}{workers}"]) == 1
            assert capsys.readouterr().err == f"mambakit: error: {cases[name]}\n", (name, workers)
        monkeypatch.setenv("MAMBAKIT_DEBUG", "1")
        with pytest.raises(UnidentifiedImageError):
            main(["loadapp", "pil1"])
    finally:
        unregister_app("loadapp")


def test_zoo_download_from_a_local_file(tmp_path, capsys, monkeypatch):
    import socket

    from mambakit.zoo import registry, weights_path
    monkeypatch.setattr(registry, "_WEIGHTS", {})
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2).state_dict(), buffer)
    data = buffer.getvalue()
    with socket.socket() as s:                  # a closed port on loopback: the download cannot happen
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/w.pt"
    entry = WeightEntry("cli-far", "okapp", "a 2x2 linear", "torch.nn:Linear", {"in_features": 2, "out_features": 2},
                        [url], hashlib.sha256(data).hexdigest(), "w.pt")
    monkeypatch.setattr(OK_APP, "weights", [entry])
    assert main(["zoo", "download", "cli-far"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("mambakit: error: weights 'cli-far': ") and f"could not reach {url}" in err
    assert str(weights_path(entry)) in err and "mambakit zoo download cli-far --from FILE" in err
    (tmp_path / "other.pt").write_bytes(data[:-1])
    assert main(["zoo", "download", "cli-far", "--from", str(tmp_path / "other.pt")]) == 1
    assert "is not the pinned" in capsys.readouterr().err and not weights_path(entry).exists()
    (tmp_path / "w.pt").write_bytes(data)
    assert main(["zoo", "download", "cli-far", "--from", str(tmp_path / "w.pt")]) == 0
    assert capsys.readouterr().out.strip() == str(weights_path(entry))
    assert weights_path(entry).read_bytes() == data
    assert main(["zoo", "download", "cli-far"]) == 0                # cached now: no network needed
