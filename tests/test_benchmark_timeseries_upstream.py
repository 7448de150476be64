"""benchmarks/timeseries_upstream.py without upstream's code: the ETTh1 script's arguments, what is read from
run.py's output, and the table."""

from pathlib import Path

from test_benchmark_rounds import _load as load_benchmark


def _load():
    return load_benchmark("timeseries_upstream")


def _pairs(args):
    return dict(zip(args[::2], args[1::2]))


def test_arguments_are_those_of_the_upstream_etth1_script():
    up = _load()
    for horizon, lr in ((96, 7e-5), (192, 7e-5), (336, 5e-5), (720, 5e-5)):
        args = _pairs(up.upstream_args(horizon, Path("/data"), 2021))
        assert float(args["--learning_rate"]) == lr and args["--pred_len"] == str(horizon)
        assert {k: args[k] for k in ("--seq_len", "--e_layers", "--d_model", "--d_state", "--d_ff", "--features",
                                     "--model", "--data")} == {
            "--seq_len": "96", "--e_layers": "2", "--d_model": "256", "--d_state": "2", "--d_ff": "256",
            "--features": "M", "--model": "S_Mamba", "--data": "ETTh1"}
    assert up.upstream_args(96, Path("/data"), 1, "--train_epochs 1")[-2:] == ["--train_epochs", "1"]


def test_reads_what_run_py_prints():
    up = _load()
    line = "Epoch: {0}, Steps: {1} | Train Loss: {2:.7f} Vali Loss: {3:.7f} Test Loss: {4:.7f}"   # upstream's format
    out = "\n".join([line.format(1, 264, 0.43, 0.7157, 0.4003), "Validation loss decreased ...",
                     line.format(2, 264, 0.36, 0.6908, 0.3893), line.format(3, 264, 0.35, 0.6920, 0.3881),
                     "Early stopping", "mse:0.38749998807907104, mae:0.4062100052833557"])
    parsed = up.parse_run_output(out)
    assert parsed["test_mse"] == 0.38749998807907104 and parsed["test_mae"] == 0.4062100052833557
    assert parsed["epochs"] == 3 and parsed["best_epoch"] == 2 and parsed["device"] == "cpu"
    assert parsed["per_epoch"][2] == dict(epoch=3, train=0.35, val=0.692, test=0.3881)
    assert up.parse_run_output(out.rsplit("\n", 1)[0]) is None          # no final line: no result


def test_table_has_each_seed_the_mean_and_the_paper(monkeypatch, tmp_path):
    up = _load()
    monkeypatch.setattr(up, "OURS", tmp_path / "absent.json")
    runs = [dict(horizon=720, seed=2, test_mse=0.51, test_mae=0.50, epochs=10, best_epoch=7, wall_s=None),
            dict(horizon=720, seed=1, test_mse=0.50, test_mae=0.49, epochs=9, best_epoch=6, wall_s=400.0,
                 device="cuda")]
    row = [line for line in up.markdown(runs).splitlines() if line.startswith("| 720")][0]
    assert row == ("| 720 | 1 -> 0.5000 / 0.4900 (6 of 9, GPU); 2 -> 0.5100 / 0.5000 (7 of 10) | 0.5050 / 0.4950 | "
                   "0.502 / 0.489 | - | 400 s |")
