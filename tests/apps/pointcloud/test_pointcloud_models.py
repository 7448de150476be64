"""Point Cloud Mamba models: shapes, the published sizes, the prompt / positional-encoding / re-sort wiring,
what invariances hold, gradients, and clear errors. (Output parity with upstream's code: test_convert.py.)"""

import pytest
import torch

from mambakit.apps.pointcloud import models as M
from mambakit.apps.pointcloud.models import PCM_CONFIGS, create_model, model_names

TINY = dict(embed_dim=8, dim_expansion=(1, 2), pre_blocks=(1, 1), pos_blocks=(0, 0), k_neighbors=(4, 4),
            reducers=(1, 2), mamba_blocks=(1, 2), orders=("xyz", "hilbert", "zyx"), prompt_num_per_order=2,
            prompt_dim=8, cls_mlps=(16,))


def _cloud(b=2, n=32, seed=0, channels=3):
    """Points on distinct 0.02 grid cells along every axis, so no serialization has ties (ties keep input
    order, which would make permutation tests depend on the permutation)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.stack([torch.randperm(n, generator=g) for _ in range(3)], -1) for _ in range(b)])
    pos = (cells.float() + 0.3 + 0.4 * torch.rand(b, n, 3, generator=g)) * 0.02
    extra = torch.rand(b, n, channels - 3, generator=g)
    return pos, torch.cat([pos, extra], -1)


def _tiny(task="cls", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(TINY, **kw)
    if task == "seg":
        cfg.pop("cls_mlps")
        return create_model("pcm", 6, task="seg", n_categories=3, decoder_blocks=(1, 1), gmp_dim=8, cls_dim=8, **cfg)
    return create_model("pcm", 5, **cfg)


def test_output_shapes_cls_and_seg_and_batch_of_one():
    pos, x = _cloud(2, 32, channels=4)
    torch.manual_seed(0)
    cls = create_model("pcm_tiny", 5, in_channels=4, **TINY)
    assert cls(pos, x).shape == (2, 5)
    seg = _tiny("seg")
    assert seg(pos, pos, torch.tensor([0, 2])).shape == (2, 32, 6)
    cls.eval()
    seg.eval()
    assert cls(pos[:1], x[:1]).shape == (1, 5)
    assert seg(pos[:1], pos[:1], torch.tensor([1])).shape == (1, 32, 6)


def test_published_parameter_counts():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in create_model(name, 40).parameters()) for name in PCM_CONFIGS}
        seg = {name: sum(p.numel() for p in create_model(name, 50, in_channels=7, task="seg", n_categories=16)
                         .parameters()) for name in PCM_CONFIGS}
    assert sizes == {"pcm": 34_229_824, "pcm_tiny": 6_950_656}       # the paper's 34.2M and 6.9M
    assert seg == {"pcm": 40_627_146, "pcm_tiny": 8_774_346}


def test_published_architecture_constants():
    torch.manual_seed(0)
    with torch.device("meta"):
        enc = create_model("pcm", 40).encoder
    assert enc.channels == [384, 384, 384, 768, 768]
    assert enc.layer_orders == ["xyz", "xzy", "yxz", "yzx", "zxy", "zyx", "hilbert", "z", "z_trans"]
    assert [lg.reducer for lg in enc.local_grouper_list] == [1, 2, 2, 2]
    assert [lg.k_neighbors for lg in enc.local_grouper_list] == [12] * 4
    assert tuple(enc.order_prompt.weight.shape) == (9 * 6, 384)
    rates = [b.drop_path.p if hasattr(b.drop_path, "p") else 0.0 for s in enc.mamba_blocks_list for b in s]
    assert rates == pytest.approx([0.0] + torch.linspace(0, 0.1, 9).tolist()[:8])
    mixer = enc.mamba_blocks_list[3][0].mixer
    assert (mixer.d_state, mixer.d_inner, mixer.merge) == (16, 1536, "sum")
    assert type(enc.residual_proj_blocks_list[2]).__name__ == "Linear"


def test_prompts_wrap_the_sequence_and_are_stripped():
    model = _tiny().eval()
    enc = model.encoder
    seen = []
    hook = enc.mamba_blocks_list[1][1].register_forward_hook(lambda m, args, out: seen.append((args, out)))
    pos, x = _cloud()
    with torch.no_grad():
        _, feats = enc.forward_levels(pos, x)
    hook.remove()
    (hidden, residual), (out, _) = seen[0]
    n = 2
    expected = enc.order_prompt_proj[1](enc.order_prompt.weight[2 * n:3 * n])      # "zyx" is the third order
    for t in (hidden, residual):
        torch.testing.assert_close(t[:, :n], expected.expand(2, -1, -1))
        torch.testing.assert_close(t[:, -n:], expected.expand(2, -1, -1))
        assert t.shape[1] == 16 + 2 * n
    torch.testing.assert_close(feats[-1], out[:, n:-n])                         # stripped after the last layer


def test_stage_equals_float64_loop_reference():
    """One stage's Mamba layers against a per-cloud loop written from the description: sort by the layer's
    codes when its order changes, add pos_proj(xyz), wrap in prompts, Block, strip."""
    model = _tiny().double().eval()
    enc = model.encoder
    pos, x = _cloud(2, 16)
    pos, x = pos.double(), torch.randn(2, 16, 16, dtype=torch.float64)
    res = torch.randn(2, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        p_out, x_out, r_out, current = enc._mamba_stage(1, 1, pos, x, res, "xyz")
        assert current == "zyx"
        for i in range(2):
            p, h, r, cur = pos[i:i + 1], x[i:i + 1], res[i:i + 1], "xyz"
            for j, block in enumerate(enc.mamba_blocks_list[1]):
                order = enc.layer_orders[1 + j]
                if order != cur:
                    perm = torch.argsort(enc.serializers[order].codes(p)[0], stable=True)
                    p, h, r, cur = p[:, perm], h[:, perm], r[:, perm], order
                h = h + p @ enc.pos_proj[1].weight.T
                k = enc.unique_orders.index(order) * 2
                prompt = (enc.order_prompt.weight[k:k + 2] @ enc.order_prompt_proj[1].weight.T)[None]
                h, r = block(torch.cat([prompt, h, prompt], 1), torch.cat([prompt, r, prompt], 1))
                h, r = h[:, 2:-2], r[:, 2:-2]
            torch.testing.assert_close(p_out[i:i + 1], p, rtol=0, atol=0)
            torch.testing.assert_close(x_out[i:i + 1], h, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r_out[i:i + 1], r, rtol=1e-12, atol=1e-12)


def test_resorts_only_when_the_order_changes(monkeypatch):
    calls = []
    real = M._serialize
    monkeypatch.setattr(M, "_serialize", lambda order, *a: calls.append(order.name) or real(order, *a))
    model = _tiny(orders=("z", "z", "xyz")).eval()
    with torch.no_grad():
        model(*_cloud())
    assert calls == ["z", "xyz"]


def test_classifier_is_invariant_to_point_order_in_eval():
    """Stage 0 does no FPS (reducer 1) and its first layer sorts the points by their codes, so every later
    step (FPS from the first serialized point, kNN, the scans) sees the same sequence whatever the input
    order: the logits are invariant to any permutation (ties in a grid cell aside; _cloud has none)."""
    model = _tiny().eval()
    pos, x = _cloud()
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(pos[:, perm], x[:, perm]), model(pos, x), rtol=1e-5, atol=1e-5)


def test_segmentation_is_equivariant_to_permutations_keeping_point_0():
    """With reducer 2 in stage 0, FPS runs on the input order and starts at point 0, so only permutations
    that keep point 0 first leave the network's computation unchanged; the per-point logits then follow the
    permutation. Moving point 0 changes the FPS start, and the logits with it."""
    model = _tiny("seg", reducers=(2, 2)).eval()
    pos, x = _cloud()
    cat = torch.tensor([0, 2])
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(31, generator=torch.Generator().manual_seed(6))])
    with torch.no_grad():
        out = model(pos, x, cat)
        torch.testing.assert_close(model(pos[:, perm], x[:, perm], cat), out[:, perm], rtol=1e-5, atol=1e-5)
        moved = torch.roll(torch.arange(32), 1)
        assert not torch.allclose(model(pos[:, moved], x[:, moved], cat), out[:, moved], atol=1e-4)


def test_eval_batch_members_do_not_interact_with_paper_orders():
    model = _tiny(orders=("xyz", "yzx", "zyx")).eval()
    pos, x = _cloud(3)
    with torch.no_grad():
        together = model(pos, x)
        alone = torch.cat([model(pos[i:i + 1], x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_eval_is_deterministic_and_gradients_reach_every_parameter():
    model = _tiny("seg")
    pos, x = _cloud()
    cat = torch.tensor([1, 2])
    model(pos, x, cat).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pos, x, cat), model(pos, x, cat), rtol=0, atol=0)


def test_cts_paper_and_as_written_give_different_orders():
    pos, _ = _cloud(1, 64)
    paper = M.PointOrder("xyz", snake="paper")
    written = M.PointOrder("xyz", snake="as_written")
    p_perm = torch.argsort(paper.codes(pos), dim=1, stable=True)
    w_perm = torch.argsort(written.codes(pos), dim=1, stable=True)
    assert not torch.equal(p_perm, w_perm)
    # as written, the sequence is sorted by x cell alone (one direction for the whole cloud)
    x_cells = torch.floor(pos[0, w_perm[0], 0] / 0.02)
    assert bool((x_cells.diff() >= 0).all()) or bool((x_cells.diff() <= 0).all())
    a = _tiny(cts="paper").eval()
    b = _tiny(cts="as_written").eval()
    with torch.no_grad():
        assert not torch.allclose(a(*_cloud()), b(*_cloud()))


def test_model_names_and_factory_errors():
    assert model_names()[:2] == ["pcm", "pcm_tiny"]
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['embed_dims'\]"):
        create_model("pcm", 5, embed_dims=8)
    with pytest.raises(ValueError, match="unknown model 'pcm_huge'"):
        create_model("pcm_huge", 5)
    with pytest.raises(ValueError, match="3 orders for 2 Mamba layers"):
        _tiny(mamba_blocks=(1, 1))
    with pytest.raises(ValueError, match="unknown order 'spiral'"):
        _tiny(orders=("xyz", "spiral", "z"))
    with pytest.raises(ValueError, match="cts must be 'paper' or 'as_written'"):
        _tiny(cts="snake")
    with pytest.raises(ValueError, match="one entry per stage"):
        _tiny(reducers=(1, 2, 2))
    with pytest.raises(ValueError, match="pre_blocks=0 path"):
        _tiny(pre_blocks=(0, 1))
    with pytest.raises(ValueError, match="needs n_categories >= 1"):
        create_model("pcm", 5, task="seg")
    with pytest.raises(ValueError, match="task must be 'cls' or 'seg'"):
        create_model("pcm", 5, task="det")


def test_forward_input_errors():
    model = _tiny().eval()
    pos, x = _cloud()
    with pytest.raises(ValueError, match=r"x has shape \(2, 32, 4\), expected \(2, 32, 3\)"):
        model(pos, torch.cat([x, x[..., :1]], -1))
    with pytest.raises(ValueError, match=r"pos must have shape \(batch, points, 3\)"):
        model(pos[..., :2], x)
    seg = _tiny("seg").eval()
    with pytest.raises(ValueError, match=r"category values must lie in \[0, 3\)"):
        seg(pos, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="category has 1 entries for a batch of 2"):
        seg(pos, x, torch.tensor([0]))
