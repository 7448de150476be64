"""Scan orders as data: index pairs `(perm, inverse)` that rearrange a token sequence before a causal scan and
put the outputs back afterwards.

An order maps a geometry (a length, per-sample lengths, an (H, W) grid or per-sample 3D points) to
`OrderIndices`:

    perm     (P,) or (b, P)   scanned position j reads token perm[j]; the value n_tokens reads a zero token
                              (an order's own padding, e.g. SR-Mamba's stride reorder of a length that is not
                              a multiple of R)
    inverse  (L,) or (b, L)   token t's output is at scanned position inverse[t]; the value P reads zero
                              (a token this order does not visit, e.g. the other cells of a 2x2 lattice)

`reorder(x, idx)` applies perm to (b, L, d) and `restore(y, idx)` applies inverse to (b, P, d); with dim=-1
they work on (b, d, L) / (b, d, P) tensors (the mixers' layout), giving contiguous results. Both
are gathers (a flip, or a transposing copy for orders that read a grid column by column: `OrderIndices.grid`),
so gradients flow. Indices for a fixed geometry are computed once and kept in an LRU cache keyed by
(order, geometry, device); random and point orders depend on data and are recomputed per call. Cached index
tensors are shared: never modify them in place.

Variable lengths: with `lengths` (b,), sample i's first lengths[i] tokens are valid and the rest is right
padding. 1D orders then rearrange each sample's valid tokens on their own (a flip starts at the sample's own
last token) and put the padding tokens after them, so they cannot reach a valid output of a causal scan.

Orders (names accepted by `scan_order`; '-' and '_' are interchangeable):
    identity, flip                        1D
    stride_R, stride_R_nopad              MambaMIL SR-Mamba: [0, R, 2R, ..., 1, R+1, ...]; by default
                                          zero-padded to a multiple of R as upstream (pads enter the scan);
                                          `_nopad` skips the missing positions instead
    shuffle                               ShuffleMamba: a random permutation (torch.Generator optional)
    row_major, col_major,                 VMamba cross-scan over a row-major (H, W) token grid (hw=(H, W))
    row_major_rev, col_major_rev
    atrous_0 .. atrous_3                  EfficientVMamba ES2D: the four cells of the 2x2 lattice (grid padded
                                          to even H and W with zero tokens); each visits HW/4 tokens
    hilbert, hilbert_trans, z, z_trans    Pointcept serialisations of 3D points (coords=(b, n, 3))
    xyz, xzy, yxz, yzx, zxy, zyx          Point Cloud Mamba's axis-permuted snake orders
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "OrderIndices", "ScanOrder", "Identity", "Flip", "StrideOrder", "RandomShuffle", "GridOrder",
    "AtrousLattice", "PointOrder", "scan_order", "reorder", "restore", "order_names", "clear_order_cache",
    "order_cache_info", "CROSS_SCAN", "ATROUS_2X2", "PCM_ORDERS", "SNAKE_ORDERS", "grid_coordinates",
    "morton_encode", "hilbert_encode", "snake_encode",
]

CROSS_SCAN = ("row_major", "col_major", "row_major_rev", "col_major_rev")
ATROUS_2X2 = ("atrous_0", "atrous_1", "atrous_2", "atrous_3")
SNAKE_ORDERS = ("xyz", "xzy", "yxz", "yzx", "zxy", "zyx")
PCM_ORDERS = SNAKE_ORDERS + ("hilbert", "z", "z_trans")
_SPACE_FILLING = ("hilbert", "hilbert_trans", "z", "z_trans")
MAX_POINT_DEPTH = 16


@dataclass(frozen=True, eq=False)
class OrderIndices:
    """The indices of one order for one geometry (see the module docstring)."""

    perm: torch.Tensor
    inverse: torch.Tensor
    n_tokens: int
    pads_input: bool
    pads_output: bool
    is_identity: bool
    is_flip: bool = False       # perm (and inverse) = (L-1, ..., 0): reorder and restore are a flip
    grid: tuple[int, int] | None = None
    # (rows, cols) where perm reads the tokens, zero-padded to rows * cols and laid row-major on that grid,
    # column by column (SR-Mamba's stride order, a column-major grid scan): reorder and restore are then a
    # transposing copy instead of a gather (several times faster on long sequences)

    @property
    def scan_length(self) -> int:
        return self.perm.shape[-1]

    @property
    def batched(self) -> bool:
        return self.perm.dim() == 2


def _gather_tokens(x: torch.Tensor, index: torch.Tensor, n_src: int, pad: bool, dim: int,
                   what: str) -> torch.Tensor:
    """x's token axis `dim` (1 or 2 of a 3D tensor, n_src long) gathered by `index` ((P,) or (b, P)); an index
    equal to n_src reads a zero token. The result is contiguous whichever axis holds the tokens."""
    b = x.shape[0]
    if index.device != x.device:
        index = index.to(x.device)
    if index.dim() == 2 and index.shape[0] != b:
        raise ValueError(f"{what}: the order was computed for batch size {index.shape[0]}, the input has {b}")
    zero_at = None
    if pad:
        if n_src == 0:                                            # nothing to read: every position is a zero token
            x = torch.cat([x, x.new_zeros(b, 1, x.shape[2]) if dim == 1 else x.new_zeros(b, x.shape[1], 1)], dim)
        else:                                                      # read any token there, zero it afterwards
            zero_at = index == n_src
            index = index.clamp(max=n_src - 1)
    if index.dim() == 1 and dim == 2:
        # the last axis of a (b * d, L) view: one pass of row gathers (index_select on the last axis of a 3D
        # tensor is several times slower on CPU)
        out = x.reshape(-1, x.shape[2]).index_select(1, index).view(x.shape[0], x.shape[1], index.shape[0])
    elif index.dim() == 1:
        out = x.index_select(dim, index)
    elif dim == 1:
        out = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    else:
        out = torch.gather(x, 2, index.unsqueeze(1).expand(-1, x.shape[1], -1))
    if zero_at is not None:
        # (P,) or (b, P) positions -> broadcast over the channel axis
        out = out.masked_fill_(zero_at.unsqueeze(-1) if dim == 1 else zero_at.unsqueeze(-2), 0.0)
    return out


def _token_dim(x: torch.Tensor, dim: int, what: str) -> int:
    """The token axis of a (b, L, d) (dim=1) or (b, d, L) (dim=2 or -1) tensor."""
    if dim not in (1, 2, -1):
        raise ValueError(f"{what}: dim must be 1 (tokens on dim 1 of (batch, length, dim)) or -1 "
                         f"(tokens last, (batch, dim, length)), got {dim}")
    if x.dim() != 3:
        layout = "(batch, length, dim)" if dim == 1 else "(batch, dim, length)"
        raise ValueError(f"{what}: expected a {layout} tensor, got shape {tuple(x.shape)}")
    return dim % 3


def reorder(x: torch.Tensor, idx: OrderIndices, dim: int = 1) -> torch.Tensor:
    """Token order -> scan order along `dim`: (b, L, d) -> (b, P, d) (dim=1), or (b, d, L) -> (b, d, P)
    (dim=-1, tokens last)."""
    if idx.is_identity:
        return x
    d = _token_dim(x, dim, "reorder")
    if x.shape[d] != idx.n_tokens:
        raise ValueError(f"reorder: the input has {x.shape[d]} tokens, the order was computed for {idx.n_tokens}")
    if idx.is_flip:
        return x.flip(d)
    if idx.grid is not None:
        return _grid_reorder(x, *idx.grid, d)
    return _gather_tokens(x, idx.perm, idx.n_tokens, idx.pads_input, d, "reorder")


def restore(y: torch.Tensor, idx: OrderIndices, dim: int = 1) -> torch.Tensor:
    """Scan order -> token order along `dim`: (b, P, d) -> (b, L, d) (dim=1), or (b, d, P) -> (b, d, L)
    (dim=-1); zeros for tokens the order does not visit."""
    if idx.is_identity:
        return y
    d = _token_dim(y, dim, "restore")
    if y.shape[d] != idx.scan_length:
        raise ValueError(f"restore: the input has {y.shape[d]} positions, the order scans {idx.scan_length}")
    if idx.is_flip:
        return y.flip(d)
    if idx.grid is not None:
        return _grid_restore(y, *idx.grid, idx.n_tokens, d)
    return _gather_tokens(y, idx.inverse, idx.scan_length, idx.pads_output, d, "restore")


def _grid_reorder(x: torch.Tensor, rows: int, cols: int, d: int) -> torch.Tensor:
    """Token axis d of a 3D tensor: its n tokens, zero-padded to rows * cols and laid row-major on (rows, cols),
    read column by column; contiguous. Written in place of a padded copy: full rows in one transposing copy,
    the last partial row (and its zero padding) on its own."""
    n = x.shape[d]
    full, rem = divmod(n, cols)
    out = x.new_empty(x.shape[:d] + (rows * cols,) + x.shape[d + 1:])
    grid = out.unflatten(d, (cols, rows)).transpose(d, d + 1)          # (.., rows, cols, ..), a view of out
    grid.narrow(d, 0, full).copy_(x.narrow(d, 0, full * cols).unflatten(d, (full, cols)))
    if full < rows:
        last = grid.select(d, full)                                    # (.., cols, ..)
        last.narrow(d, 0, rem).copy_(x.narrow(d, full * cols, rem))
        last.narrow(d, rem, cols - rem).zero_()
    return out


def _grid_restore(y: torch.Tensor, rows: int, cols: int, n: int, d: int) -> torch.Tensor:
    """Inverse of `_grid_reorder`: y's axis d in scan order (rows * cols) -> the n tokens, contiguous."""
    full, rem = divmod(n, cols)
    grid = y.unflatten(d, (cols, rows)).transpose(d, d + 1)            # (.., rows, cols, ..) in token order
    if full == rows:
        return grid.flatten(d, d + 1)                                  # a transposing copy
    out = y.new_empty(y.shape[:d] + (n,) + y.shape[d + 1:])
    out.narrow(d, 0, full * cols).unflatten(d, (full, cols)).copy_(grid.narrow(d, 0, full))
    out.narrow(d, full * cols, rem).copy_(grid.select(d, full).narrow(d, 0, rem))
    return out


def _transpose_grid(perm: torch.Tensor, n_tokens: int) -> tuple[int, int] | None:
    """(rows, cols) if the (P,) perm reads n_tokens tokens, zero-padded to rows * cols = P and laid
    row-major on that grid, column by column (see `OrderIndices.grid`); else None."""
    P = perm.numel()
    if P < 4 or int(perm[0]) != 0:
        return None
    cols = int(perm[1])
    if cols < 2 or P % cols or P // cols < 2:
        return None
    src = torch.arange(P).view(P // cols, cols).t().flatten()
    expected = torch.where(src < n_tokens, src, n_tokens)
    return (P // cols, cols) if torch.equal(perm, expected) else None


def _assemble(rows: torch.Tensor | list[torch.Tensor], n_tokens: int, device) -> OrderIndices:
    """Per-row sequences (token indices, -1 = zero token) -> OrderIndices. A tensor means one row for all."""
    single = isinstance(rows, torch.Tensor)
    rows = [rows] if single else rows
    b = len(rows)
    P = max((r.numel() for r in rows), default=0)
    perm = torch.full((b, P), n_tokens, dtype=torch.long)
    for i, r in enumerate(rows):
        perm[i, : r.numel()] = torch.where(r < 0, n_tokens, r)
    inverse = torch.full((b, n_tokens + 1), P, dtype=torch.long)
    inverse.scatter_(1, perm, torch.arange(P).expand(b, P))     # column n_tokens collects the zero tokens
    inverse = inverse[:, :n_tokens].contiguous()
    pads_input = bool((perm == n_tokens).any())
    pads_output = bool((inverse == P).any())
    is_identity = P == n_tokens and bool((perm == torch.arange(P)).all())
    is_flip = single and P == n_tokens and not is_identity and bool((perm == torch.arange(P - 1, -1, -1)).all())
    grid = None
    if single:
        perm, inverse = perm[0], inverse[0]
        grid = None if is_identity or is_flip else _transpose_grid(perm, n_tokens)
    return OrderIndices(perm.to(device), inverse.to(device), n_tokens, pads_input, pads_output, is_identity,
                        is_flip, grid)


_CACHE: "OrderedDict[tuple, OrderIndices]" = OrderedDict()
_CACHE_SIZE = 256
_CACHE_STATS = {"hits": 0, "misses": 0}


def clear_order_cache() -> None:
    _CACHE.clear()
    _CACHE_STATS.update(hits=0, misses=0)


def order_cache_info() -> dict:
    return {**_CACHE_STATS, "size": len(_CACHE), "maxsize": _CACHE_SIZE}


def _check_lengths(lengths, n_tokens: int) -> tuple[int, ...] | None:
    if lengths is None:
        return None
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor of shape (batch,), got dtype {lengths.dtype} "
                             f"and shape {tuple(lengths.shape)}")
        lengths = lengths.tolist()
    lengths = tuple(int(v) for v in lengths)
    bad = [v for v in lengths if not 0 <= v <= n_tokens]
    if bad:
        raise ValueError(f"lengths must lie in [0, {n_tokens}] (the sequence length), got {bad[:4]}")
    return lengths


class ScanOrder:
    """A rule that turns a geometry into `OrderIndices`. Subclasses implement `_build`."""

    name = "order"
    causal = False      # True only where the scan order is the token order (a causal mixer stays causal)
    cacheable = True    # False where the indices depend on data or randomness

    def _key(self) -> tuple:
        return ()

    def _build(self, n_tokens: int, lengths: tuple[int, ...] | None, hw, coords):
        raise NotImplementedError

    def indices(self, n_tokens: int, *, lengths=None, hw: tuple[int, int] | None = None,
                coords: torch.Tensor | None = None, device=None) -> OrderIndices:
        """Indices for `n_tokens` tokens (optionally per-sample `lengths`, a grid `hw`, points `coords`)."""
        if not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"{self.name}: n_tokens must be a non-negative int, got {n_tokens!r}")
        lengths = _check_lengths(lengths, n_tokens)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if not self.cacheable:
            return _assemble(self._build(n_tokens, lengths, hw, coords), n_tokens, device)
        hw_key = tuple(int(v) for v in hw) if hw is not None else None
        key = (type(self).__name__, self._key(), n_tokens, lengths, hw_key, device)
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            _CACHE_STATS["hits"] += 1
            return hit
        _CACHE_STATS["misses"] += 1
        idx = _assemble(self._build(n_tokens, lengths, hw_key, coords), n_tokens, device)
        _CACHE[key] = idx
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return idx

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _SequenceOrder(ScanOrder):
    """A 1D order defined by `_sequence(n)`; per-sample lengths rearrange each sample's valid prefix."""

    def _sequence(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def _build(self, n_tokens, lengths, hw, coords):
        if hw is not None or coords is not None:
            raise ValueError(f"scan order {self.name!r} is a 1D order; it takes no hw/coords")
        if lengths is None or all(v == n_tokens for v in lengths):
            return self._sequence(n_tokens)
        return [torch.cat([self._sequence(v), torch.arange(v, n_tokens)]) for v in lengths]


class Identity(_SequenceOrder):
    name = "identity"
    causal = True

    def _build(self, n_tokens, lengths, hw, coords):
        # Right padding already sits after every valid token: nothing to rearrange, per sample or not.
        return torch.arange(n_tokens)

    def _sequence(self, n):
        return torch.arange(n)


class Flip(_SequenceOrder):
    name = "flip"

    def _sequence(self, n):
        return torch.arange(n - 1, -1, -1)


class StrideOrder(_SequenceOrder):
    """MambaMIL's SR-Mamba order: positions [0, R, 2R, ..., 1, R+1, ...].

    pad=True (upstream): the length is zero-padded to a multiple of R first, so zero tokens sit at the end of
    the last stride groups and enter the scan. pad=False: missing positions are skipped (a permutation).
    """

    def __init__(self, rate: int, pad: bool = True):
        if not isinstance(rate, int) or rate < 1:
            raise ValueError(f"StrideOrder: rate must be a positive int, got {rate!r}")
        self.rate = rate
        self.pad = pad
        self.name = f"stride_{rate}" + ("" if pad else "_nopad")

    def _key(self):
        return (self.rate, self.pad)

    def _sequence(self, n):
        groups = math.ceil(n / self.rate)
        j = torch.arange(groups * self.rate)
        src = (j % groups) * self.rate + j // groups
        return torch.where(src < n, src, -1) if self.pad else src[src < n]


class RandomShuffle(_SequenceOrder):
    """ShuffleMamba's random order: one permutation shared by the batch (per-sample ones under lengths)."""

    name = "shuffle"
    cacheable = False

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def _sequence(self, n):
        return torch.randperm(n, generator=self.generator)


def _check_hw(name: str, n_tokens: int, lengths, hw) -> tuple[int, int]:
    if hw is None:
        raise ValueError(f"scan order {name!r} needs the token grid: pass hw=(H, W)")
    if len(hw) != 2 or hw[0] < 1 or hw[1] < 1 or hw[0] * hw[1] != n_tokens:
        raise ValueError(f"scan order {name!r}: hw={tuple(hw)} does not describe {n_tokens} tokens (H * W)")
    if lengths is not None and any(v != n_tokens for v in lengths):
        raise ValueError(f"scan order {name!r} scans full (H, W) grids; per-sample lengths are not supported")
    return int(hw[0]), int(hw[1])


class GridOrder(ScanOrder):
    """VMamba cross-scan orders over tokens laid out row-major on an (H, W) grid."""

    KINDS = CROSS_SCAN

    def __init__(self, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"GridOrder: unknown kind {kind!r}; expected one of {self.KINDS}")
        self.name = kind

    def _key(self):
        return (self.name,)

    def _build(self, n_tokens, lengths, hw, coords):
        H, W = _check_hw(self.name, n_tokens, lengths, hw)
        tok = torch.arange(H * W).view(H, W)
        seq = tok.flatten() if self.name.startswith("row") else tok.t().flatten()
        return seq.flip(0) if self.name.endswith("_rev") else seq


class AtrousLattice(GridOrder):
    """EfficientVMamba's ES2D: cell k of the 2x2 lattice, on the grid zero-padded to even H and W.

    k=0: even rows, even cols, row-major      k=1: odd rows, even cols, column-major
    k=2: even rows, odd cols, row-major       k=3: odd rows, odd cols, column-major
    """

    _CELLS = {0: (0, 0, False), 1: (1, 0, True), 2: (0, 1, False), 3: (1, 1, True)}

    def __init__(self, k: int):
        if k not in self._CELLS:
            raise ValueError(f"AtrousLattice: k must be 0, 1, 2 or 3, got {k!r}")
        self.k = k
        self.name = f"atrous_{k}"

    def _key(self):
        return (self.k,)

    def _build(self, n_tokens, lengths, hw, coords):
        H, W = _check_hw(self.name, n_tokens, lengths, hw)
        Hp, Wp = H + H % 2, W + W % 2
        h, w = torch.arange(Hp)[:, None], torch.arange(Wp)[None, :]
        tok = torch.where((h < H) & (w < W), h * W + w, -1)            # -1: a padding cell (zero token)
        h0, w0, col_major = self._CELLS[self.k]
        cell = tok[h0::2, w0::2]
        return (cell.t() if col_major else cell).flatten()


# ---------------------------------------------------------------------------------------------------------
# 3D point serialisations


def grid_coordinates(coords: torch.Tensor, grid_size: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(b, n, 3) float positions -> (b, n, 3) int64 grid cells floor(pos / grid_size) - per-sample minimum."""
    grid = torch.floor(coords / grid_size).to(torch.int64)
    if valid is None:
        return grid - grid.amin(dim=1, keepdim=True)
    big = torch.iinfo(torch.int64).max
    mins = torch.where(valid[..., None], grid, big).amin(dim=1, keepdim=True)
    return torch.where(valid[..., None], grid - mins, 0)


def _interleave3(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, depth: int) -> torch.Tensor:
    """Bit i of c0, c1, c2 goes to bit 3i+2, 3i+1, 3i of the code."""
    code = torch.zeros_like(c0)
    for i in range(depth):
        code |= ((c0 >> i) & 1) << (3 * i + 2) | ((c1 >> i) & 1) << (3 * i + 1) | ((c2 >> i) & 1) << (3 * i)
    return code


def morton_encode(grid: torch.Tensor, depth: int = MAX_POINT_DEPTH) -> torch.Tensor:
    """Z-order code of (..., 3) non-negative int cells with x in the highest bit of each triple."""
    return _interleave3(grid[..., 0], grid[..., 1], grid[..., 2], depth)


def hilbert_encode(grid: torch.Tensor, depth: int = MAX_POINT_DEPTH) -> torch.Tensor:
    """Hilbert index of (..., 3) int cells in [0, 2^depth), by Skilling's transpose algorithm (AIP Conf.
    Proc. 707, 2004), the curve Pointcept and Point Cloud Mamba serialise with."""
    x = [grid[..., i].to(torch.int64).clone() for i in range(3)]
    q = 1 << (depth - 1) if depth > 0 else 0
    while q > 1:                                   # undo excess work, from the top bit down
        low = q - 1
        for i in range(3):
            on = (x[i] & q) != 0
            if i == 0:
                x[0] = torch.where(on, x[0] ^ low, x[0])
                continue
            swap = (x[0] ^ x[i]) & low
            x0_new = torch.where(on, x[0] ^ low, x[0] ^ swap)
            x[i] = torch.where(on, x[i], x[i] ^ swap)
            x[0] = x0_new
        q >>= 1
    x[1] = x[1] ^ x[0]                             # Gray decode of the interleaved bit string
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[0])
    q = 1 << (depth - 1) if depth > 0 else 0
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave3(x[0] ^ t, x[1] ^ t, x[2] ^ t, depth)


def snake_encode(grid: torch.Tensor, axes: str = "xyz") -> torch.Tensor:
    """Boustrophedon code: the first axis of `axes` varies fastest, reversing direction on every row of the
    second axis, and each layer of the third axis traverses the 2D snake backwards on odd layers, so
    consecutive codes are grid neighbours. grid: (..., 3) non-negative int cells."""
    c1, c2, c3 = (grid[..., "xyz".index(a)] for a in axes)
    r1 = int(c1.max()) + 1 if c1.numel() else 1
    r2 = int(c2.max()) + 1 if c2.numel() else 1
    code2 = c2 * r1 + torch.where(c2 % 2 == 0, c1, r1 - 1 - c1)
    return c3 * (r1 * r2) + torch.where(c3 % 2 == 0, code2, r1 * r2 - 1 - code2)


def _snake_as_written(grid: torch.Tensor, axes: str) -> torch.Tensor:
    """Point Cloud Mamba's `encode_cts` at HEAD: its loop combines the batch-wide maxima of the second and
    third axes instead of the per-point coordinates, so the code orders points by the first axis only,
    ascending or descending with the parity of those maxima (see UPSTREAM.md). grid: (m, 3) valid cells."""
    c1 = grid[:, "xyz".index(axes[0])]
    m1, m2, m3 = (int(grid[:, "xyz".index(a)].max()) for a in axes)
    s2, s3 = (1 if m2 % 2 == 0 else -1), (1 if m3 % 2 == 0 else -1)
    code1 = (m2 + (m2 % 2)) * m1 + s2 * c1
    return (m3 + (m3 % 2)) * (m1 * m2) + s3 * code1


class PointOrder(ScanOrder):
    """Serialisation of 3D points, per sample: coords (b, n, 3) -> perms (b, n).

    grid cells = floor(pos / grid_size) - per-sample min (Pointcept / PCM; grid_size 0.02 in PCM).
    kind: hilbert | hilbert_trans | z | z_trans (x and y swapped for *_trans) | xyz ... zyx (snake).
    depth: bits per axis for hilbert/z; None = Pointcept's adaptive depth, the bit length of the largest
      cell over the whole batch (so it depends on the batch; pass an int for batch-independent orders).
      At most 16.
    snake: "paper" (the boustrophedon the paper describes, neighbours in the sequence are grid neighbours)
      or "as_written" (PCM's code at HEAD, which sorts by the first permuted axis only).
    Ties (points in one cell) keep their input order (stable sort; upstream's argsort leaves them unspecified).
    """

    cacheable = False
    KINDS = _SPACE_FILLING + SNAKE_ORDERS

    def __init__(self, kind: str, grid_size: float = 0.02, depth: int | None = None, snake: str = "paper"):
        kind = kind.lower().replace("-", "_")
        if kind not in self.KINDS:
            raise ValueError(f"PointOrder: unknown kind {kind!r}; expected one of {self.KINDS}")
        if not grid_size > 0:
            raise ValueError(f"PointOrder: grid_size must be positive, got {grid_size!r}")
        if depth is not None and not 1 <= depth <= MAX_POINT_DEPTH:
            raise ValueError(f"PointOrder: depth must lie in [1, {MAX_POINT_DEPTH}], got {depth!r}")
        if snake not in ("paper", "as_written"):
            raise ValueError(f"PointOrder: snake must be 'paper' or 'as_written', got {snake!r}")
        self.name, self.grid_size, self.depth, self.snake = kind, grid_size, depth, snake

    def codes(self, coords: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(b, n, 3) positions -> (b, n) int64 serialisation codes (invalid points get the largest code)."""
        if valid is None:
            valid = torch.ones(coords.shape[:2], dtype=torch.bool, device=coords.device)
        grid = grid_coordinates(coords, self.grid_size, valid)
        cells = grid[valid]                                   # (m, 3) valid cells, batch-wide
        if self.name in SNAKE_ORDERS:
            code = snake_encode(cells, self.name) if self.snake == "paper" else _snake_as_written(cells, self.name)
        else:
            depth = self.depth
            if depth is None:
                depth = max(int(cells.max()).bit_length() if cells.numel() else 1, 1)
            if cells.numel() and int(cells.max()) >= 1 << depth:
                raise ValueError(f"PointOrder({self.name!r}): the points span {int(cells.max()) + 1} cells of "
                                 f"size {self.grid_size} on an axis, more than depth={depth} bits can index; "
                                 f"use a larger grid_size or depth (at most {MAX_POINT_DEPTH})")
            if depth > MAX_POINT_DEPTH:
                raise ValueError(f"PointOrder({self.name!r}): the points span {int(cells.max()) + 1} cells of size "
                                 f"{self.grid_size}, which needs depth {depth} > {MAX_POINT_DEPTH}; "
                                 f"use a larger grid_size")
            if self.name.endswith("_trans"):
                cells = cells[:, [1, 0, 2]]
            code = (hilbert_encode if self.name.startswith("hilbert") else morton_encode)(cells, depth)
        out = torch.full(valid.shape, torch.iinfo(torch.int64).max, dtype=torch.int64, device=coords.device)
        out[valid] = code
        return out

    def _build(self, n_tokens, lengths, hw, coords):
        if coords is None:
            raise ValueError(f"scan order {self.name!r} serialises points: pass coords=(batch, n, 3)")
        if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[1:] != (n_tokens, 3):
            got = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
            raise ValueError(f"scan order {self.name!r}: coords has shape {got}, expected (batch, {n_tokens}, 3)")
        if not coords.dtype.is_floating_point:
            raise TypeError(f"scan order {self.name!r}: coords must be float positions, got {coords.dtype}")
        if lengths is not None and len(lengths) != coords.shape[0]:
            raise ValueError(f"scan order {self.name!r}: {len(lengths)} lengths for {coords.shape[0]} point sets")
        valid = None
        if lengths is not None:
            valid = torch.arange(n_tokens, device=coords.device) < torch.tensor(lengths, device=coords.device)[:, None]
        code = self.codes(coords.detach(), valid).cpu()
        # Invalid points carry the largest code, so the stable sort leaves them after the valid ones in order.
        return list(torch.argsort(code, dim=1, stable=True))


# ---------------------------------------------------------------------------------------------------------

_NAMED = {"identity": Identity, "flip": Flip, "shuffle": RandomShuffle}


def order_names() -> list[str]:
    """The accepted order names (R in stride_R is any positive int)."""
    return (list(_NAMED) + ["stride_R", "stride_R_nopad"] + list(CROSS_SCAN) + list(ATROUS_2X2)
            + list(_SPACE_FILLING) + list(SNAKE_ORDERS))


def scan_order(spec: str | ScanOrder) -> ScanOrder:
    """A ScanOrder from its name (see `order_names()`), or the ScanOrder itself."""
    if isinstance(spec, ScanOrder):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a scan order is a name or a ScanOrder, got {type(spec).__name__}")
    name = spec.lower().replace("-", "_")
    if name in _NAMED:
        return _NAMED[name]()
    m = re.fullmatch(r"stride_(\d+)(_nopad)?", name)
    if m and int(m.group(1)) >= 1:
        return StrideOrder(int(m.group(1)), pad=m.group(2) is None)
    if name in CROSS_SCAN:
        return GridOrder(name)
    m = re.fullmatch(r"atrous_([0-3])", name)
    if m:
        return AtrousLattice(int(m.group(1)))
    if name in PointOrder.KINDS:
        return PointOrder(name)
    raise ValueError(f"unknown scan order {spec!r}; expected one of {order_names()}")


def orders_from(specs: Sequence[str | ScanOrder]) -> tuple[ScanOrder, ...]:
    if isinstance(specs, (str, ScanOrder)):
        specs = [specs]
    orders = tuple(scan_order(s) for s in specs)
    if not orders:
        raise ValueError("at least one scan order is needed")
    return orders
