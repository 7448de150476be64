"""Point-cloud operators in plain PyTorch, batched, with nothing to compile: farthest point sampling, k nearest
neighbours, ball query, gathering by index and three-nearest-neighbour interpolation.

They replace openpoints' `pointnet2_batch` CUDA extension (the part of Point Cloud Mamba's install that fails,
PCM #5) and compute the same function:

- `farthest_point_sample` starts at point 0 as the CUDA kernel does (PointMLP's Python fallback starts at a
  random point) and breaks ties towards the lower index; once every distinct position is taken (duplicate
  points, or more samples than points) the remaining picks are repeats, as upstream's.
- `knn` returns neighbours sorted by distance, ties towards the lower index (also between the k-th and the
  (k+1)-th, which decides which of several duplicates is kept); a cloud
  with fewer than k points pads each row with its nearest neighbour (ball query's padding rule), so every
  query gets k indices of real points.
- Distances are computed as sums of squared differences (not |a|^2 + |b|^2 - 2ab, which cancels badly for
  nearby points), in chunks of queries so memory stays bounded on large clouds.

Shapes: positions (B, N, 3), indices int64.
"""

from __future__ import annotations

import torch

__all__ = ["farthest_point_sample", "knn", "feature_knn", "ball_query", "index_points", "square_distance",
           "three_nn_interpolate"]

#: bounds the memory of knn, feature_knn and ball_query: a chunk of queries holds about this many elements
#: (B x queries x N x 3 for positions: three (B, queries, N) tensors live at once)
_CHUNK_ELEMENTS = 1 << 24


def _check_points(name: str, pos: torch.Tensor, what: str = "pos") -> None:
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[-1] != 3:
        got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"{name}: {what} must have shape (batch, points, 3), got {got}")
    if not pos.dtype.is_floating_point:
        raise TypeError(f"{name}: {what} must hold float positions, got {pos.dtype}")


def _check_pair(name: str, query: torch.Tensor, ref: torch.Tensor) -> None:
    _check_points(name, query, "query")
    _check_points(name, ref, "ref")
    if query.shape[0] != ref.shape[0]:
        raise ValueError(f"{name}: {query.shape[0]} query clouds for {ref.shape[0]} reference clouds")


def square_distance(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, M, 3), (B, N, 3) -> (B, M, N) squared Euclidean distances, summed coordinate by coordinate: no
    (B, M, N, 3) intermediate (3x faster on CPU than broadcasting all three at once, same numbers)."""
    d = (query[:, :, None, 0] - ref[:, None, :, 0]).square_()
    for axis in (1, 2):
        d.add_((query[:, :, None, axis] - ref[:, None, :, axis]).square_())
    return d


def _query_chunks(m: int, n: int, b: int, per_pair: int = 3):
    step = max(1, _CHUNK_ELEMENTS // max(1, b * n * per_pair))
    for start in range(0, m, step):
        yield slice(start, min(m, start + step))


def farthest_point_sample(pos: torch.Tensor, n_samples: int) -> torch.Tensor:
    """(B, N, 3) -> (B, n_samples) indices of farthest point sampling from point 0.

    n_samples == N returns 0..N-1 without running the loop: the sampled set is then the whole cloud, and
    every caller here sorts the indices anyway (PCM keeps the serialization order that way)."""
    _check_points("farthest_point_sample", pos)
    b, n, _ = pos.shape
    if n_samples < 1 or n < 1:
        raise ValueError(f"farthest_point_sample: need n_samples >= 1 from a non-empty cloud, got "
                         f"n_samples={n_samples} from {n} points")
    if n_samples == n:
        return torch.arange(n, device=pos.device).expand(b, n).clone()
    pos = pos.detach()
    out = torch.empty(b, n_samples, dtype=torch.long, device=pos.device)
    nearest = torch.full((b, n), float("inf"), dtype=pos.dtype, device=pos.device)
    farthest = torch.zeros(b, dtype=torch.long, device=pos.device)
    rows = torch.arange(b, device=pos.device)
    for i in range(n_samples):
        out[:, i] = farthest
        centre = pos[rows, farthest][:, None, :]
        torch.minimum(nearest, (pos - centre).square().sum(-1), out=nearest)
        farthest = nearest.argmax(dim=1)       # the first maximum: ties go to the lower index
    return out


def _k_smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of d (..., N) ordered by (value, index), so that ties go to the lower
    index also at the k-th place (where topk alone picks any of the tied entries, e.g. between duplicates)."""
    n = d.shape[-1]
    top_d, top_i = torch.topk(d, min(k + 1, n), dim=-1, largest=False, sorted=True)
    if k < n and (top_d[..., k] == top_d[..., k - 1]).any():
        # some row's (k+1)-th value equals its k-th: take all entries below the k-th value and the
        # lowest-indexed ones equal to it, then read them out in index order (the keys are distinct)
        kth = top_d[..., k - 1:k]
        below, tied = d < kth, d == kth
        room = k - below.sum(-1, keepdim=True)
        chosen = below | (tied & (tied.cumsum(-1) <= room))
        key = torch.where(chosen, torch.arange(n, device=d.device), n)
        top_i = torch.topk(key, k, dim=-1, largest=False, sorted=True).values
    else:
        top_i = top_i[..., :k]
        top_i = top_i.gather(-1, torch.argsort(top_i, dim=-1))
    top_d = d.gather(-1, top_i)
    order = torch.argsort(top_d, dim=-1, stable=True)      # by value; equal values keep index order
    return top_d.gather(-1, order), top_i.gather(-1, order)


def knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query point its k nearest points of `ref`: (squared distances (B, M, k), indices (B, M, k)),
    nearest first. With fewer than k reference points the rows are padded with the nearest one."""
    _check_pair("knn", query, ref)
    b, m, _ = query.shape
    n = ref.shape[1]
    if k < 1 or n < 1:
        raise ValueError(f"knn: need k >= 1 and a non-empty reference cloud, got k={k}, {n} points")
    kk = min(k, n)
    query, ref = query.detach(), ref.detach()
    dists, idxs = [], []
    for rows in _query_chunks(m, n, b):
        top_d, top_i = _k_smallest(square_distance(query[:, rows], ref), kk)
        dists.append(top_d)
        idxs.append(top_i)
    dist, idx = torch.cat(dists, 1), torch.cat(idxs, 1)
    if kk < k:
        pad = k - kk
        dist = torch.cat([dist, dist[..., :1].expand(b, m, pad)], -1)
        idx = torch.cat([idx, idx[..., :1].expand(b, m, pad)], -1)
    return dist, idx


def feature_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """DGCNN's dynamic graph: for each point of x (B, N, C) the indices (B, N, k) of its k nearest points in
    feature space (itself included), nearest first, ties to the lower index; k > N pads with the nearest.

    Features have tens to hundreds of channels, so distances are |a|^2 + |b|^2 - 2 a.b through a matrix
    product (as DGCNN's own code), in chunks of queries of (B, chunk, N) floats."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"feature_knn: x must be float features of shape (batch, points, channels), got {got}")
    b, n, _ = x.shape
    if k < 1 or n < 1:
        raise ValueError(f"feature_knn: need k >= 1 and a non-empty cloud, got k={k}, {n} points")
    kk = min(k, n)
    x = x.detach()
    norms = x.square().sum(-1)
    idxs = []
    for rows in _query_chunks(n, n, b, per_pair=1):
        d = norms[:, rows, None] + norms[:, None, :] - 2 * torch.bmm(x[:, rows], x.transpose(1, 2))
        idxs.append(_k_smallest(d, kk)[1])
    idx = torch.cat(idxs, 1)
    if kk < k:
        idx = torch.cat([idx, idx[..., :1].expand(b, n, k - kk)], -1)
    return idx


def ball_query(query: torch.Tensor, ref: torch.Tensor, radius: float, n_samples: int) -> torch.Tensor:
    """PointNet++'s ball query: for each query point the first `n_samples` reference points (in index order)
    within `radius`, padded with the first one found. (B, M, 3), (B, N, 3) -> (B, M, n_samples).

    A query with no point in the ball (impossible when the queries are reference points) gets its nearest."""
    _check_pair("ball_query", query, ref)
    b, m, _ = query.shape
    n = ref.shape[1]
    if radius <= 0 or n_samples < 1:
        raise ValueError(f"ball_query: need radius > 0 and n_samples >= 1, got {radius}, {n_samples}")
    query, ref = query.detach(), ref.detach()
    out = []
    positions = torch.arange(n, device=ref.device)
    for rows in _query_chunks(m, n, b):
        d = square_distance(query[:, rows], ref)
        inside = d <= radius * radius
        key = torch.where(inside, positions, n)             # inside points keep their index, others sort last
        first = torch.topk(key, min(n_samples, n), dim=-1, largest=False, sorted=True).values
        nearest = d.argmin(-1, keepdim=True)
        head = torch.where(first[..., :1] == n, nearest, first[..., :1])
        first = torch.where(first == n, head, first)
        if first.shape[-1] < n_samples:
            first = torch.cat([first, head.expand(*first.shape[:-1], n_samples - first.shape[-1])], -1)
        out.append(first)
    return torch.cat(out, 1)


def index_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) gathered by idx (B, ...) -> (B, ..., C); differentiable in x."""
    if x.dim() != 3:
        raise ValueError(f"index_points: x must have shape (batch, points, channels), got {tuple(x.shape)}")
    if idx.dim() < 1 or idx.shape[0] != x.shape[0] or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index_points: idx must be int64 of shape (batch={x.shape[0]}, ...), got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    b, n, c = x.shape
    flat = idx.reshape(b, -1).long()
    out = x.gather(1, flat[..., None].expand(b, flat.shape[1], c))
    return out.reshape(*idx.shape, c)


def three_nn_interpolate(query: torch.Tensor, ref: torch.Tensor, feats: torch.Tensor, eps: float = 1e-8
                         ) -> torch.Tensor:
    """PointNet++ feature propagation: features (B, N, C) at `ref` points carried to `query` points (B, M, 3)
    by inverse-distance weights of the three nearest reference points (weights 1 / (squared distance + eps),
    normalised, as PointNet++ / PointMLP's Python code). A single reference point is broadcast."""
    _check_pair("three_nn_interpolate", query, ref)
    if feats.dim() != 3 or feats.shape[:2] != ref.shape[:2]:
        raise ValueError(f"three_nn_interpolate: feats must have shape (batch={ref.shape[0]}, "
                         f"ref points={ref.shape[1]}, channels), got {tuple(feats.shape)}")
    if ref.shape[1] == 1:
        return feats.expand(feats.shape[0], query.shape[1], feats.shape[2])
    d, idx = knn(query, ref, min(3, ref.shape[1]))
    w = 1.0 / (d + eps)
    w = w / w.sum(-1, keepdim=True)
    return (index_points(feats, idx) * w[..., None].to(feats.dtype)).sum(2)
