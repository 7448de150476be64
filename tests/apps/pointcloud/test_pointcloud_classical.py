"""The classical shape-descriptor baseline: invariant to scale and rotation, and it separates shapes whose
distance statistics differ."""

import math

import pytest
import torch

from mambakit.apps.pointcloud.classical import D2_BINS, d2_logistic_regression, shape_descriptors
from mambakit.apps.pointcloud.data import make_cloud, rotation_about


def test_descriptors_ignore_scale_translation_and_rotation():
    torch.manual_seed(0)
    pos = torch.randn(500, 3) * torch.tensor([3.0, 1.0, 0.5])
    base = shape_descriptors(pos)
    assert base.shape == (D2_BINS + 3,) and base[:D2_BINS].sum() == pytest.approx(1.0)
    moved = (pos * 2.5 + 7.0) @ rotation_about(1, 0.7).T.float()
    assert shape_descriptors(moved) == pytest.approx(base, abs=1e-6)
    linearity, planarity, sphericity = base[D2_BINS:]
    assert linearity > planarity > sphericity > 0                      # an elongated cloud


def test_logistic_regression_tells_balls_from_discs():
    torch.manual_seed(1)

    def cloud(kind, i):
        p = torch.randn(256, 3)
        p = p / p.norm(dim=1, keepdim=True)
        if kind == 1:
            p[:, 1] *= 0.05                                            # squashed into a disc
        return make_cloud(p * (1 + 0.1 * i), y=[kind], name=f"{kind}#{i}")

    train = [cloud(k, i) for k in (0, 1) for i in range(6)]
    test = [cloud(k, i) for k in (0, 1) for i in range(6, 9)]
    assert d2_logistic_regression(train, test) == 1.0
