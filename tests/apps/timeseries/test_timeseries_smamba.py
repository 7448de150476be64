"""S-Mamba: the bidirectional mixer is two independent Mamba passes summed, the instance normalisation round
trips, the layer follows upstream's equations, and every parameter is used."""

import pytest
import torch

from mambakit.apps.timeseries.models import SMamba, SMambaConfig, build_model, instance_normalize


def small_smamba(**kw):
    args = dict(seq_len=24, pred_len=12, d_model=16, d_ff=32, e_layers=2, d_state=2)
    args.update(kw)
    return SMamba(**args)


def test_bidirectional_mixer_is_forward_plus_flipped_backward_pass():
    torch.manual_seed(0)
    model = small_smamba().double()
    mixer = model.encoder.layers[0].mixer
    forward_mamba, backward_mamba = mixer.mixers
    assert forward_mamba is not backward_mamba
    assert forward_mamba.in_proj.weight.data_ptr() != backward_mamba.in_proj.weight.data_ptr()
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    out = mixer(x)
    ref = forward_mamba(x) + backward_mamba(x.flip(1)).flip(1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g, retain_graph=True)
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-12)
    # it is bidirectional: the first token's output depends on the last token's input
    (g_first,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert g_first[:, -1].abs().sum() > 0


def test_encoder_layer_matches_upstream_equations():
    """x + Mamba_f(x) + flip(Mamba_b(flip(x))) -> LN -> x + FFN(x) (GELU) -> LN; no dropout on the mixer."""
    torch.manual_seed(1)
    layer = small_smamba().double().eval().encoder.layers[1]
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    f, b = layer.mixer.mixers
    h = layer.norm1(x + f(x) + b(x.flip(1)).flip(1))
    y = layer.linear2(torch.nn.functional.gelu(layer.linear1(h)))
    torch.testing.assert_close(layer(x), layer.norm2(h + y), rtol=1e-12, atol=1e-12)


def test_forecast_shape_and_time_tokens_are_dropped():
    torch.manual_seed(0)
    model = small_smamba()
    x = torch.randn(4, 24, 5)
    marks = torch.rand(4, 24, 4) - 0.5
    y = model(x, marks)
    assert y.shape == (4, 12, 5)
    assert model(x).shape == (4, 12, 5)
    # the calendar tokens take part in the mixing: they change the forecast of the variates
    assert not torch.allclose(model.eval()(x, marks), model(x))


def test_normalisation_round_trip_scale_and_shift_equivariance():
    torch.manual_seed(0)
    model = small_smamba().double().eval()
    x = 30 * torch.randn(2, 24, 3, dtype=torch.float64)
    a = torch.tensor([100.0, 1.0, 0.01], dtype=torch.float64)
    c = torch.tensor([3.0, -2.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(model(x * a + c), model(x) * a + c, rtol=1e-6, atol=1e-6 * 100 * 30)
    # and a constant series comes back as itself (normalised to zeros, de-normalised to the mean)
    flat = torch.full((1, 24, 3), 7.0, dtype=torch.float64)
    z, mean, std = instance_normalize(flat)
    assert torch.all(z == 0) and torch.allclose(mean, torch.full_like(mean, 7.0))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model(SMambaConfig(d_model=16, d_ff=32, e_layers=2, d_state=2), seq_len=24, pred_len=12,
                        n_variates=3)
    y = model(torch.randn(4, 24, 3), torch.rand(4, 24, 4) - 0.5)
    torch.nn.functional.mse_loss(y, torch.randn_like(y)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []
    # upstream's unused `man`, `man2` and `a` modules are not built
    assert not any(k in n for n in dict(model.named_modules()) for k in (".man", ".a."))


def test_upstream_mamba_settings():
    model = small_smamba(d_state=2)
    mamba = model.encoder.layers[0].mixer.mixers[0]
    assert mamba.conv1d.weight.shape == (16, 1, 2)            # d_conv = 2, expand = 1 (d_inner = d_model)
    assert mamba.A_log.shape == (16, 2)
    with pytest.raises(ValueError, match=r"expected x of shape \(batch, seq_len=24"):
        model(torch.randn(1, 10, 3))
