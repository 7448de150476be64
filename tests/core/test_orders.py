"""Scan orders: inverses undo them, the index sets and sequences upstream uses, per-sample lengths, caching,
point serialisations, errors."""

import itertools

import pytest
import torch

from mambakit.core import orders as O
from mambakit.core.orders import (AtrousLattice, GridOrder, PointOrder, RandomShuffle, StrideOrder, reorder, restore,
                                  scan_order)


def roundtrip_ok(idx, b=2, d=3):
    """reorder then restore gives back every visited token; unvisited tokens come back as zero."""
    x = torch.randn(b, idx.n_tokens, d)
    y = restore(reorder(x, idx), idx)
    visited = torch.zeros(b, idx.n_tokens, dtype=torch.bool)
    perm = idx.perm if idx.batched else idx.perm.expand(b, -1)
    for i in range(b):
        real = perm[i][perm[i] < idx.n_tokens]
        assert real.unique().numel() == real.numel(), "an order visits a token twice"
        visited[i, real] = True
    assert torch.equal(y[visited], x[visited])
    assert torch.all(y[~visited] == 0)
    return visited


@pytest.mark.parametrize("name,n", [("identity", 7), ("flip", 1), ("flip", 8), ("stride_3", 10), ("stride_5", 5),
                                    ("stride_4_nopad", 11), ("stride_1", 6), ("shuffle", 9)])
def test_1d_orders_invert_and_visit_every_token(name, n):
    idx = scan_order(name).indices(n)
    assert roundtrip_ok(idx).all()


@pytest.mark.parametrize("H,W", [(1, 1), (3, 5), (4, 4), (5, 2), (7, 3)])
def test_grid_orders_invert(H, W):
    for name in O.CROSS_SCAN:
        idx = scan_order(name).indices(H * W, hw=(H, W))
        assert roundtrip_ok(idx).all() and idx.scan_length == H * W
    covered = torch.zeros(2, H * W, dtype=torch.long)
    for name in O.ATROUS_2X2:
        idx = scan_order(name).indices(H * W, hw=(H, W))
        covered += roundtrip_ok(idx).long()
        assert idx.scan_length == (H + H % 2) * (W + W % 2) // 4
    assert torch.all(covered == 1), "the four lattice cells cover every token exactly once"


def explicit_reorder(x, perm, n_tokens):
    """Token-major (b, L, d) -> (b, P, d) by a Python loop over the indices (n_tokens reads a zero token)."""
    b, _, d = x.shape
    rows = perm if perm.dim() == 2 else perm.expand(b, -1)
    return torch.stack([torch.stack([x[i, j] if j < n_tokens else x.new_zeros(d) for j in row.tolist()])
                        for i, row in enumerate(rows)])


@pytest.mark.parametrize("name,n,lengths", [("flip", 9, None), ("flip", 9, [9, 4, 1]), ("stride_4", 10, None),
                                            ("stride_4", 10, [10, 7, 3]), ("stride_3_nopad", 10, [5, 10, 2]),
                                            ("stride_4", 12, None), ("stride_4_nopad", 12, None),
                                            ("col_major", 15, None), ("atrous_1", 15, None), ("shuffle", 8, None)])
def test_channel_major_reorder_restore_equal_token_major_ones_with_gradients(name, n, lengths):
    """dim=-1 on (b, d, L) gives the token-major results transposed, contiguous, with the same gradients; zero
    tokens (stride padding, unvisited lattice cells) are zeros and pass no gradient."""
    hw = (3, 5) if name.startswith(("atrous", "col")) else None
    idx = scan_order(name).indices(n, lengths=lengths, hw=hw)
    x = torch.randn(3, n, 4, dtype=torch.float64, requires_grad=True)
    xs = reorder(x, idx)
    torch.testing.assert_close(xs, explicit_reorder(x, idx.perm, n), rtol=0, atol=0)
    xs_cm = reorder(x.transpose(1, 2).contiguous(), idx, dim=-1)
    assert xs_cm.is_contiguous() and xs_cm.shape == (3, 4, idx.scan_length)
    torch.testing.assert_close(xs_cm, xs.transpose(1, 2), rtol=0, atol=0)
    y = torch.randn(3, idx.scan_length, 4, dtype=torch.float64, requires_grad=True)
    yr_cm = restore(y.transpose(1, 2).contiguous(), idx, dim=-1)
    assert yr_cm.is_contiguous()
    torch.testing.assert_close(yr_cm, restore(y, idx).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(restore(y, idx), explicit_reorder(y, idx.inverse, idx.scan_length), rtol=0, atol=0)
    g1, g2 = torch.randn_like(xs_cm), torch.randn_like(yr_cm)
    grads_cm = torch.autograd.grad((xs_cm * g1).sum() + (yr_cm * g2).sum(), [x, y])
    grads_tm = torch.autograd.grad((reorder(x, idx) * g1.transpose(1, 2)).sum()
                                   + (restore(y, idx) * g2.transpose(1, 2)).sum(), [x, y])
    for a, r in zip(grads_cm, grads_tm):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    if idx.pads_input:
        perm = idx.perm if idx.batched else idx.perm.expand(3, -1)
        assert torch.all(xs_cm.transpose(1, 2)[perm == n] == 0)
    with pytest.raises(ValueError, match="dim must be 1"):
        reorder(x, idx, dim=0)
    with pytest.raises(ValueError, match=r"expected a \(batch, dim, length\) tensor"):
        restore(y[0], idx, dim=-1)


def test_flip_is_marked_and_uses_flip():
    idx = scan_order("flip").indices(6)
    assert idx.is_flip and not idx.is_identity and not scan_order("flip").indices(1).is_flip
    assert not scan_order("flip").indices(6, lengths=[6, 3]).is_flip and not StrideOrder(2).indices(6).is_flip
    x = torch.randn(2, 5, 6)
    assert torch.equal(reorder(x, idx, dim=-1), x.flip(-1)) and torch.equal(restore(x, idx, dim=-1), x.flip(-1))


@pytest.mark.parametrize("name,n,hw,grid", [("stride_4", 10, None, (3, 4)), ("stride_4", 12, None, (3, 4)),
                                            ("stride_5", 20003, None, (4001, 5)), ("stride_4_nopad", 12, None, (3, 4)),
                                            ("stride_4_nopad", 10, None, None), ("stride_3", 2, None, None),
                                            ("col_major", 12, (3, 4), (3, 4)), ("col_major_rev", 12, (3, 4), None),
                                            ("row_major", 12, (3, 4), None), ("flip", 12, None, None),
                                            ("atrous_1", 16, (4, 4), None)])
def test_transposing_orders_are_marked_and_copy_like_the_gather(name, n, hw, grid):
    """Orders that read a zero-padded (rows, cols) grid column by column carry `grid` and reorder / restore
    by a transposing copy; its results equal the generic gather's, in both layouts."""
    idx = scan_order(name).indices(n, hw=hw)
    assert idx.grid == grid
    assert scan_order(name).indices(n, hw=hw, lengths=[n, n - 1] if hw is None else None).grid == (
        grid if hw is not None else None)              # per-sample lengths: batched indices, the gather path
    for dim, x in ((1, torch.randn(2, n, 3)), (2, torch.randn(2, 3, n))):
        xs = reorder(x, idx, dim=dim)
        assert xs.is_contiguous()
        assert torch.equal(xs, O._gather_tokens(x, idx.perm, n, idx.pads_input, dim, "test"))
        back = restore(xs, idx, dim=dim)
        assert back.is_contiguous()
        assert torch.equal(back, O._gather_tokens(xs, idx.inverse, idx.scan_length, idx.pads_output, dim, "test"))
    if n < 100:                                        # gradients: those of the gather (a linear map)
        for dim, shape in ((1, (2, n, 3)), (2, (2, 3, n))):
            x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda t: reorder(t, idx, dim=dim), (x,))
            y = torch.randn(*shape[:dim], idx.scan_length, *shape[dim + 1:], dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda t: restore(t, idx, dim=dim), (y,))


def test_stride_order_sequence_and_padding():
    # MambaMIL: pad 10 tokens to 12 with rate 4, rearrange "(k w) -> (w k)": [0, 4, 8, 1, 5, 9, 2, 6, pad, 3, 7, pad]
    idx = StrideOrder(4).indices(10)
    assert idx.perm.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 10] and idx.pads_input
    assert StrideOrder(4, pad=False).indices(10).perm.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]
    assert StrideOrder(5).indices(10).perm.tolist() == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]


def test_cross_scan_sequences():
    H, W = 2, 3                                    # tokens 0 1 2 / 3 4 5
    seq = {n: scan_order(n).indices(6, hw=(H, W)).perm.tolist() for n in O.CROSS_SCAN}
    assert seq == {"row_major": [0, 1, 2, 3, 4, 5], "col_major": [0, 3, 1, 4, 2, 5],
                   "row_major_rev": [5, 4, 3, 2, 1, 0], "col_major_rev": [5, 2, 4, 1, 3, 0]}
    assert scan_order("row_major").indices(6, hw=(H, W)).is_identity


@pytest.mark.parametrize("H,W", [(4, 6), (5, 3)])
def test_atrous_lattices_match_efficientvmamba_slicing(H, W):
    """EfficientScan: pad to even, then x[::2, ::2], x.T[::2, 1::2], x[::2, 1::2], x.T[1::2, 1::2], flattened."""
    ids = torch.arange(H * W, dtype=torch.float64).view(H, W) + 1          # +1 so that padding (0) is visible
    padded = torch.nn.functional.pad(ids, (0, W % 2, 0, H % 2))
    expected = [padded[::2, ::2], padded.t()[::2, 1::2], padded[::2, 1::2], padded.t()[1::2, 1::2]]
    x = ids.flatten()[None, :, None]
    for k, exp in enumerate(expected):
        idx = AtrousLattice(k).indices(H * W, hw=(H, W))
        got = reorder(x, idx)[0, :, 0]
        assert torch.equal(got, exp.flatten()), f"lattice {k}"


def test_lengths_reorder_each_sample_on_its_own():
    lengths = [5, 2, 0, 3]
    idx = scan_order("flip").indices(5, lengths=torch.tensor(lengths))
    assert idx.batched and not idx.pads_input
    assert idx.perm.tolist() == [[4, 3, 2, 1, 0], [1, 0, 2, 3, 4], [0, 1, 2, 3, 4], [2, 1, 0, 3, 4]]
    roundtrip_ok(idx, b=4)
    sr = StrideOrder(2).indices(5, lengths=[5, 3])
    # sample 0: 5 -> padded 6: [0, 2, 4, 1, 3, pad]; sample 1: 3 -> 4: [0, 2, 1, pad] then its padding 3, 4
    assert sr.perm.tolist() == [[0, 2, 4, 1, 3, 5], [0, 2, 1, 5, 3, 4]]
    roundtrip_ok(sr)
    assert scan_order("identity").indices(5, lengths=[2, 5]).is_identity
    assert not scan_order("flip").indices(4, lengths=[4, 4]).batched      # full lengths: one shared order


def test_shuffle_uses_generator_and_is_not_cached():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = RandomShuffle(g1).indices(20).perm
    b = RandomShuffle(g2).indices(20).perm
    assert torch.equal(a, b)
    s = RandomShuffle(torch.Generator().manual_seed(1))
    assert not torch.equal(s.indices(20).perm, s.indices(20).perm)
    per_sample = s.indices(6, lengths=[6, 3])
    assert sorted(per_sample.perm[1, :3].tolist()) == [0, 1, 2] and per_sample.perm[1, 3:].tolist() == [3, 4, 5]


def test_indices_are_cached_per_geometry_and_device():
    O.clear_order_cache()
    a = scan_order("flip").indices(11)
    b = scan_order("flip").indices(11)
    c = scan_order("flip").indices(12)
    assert a is b and a is not c
    assert O.order_cache_info()["hits"] == 1 and O.order_cache_info()["misses"] == 2
    assert scan_order("col_major").indices(6, hw=(2, 3)) is not scan_order("col_major").indices(6, hw=(3, 2))


# -- points ----------------------------------------------------------------------------------------------

def test_morton_and_hilbert_codes_small_cases():
    cube = torch.tensor(list(itertools.product(range(2), repeat=3)))         # (x, y, z) in {0,1}^3
    z = O.morton_encode(cube, depth=1)
    assert torch.equal(z, cube[:, 0] * 4 + cube[:, 1] * 2 + cube[:, 2])
    for depth in (1, 2, 3):
        side = 1 << depth
        cells = torch.tensor(list(itertools.product(range(side), repeat=3)))
        h = O.hilbert_encode(cells, depth)
        assert torch.equal(h.sort().values, torch.arange(side ** 3)), "a bijection onto 0..8^depth-1"
        walk = cells[h.argsort()]
        steps = (walk[1:] - walk[:-1]).abs().sum(-1)
        assert torch.all(steps == 1), "consecutive Hilbert indices are grid neighbours"
        assert h[(cells == 0).all(-1)].item() == 0


@pytest.mark.parametrize("axes", O.SNAKE_ORDERS)
def test_snake_order_walks_between_neighbours(axes):
    cells = torch.tensor(list(itertools.product(range(3), range(4), range(2))))
    code = O.snake_encode(cells, axes)
    walk = cells[code.argsort()]
    assert torch.all((walk[1:] - walk[:-1]).abs().sum(-1) == 1)
    fastest = "xyz".index(axes[0])
    assert walk[1, fastest] != walk[0, fastest]           # the first permuted axis varies fastest


def test_snake_as_written_sorts_by_first_axis_only():
    torch.manual_seed(0)
    pos = torch.rand(2, 50, 3)
    order = PointOrder("yxz", snake="as_written").indices(50, coords=pos)
    grid = O.grid_coordinates(pos, 0.02)
    for i in range(2):
        y = grid[i, order.perm[i], 1]
        assert torch.all(y.diff() >= 0) or torch.all(y.diff() <= 0)


def test_point_orders_are_per_sample_and_invert():
    torch.manual_seed(0)
    pos = torch.rand(3, 40, 3)
    for kind in O.PCM_ORDERS + ("hilbert_trans",):
        idx = PointOrder(kind).indices(40, coords=pos)
        assert idx.batched and idx.perm.shape == (3, 40)
        assert roundtrip_ok(idx, b=3).all()
        alone = PointOrder(kind).indices(40, coords=pos[1:2])
        if kind in O.SNAKE_ORDERS:      # snake codes do not depend on the rest of the batch
            assert torch.equal(alone.perm[0], idx.perm[1])


def test_point_order_lengths_keep_padding_last_and_match_alone():
    torch.manual_seed(1)
    pos = torch.rand(2, 30, 3)
    idx = PointOrder("hilbert", depth=8).indices(30, lengths=[30, 17], coords=pos)
    assert idx.perm[1, 17:].tolist() == list(range(17, 30))
    alone = PointOrder("hilbert", depth=8).indices(17, coords=pos[1:2, :17])
    assert torch.equal(idx.perm[1, :17], alone.perm[0])


def test_point_depth_limit_and_translation_invariance():
    pos = torch.rand(1, 20, 3)
    a = PointOrder("z").indices(20, coords=pos).perm
    b = PointOrder("z").indices(20, coords=pos + 3.0).perm         # grid cells are relative to the minimum
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="depth"):
        PointOrder("hilbert", grid_size=1e-6).indices(20, coords=pos)
    with pytest.raises(ValueError, match="more than depth=2 bits"):
        PointOrder("z", depth=2).indices(20, coords=pos)


def test_bad_order_specs_and_geometry_raise():
    with pytest.raises(ValueError, match="unknown scan order 'spiral'"):
        scan_order("spiral")
    with pytest.raises(TypeError):
        scan_order(3)
    with pytest.raises(ValueError, match="rate must be a positive int"):
        StrideOrder(0)
    with pytest.raises(ValueError, match=r"pass hw=\(H, W\)"):
        scan_order("col_major").indices(6)
    with pytest.raises(ValueError, match="does not describe 6 tokens"):
        GridOrder("col_major").indices(6, hw=(2, 2))
    with pytest.raises(ValueError, match="lengths are not supported"):
        AtrousLattice(0).indices(6, hw=(2, 3), lengths=[6, 4])
    with pytest.raises(ValueError, match="pass coords"):
        PointOrder("z").indices(5)
    with pytest.raises(ValueError, match=r"expected \(batch, 5, 3\)"):
        PointOrder("z").indices(5, coords=torch.rand(1, 5, 2))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        scan_order("flip").indices(4, lengths=[5])
    with pytest.raises(ValueError, match="the order was computed for batch size 2"):
        reorder(torch.randn(3, 4, 1), scan_order("flip").indices(4, lengths=[4, 2]))
    assert scan_order("Hilbert-Trans").name == "hilbert_trans"
