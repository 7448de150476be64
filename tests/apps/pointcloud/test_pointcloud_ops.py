"""Point-cloud operators against float64 brute-force references written out plainly with Python loops."""

import pytest
import torch

from mambakit.apps.pointcloud import ops


# ---------------------------------------------------------------- references (float64, one cloud at a time)

def _sqdist(a, b):
    return sum((float(a[i]) - float(b[i])) ** 2 for i in range(3))


def fps_reference(cloud, n_samples):
    """Start at point 0; next the point farthest from the chosen set, the lower index on ties."""
    cloud = cloud.double()
    nearest = [float("inf")] * len(cloud)
    chosen = [0]
    while len(chosen) < n_samples:
        last = cloud[chosen[-1]]
        nearest = [min(nearest[j], _sqdist(cloud[j], last)) for j in range(len(cloud))]
        best = max(range(len(cloud)), key=lambda j: (nearest[j], -j))
        chosen.append(best)
    return chosen


def knn_reference(query, ref, k):
    """Sorted by (distance, index); a row shorter than k is padded with its nearest point."""
    query, ref = query.double(), ref.double()
    dists, idxs = [], []
    for q in query:
        ranked = sorted((_sqdist(q, r), j) for j, r in enumerate(ref))[:k]
        ranked += [ranked[0]] * (k - len(ranked))
        dists.append([d for d, _ in ranked])
        idxs.append([j for _, j in ranked])
    return torch.tensor(dists, dtype=torch.float64), torch.tensor(idxs)


def ball_reference(query, ref, radius, n_samples):
    """The first n_samples points (index order) within radius, padded with the first; none inside: nearest."""
    query, ref = query.double(), ref.double()
    out = []
    for q in query:
        d = [_sqdist(q, r) for r in ref]
        inside = [j for j in range(len(ref)) if d[j] <= radius * radius][:n_samples]
        if not inside:
            inside = [min(range(len(ref)), key=lambda j: (d[j], j))]
        out.append(inside + [inside[0]] * (n_samples - len(inside)))
    return torch.tensor(out)


def interpolate_reference(query, ref, feats, eps=1e-8):
    query, ref, feats = query.double(), ref.double(), feats.double()
    out = []
    for q in query:
        ranked = sorted((_sqdist(q, r), j) for j, r in enumerate(ref))[:3]
        w = [1.0 / (d + eps) for d, _ in ranked]
        out.append(sum(wi / sum(w) * feats[j] for wi, (_, j) in zip(w, ranked)))
    return torch.stack(out)


def _cloud(b, n, dtype=torch.float32, duplicates=0):
    pos = torch.rand(b, n, 3, dtype=torch.float64)
    if duplicates:
        # copy some points onto others (different ones per cloud) so exact distance ties occur
        for i in range(b):
            src = torch.randperm(n)[:duplicates]
            dst = torch.randperm(n)[:duplicates]
            pos[i, dst] = pos[i, src]
    return pos.to(dtype)


# ---------------------------------------------------------------- farthest point sampling

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("duplicates", [0, 30])
def test_fps_equals_reference_exactly(dtype, duplicates):
    pos = _cloud(3, 90, dtype, duplicates)
    got = ops.farthest_point_sample(pos, 40)
    assert got.dtype == torch.int64 and got.shape == (3, 40)
    for i in range(3):
        assert got[i].tolist() == fps_reference(pos[i], 40)


def test_fps_takes_every_distinct_point_then_repeats():
    # 5 distinct positions, each twice: 5 distinct picks, then repeats of already chosen points
    base = torch.rand(1, 5, 3, dtype=torch.float64)
    pos = torch.cat([base, base], 1)
    got = ops.farthest_point_sample(pos, 8)
    assert got[0].tolist() == fps_reference(pos[0], 8)
    assert len({tuple(pos[0, j].tolist()) for j in got[0, :5].tolist()}) == 5
    assert got[0, 0] == 0


def test_fps_more_samples_than_points_repeats():
    pos = _cloud(2, 6)
    got = ops.farthest_point_sample(pos, 9)
    for i in range(2):
        assert got[i].tolist() == fps_reference(pos[i], 9)
        assert sorted(set(got[i].tolist())) == list(range(6))


def test_fps_all_points_returns_the_whole_cloud_in_index_order():
    # documented shortcut: n_samples == N gives 0..N-1, the same set as the loop on distinct points
    pos = _cloud(2, 50)
    got = ops.farthest_point_sample(pos, 50)
    assert got.tolist() == [list(range(50))] * 2
    assert sorted(fps_reference(pos[1], 50)) == list(range(50))


def test_fps_bad_input():
    with pytest.raises(ValueError, match=r"farthest_point_sample: pos must have shape \(batch, points, 3\), got \(10, 3\)"):
        ops.farthest_point_sample(torch.rand(10, 3), 4)
    with pytest.raises(TypeError, match="float positions, got torch.int64"):
        ops.farthest_point_sample(torch.zeros(1, 10, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="n_samples >= 1 .* got n_samples=0 from 10 points"):
        ops.farthest_point_sample(torch.rand(1, 10, 3), 0)


# ---------------------------------------------------------------- k nearest neighbours

def _assert_knn(query, ref, k):
    dist, idx = ops.knn(query, ref, k)
    assert dist.shape == idx.shape == (query.shape[0], query.shape[1], k) and idx.dtype == torch.int64
    for i in range(query.shape[0]):
        ref_d, ref_i = knn_reference(query[i], ref[i], k)
        assert idx[i].tolist() == ref_i.tolist()
        torch.testing.assert_close(dist[i].double(), ref_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_equals_reference_on_different_clouds(dtype):
    _assert_knn(_cloud(3, 20, dtype), _cloud(3, 70, dtype), 7)


def test_knn_duplicates_tie_to_the_lower_index_even_at_the_kth_place():
    ref = _cloud(2, 60, torch.float64, duplicates=25)
    _assert_knn(ref, ref, 5)
    # many exact ties straddling the k-th place: 6 copies of one point, k = 3
    ref = torch.cat([torch.zeros(1, 6, 3, dtype=torch.float64), torch.ones(1, 4, 3, dtype=torch.float64)], 1)
    ref = ref[:, torch.tensor([7, 3, 0, 9, 5, 1, 8, 2, 4, 6])]
    _, idx = ops.knn(torch.zeros(1, 1, 3, dtype=torch.float64), ref, 3)
    assert idx[0, 0].tolist() == [1, 2, 4]


def test_knn_cloud_smaller_than_k_pads_with_the_nearest():
    query, ref = _cloud(2, 8), _cloud(2, 3)
    dist, idx = ops.knn(query, ref, 5)
    _assert_knn(query, ref, 5)
    assert (idx[..., 3:] == idx[..., :1]).all() and (dist[..., 3:] == dist[..., :1]).all()


def test_knn_chunks_give_the_same_answer(monkeypatch):
    query, ref = _cloud(2, 41), _cloud(2, 33)
    whole = ops.knn(query, ref, 4)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 2 * 33 * 3 * 5)        # 5 queries per chunk: 9 chunks
    assert len(list(ops._query_chunks(41, 33, 2))) == 9
    chunked = ops.knn(query, ref, 4)
    assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[0], chunked[0])
    _assert_knn(query, ref, 4)


def test_knn_bad_input():
    with pytest.raises(ValueError, match=r"knn: ref must have shape \(batch, points, 3\), got \(2, 5, 2\)"):
        ops.knn(torch.rand(2, 4, 3), torch.rand(2, 5, 2), 3)
    with pytest.raises(ValueError, match="knn: 2 query clouds for 3 reference clouds"):
        ops.knn(torch.rand(2, 4, 3), torch.rand(3, 5, 3), 3)
    with pytest.raises(ValueError, match="knn: need k >= 1"):
        ops.knn(torch.rand(2, 4, 3), torch.rand(2, 5, 3), 0)


# ---------------------------------------------------------------- ball query

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ball_query_equals_reference(dtype):
    ref = _cloud(3, 80, dtype, duplicates=10)
    query = ref[:, :25]
    got = ops.ball_query(query, ref, 0.3, 12)
    assert got.shape == (3, 25, 12) and got.dtype == torch.int64
    for i in range(3):
        assert got[i].tolist() == ball_reference(query[i], ref[i], 0.3, 12).tolist()


def test_ball_query_empty_ball_falls_back_to_the_nearest_and_small_clouds_pad(monkeypatch):
    ref = _cloud(2, 5, torch.float64)
    query = torch.cat([ref[:, :2], ref[:, :1] + 10.0], 1)                 # the last query is far from all
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 2 * 5 * 3)                # one query per chunk
    got = ops.ball_query(query, ref, 0.5, 8)                            # n_samples > N
    for i in range(2):
        assert got[i].tolist() == ball_reference(query[i], ref[i], 0.5, 8).tolist()


def test_ball_query_bad_input():
    with pytest.raises(ValueError, match="ball_query: need radius > 0 and n_samples >= 1, got -0.1, 4"):
        ops.ball_query(torch.rand(1, 4, 3), torch.rand(1, 5, 3), -0.1, 4)
    with pytest.raises(ValueError, match="ball_query: 1 query clouds for 2 reference clouds"):
        ops.ball_query(torch.rand(1, 4, 3), torch.rand(2, 5, 3), 0.1, 4)


# ---------------------------------------------------------------- gathering and interpolation

def test_index_points_values_and_gradient():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 7, (2, 4, 5))
    got = ops.index_points(x, idx)
    assert got.shape == (2, 4, 5, 3)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                assert torch.equal(got[b, i, j], x[b, idx[b, i, j]])
    assert torch.autograd.gradcheck(lambda t: ops.index_points(t, idx), (x,))


def test_index_points_bad_input():
    with pytest.raises(ValueError, match=r"index_points: x must have shape \(batch, points, channels\)"):
        ops.index_points(torch.rand(7, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be int64 of shape \(batch=2, \.\.\.\), got torch.int64 \(3, 4\)"):
        ops.index_points(torch.rand(2, 7, 3), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be int64 .* got torch.float32"):
        ops.index_points(torch.rand(2, 7, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_three_nn_interpolate_equals_reference(dtype):
    query, ref = _cloud(2, 15, dtype), _cloud(2, 9, dtype)
    feats = torch.randn(2, 9, 4, dtype=dtype)
    got = ops.three_nn_interpolate(query, ref, feats)
    assert got.shape == (2, 15, 4) and got.dtype == dtype
    for i in range(2):
        torch.testing.assert_close(got[i].double(), interpolate_reference(query[i], ref[i], feats[i]),
                                   rtol=1e-5, atol=1e-5)


def test_three_nn_interpolate_at_a_reference_point_returns_its_features():
    ref = _cloud(1, 10, torch.float64)
    feats = torch.randn(1, 10, 2, dtype=torch.float64)
    torch.testing.assert_close(ops.three_nn_interpolate(ref, ref, feats), feats, rtol=0, atol=1e-4)


def test_three_nn_interpolate_few_reference_points():
    query = _cloud(2, 6, torch.float64)
    one = torch.randn(2, 1, 3, dtype=torch.float64)
    got = ops.three_nn_interpolate(query, _cloud(2, 1, torch.float64), one)
    assert torch.equal(got, one.expand(2, 6, 3))
    ref, feats = _cloud(2, 2, torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    got = ops.three_nn_interpolate(query, ref, feats)
    d = ((query[:, :, None] - ref[:, None]) ** 2).sum(-1)
    w = 1 / (d + 1e-8)
    torch.testing.assert_close(got, (w / w.sum(-1, keepdim=True)) @ feats)


def test_three_nn_interpolate_gradient_in_feats():
    query, ref = _cloud(1, 6, torch.float64), _cloud(1, 5, torch.float64)
    feats = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: ops.three_nn_interpolate(query, ref, f), (feats,))


def test_three_nn_interpolate_bad_feats():
    with pytest.raises(ValueError, match=r"feats must have shape \(batch=2, ref points=9, channels\), got \(2, 8, 4\)"):
        ops.three_nn_interpolate(torch.rand(2, 5, 3), torch.rand(2, 9, 3), torch.rand(2, 8, 4))


# ---------------------------------------------------------------- kNN in feature space (DGCNN)

def feature_knn_reference(x, k):
    x = x.double()
    out = []
    for q in x:
        ranked = sorted((float(((q - r) ** 2).sum()), j) for j, r in enumerate(x))[:k]
        out.append([j for _, j in ranked] + [ranked[0][1]] * (k - len(ranked)))
    return out


def test_feature_knn_equals_reference_with_chunks(monkeypatch):
    x = torch.randn(2, 23, 10)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 2 * 23 * 4)              # 4 queries per chunk
    idx = ops.feature_knn(x, 6)
    assert idx.shape == (2, 23, 6) and idx.dtype == torch.int64
    for i in range(2):
        assert idx[i].tolist() == feature_knn_reference(x[i], 6)
    assert (idx[..., 0] == torch.arange(23)).all()                      # each point is its own nearest


def test_feature_knn_small_cloud_pads_and_bad_input():
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    assert ops.feature_knn(x, 5)[0].tolist() == feature_knn_reference(x[0], 5)
    with pytest.raises(ValueError, match=r"feature_knn: x must be float features of shape \(batch, points, channels\), got torch.float32 \(3, 5\)"):
        ops.feature_knn(torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="feature_knn: need k >= 1"):
        ops.feature_knn(x, 0)


def test_square_distance_values_and_gradient():
    q = torch.rand(2, 4, 3, dtype=torch.float64, requires_grad=True)
    r = torch.rand(2, 5, 3, dtype=torch.float64)
    got = ops.square_distance(q, r)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                assert got[b, i, j].item() == pytest.approx(_sqdist(q[b, i], r[b, j]), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a: ops.square_distance(a, r), (q,))
