"""Point clouds as PyG `Data` objects: transforms, batching, mesh / point-file reading and the readers of the
published benchmark formats.

A cloud is a `torch_geometric.data.Data` with
    pos       float32 (N, 3)
    x         optional float32 (N, F) extra per-point features; `x_kind == "normal"` marks unit normals, which
              the geometric transforms rotate / scale together with `pos`
    y         int64 (1,) class label (classification) or (N,) part labels (segmentation)
    category  int64 (1,) shape category (segmentation)
    name      str, the file or sample it came from (every error about the cloud names it)

Transforms are callables Data -> Data (PyG style) that draw their randomness from torch's global RNG, so
`torch.manual_seed` makes an epoch reproducible. They follow Point Cloud Mamba's published pipelines
(openpoints' `PointCloudScaleAndTranslate`, `PointCloudScaling`, `PointCloudCenterAndNormalize`,
`PointCloudRotation`, and train.py's FPS 2048 -> 1200 then 1024 at random for ScanObjectNN).

Readers (lists are loaded at once; `LazyClouds` read one file per access):
    read_modelnet40_h5(root, split)            list    modelnet40_ply_hdf5_2048/ply_data_{train,test}*.h5
    read_modelnet_normal(root, split)          lazy    modelnet40_normal_resampled/ (x = normals)
    read_scanobjectnn_h5(root, split)          list    main_split/{training,test}_objectdataset_*.h5
    read_shapenetpart(root, split)             lazy    shapenetcore_partanno_segmentation_benchmark_v0_normal/
    read_mesh_folder(root, split)              list    <class>/[train|test/]files or [train|test/]<class>/files:
                                                       meshes (.off .ply .obj .stl, sampled and cached) and
                                                       point files (.xyz .txt .npy); PyG's ModelNet raw layout
                                                       (<Class>/{train,test}/*.off) is a case of it
The eager readers return a `CloudList`: a list of Data that also carries `classes` (names by label) and
`skipped` ((file, reason) of files left out with a warning).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch_geometric.data import Data

from mambakit.data.errors import DataError

from .ops import farthest_point_sample

__all__ = [
    "CloudList", "LazyClouds", "PointCloudDataset", "make_cloud", "collate_points", "FEATURES",
    "Compose", "SamplePoints", "FirstPoints", "FPSThenRandom", "ScaleAndTranslate", "RandomScale",
    "CenterAndNormalize", "NormalizeUnitSphere", "RandomRotate", "Jitter",
    "read_off", "load_mesh", "sample_mesh", "read_point_file", "mesh_samples",
    "read_modelnet40_h5", "read_modelnet_normal", "read_scanobjectnn_h5", "read_shapenetpart", "read_mesh_folder",
    "MODELNET40_CLASSES", "SCANOBJECTNN_CLASSES", "SHAPENETPART_PARTS", "SHAPENETPART_SYNSETS",
    "MESH_SUFFIXES", "POINT_SUFFIXES",
]

#: the gravity (up) axis of every dataset here: y, as PCM's ScanObjectNN config (gravity_dim 1)
UP_AXIS = 1


# --------------------------------------------------------------------------------------------------
# clouds

def _describe(data: Data) -> str:
    return getattr(data, "name", None) or "a point cloud"


def check_positions(pos: torch.Tensor, what: str) -> None:
    """Raise a DataError naming `what` unless pos is a non-empty (N, 3) array of finite numbers."""
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise DataError(f"{what}: expected positions of shape (points, 3), got {tuple(pos.shape)}")
    if pos.shape[0] == 0:
        raise DataError(f"{what}: the cloud has no points")
    bad = ~torch.isfinite(pos).all(dim=1)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise DataError(f"{what}: {int(bad.sum())} of {pos.shape[0]} points have NaN or infinite coordinates "
                        f"(first at row {first})")


def make_cloud(pos, *, y=None, x=None, x_kind: str | None = None, category=None, name: str = "") -> Data:
    """A checked cloud: pos (N, 3) finite, x (N, F) when given, y a class label or N part labels."""
    pos = torch.as_tensor(np.asarray(pos, dtype=np.float32))
    check_positions(pos, name or "point cloud")
    fields = {"pos": pos, "name": name}
    if x is not None:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if x.dim() != 2 or x.shape[0] != pos.shape[0]:
            raise DataError(f"{name}: {pos.shape[0]} points but features of shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise DataError(f"{name}: the per-point features hold NaN or infinite values")
        fields["x"] = x
        if x_kind:
            fields["x_kind"] = x_kind
    if y is not None:
        y = torch.as_tensor(np.asarray(y)).long().reshape(-1)
        if y.numel() not in (1, pos.shape[0]):
            raise DataError(f"{name}: {y.numel()} labels for {pos.shape[0]} points (expected 1 class label or "
                            f"one part label per point)")
        fields["y"] = y
    if category is not None:
        fields["category"] = torch.as_tensor(category).long().reshape(1)
    return Data(**fields)


class CloudList(list):
    """A list of Data with the class names (`classes[label]`) and the files skipped while reading."""

    def __init__(self, items: Iterable[Data] = (), classes: Sequence[str] = (), skipped=()):
        super().__init__(items)
        self.classes = list(classes)
        self.skipped: list[tuple[str, str]] = list(skipped)


class LazyClouds(Sequence):
    """A sequence of clouds read from their files on access (`read(path, meta) -> Data`), for sets too big to
    hold as lists. A bad file raises a DataError naming it when it is reached."""

    def __init__(self, entries: Sequence[tuple[Path, object]], read: Callable[[Path, object], Data],
                 classes: Sequence[str] = ()):
        self.entries = list(entries)
        self.read = read
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path, meta = self.entries[i]
        return self.read(path, meta)


class PointCloudDataset(torch.utils.data.Dataset):
    """A torch Dataset over clouds (a list or LazyClouds) returning a transformed copy of each: the stored
    clouds are never modified, so every epoch draws fresh augmentations from the originals."""

    def __init__(self, items: Sequence[Data], transform: Callable[[Data], Data] | None = None):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Data:
        data = self.items[i].clone()
        return self.transform(data) if self.transform is not None else data


# --------------------------------------------------------------------------------------------------
# batching

#: input features `collate_points` builds, and their channel counts (models take C_in from here)
FEATURES = {"xyz": 3, "xyz_height": 4, "xyz_normals": 6, "xyz_normals_height": 7}


def _features_of(data: Data, features: str) -> torch.Tensor:
    pos = data.pos
    parts = [pos]
    if "normals" in features:
        normals = getattr(data, "x", None)
        if normals is None or getattr(data, "x_kind", None) != "normal":
            raise DataError(f"{_describe(data)}: features {features!r} need normals in data.x (x_kind 'normal'); "
                            f"this cloud has none (read ModelNet normal_resampled / ShapeNetPart, or sample meshes "
                            f"with normals)")
        parts.append(normals)
    if features.endswith("height"):
        height = pos[:, UP_AXIS:UP_AXIS + 1]
        parts.append(height - height.min())
    return torch.cat(parts, dim=1) if len(parts) > 1 else pos


def collate_points(batch: Sequence[Data], features: str = "xyz") -> dict:
    """Stack equal-sized clouds: {"pos" (B, N, 3), "x" (B, N, C_in), "y" (B,) or (B, N), "category" (B,) when
    the clouds have one}. features: "xyz", "xyz_height" (height = pos[:, 1] - its minimum, per cloud, after
    the transforms), "xyz_normals" or "xyz_normals_height" (PCM's ShapeNetPart input: xyz, normals, height)."""
    if features not in FEATURES:
        raise ValueError(f"collate_points: features must be one of {', '.join(FEATURES)}, got {features!r}")
    if not batch:
        raise ValueError("collate_points: empty batch")
    sizes = {d.pos.shape[0] for d in batch}
    if len(sizes) != 1:
        raise DataError(f"collate_points: clouds of different sizes {sorted(sizes)} in one batch (first "
                        f"{_describe(batch[0])}); sample them to a fixed count (SamplePoints / FirstPoints)")
    out = {"pos": torch.stack([d.pos for d in batch]).float(),
           "x": torch.stack([_features_of(d, features) for d in batch]).float()}
    if all(getattr(d, "y", None) is not None for d in batch):
        ys = [d.y for d in batch]
        out["y"] = torch.cat(ys) if ys[0].numel() == 1 else torch.stack(ys)
    if all(getattr(d, "category", None) is not None for d in batch):
        out["category"] = torch.cat([d.category.reshape(1) for d in batch]).long()
    out["name"] = [getattr(d, "name", "") for d in batch]
    return out


# --------------------------------------------------------------------------------------------------
# transforms

class Compose:
    def __init__(self, transforms: Sequence[Callable[[Data], Data]]):
        self.transforms = list(transforms)

    def __call__(self, data: Data) -> Data:
        for t in self.transforms:
            data = t(data)
        return data

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


def _per_point_fields(data: Data) -> list[str]:
    """Fields indexed by point: pos, x, and y when it holds one label per point."""
    n = data.pos.shape[0]
    fields = ["pos"]
    if getattr(data, "x", None) is not None:
        fields.append("x")
    y = getattr(data, "y", None)
    if y is not None and y.dim() == 1 and y.numel() == n and n != 1:
        fields.append("y")
    return fields


def _take(data: Data, idx: torch.Tensor) -> Data:
    for field in _per_point_fields(data):
        data[field] = data[field][idx]
    return data


def _need_points(data: Data, n: int, who: str) -> None:
    have = data.pos.shape[0]
    if have < n:
        raise DataError(f"{_describe(data)}: {who} needs {n} points, the cloud has {have}")


class SamplePoints:
    """n points drawn at random without replacement, in random order (training)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __call__(self, data: Data) -> Data:
        _need_points(data, self.n, repr(self))
        return _take(data, torch.randperm(data.pos.shape[0])[:self.n])

    def __repr__(self) -> str:
        return f"SamplePoints({self.n})"


class FirstPoints:
    """The first n points (PCM's evaluation: the stored order, no randomness)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __call__(self, data: Data) -> Data:
        _need_points(data, self.n, repr(self))
        return _take(data, torch.arange(self.n))

    def __repr__(self) -> str:
        return f"FirstPoints({self.n})"


class FPSThenRandom:
    """Farthest point sampling to n_fps points (from point 0, as the CUDA kernel), then n of those at random:
    PCM's ScanObjectNN training input (2048 -> 1200 -> 1024)."""

    def __init__(self, n_fps: int = 1200, n: int = 1024):
        if n > n_fps:
            raise ValueError(f"FPSThenRandom: n ({n}) must not exceed n_fps ({n_fps})")
        self.n_fps, self.n = int(n_fps), int(n)

    def __call__(self, data: Data) -> Data:
        _need_points(data, self.n_fps, repr(self))
        fps = farthest_point_sample(data.pos[None].float(), self.n_fps)[0]
        return _take(data, fps[torch.randperm(self.n_fps)[:self.n]])

    def __repr__(self) -> str:
        return f"FPSThenRandom({self.n_fps}, {self.n})"


def _uniform(low: float, high: float, size: int) -> torch.Tensor:
    return torch.rand(size) * (high - low) + low


def _scale_normals(data: Data, scale: torch.Tensor) -> None:
    """Normals of a surface scaled by diag(s) transform by diag(1/s), then are renormalised."""
    if getattr(data, "x_kind", None) == "normal" and getattr(data, "x", None) is not None:
        n = data.x / scale
        data.x = n / n.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ScaleAndTranslate:
    """PCM's ModelNet training augmentation: pos * s + t, with s ~ U(scale) per axis (anisotropic) and
    t ~ U(-shift, shift) per axis."""

    def __init__(self, scale: tuple[float, float] = (2 / 3, 3 / 2), shift: float = 0.2, anisotropic: bool = True):
        self.scale, self.shift, self.anisotropic = tuple(scale), float(shift), anisotropic

    def __call__(self, data: Data) -> Data:
        s = _uniform(*self.scale, 3 if self.anisotropic else 1).expand(3)
        t = _uniform(-self.shift, self.shift, 3)
        data.pos = data.pos * s + t
        _scale_normals(data, s)
        return data

    def __repr__(self) -> str:
        return f"ScaleAndTranslate(scale={self.scale}, shift={self.shift})"


class RandomScale:
    """pos * s, s ~ U(scale) per axis (anisotropic, as openpoints' PointCloudScaling) or one for all."""

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), anisotropic: bool = True):
        self.scale, self.anisotropic = tuple(scale), anisotropic

    def __call__(self, data: Data) -> Data:
        s = _uniform(*self.scale, 3 if self.anisotropic else 1).expand(3)
        data.pos = data.pos * s
        _scale_normals(data, s)
        return data

    def __repr__(self) -> str:
        return f"RandomScale({self.scale})"


class CenterAndNormalize:
    """Subtract the mean point; with normalize, divide by the largest distance to it (unit sphere)."""

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def __call__(self, data: Data) -> Data:
        pos = data.pos - data.pos.mean(dim=0, keepdim=True)
        if self.normalize:
            radius = pos.norm(dim=1).max()
            if not radius > 0:
                raise DataError(f"{_describe(data)}: all points coincide; cannot normalise the cloud")
            pos = pos / radius
        data.pos = pos
        return data

    def __repr__(self) -> str:
        return f"CenterAndNormalize(normalize={self.normalize})"


class NormalizeUnitSphere(CenterAndNormalize):
    """Centre on the mean and scale into the unit sphere (PointNet's pc_normalize)."""

    def __init__(self):
        super().__init__(normalize=True)

    def __repr__(self) -> str:
        return "NormalizeUnitSphere()"


def rotation_about(axis: int, angle: float) -> torch.Tensor:
    """The 3x3 rotation by `angle` radians about coordinate axis `axis` (right-handed)."""
    c, s = math.cos(angle), math.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = torch.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


class RandomRotate:
    """Rotation about one axis (default y, gravity) by an angle ~ U(-max_angle, max_angle); normals follow."""

    def __init__(self, axis: int = UP_AXIS, max_angle: float = math.pi):
        if axis not in (0, 1, 2):
            raise ValueError(f"RandomRotate: axis must be 0, 1 or 2, got {axis}")
        self.axis, self.max_angle = axis, float(max_angle)

    def __call__(self, data: Data) -> Data:
        angle = float(_uniform(-self.max_angle, self.max_angle, 1))
        r = rotation_about(self.axis, angle)
        data.pos = data.pos @ r.T
        if getattr(data, "x_kind", None) == "normal" and getattr(data, "x", None) is not None:
            data.x = data.x @ r.T
        return data

    def __repr__(self) -> str:
        return f"RandomRotate(axis={self.axis}, max_angle={self.max_angle:.4g})"


class Jitter:
    """Gaussian noise of std sigma on every coordinate, clipped to +-clip."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05):
        self.sigma, self.clip = float(sigma), float(clip)

    def __call__(self, data: Data) -> Data:
        noise = (torch.randn_like(data.pos) * self.sigma).clamp(-self.clip, self.clip)
        data.pos = data.pos + noise
        return data

    def __repr__(self) -> str:
        return f"Jitter(sigma={self.sigma}, clip={self.clip})"


# --------------------------------------------------------------------------------------------------
# meshes and point files

MESH_SUFFIXES = (".off", ".ply", ".obj", ".stl")
POINT_SUFFIXES = (".xyz", ".txt", ".pts", ".npy")


def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An OFF mesh -> (vertices float64 (V, 3), triangles int64 (F, 3)); polygons are fanned into triangles.

    Our own parser: trimesh 4.x fails on several CGAL files with numpy 2 (polygon faces, colour columns), and
    OFF is simple. Accepts OFF / COFF / NOFF / CNOFF headers, comments, the counts on the header line, and
    per-vertex / per-face extra columns (colours, normals), which are ignored."""
    path = Path(path)
    lines = (line.split("#", 1)[0].split() for line in path.read_text(errors="replace").splitlines())
    rows = [r for r in lines if r]
    if not rows:
        raise DataError(f"{path}: empty file (expected an OFF mesh)")
    head = rows[0][0]
    if not re.fullmatch(r"(ST)?C?N?4?OFF", head):
        raise DataError(f"{path}: not an OFF file (first word {head[:20]!r}, expected OFF)")
    # the counts follow the header word, on its line or on the next
    start = 1 if len(rows[0]) > 1 else 2
    counts = rows[0][1:] if start == 1 else (rows[1] if len(rows) > 1 else [])
    try:
        n_vertices, n_faces = int(counts[0]), int(counts[1])
    except (IndexError, ValueError):
        raise DataError(f"{path}: the OFF header must give vertex and face counts") from None
    body = rows[start:]
    if len(body) < n_vertices + n_faces:
        raise DataError(f"{path}: the header promises {n_vertices} vertices and {n_faces} faces, the file has "
                        f"{len(body)} data lines")
    try:
        vertices = np.array([[float(v) for v in r[:3]] for r in body[:n_vertices]], dtype=np.float64)
        triangles = []
        for r in body[n_vertices:n_vertices + n_faces]:
            k = int(r[0])
            ids = [int(v) for v in r[1:1 + k]]
            triangles.extend((ids[0], ids[i], ids[i + 1]) for i in range(1, k - 1))
    except (ValueError, IndexError) as e:
        raise DataError(f"{path}: malformed OFF body ({e})") from None
    faces = np.array(triangles, dtype=np.int64).reshape(-1, 3)
    if vertices.shape != (n_vertices, 3):
        raise DataError(f"{path}: every vertex line needs 3 coordinates")
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise DataError(f"{path}: a face refers to a vertex outside 0..{n_vertices - 1}")
    return vertices, faces


def load_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Any mesh file -> (vertices (V, 3), triangles (F, 3)): OFF by read_off, .ply / .obj / .stl by trimesh."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".off":
        return read_off(path)
    if suffix not in MESH_SUFFIXES:
        raise DataError(f"{path}: not a mesh file (expected one of {', '.join(MESH_SUFFIXES)})")
    import trimesh

    try:
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except Exception as e:  # trimesh raises many types for broken files
        raise DataError(f"{path}: cannot read the mesh ({type(e).__name__}: {e})") from None
    vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    return vertices, faces


def triangle_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0, *,
                what: str = "mesh") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n points on the surface, uniform by area (a triangle is picked with probability area / total, then a
    uniform point in it), from a numpy generator seeded by `seed`.

    Returns (points float32 (n, 3), unit normals float32 (n, 3), face index int64 (n,)). A mesh with no
    faces, NaN vertices or zero total area is a DataError naming `what`."""
    if len(faces) == 0 or len(vertices) == 0:
        raise DataError(f"{what}: the mesh has no faces (nothing to sample points from)")
    if not np.isfinite(vertices).all():
        raise DataError(f"{what}: the mesh has NaN or infinite vertex coordinates")
    areas = triangle_areas(vertices, faces)
    total = areas.sum()
    if not total > 0:
        raise DataError(f"{what}: the mesh has zero surface area ({len(faces)} degenerate faces)")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=n, p=areas / total)
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1                     # fold the square onto the triangle: uniform over its area
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    a, b, c = (vertices[faces[face, i]] for i in range(3))
    points = a + u[:, None] * (b - a) + v[:, None] * (c - a)
    normal = np.cross(b - a, c - a)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return points.astype(np.float32), normal.astype(np.float32), face.astype(np.int64)


def read_point_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A point file -> (xyz float32 (N, 3), normals (N, 3) or None). .npy: an (N, 3) or (N, 6) array;
    .xyz / .txt / .pts: rows of 3 or 6+ numbers separated by spaces or commas (columns 4-6 are normals)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: cannot read the array ({type(e).__name__}: {e})") from None
    else:
        try:
            array = np.loadtxt(path, delimiter="," if _has_commas(path) else None, dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise DataError(f"{path}: not a table of numbers ({e})") from None
    if array.ndim != 2 or array.shape[1] < 3 or array.shape[0] == 0:
        raise DataError(f"{path}: expected rows of x y z [nx ny nz], got an array of shape {array.shape}")
    xyz = array[:, :3].astype(np.float32)
    check_positions(torch.from_numpy(xyz), str(path))
    normals = array[:, 3:6].astype(np.float32) if array.shape[1] >= 6 else None
    return xyz, normals


def _has_commas(path: Path) -> bool:
    with open(path, errors="replace") as f:
        return "," in f.readline()


def _sample_cache_dir() -> Path:
    from mambakit.data.cache import mambakit_home

    return mambakit_home() / "pointcloud" / "mesh_samples"


def mesh_samples(path: str | Path, n: int, seed: int = 0, cache_dir: str | Path | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(points (n, 3), normals (n, 3)) sampled from a mesh file, cached on disk (keyed by the file's path,
    size, mtime, n and seed), so later runs and epochs do not sample the mesh again."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{n}|{seed}".encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else _sample_cache_dir()
    cached = folder / f"{path.stem[:40]}-{key}.npy"
    if cached.is_file():
        array = np.load(cached)
        return array[:, :3], array[:, 3:]
    vertices, faces = load_mesh(path)
    points, normals, _ = sample_mesh(vertices, faces, n, seed, what=str(path))
    folder.mkdir(parents=True, exist_ok=True)
    part = cached.with_name(cached.name + f".{os.getpid()}.part.npy")
    np.save(part, np.concatenate([points, normals], axis=1))
    os.replace(part, cached)
    return points, normals


# --------------------------------------------------------------------------------------------------
# readers of the published formats

SCANOBJECTNN_CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                        "bed", "pillow", "sink", "sofa", "toilet"]

MODELNET40_CLASSES = [
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone", "cup",
    "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp", "laptop",
    "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink", "sofa",
    "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox"]

#: ShapeNetPart's 16 categories (in synsetoffset2category.txt order) with their synset and part ids (50 in all)
SHAPENETPART_SYNSETS = {
    "Airplane": "02691156", "Bag": "02773838", "Cap": "02954340", "Car": "02958343", "Chair": "03001627",
    "Earphone": "03261776", "Guitar": "03467517", "Knife": "03624134", "Lamp": "03636649",
    "Laptop": "03642806", "Motorbike": "03790512", "Mug": "03797390", "Pistol": "03948459",
    "Rocket": "04099429", "Skateboard": "04225987", "Table": "04379243"}
_PART_COUNTS = [4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3]
SHAPENETPART_PARTS: dict[str, list[int]] = {}
_start = 0
for _name, _count in zip(SHAPENETPART_SYNSETS, _PART_COUNTS):
    SHAPENETPART_PARTS[_name] = list(range(_start, _start + _count))
    _start += _count
del _start, _name, _count


def _split_name(split: str, allowed=("train", "test")) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(allowed)}, got {split!r}")
    return split


def _read_h5_clouds(files: list[Path], classes: list[str]) -> CloudList:
    import h5py

    clouds = CloudList(classes=classes)
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ("data", "label") if k not in f]
                if missing:
                    raise DataError(f"{path}: no dataset {', '.join(missing)} (keys: {', '.join(f.keys())})")
                points = np.asarray(f["data"], dtype=np.float32)
                labels = np.asarray(f["label"]).reshape(-1).astype(np.int64)
                normals = np.asarray(f["normal"], dtype=np.float32) if "normal" in f else None
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
        if points.ndim != 3 or points.shape[2] < 3 or len(labels) != len(points):
            raise DataError(f"{path}: expected data (n, points, 3) and label (n,), got {points.shape} and "
                            f"{len(labels)} labels")
        if classes and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{len(classes) - 1}")
        for i in range(len(points)):
            x = normals[i] if normals is not None else None
            clouds.append(make_cloud(points[i, :, :3], y=[labels[i]], x=x, x_kind="normal" if x is not None else None,
                                     name=f"{path.name}[{i}]"))
    return clouds


def read_modelnet40_h5(root: str | Path, split: str = "train") -> CloudList:
    """ModelNet40 as PCM reads it: `root` = modelnet40_ply_hdf5_2048/ (or its parent) with
    ply_data_{split}*.h5 (data (n, 2048, 3), label (n, 1), optional normal) and shape_names.txt."""
    split = _split_name(split)
    root = Path(root)
    if not list(root.glob("ply_data_*.h5")) and (root / "modelnet40_ply_hdf5_2048").is_dir():
        root = root / "modelnet40_ply_hdf5_2048"
    files = sorted(root.glob(f"ply_data_{split}*.h5"))
    if not files:
        raise DataError(f"{root}: no ply_data_{split}*.h5 files (expected the modelnet40_ply_hdf5_2048 folder)")
    names_file = root / "shape_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else list(MODELNET40_CLASSES)
    return _read_h5_clouds(files, classes)


def read_scanobjectnn_h5(root: str | Path, split: str = "train",
                         variant: str = "objectdataset_augmentedrot_scale75") -> CloudList:
    """ScanObjectNN (hardest variant by default): `root` = main_split/ (or h5_files/ above it) holding
    {training,test}_<variant>.h5 (data (n, 2048, 3), label (n,)). The model input adds height along y
    (collate_points features="xyz_height")."""
    split = _split_name(split)
    root = Path(root)
    if (root / "main_split").is_dir():
        root = root / "main_split"
    path = root / f"{'training' if split == 'train' else 'test'}_{variant}.h5"
    if not path.is_file():
        raise DataError(f"{path}: not found (expected ScanObjectNN's h5_files/main_split folder)")
    return _read_h5_clouds([path], list(SCANOBJECTNN_CLASSES))


def _read_rows(path: Path, min_columns: int) -> np.ndarray:
    try:
        rows = np.loadtxt(path, delimiter="," if _has_commas(path) else None, dtype=np.float64, ndmin=2)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a table of numbers ({e})") from None
    if rows.shape[0] == 0 or rows.shape[1] < min_columns:
        raise DataError(f"{path}: expected rows of at least {min_columns} numbers, got shape {rows.shape}")
    return rows


def read_modelnet_normal(root: str | Path, split: str = "train", n_classes: int = 40) -> LazyClouds:
    """modelnet40_normal_resampled/ (read lazily, one file per access): modelnet{40,10}_shape_names.txt,
    modelnet{n}_{split}.txt ids such as airplane_0001, and <class>/<id>.txt rows x,y,z,nx,ny,nz
    (10,000 points each). x = the normals (x_kind "normal")."""
    split = _split_name(split)
    root = Path(root)
    names_file, ids_file = root / f"modelnet{n_classes}_shape_names.txt", root / f"modelnet{n_classes}_{split}.txt"
    for needed in (names_file, ids_file):
        if not needed.is_file():
            raise DataError(f"{needed}: not found (expected the modelnet40_normal_resampled folder)")
    classes = names_file.read_text().split()
    entries = []
    for line_no, sample_id in enumerate(ids_file.read_text().split(), 1):
        cls = sample_id.rsplit("_", 1)[0]
        if cls not in classes:
            raise DataError(f"{ids_file}:{line_no}: {sample_id!r} names class {cls!r}, not in {names_file.name}")
        entries.append((root / cls / f"{sample_id}.txt", classes.index(cls)))

    def read(path: Path, label: int) -> Data:
        rows = _read_rows(path, 6)
        return make_cloud(rows[:, :3], x=rows[:, 3:6], x_kind="normal", y=[label], name=str(path))

    return LazyClouds(entries, read, classes)


def read_shapenetpart(root: str | Path, split: str = "train") -> LazyClouds:
    """shapenetcore_partanno_segmentation_benchmark_v0_normal/ (read lazily): synsetoffset2category.txt,
    train_test_split/shuffled_{train,val,test}_file_list.json ("shape_data/<synset>/<id>") and
    <synset>/<id>.txt rows x y z nx ny nz part. y = the part ids (checked against the category's parts),
    category = the index of the category in synsetoffset2category.txt, x = the normals."""
    split = _split_name(split, ("train", "val", "test", "trainval"))
    root = Path(root)
    table = root / "synsetoffset2category.txt"
    if not table.is_file():
        raise DataError(f"{table}: not found (expected the ShapeNetPart normal benchmark folder)")
    categories = [line.split() for line in table.read_text().splitlines() if line.strip()]
    names = [c[0] for c in categories]
    synset_index = {c[1]: i for i, c in enumerate(categories)}
    unknown = [n for n in names if n not in SHAPENETPART_PARTS]
    if unknown:
        raise DataError(f"{table}: unknown categories {unknown} (expected ShapeNetPart's 16)")
    entries = []
    for part in (["train", "val"] if split == "trainval" else [split]):
        listing = root / "train_test_split" / f"shuffled_{part}_file_list.json"
        if not listing.is_file():
            raise DataError(f"{listing}: not found")
        for item in json.loads(listing.read_text()):
            synset, shape_id = item.split("/")[-2:]
            if synset not in synset_index:
                raise DataError(f"{listing}: {item!r} is in synset {synset}, not in {table.name}")
            entries.append((root / synset / f"{shape_id}.txt", synset_index[synset]))

    def read(path: Path, category: int) -> Data:
        rows = _read_rows(path, 7)
        labels = rows[:, 6]
        allowed = SHAPENETPART_PARTS[names[category]]
        bad = (labels < allowed[0]) | (labels > allowed[-1]) | (labels != np.round(labels))
        if bad.any():
            raise DataError(f"{path}: part label {labels[bad][0]:g} is not a part of {names[category]} "
                            f"(parts {allowed[0]}..{allowed[-1]}; {int(bad.sum())} rows affected)")
        return make_cloud(rows[:, :3], x=rows[:, 3:6], x_kind="normal", y=labels.astype(np.int64),
                          category=category, name=str(path))

    clouds = LazyClouds(entries, read, names)
    clouds.parts = {n: SHAPENETPART_PARTS[n] for n in names}
    return clouds


# --------------------------------------------------------------------------------------------------
# a folder of meshes / point files

def _class_folders(root: Path, split: str | None) -> list[tuple[str, Path]]:
    """(class, folder of its files) for the layouts <split>/<class>/, <class>/<split>/ and <class>/."""
    if split is not None and (root / split).is_dir():
        base = root / split
        return [(d.name, d) for d in sorted(base.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    out = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name in ("train", "test"):
            continue
        if split is not None and (d / split).is_dir():
            out.append((d.name, d / split))
        elif split is None or not any((d / s).is_dir() for s in ("train", "test")):
            out.append((d.name, d))
    return out


def _files_of(folder: Path) -> list[Path]:
    suffixes = MESH_SUFFIXES + POINT_SUFFIXES
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def read_mesh_folder(root: str | Path, split: str | None = None, n_points: int = 2048, seed: int = 0,
                     cache_dir: str | Path | None = None, classes: Sequence[str] | None = None) -> CloudList:
    """A user's folder, one subfolder per class: meshes (.off .ply .obj .stl) are sampled to n_points surface
    points (area-uniform, seeded, cached on disk, x = the face normals) and point files (.xyz .txt .pts
    .npy) are read as they are. With split ("train" / "test") it reads <split>/<class>/ or <class>/<split>/
    (PyG's raw ModelNet10/40 layout is the latter); without, <class>/.

    A file that cannot be used (unreadable, empty or zero-area mesh, NaN coordinates) is skipped with a
    warning naming it; the returned list's `.skipped` holds every (file, reason) and a final warning gives
    the count. classes: the class list to label by (e.g. the training split's, so test labels agree)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    folders = _class_folders(root, split)
    if not folders:
        where = f"{root}/{split}" if split else str(root)
        raise DataError(f"{where}: no class subfolders (expected <class>/ folders of mesh or point files)")
    names = list(classes) if classes is not None else [name for name, _ in folders]
    clouds, skipped = CloudList(classes=names), []
    for name, folder in folders:
        if name not in names:
            raise DataError(f"{folder}: class {name!r} is not one of {names}")
        for path in _files_of(folder):
            try:
                clouds.append(_read_one(path, names.index(name), n_points, seed, cache_dir))
            except DataError as e:
                warnings.warn(f"skipped {path}: {e}")
                skipped.append((str(path), str(e)))
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} of {len(skipped) + len(clouds)} files (see .skipped)")
    if not clouds:
        raise DataError(f"{root}: no usable mesh or point files"
                        + (f" ({len(skipped)} skipped, first: {skipped[0][1]})" if skipped else ""))
    clouds.skipped = skipped
    return clouds


def _read_one(path: Path, label: int, n_points: int, seed: int, cache_dir) -> Data:
    if path.suffix.lower() in MESH_SUFFIXES:
        points, normals = mesh_samples(path, n_points, seed, cache_dir)
    else:
        points, normals = read_point_file(path)
    return make_cloud(points, x=normals, x_kind="normal" if normals is not None else None, y=[label],
                      name=str(path))
