"""Vim: upstream key names and shapes, the forward against a float64 reference written from upstream's
description, the middle class token, drop-path schedule, initialisation, timm registration."""

import math

import pytest
import torch
import torch.nn.functional as F

import mambakit.apps.vision  # noqa: F401  (registers the models with timm)
import timm
from mambakit.apps.vision.vim import VisionMamba
from mambakit.kernels.reference import selective_scan_ref


def upstream_vim_shapes(dim: int, depth: int, grid: int, num_classes: int = 1000, in_chans: int = 3,
                        patch: int = 16, d_state: int = 16) -> dict:
    """Keys and shapes of hustvl/Vim's VisionMamba (bimamba v2, middle class token), from its code."""
    d_inner, rank = 2 * dim, math.ceil(dim / 16)
    shapes = {"patch_embed.proj.weight": (dim, in_chans, patch, patch), "patch_embed.proj.bias": (dim,),
              "cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim), "norm_f.weight": (dim,),
              "head.weight": (num_classes, dim), "head.bias": (num_classes,)}
    for i in range(depth):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (dim,)
        shapes[p + "mixer.in_proj.weight"] = (2 * d_inner, dim)
        shapes[p + "mixer.out_proj.weight"] = (dim, d_inner)
        for s, a in (("", "A_log"), ("_b", "A_b_log")):
            shapes[p + f"mixer.conv1d{s}.weight"] = (d_inner, 1, 4)
            shapes[p + f"mixer.conv1d{s}.bias"] = (d_inner,)
            shapes[p + f"mixer.x_proj{s}.weight"] = (rank + 2 * d_state, d_inner)
            shapes[p + f"mixer.dt_proj{s}.weight"] = (d_inner, rank)
            shapes[p + f"mixer.dt_proj{s}.bias"] = (d_inner,)
            shapes[p + f"mixer.{a}"] = (d_inner, d_state)
            shapes[p + f"mixer.D{s}"] = (d_inner,)
    return shapes


def test_state_dict_matches_upstream_names_and_shapes():
    model = timm.create_model("vim_tiny_patch16_224")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == upstream_vim_shapes(192, 24, 14)
    stride8 = timm.create_model("vim_tiny_patch16_stride8_224")
    assert tuple(stride8.pos_embed.shape) == (1, 27 * 27 + 1, 192)     # (224 - 16) / 8 + 1 = 27


# ---------------------------------------------------------------------------------------------------------
# a float64 reference of upstream's forward

def rms_norm(x, w, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def direction(xz, m, s, a):
    """mamba_inner_fn_no_out_proj on xz (b, 2 d_inner, L) with parameter set suffix s."""
    d_inner, L = xz.shape[1] // 2, xz.shape[-1]
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    conv = getattr(m, f"conv1d{s}")
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=3, groups=d_inner)[..., :L])
    x_dbl = getattr(m, f"x_proj{s}").weight @ x                           # (b, R + 2N, L)
    R = getattr(m, f"dt_proj{s}").weight.shape[1]
    dt, B, C = x_dbl[:, :R], x_dbl[:, R:R + 16], x_dbl[:, R + 16:]
    dt = getattr(m, f"dt_proj{s}").weight @ dt
    A = -torch.exp(getattr(m, a))
    return selective_scan_ref(x, dt, A, B, C, getattr(m, f"D{s}"), z=z,
                              delta_bias=getattr(m, f"dt_proj{s}").bias, delta_softplus=True)


def reference_forward(model, img):
    x = F.conv2d(img, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                 stride=model.patch_embed.stride).flatten(2).transpose(1, 2)
    B, M, _ = x.shape
    tp = M // 2
    x = torch.cat([x[:, :tp], model.cls_token.expand(B, -1, -1), x[:, tp:]], dim=1) + model.pos_embed
    hidden, residual = x, None
    for layer in model.layers:
        residual = hidden if residual is None else residual + hidden
        h = rms_norm(residual, layer.norm.weight)
        m = layer.mixer
        xz = (h @ m.in_proj.weight.T).transpose(1, 2)                      # (b, 2 d_inner, L)
        out = direction(xz, m, "", "A_log")
        out_b = direction(xz.flip(-1), m, "_b", "A_b_log").flip(-1)
        hidden = ((out + out_b) / 2).transpose(1, 2) @ m.out_proj.weight.T
    h = rms_norm(residual + hidden, model.norm_f.weight)
    return h[:, tp] @ model.head.weight.T + model.head.bias


def tiny_vim(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_classes=5, drop_path_rate=0.0)
    cfg.update(kw)
    return VisionMamba(**cfg)


@pytest.mark.parametrize("img_size, stride", [(32, 8), (24, 4)])
def test_forward_and_backward_match_float64_reference(img_size, stride):
    model = tiny_vim(img_size=img_size, stride=stride, depth=2).double().eval()
    with torch.no_grad():                               # non-trivial values everywhere
        for layer in model.layers:
            layer.mixer.dt_proj_b.bias.uniform_(-3, -1)
    img = torch.randn(2, 3, img_size, img_size, dtype=torch.float64)
    out = model(img)
    ref = reference_forward(model, img)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), grad_out)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), grad_out)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")


def test_large_cpu_batches_run_in_cache_sized_parts_with_the_same_result(monkeypatch):
    """On the CPU a batch over the token budget runs in parts (here 3 + 3 + 1 images): the logits equal the
    one-pass float64 reference, and in training (ShuffleMamba on, dropout and drop path off) the logits and
    every gradient equal the one-pass forward with the same draw, which the parts share."""
    from mambakit.core import layout
    model = tiny_vim(depth=3, shuffle_rate=1.0).double().eval()
    img = torch.randn(7, 3, 32, 32, dtype=torch.float64)
    calls = []
    real = model._forward_features
    monkeypatch.setattr(model, "_forward_features", lambda x, plan=None: calls.append(x.shape[0]) or real(x, plan))
    with torch.no_grad():
        one_pass = model(img)                                               # 7 x 17 tokens: under the budget
    monkeypatch.setattr(layout, "CPU_BATCH_TOKENS", 3 * 17)                # 16 patches + the class token
    with torch.no_grad():
        out = model(img)
    assert calls == [7, 3, 3, 1]
    torch.testing.assert_close(out, reference_forward(model, img), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, one_pass, rtol=1e-12, atol=1e-12)

    model.train()
    torch.manual_seed(4)
    parts = model(img)
    calls.clear()
    torch.manual_seed(4)
    plan = model.shuffle_plan(17)
    assert any(idx is not None for idx in plan)                             # layers 1 and 2 shuffle
    whole = model.forward_head(real(img, plan))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    weight, params = torch.randn_like(whole), list(model.parameters())
    got = torch.autograd.grad((parts * weight).sum(), params)
    want = torch.autograd.grad((whole * weight).sum(), params)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_middle_class_token_is_pooled():
    model = tiny_vim().double().eval()                   # 4x4 grid: 16 patches, class token at index 8
    img = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    tokens = model.forward_features(img)
    assert tokens.shape == (1, 17, 16) and model.cls_index(16) == 8
    torch.testing.assert_close(model.forward_head(tokens), model.head(tokens[:, 8]))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 8])


def test_head_class_token_and_average_pooling():
    head = tiny_vim(cls_token_position="head").double().eval()
    tokens = head.forward_features(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    torch.testing.assert_close(head.forward_head(tokens, pre_logits=True), tokens[:, 0])
    avg = tiny_vim(cls_token_position="none", global_pool="avg")
    assert avg.pos_embed.shape == (1, 16, 16) and not hasattr(avg, "cls_token")
    assert avg(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="needs a class token"):
        tiny_vim(cls_token_position="none")


def test_shifted_drop_path_schedule():
    model = tiny_vim(depth=4, drop_path_rate=0.3)
    rates = [getattr(layer.drop_path, "p", 0.0) for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.0, 0.1, 0.2])          # ([0] + linspace(0, 0.3, 4))[:4]
    assert model.drop_path.p == pytest.approx(0.3)                 # the final add gets the full rate


def test_upstream_initialisation():
    torch.manual_seed(1)
    model = tiny_vim(depth=4, embed_dim=32)
    for layer in model.layers:
        m = layer.mixer
        assert torch.all(m.dt_proj_b.bias == 0)                    # Vim never marks it _no_reinit
        dt = F.softplus(m.dt_proj.bias)                            # mamba_ssm's dt init, in [1e-3, 0.1]
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        bound = 1 / math.sqrt(m.out_proj.weight.shape[1]) / math.sqrt(4)     # GPT-2 rescale by sqrt(depth)
        assert m.out_proj.weight.abs().max() <= bound
        torch.testing.assert_close(m.A_b_log, torch.log(torch.arange(1, 17.0)).repeat(64, 1))
    assert torch.all(model.patch_embed.proj.bias == 0) and torch.all(model.head.bias == 0)
    assert 0.01 < model.pos_embed.std() < 0.03


def test_input_size_is_checked_unless_dynamic():
    model = tiny_vim()
    with pytest.raises(ValueError, match="does not match the model's img_size 32x32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"expected images \(batch, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    dyn = tiny_vim(dynamic_img_size=True).eval()
    assert dyn(torch.randn(1, 3, 48, 40)).shape == (1, 5)           # 6x5 grid, pos_embed resampled


def test_timm_registration_and_pretrained_configs():
    names = set(timm.list_models("vim_*")) | set(timm.list_models("efficient_vmamba_*"))
    assert set(mambakit.apps.vision.TIMM_MODELS) <= names
    cfg = timm.models.get_pretrained_cfg("vim_tiny_patch16_224.in1k").to_dict()
    assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")
    plus = timm.models.get_pretrained_cfg("vim_small_patch16_stride8_224.in1k").to_dict()
    assert plus["hf_hub_filename"] == "vim_s_midclstok_ft_81p6acc.pth"
    model = timm.create_model("vim_small_patch16_224", num_classes=7, drop_path_rate=0.05)
    assert model.num_classes == 7 and model.head.out_features == 7 and model.embed_dim == 384
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
