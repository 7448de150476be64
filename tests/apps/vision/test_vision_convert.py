"""Converters on files laid out as upstream publishes them, loaded through timm offline
(`pretrained_cfg_overlay=dict(file=PATH)`), and position-embedding resizing around the middle class token."""

import argparse

import pytest
import torch
import torch.nn.functional as F

import mambakit.apps.vision  # noqa: F401
import timm
from mambakit.apps.vision.convert import (efficient_vmamba_from_upstream, load_checkpoint_file, resize_pos_embed,
                                          vim_from_upstream)
from mambakit.apps.vision.efficient_vmamba import EfficientVSSM
from mambakit.apps.vision.vim import VisionMamba


def random_state(model: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v.clone())
            for k, v in model.state_dict().items()}


def save_vim_upstream(path, model, seed=0):
    """DeiT/Vim's training checkpoint: model, model_ema, optimizer, ..., args (an argparse.Namespace)."""
    ckpt = {"model": random_state(model, seed), "model_ema": random_state(model, seed + 1),
            "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 299}, "epoch": 299,
            "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="vim_tiny_patch16_224", lr=5e-4)}
    torch.save(ckpt, path)
    return ckpt


def small_vim_name_kwargs():
    return dict(depth=2)          # fewer layers than published; the key layout is the same per layer


def test_vim_upstream_file_loads_through_timm_offline(tmp_path):
    ref = timm.create_model("vim_tiny_patch16_224", **small_vim_name_kwargs())
    path = str(tmp_path / "vim_t_midclstok_76p1acc.pth")
    ckpt = save_vim_upstream(path, ref)
    # custom_load=True: our loader, which takes upstream's evaluated weights ('model')
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, **small_vim_name_kwargs(),
                              pretrained_cfg_overlay=dict(file=path, custom_load=True))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k], msg=k)
    # a plain file overlay: timm's generic loader, which prefers 'model_ema', then our filter
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, **small_vim_name_kwargs(),
                              pretrained_cfg_overlay=dict(file=path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["model_ema"][k], msg=k)


@pytest.mark.parametrize("custom_load", [True, False])
def test_vim_fine_tune_head_and_resolution(tmp_path, custom_load):
    ref = timm.create_model("vim_tiny_patch16_224", **small_vim_name_kwargs())
    ckpt = save_vim_upstream(tmp_path / "v.pth", ref)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, num_classes=10, img_size=288,
                              **small_vim_name_kwargs(),
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "v.pth"), custom_load=custom_load))
    weights = ckpt["model" if custom_load else "model_ema"]
    assert model.head.out_features == 10 and torch.all(model.head.bias == 0)       # a fresh head
    torch.testing.assert_close(model.layers[1].mixer.A_b_log, weights["layers.1.mixer.A_b_log"])
    expected = resize_pos_embed(weights["pos_embed"], (14, 14), (18, 18), "middle")
    torch.testing.assert_close(model.pos_embed, expected)
    assert model(torch.randn(1, 3, 288, 288)).shape == (1, 10)


def test_vim_converter_picks_ema_on_request_and_strips_prefixes():
    model = VisionMamba(img_size=32, patch_size=8, embed_dim=16, depth=1)
    ckpt = {"model": {"module." + k: v for k, v in random_state(model, 0).items()},
            "model_ema": random_state(model, 1), "args": argparse.Namespace()}
    assert set(vim_from_upstream(ckpt)) == set(model.state_dict())
    torch.testing.assert_close(vim_from_upstream(ckpt, use_ema=True)["pos_embed"], ckpt["model_ema"]["pos_embed"])
    with pytest.raises(ValueError, match="not a Vim"):
        vim_from_upstream({"model": {"patch_embed.0.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="no EMA weights under model_ema"):
        vim_from_upstream({"epoch": 3}, use_ema=True)


def test_loading_another_size_names_the_mismatch(tmp_path):
    save_vim_upstream(tmp_path / "s.pth", timm.create_model("vim_small_patch16_224", depth=1))
    with pytest.raises(ValueError, match=r"s\.pth does not fit VisionMamba .* shape mismatches: cls_token: checkpoint \(1, 1, 384\) vs model \(1, 1, 192\)"):
        timm.create_model("vim_tiny_patch16_224", depth=1, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "s.pth"), custom_load=True))


def test_efficient_vmamba_upstream_file_loads_through_timm_offline(tmp_path):
    ref = timm.create_model("efficient_vmamba_tiny")
    state = random_state(ref, 3)
    torch.save({"state_dict": {"module.module." + k: v for k, v in state.items()}, "epoch": 300},
               tmp_path / "efficient_vmamba_tiny.ckpt")
    model = timm.create_model("efficient_vmamba_tiny", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "efficient_vmamba_tiny.ckpt")))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)
    ft = timm.create_model("efficient_vmamba_tiny", pretrained=True, num_classes=3,
                           pretrained_cfg_overlay=dict(file=str(tmp_path / "efficient_vmamba_tiny.ckpt")))
    assert ft.classifier.head.out_features == 3
    torch.testing.assert_close(ft.layers[0].blocks[1].op.A_logs, state["layers.0.blocks.1.op.A_logs"])


def test_efficient_vmamba_converter_rejects_other_layouts():
    model = EfficientVSSM(dims=8, depths=(1, 1, 1, 1))
    assert set(efficient_vmamba_from_upstream({"state_dict": model.state_dict()})) == set(model.state_dict())
    with pytest.raises(ValueError, match="not an EfficientVSSM state dict"):
        efficient_vmamba_from_upstream({"state_dict": {"module.module.head.weight": torch.zeros(2, 2)}})


class NotATensor:
    pass


def test_checkpoint_files_with_code_are_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": NotATensor()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="pickles Python objects other than tensors"):
        load_checkpoint_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint_file(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------
# position embeddings

def test_resize_takes_the_middle_class_token_out_and_puts_it_back():
    D, old, new = 3, (4, 4), (6, 8)
    grid = torch.randn(1, D, *old)
    tokens = grid.flatten(2).transpose(1, 2)                          # (1, 16, D)
    cls = torch.full((1, 1, D), 1e3)                                  # far outside the grid's range
    pos = torch.cat([tokens[:, :8], cls, tokens[:, 8:]], dim=1)       # the middle class token sits at 16 // 2
    out = resize_pos_embed(pos, old, new, "middle")
    assert out.shape == (1, 49, D)
    torch.testing.assert_close(out[:, 24], cls[:, 0])                 # the new middle: 48 // 2
    expected = F.interpolate(grid, size=new, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(torch.cat([out[:, :24], out[:, 25:]], dim=1), expected)
    assert out.abs().max() == 1e3 and (out.abs() > 100).sum() == D   # nothing of the token leaked into the grid


def test_resize_head_token_none_and_identity():
    pos = torch.randn(1, 17, 2)
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos
    head = resize_pos_embed(pos, (4, 4), (2, 2), "head")
    torch.testing.assert_close(head[:, 0], pos[:, 0])
    assert resize_pos_embed(pos[:, 1:], (4, 4), (3, 5), "none").shape == (1, 15, 2)
    with pytest.raises(ValueError, match=r"expected \(1, 10, D\) for a 3x3 grid plus the class token"):
        resize_pos_embed(pos, (3, 3), (4, 4))
