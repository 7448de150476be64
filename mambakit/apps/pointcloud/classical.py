"""A classical, training-free-features baseline for point-cloud classification: Osada et al.'s D2 shape
distribution (the histogram of distances between random point pairs, scale-normalised by their mean) with
the covariance shape descriptors (linearity, planarity, sphericity from the eigenvalues of each cloud's
covariance), classified by logistic regression (scikit-learn). It sees the same evaluation clouds as the
networks and costs a second, which makes it the quickstart's floor: a network that cannot beat it has not
learnt shape."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["shape_descriptors", "d2_logistic_regression"]

D2_BINS = 32
D2_PAIRS = 4096


def shape_descriptors(pos: torch.Tensor, seed: int = 0) -> np.ndarray:
    """(N, 3) -> (D2_BINS + 3,) features: the D2 histogram over distances / mean distance in [0, 3), and
    the three eigenvalue ratios of the covariance."""
    pos = pos.double()
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(pos), (D2_PAIRS,), generator=g)
    j = torch.randint(0, len(pos), (D2_PAIRS,), generator=g)
    d = (pos[i] - pos[j]).norm(dim=1)
    d = d / d.mean().clamp_min(1e-12)
    hist = torch.histc(d.clamp(max=2.999), bins=D2_BINS, min=0.0, max=3.0) / D2_PAIRS
    centred = pos - pos.mean(0)
    ev = torch.linalg.eigvalsh(centred.T @ centred / len(pos)).flip(0).clamp_min(1e-12)   # l1 >= l2 >= l3
    shape = torch.stack([(ev[0] - ev[1]) / ev[0], (ev[1] - ev[2]) / ev[0], ev[2] / ev[0]])
    return torch.cat([hist, shape]).numpy()


def _features(dataset) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    for k in range(len(dataset)):
        cloud = dataset[k]
        rows.append(shape_descriptors(cloud.pos, seed=k))
        labels.append(int(cloud.y.reshape(-1)[0]))
    return np.stack(rows), np.array(labels)


def d2_logistic_regression(train, test, seed: int = 0) -> float:
    """Test accuracy of logistic regression on the shape descriptors of `train` (fitted) and `test`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(seed)                  # the training clouds' transforms draw from torch's RNG
    x_train, y_train = _features(train)
    x_test, y_test = _features(test)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())
