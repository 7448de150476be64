"""The app through the command line: train a small model on a CSV, evaluate it, forecast past the end of a
file (dates, columns, plot), and the errors a forecasting user meets."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mambakit.apps.timeseries.config import ForecastRecipe
from mambakit.apps.timeseries.forecast import forecast_csv, load_forecaster
from mambakit.apps.timeseries.task import ForecastTask, Forecaster
from mambakit.cli import main
from mambakit.engine.config import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def daily_csv(path, n=400, freq="h", start="2021-03-01 00:00"):
    """Two series with a daily cycle and a slow trend, plus a target."""
    dates = pd.date_range(start, periods=n, freq=freq)
    t = np.arange(n)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "timestamp": dates.strftime("%Y-%m-%d %H:%M:%S"),
        "load": 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.01 * t + rng.normal(0, 0.2, n),
        "temp": 20 + 5 * np.cos(2 * np.pi * t / 24) + rng.normal(0, 0.3, n),
        "price": 50 + 10 * np.sin(2 * np.pi * (t - 3) / 24) + rng.normal(0, 1, n),
    })
    df.to_csv(path, index=False)
    return df


def write_recipe(path, csv, model="dlinear", features="M", pred_len=12, **extra):
    model_block = {"dlinear": "  name: dlinear\n  moving_avg: 5\n",
                   "smamba": "  name: smamba\n  d_model: 16\n  d_ff: 16\n  e_layers: 1\n  d_state: 2\n",
                   "itransformer": "  name: itransformer\n  d_model: 16\n  d_ff: 16\n  e_layers: 1\n  n_heads: 2\n"}[model]
    path.write_text(f"""data:
  path: {csv}
  date_column: timestamp
  target: price
  features: {features}
  split: ratio
  seq_len: 48
  label_len: 24
  pred_len: {pred_len}
model:
{model_block}eval:
  seasonal_period: 24
  plot_windows: 2
train:
  epochs: 2
  batch_size: 16
  eval_batch_size: 64
  seed: 1
  log_every_steps: 5
  optimizer: {{name: adam, lr: 0.01}}
  early_stopping: {{monitor: val/loss, patience: 3}}
run:
  progress: false
  tensorboard: false
""")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small DLinear run through `mambakit timeseries train`, shared by the tests below."""
    root = tmp_path_factory.mktemp("ts_app")
    csv = root / "series.csv"
    daily_csv(csv)
    recipe = write_recipe(root / "recipe.yaml", csv)
    run = root / "run"
    assert main(["timeseries", "train", "-c", str(recipe), "--run-dir", str(run)]) == 0
    return {"root": root, "csv": csv, "recipe": recipe, "run": run}


def test_train_writes_run_folder_with_test_metrics_and_plot(trained):
    run = trained["run"]
    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    assert set(m) >= {"val/loss", "test/mse", "test/mae", "test/naive_mse"}
    assert math.isfinite(m["test/mse"]) and m["test/mse"] < 0.2        # far below the scaled variance (~1)
    assert (run / "test_forecast.png").read_bytes()[:8] == PNG_MAGIC
    assert (run / "curves.png").is_file()


def test_checkpoint_carries_scaler_and_data_description(trained):
    model, recipe = load_forecaster(trained["run"])
    info = model.info
    assert info["columns"] == ["load", "temp", "price"] and info["freq"] == "h" and info["pred_len"] == 12
    raw = pd.read_csv(trained["csv"])[["load", "temp", "price"]].to_numpy()
    n_train = int(len(raw) * 0.7)
    np.testing.assert_allclose(model.scaler_mean.numpy(), raw[:n_train].mean(0), rtol=1e-12)
    np.testing.assert_allclose(model.scaler_std.numpy(), raw[:n_train].std(0), rtol=1e-12)
    assert recipe.model.name == "dlinear"


def test_eval_verb_reproduces_test_metrics_and_plots(trained, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    plot = tmp_path / "eval.png"
    assert main(["timeseries", "eval", "--checkpoint", str(trained["run"]), "--output", str(out),
                 "--plot", str(plot)]) == 0
    metrics = json.loads(out.read_text())
    summary = json.loads((trained["run"] / "summary.json").read_text())["metrics"]
    assert metrics["test/mse"] == pytest.approx(summary["test/mse"], rel=1e-6)
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_forecast_cli_writes_dated_rows_and_png(trained, tmp_path):
    out, plot = tmp_path / "fc.csv", tmp_path / "fc.png"
    code = main(["timeseries", "forecast", "--checkpoint", str(trained["run"]), "--csv", str(trained["csv"]),
                 "--horizon", "30", "--out", str(out), "--plot", str(plot)])
    assert code == 0
    fc = pd.read_csv(out)
    assert list(fc.columns) == ["timestamp", "load", "temp", "price"]
    last = pd.Timestamp(pd.read_csv(trained["csv"])["timestamp"].iloc[-1])
    expected = pd.date_range(last + pd.Timedelta(hours=1), periods=30, freq="h")
    assert list(pd.to_datetime(fc["timestamp"])) == list(expected)          # 30 > pred_len 12: rolled out
    assert np.isfinite(fc[["load", "temp", "price"]].to_numpy()).all()
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_forecast_matches_model_on_last_window_and_holdout_truth(trained):
    model, _ = load_forecaster(trained["run"])
    df = pd.read_csv(trained["csv"])
    values = df[["load", "temp", "price"]].to_numpy()
    result = forecast_csv(model, trained["csv"], horizon=12, holdout=12, columns=["price", "load"])
    assert result.columns == ["price", "load"]
    # the truth is the hidden rows, the forecast is the model on the 48 rows before them
    np.testing.assert_allclose(result.truth, values[-12:][:, [2, 0]])
    scaler = model.scaler
    x = torch.tensor(scaler.transform(values[-60:-12]), dtype=torch.float32)[None]
    with torch.no_grad():
        direct = scaler.inverse_transform(model(x)[0].double().numpy())
    np.testing.assert_allclose(result.values, direct[:, [2, 0]], rtol=1e-6, atol=1e-6)
    assert str(result.dates[0]) == df["timestamp"].iloc[-12]


def test_forecast_errors(trained, tmp_path):
    model, _ = load_forecaster(trained["run"])
    df = pd.read_csv(trained["csv"])
    irregular = tmp_path / "irregular.csv"
    df.drop(index=100).to_csv(irregular, index=False)
    with pytest.raises(ValueError, match=r"irregular\.csv: line 102, column 'timestamp': irregular dates"):
        forecast_csv(model, irregular)
    missing = tmp_path / "missing.csv"
    df.drop(columns=["temp"]).to_csv(missing, index=False)
    with pytest.raises(ValueError, match=r"missing\.csv: no column 'temp'"):
        forecast_csv(model, missing)
    short = tmp_path / "short.csv"
    df.iloc[:30].to_csv(short, index=False)
    with pytest.raises(ValueError, match=r"short\.csv: 30 rows before the forecast start, but the model looks "
                                         r"back 48 rows"):
        forecast_csv(model, short)
    half_hourly = tmp_path / "half.csv"
    daily_csv(half_hourly, n=100, freq="30min")
    with pytest.raises(ValueError, match=r"'30min'-spaced but the model was trained on 'h' data"):
        forecast_csv(model, half_hourly)
    with pytest.raises(ValueError, match="--columns: rain not among the forecast columns"):
        forecast_csv(model, trained["csv"], columns=["rain"])
    assert main(["timeseries", "forecast", "--checkpoint", str(trained["run"]), "--csv", str(short),
                 "--out", str(tmp_path / "x.csv")]) == 1                       # reported, no traceback


def test_recipe_errors_name_file_and_key(tmp_path, trained):
    recipe = write_recipe(tmp_path / "r.yaml", trained["csv"])
    text = recipe.read_text().replace("features: M", "features: X")
    recipe.write_text(text)
    with pytest.raises(ValueError, match=r"r\.yaml: data\.features: expected one of 'M', 'S', 'MS', got 'X'"):
        load_config(ForecastRecipe, recipe)
    ok = write_recipe(tmp_path / "ok.yaml", trained["csv"])
    cfg = load_config(ForecastRecipe, ok, ["data.columns=[load,nope]"])
    with pytest.raises(ValueError, match=r"series\.csv: no column 'nope'"):
        ForecastTask(cfg).build_datasets()


def test_features_ms_scores_the_target_only(trained, tmp_path):
    recipe = write_recipe(tmp_path / "ms.yaml", trained["csv"], features="MS")
    cfg = load_config(ForecastRecipe, recipe)
    task = ForecastTask(cfg)
    model = task.build_model()
    batch = {k: v.unsqueeze(0) for k, v in task.build_datasets().test[0].items()}
    pred, true = task.forecast_batch(model, batch)
    assert pred.shape == true.shape == (1, 12, 1)
    torch.testing.assert_close(true[0, :, 0], batch["y"][0, -12:, -1])       # the target (price) is last
    assert isinstance(model, Forecaster) and model.info["features"] == "MS"


def _tslib_type1_lr(base_lr, epochs):
    """TSLib: after epoch e (0-based) adjust_learning_rate(opt, e + 1) sets lr = base * 0.5 ** ((e + 1) - 1)."""
    lrs, lr = [], base_lr
    for epoch in range(epochs):
        lrs.append(lr)
        lr = base_lr * 0.5 ** epoch            # set after this epoch, used by the next one
    return lrs


def test_recipes_load_and_reproduce_tslib_type1_schedule():
    from pathlib import Path

    from mambakit.engine.optim import lr_at

    folder = Path(__file__).resolve().parents[3] / "configs" / "timeseries"
    recipes = sorted(folder.glob("*_etth1_*.yaml"))
    assert len(recipes) == 12
    upstream_lr = {"smamba": {96: 7e-5, 192: 7e-5, 336: 5e-5, 720: 5e-5}, "itransformer": {}, "dlinear": {}}
    for path in recipes:
        cfg = load_config(ForecastRecipe, path, ["data.path=unused.csv"])
        base = upstream_lr[cfg.model.name].get(cfg.data.pred_len, 1e-4)
        spe = 264
        ours = [lr_at(cfg.train.scheduler, cfg.train.optimizer.lr, e * spe + k, spe, 10 * spe)
                for e in range(10) for k in (0, spe - 1)]
        expected = [lr for lr in _tslib_type1_lr(base, 10) for _ in (0, 1)]
        np.testing.assert_allclose(ours, expected, rtol=1e-12, err_msg=str(path))
        assert cfg.train.early_stopping.patience == 3 and cfg.train.batch_size == 32 and cfg.train.epochs == 10
        assert cfg.data.split == "ett_hour" and cfg.data.seq_len == 96
    for extra in ("quick_elecdemand.yaml", "smamba_custom.yaml"):
        load_config(ForecastRecipe, folder / extra, ["data.path=unused.csv"])
