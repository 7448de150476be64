"""Every number the forecasting app reports, against numpy by hand on small cases where a plausible bug changes
it (MAE as squared error, the wrong column scored for features MS, inverse scaling with another column's
mean / std, a batch-mean-of-means), and every inference path against the evaluation loop's predictions."""

import numpy as np
import pandas as pd
import pytest
import torch

from mambakit.apps.timeseries.config import ForecastRecipe
from mambakit.apps.timeseries.forecast import forecast_csv, load_forecaster, run_forecast
from mambakit.apps.timeseries.metrics import metric, reduce_errors, seasonal_naive, window_errors
from mambakit.apps.timeseries.task import ForecastTask
from mambakit.engine.config import load_config
from mambakit.engine.trainer import Trainer

from ts_reference import eval_loop, mae, mse, ratio_test_rows, windows

COLUMNS = ["load", "temp", "price"]          # price is the target: last after reading


def series_csv(path, n=160):
    """Three hourly columns with different means and spreads (10 / 20 / 50, std about 3 / 5 / 10)."""
    t = np.arange(n)
    rng = np.random.default_rng(7)
    df = pd.DataFrame({
        "when": pd.date_range("2023-01-02", periods=n, freq="h").strftime("%Y-%m-%d %H:%M"),
        "price": 50 + 10 * np.sin(2 * np.pi * (t - 3) / 24) + rng.normal(0, 2, n),
        "load": 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.02 * t + rng.normal(0, .5, n),
        "temp": 20 + 5 * np.cos(2 * np.pi * t / 24) + rng.normal(0, 1, n),
    })
    df.to_csv(path, index=False)
    return df


def recipe(path, csv, features, pred_len=4, model="smamba", max_steps=0):
    block = ("{name: smamba, d_model: 16, d_ff: 16, e_layers: 1, d_state: 2, dropout: 0.0}" if model == "smamba"
             else "{name: dlinear, moving_avg: 5}")
    path.write_text(f"""data:
  path: {csv}
  date_column: when
  target: price
  features: {features}
  seq_len: 24
  label_len: 12
  pred_len: {pred_len}
model: {block}
eval: {{original_scale: true, seasonal_period: 12, plot_windows: 0}}
train:
  epochs: 1
  max_steps: {max(max_steps, 1)}
  batch_size: 8
  seed: 5
  optimizer: {{name: adam, lr: 0.01}}
run: {{progress: false, tensorboard: false}}
""")
    return load_config(ForecastRecipe, path)


def by_hand(df, features, pred_len, seq_len=24):
    """TSLib's pipeline in numpy: the read columns (target last), scaler on the training rows, test windows."""
    cols = ["price"] if features == "S" else ["load", "temp", "price"]
    raw = df[cols].to_numpy(dtype=np.float64)
    n_train, test_start = ratio_test_rows(len(raw), seq_len)
    mean, std = raw[:n_train].mean(0), raw[:n_train].std(0)        # population std, as sklearn
    x, y = windows((raw - mean) / std, test_start, len(raw), seq_len, pred_len)
    return x, y, mean, std


# --------------------------------------------------------------------------------------------------
# metric functions on a hand-made case

def test_window_errors_reduce_to_the_mean_over_all_windows_not_the_mean_of_batch_means():
    pred = torch.tensor([[[0.5, 2.0], [1.0, -1.0]], [[3.0, 0.0], [0.0, 0.0]], [[-2.0, 1.5], [0.25, 4.0]]])
    true = torch.zeros_like(pred)
    true[2] = 1.0
    d = (pred - true).numpy()
    # by hand: 12 errors 0.5 2 1 -1 | 3 0 0 0 | -3 .5 -.75 3
    assert np.sum(d ** 2) == pytest.approx(0.25 + 4 + 1 + 1 + 9 + 9 + 0.25 + 0.5625 + 9)
    parts = [window_errors(pred[:1], true[:1]), window_errors(pred[1:], true[1:])]     # unequal batches
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    got = reduce_errors(joined)
    assert got["mse"] == pytest.approx(34.0625 / 12, rel=1e-12)
    assert got["mae"] == pytest.approx((0.5 + 2 + 1 + 1 + 3 + 3 + 0.5 + 0.75 + 3) / 12, rel=1e-12)
    assert got["rmse"] == pytest.approx((34.0625 / 12) ** 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        window_errors(pred, true[..., :1])


def test_metric_matches_numpy_including_percentage_errors():
    pred = np.array([[1.0, 4.0], [2.5, -1.0]])
    true = np.array([[2.0, 2.0], [2.0, 1.0]])
    m = metric(pred, true)
    assert m["mse"] == pytest.approx((1 + 4 + 0.25 + 4) / 4) and m["mae"] == pytest.approx((1 + 2 + .5 + 2) / 4)
    assert m["mape"] == pytest.approx((0.5 + 1 + 0.25 + 2) / 4)
    assert m["mspe"] == pytest.approx((.25 + 1 + .0625 + 4) / 4)


def test_seasonal_naive_repeats_the_last_period():
    x = torch.arange(10.0).reshape(1, 10, 1)
    np.testing.assert_array_equal(seasonal_naive(x, 7, 3)[0, :, 0].numpy(), [7, 8, 9, 7, 8, 9, 7])
    np.testing.assert_array_equal(seasonal_naive(x, 2, 1)[0, :, 0].numpy(), [9, 9])


# --------------------------------------------------------------------------------------------------
# the reported metrics, through the engine's evaluation loop, against numpy

@pytest.mark.parametrize("features, pred_len", [("M", 4), ("MS", 4), ("S", 4), ("MS", 1)])
def test_reported_metrics_equal_numpy_reference(tmp_path, features, pred_len):
    """test/mse, test/mae (scaled), test/orig_* (original units) and test/naive_* for M, S and MS, with the
    windows split over batches of 5; the reference sees only the CSV and the predictions the loop made."""
    df = series_csv(tmp_path / "s.csv")
    task = ForecastTask(recipe(tmp_path / "r.yaml", tmp_path / "s.csv", features, pred_len))
    torch.manual_seed(0)
    model = task.build_model()
    metrics, inputs, preds = eval_loop(task, model)
    x, y, mean, std = by_hand(df, features, pred_len)
    np.testing.assert_allclose(inputs, x, rtol=0, atol=1e-6)               # the loop saw TSLib's windows
    assert preds.shape == y.shape
    scored = slice(-1, None) if features == "MS" else slice(None)           # MS: the target (price) only
    p, t = preds[..., scored], y[..., scored]
    assert metrics["test/mse"] == pytest.approx(mse(p, t), rel=1e-6)
    assert metrics["test/mae"] == pytest.approx(mae(p, t), rel=1e-6)
    m, s = mean[scored], std[scored]
    assert metrics["test/orig_mse"] == pytest.approx(mse(p * s + m, t * s + m), rel=1e-6)
    assert metrics["test/orig_mae"] == pytest.approx(mae(p * s + m, t * s + m), rel=1e-6)
    raw_truth = df[["price"] if features != "M" else ["load", "temp", "price"]].to_numpy()
    np.testing.assert_allclose((t * s + m)[-1, -1, -1], raw_truth[-1, -1], rtol=1e-9)   # last row of the file
    period = 12                            # shorter than the lookback (24)
    naive = np.stack([x[:, 24 - period + (h % period)] for h in range(pred_len)], axis=1)[..., scored]
    assert metrics["test/naive_mse"] == pytest.approx(mse(naive, t), rel=1e-6)
    assert metrics["test/naive_mae"] == pytest.approx(mae(naive, t), rel=1e-6)
    again, _, preds2 = eval_loop(task, model, batch_size=64)               # another batching, same numbers
    np.testing.assert_array_equal(preds2, preds)
    assert again == pytest.approx(metrics, rel=1e-9)


def test_training_loss_for_ms_is_the_target_column_only(tmp_path):
    series_csv(tmp_path / "s.csv")
    task = ForecastTask(recipe(tmp_path / "r.yaml", tmp_path / "s.csv", "MS"))
    torch.manual_seed(0)
    model = task.build_model()
    batch = {k: torch.stack([task.build_datasets().train[i][k] for i in range(4)]) for k in ("x", "y", "x_mark")}
    with torch.no_grad():
        loss = task.training_step(model, batch)
        full = model(batch["x"], batch["x_mark"]).double().numpy()
    truth = batch["y"][:, -4:].double().numpy()
    assert float(loss) == pytest.approx(mse(full[..., -1], truth[..., -1]), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# inference paths equal the evaluation loop

@pytest.fixture(scope="module", params=["M", "MS"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ts_metrics_{request.param}")
    df = series_csv(root / "s.csv")
    cfg = recipe(root / "r.yaml", root / "s.csv", request.param, pred_len=6, max_steps=3)
    result = Trainer(ForecastTask(cfg)).fit(root / "run")
    return {"root": root, "df": df, "cfg": cfg, "run": result.run_dir, "features": request.param}


def test_forecast_equals_the_evaluation_loop_on_test_windows_twice(run):
    """`forecast --holdout` ending where a test window's lookback ends predicts what the eval loop predicted
    for that window (in original units, scaled back by the numpy scaler), and again the same the second time."""
    model, _ = load_forecaster(run["run"])
    task = ForecastTask(run["cfg"])
    _, _, preds = eval_loop(task, model)
    df, features = run["df"], run["features"]
    _, _, mean, std = by_hand(df, features, 6)
    n, (n_train, test_start) = len(df), ratio_test_rows(len(df), 24)
    names = ["price"] if features == "MS" else COLUMNS
    scored = slice(-1, None) if features == "MS" else slice(None)
    for i in (0, 7, len(preds) - 1):
        hold = n - (test_start + i + 24)
        first = forecast_csv(model, run["root"] / "s.csv", holdout=hold, horizon=6)
        second = forecast_csv(model, run["root"] / "s.csv", holdout=hold, horizon=6)
        assert first.columns == names
        np.testing.assert_array_equal(first.values, second.values)
        expected = preds[i][..., scored] * std[scored] + mean[scored]
        np.testing.assert_allclose(first.values, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(first.truth, df[names].to_numpy()[test_start + i + 24:][:6], rtol=1e-12)


def test_forecast_holdout_score_is_the_original_scale_error(run, capsys):
    df = run["df"]
    result = run_forecast(run["run"], run["root"] / "s.csv", out=None, plot=None, holdout=6)
    printed = capsys.readouterr().out
    names = ["price"] if run["features"] == "MS" else COLUMNS
    truth = df[names].to_numpy()[-6:]
    expected = f"MSE {mse(result.values, truth):.6g}  MAE {mae(result.values, truth):.6g}"
    assert expected in printed


def test_pretrained_rebuild_and_test_plot_use_the_eval_predictions(run, monkeypatch):
    """zoo.load_pretrained(run) gives the same predictions, and the test-window plot draws them."""
    from mambakit.apps.timeseries import plots, task as task_module
    from mambakit.zoo import load_pretrained

    task = ForecastTask(run["cfg"])
    model, _ = load_forecaster(run["run"])
    _, _, preds = eval_loop(task, model)
    _, _, again = eval_loop(task, load_pretrained(str(run["run"])))
    np.testing.assert_array_equal(again, preds)
    drawn = {}
    monkeypatch.setattr(plots, "plot_test_windows",
                        lambda path, column, dates, looks, p, trues, title: drawn.update(p=p, trues=trues))
    task_module.plot_test_forecasts(task, model, run["root"] / "x.png", count=3)
    df = run["df"]
    _, _, mean, std = by_hand(df, run["features"], 6)
    picks = np.unique(np.linspace(0, len(preds) - 1, num=3).round().astype(int))
    for k, i in enumerate(picks):
        np.testing.assert_allclose(drawn["p"][k], preds[i][:, -1] * std[-1] + mean[-1], rtol=1e-5)
        start = ratio_test_rows(len(df), 24)[1] + i + 24
        np.testing.assert_allclose(drawn["trues"][k], df["price"].to_numpy()[start:start + 6], rtol=1e-6)
