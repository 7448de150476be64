"""The quickstart's named baseline: multinomial logistic regression on the raw pixels (scikit-learn), trained
on exactly the training images of the recipe's split and scored on its test images."""

from __future__ import annotations

from .config import AugmentConfig, DataConfig

__all__ = ["logistic_regression_baseline"]


def logistic_regression_baseline(data: DataConfig, C: float = 0.1, max_iter: int = 300) -> float:
    """Test accuracy of LogisticRegression(C) on the flattened, normalised training images."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from .data import build_datasets

    splits = build_datasets(data, AugmentConfig(random_shift=0, mixup=0.0, cutmix=0.0, auto_augment=None))

    def arrays(ds):
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return np.stack([x.numpy().ravel() for x in xs]), np.array(ys)

    x_train, y_train = arrays(splits.train)
    x_test, y_test = arrays(splits.test)
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(x_train, y_train)
    return float((clf.predict(x_test) == y_test).mean())
