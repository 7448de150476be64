"""numpy references for the forecasting tests: TSLib's windows, scaler and metrics written out by hand, and the
evaluation loop's own predictions (recorded while `engine.trainer.evaluate` runs), so that the app's numbers are
checked against something that does not share its code."""

import numpy as np
import torch
from torch import nn

from mambakit.engine.trainer import evaluate


class Recorder(nn.Module):
    """Wraps a forecaster and keeps every input and output the evaluation loop passes through it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs, self.outputs = [], []

    def forward(self, x, x_mark=None):
        out = self.model(x, x_mark)
        self.inputs.append(x.detach().double().clone())
        self.outputs.append(out.detach().double().clone())
        return out


def eval_loop(task, model, split="test", batch_size=5):
    """(metrics, inputs (W, L, C), predictions (W, H, C)) of the engine's evaluation of `model` on `split`."""
    rec = Recorder(model)
    metrics = evaluate(task, rec, split, batch_size=batch_size)
    return metrics, torch.cat(rec.inputs).numpy(), torch.cat(rec.outputs).numpy()


def ratio_test_rows(n, seq_len):
    """TSLib custom split by hand: train rows [0, int(.7 n)), test rows [n - int(.2 n) - seq_len, n)."""
    return int(0.7 * n), n - int(0.2 * n) - seq_len


def windows(scaled, start, stop, seq_len, pred_len):
    """x[i] = rows start+i .. start+i+L-1, y[i] = the next pred_len rows, for every window in [start, stop)."""
    count = stop - start - seq_len - pred_len + 1
    x = np.stack([scaled[start + i:start + i + seq_len] for i in range(count)])
    y = np.stack([scaled[start + i + seq_len:start + i + seq_len + pred_len] for i in range(count)])
    return x, y


def mse(a, b):
    return float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))


def mae(a, b):
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))
