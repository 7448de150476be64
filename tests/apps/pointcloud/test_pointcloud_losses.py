import math

import pytest
import torch

from mambakit.apps.pointcloud.losses import poly1_focal_loss


def _reference(logits, target, epsilon=1.0, alpha=0.25, gamma=2.0):
    total, count = 0.0, 0
    for row, t in zip(logits.tolist(), target.tolist()):
        for c, z in enumerate(row):
            y = 1.0 if c == t else 0.0
            p = 1 / (1 + math.exp(-z))
            ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
            pt = y * p + (1 - y) * (1 - p)
            a = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else 1.0
            total += a * ce * (1 - pt) ** gamma + epsilon * (1 - pt) ** (gamma + 1)
            count += 1
    return total / count


@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_poly1_focal_matches_the_formula(alpha):
    torch.manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64) * 3
    target = torch.randint(0, 5, (7,))
    got = poly1_focal_loss(logits, target, alpha=alpha)
    assert got.item() == pytest.approx(_reference(logits, target, alpha=alpha), rel=1e-12)


def test_poly1_focal_gradient_and_shape_check():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 1, 1])
    assert torch.autograd.gradcheck(lambda z: poly1_focal_loss(z, target), (logits,))
    with pytest.raises(ValueError, match="logits \\(M, C\\)"):
        poly1_focal_loss(logits[None], target)
