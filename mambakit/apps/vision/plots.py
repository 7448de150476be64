"""Classification plots: the confusion matrix (rows: true class, columns: predicted class), shared with the
other apps through mambakit.engine.plots."""

from mambakit.engine.plots import plot_confusion_matrix

__all__ = ["plot_confusion_matrix"]
