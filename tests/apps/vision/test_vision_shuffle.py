"""ShuffleMamba's stochastic layer-wise shuffle in Vim: per-layer probabilities, one coin per layer per
forward, one permutation shared by the batch, hidden and residual restored, nothing at eval."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from mambakit.apps.vision.vim import VisionMamba, shuffle_probabilities


class ProbeLayer(nn.Module):
    """A stand-in layer whose output depends on token order (cumsum), recording what it receives."""

    def __init__(self, i: int):
        super().__init__()
        self.i = i
        self.seen = []

    def forward(self, hidden, residual=None):
        self.seen.append((hidden.detach().clone(), None if residual is None else residual.detach().clone()))
        residual = hidden if residual is None else residual + hidden
        return torch.cumsum(residual, dim=1) * 0.1 + self.i, residual


def probe_model(rate: float, depth: int = 5):
    model = VisionMamba(img_size=16, patch_size=4, embed_dim=4, depth=depth, num_classes=3, drop_path_rate=0.0,
                        shuffle_rate=rate)
    model.layers = nn.ModuleList([ProbeLayer(i) for i in range(depth)])
    return model


def replay(x, probs):
    """What the shuffled forward must compute, drawing the same random numbers in the same order."""
    hidden, residual, events = x, None, []
    for i, p in enumerate(probs):
        shuffled = torch.rand(1).item() < p
        perm = torch.randperm(x.shape[1]) if shuffled else torch.arange(x.shape[1])
        inv = torch.argsort(perm)
        h, r = hidden[:, perm], (residual[:, perm] if residual is not None else None)
        r = h if r is None else r + h
        hidden, residual = (torch.cumsum(r, 1) * 0.1 + i)[:, inv], r[:, inv]
        events.append((shuffled, perm))
    return hidden, residual, events


def test_probabilities_rise_linearly_to_the_rate():
    assert shuffle_probabilities(0.5, 5) == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    assert probe_model(0.4, depth=3).shuffle_probs == pytest.approx([0.0, 0.2, 0.4])
    with pytest.raises(ValueError, match="shuffle_rate is a probability"):
        VisionMamba(img_size=16, patch_size=4, embed_dim=4, depth=1, shuffle_rate=1.5)


def test_training_forward_matches_replay_and_restores_order():
    torch.manual_seed(3)
    model = probe_model(1.0, depth=6).train()
    x = torch.randn(3, 17, 4)                                   # batch 3, 16 patches + class token
    state = torch.get_rng_state()
    hidden, residual = x, None
    for layer, idx in zip(model.layers, model.shuffle_plan(x.shape[1])):
        hidden, residual = model._run_layer(layer, hidden, residual, idx)
    torch.set_rng_state(state)
    ref_hidden, ref_residual, events = replay(x, model.shuffle_probs)
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(residual, ref_residual)
    assert any(s for s, _ in events) and not events[0][0]     # some layer shuffled; p = 0 at layer 0


def test_one_coin_per_layer_per_training_forward(monkeypatch):
    model = probe_model(0.5, depth=4).train()
    calls = []
    real_rand = torch.rand

    def counting_rand(*args, **kwargs):
        calls.append(args)
        return real_rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", counting_rand)
    model.forward_features(torch.randn(2, 3, 16, 16))
    assert calls == [(1,)] * 4
    calls.clear()
    model.eval()
    model.forward_features(torch.randn(2, 3, 16, 16))
    assert calls == []                                          # nothing drawn at eval


def test_eval_output_is_unchanged_by_the_shuffle_rate():
    torch.manual_seed(0)
    plain = VisionMamba(img_size=16, patch_size=4, embed_dim=8, depth=3, num_classes=3, shuffle_rate=0.0)
    shuffled = VisionMamba(img_size=16, patch_size=4, embed_dim=8, depth=3, num_classes=3, shuffle_rate=0.9)
    shuffled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain.eval()(x), shuffled.eval()(x))


def test_first_shuffled_layer_sees_a_batch_shared_permutation():
    torch.manual_seed(5)
    model = probe_model(1.0, depth=2).train()                  # layer 1 shuffles with probability 1
    tokens = torch.randn(4, 17, 4)
    plan = model.shuffle_plan(17)
    hidden, residual = model._run_layer(model.layers[0], tokens, None, plan[0])
    model._run_layer(model.layers[1], hidden, residual, plan[1])
    seen_h, seen_r = model.layers[1].seen[0]
    perm = [int(torch.nonzero((seen_h[0] == hidden[0, j]).all(-1))[0]) for j in range(17)]
    inv = torch.tensor(perm)                                   # where token j went
    assert sorted(perm) == list(range(17)) and perm != list(range(17))
    for b in range(4):                                         # the same permutation for every sample
        torch.testing.assert_close(seen_h[b, inv], hidden[b])
        torch.testing.assert_close(seen_r[b, inv], residual[b])


def test_import_hook_registers_models_whichever_comes_first():
    code = ("import sys, mambakit.apps.vision; assert 'timm' not in sys.modules; import timm; "
            "assert 'vim_tiny_patch16_224' in timm.list_models('vim*'); "
            "assert 'efficient_vmamba_tiny' in timm.list_models('efficient*')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    code = ("import timm; assert 'vim_tiny_patch16_224' not in timm.list_models('vim*'); "
            "import mambakit.apps.vision; assert 'vim_base_patch16_224' in timm.list_models('vim*')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
