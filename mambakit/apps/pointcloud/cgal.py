"""The app's offline data: classification and part-segmentation sets built from CGAL's demo meshes.

Where the meshes come from: Debian's `libcgal-demo` 5.5.1-2 .deb (registered as dataset "cgal-meshes", pinned
by sha256; $MAMBAKIT_CGAL_DEB names a copy downloaded elsewhere). A .deb is an `ar` archive whose
`data.tar.xz` (this one; .gz / .bz2 are read the same way, .zst needs the `zstandard` module) holds
`usr/share/doc/libcgal-dev/data.tar.gz`, whose `data/meshes/` holds the meshes. All of it is unpacked here in
pure Python (no apt, no dpkg) into `<cache>/datasets/cgal-meshes/meshes/`.

Classification set (`build_cgal_classification`): six coarse groups, chosen after looking at every mesh with
at least 500 faces (`MESH_TABLE` lists each mesh file with its class and its family):
    animal       13 families, 17 files: armadillo, bears, bull, bunny, camel, Chinese dragon, cow, dinosaur,
                 diplodocus, elephants, lions, pig, triceratops
    human         8: Homer, a man, two busts (mannequin-devil, Nefertiti), a head, a hand, a femur, foot bones
    mechanical   11 families, 15 files: CAD parts (ALSTOM part, anchor, blade, coupling, fandisk, holes,
                 mech-holes-shark, pinion, rotor, spool, turbine)
    blob          9 families, 14 files: closed smooth primitives and blobs (blobby, cheese, meshed cube,
                 cylinder, ellipsoid, helmet, oblong box, retinal molecule surface, spheres)
    loop          6: genus >= 1 shapes (figure eight, elk sculpture, handle, three knots)
    surface       9 families, 10 files: open surfaces and height fields (terrain patches, planes, a cone
                 mask, horizons, a paraboloid)
A family groups files that are the same shape at another resolution or with edits (elephant /
elephant-with-holes / refined_elephant, rotor / rotor_small, ...): the train / test split is by family,
stratified by class and seeded, so no shape is seen in both. Left out on purpose (`EXCLUDED`): boeing (the
only vehicle), cactus (the only plant), mushroom (a torus on a cone: loop or blob?), b9_mesh (unidentified
open fragments); every mesh under `MIN_FACES` faces or with zero area is dropped with its reason.
Each file gives `samples_per_mesh` clouds: the mesh normalised into the unit sphere, `n_points` points drawn
uniformly by area, then a rotation about the up axis (y) by an angle in [0, 2 pi), an anisotropic scale in
[0.8, 1.25] per axis, and normalisation into the unit sphere again; every draw comes from a generator seeded
by (seed, file, sample index), so a set is the same on every machine and does not depend on file order.

Part-segmentation set (`build_cgal_partseg`): the same meshes, categories = the six classes, three parts per
category (part ids 3c, 3c+1, 3c+2, as ShapeNetPart gives each category its own ids; 18 in all). The rule: in
the mesh's own normalised frame, take its most distinct principal axis (PCA of 20,000 area-uniform surface
points: the long axis of an elongated shape, the thickness axis of a disc: whichever eigenvalue ratio,
lambda1/lambda2 or lambda2/lambda3, is larger) and cut the surface by the distance |t| of each point from the
plane through the centre across that axis, at the 1/3 and 2/3 quantiles of |t|: part 0 = the central slab,
1 = the two slabs beside it, 2 = the two ends (a disc's two faces). Why this rule: it is defined for every
mesh with a distinct axis (most CGAL meshes are one connected component, so components would label almost
nothing, and the OFF files carry no face groups); it does not depend on an arbitrary sign (a rule telling
the two ends apart had to drop 41 of 70 meshes whose ends are not distinguishable); parts are balanced; it is
fixed per mesh, independent of the pose a sample is drawn in; and predicting it needs global shape reasoning
(find the axis, then the centre plane), not a threshold on one coordinate. Meshes without a distinct axis
(best ratio under `MIN_AXIS_RATIO`: spheres, a cube, gears) are dropped from this set with that reason.
Labels are assigned before the pose (rotation about y, a milder per-axis scale in [0.9, 1.1]) and travel
with their points.

Size: 1024 points per cloud (PCM's and PointNet++'s input size; their stage reducers assume it). The points
are i.i.d. area-uniform samples in random order, so `FirstPoints(512)` gives an equally valid 512-point cloud
where a demo must be faster.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mambakit.data import DownloadError, dataset_dir, fetch, file_lock, get_dataset, register_dataset
from mambakit.data.errors import DataError

from .data import CloudList, MESH_SUFFIXES, load_mesh, make_cloud, rotation_about, sample_mesh
from .datasets import CGAL_DEB_ENV, CGAL_DEB_URL, CGAL_MESHES

__all__ = ["CGAL_CLASSES", "MESH_TABLE", "EXCLUDED", "MIN_FACES", "MIN_AXIS_RATIO", "read_ar", "extract_deb_meshes",
           "cgal_mesh_dir", "select_meshes", "split_by_family", "build_cgal_classification",
           "build_cgal_partseg", "PARTS_PER_CATEGORY"]

CGAL_CLASSES = ["animal", "human", "mechanical", "blob", "loop", "surface"]
MIN_FACES = 500
MIN_AXIS_RATIO = 1.2
PARTS_PER_CATEGORY = 3
#: per-axis scale range of the sample poses: milder for segmentation, whose parts are cut along an axis that
#: a strong anisotropic scale could make no longer the most distinct one
CLS_SCALE, SEG_SCALE = (0.8, 1.25), (0.9, 1.1)
_SET_VERSION = 1   # bump when the way the sets are built changes: cached sets of older versions are ignored


def _families(cls: str, groups: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    return {f: (cls, family) for family, files in groups.items() for f in files}


def _singles(cls: str, files: str) -> dict[str, tuple[str, str]]:
    return {f: (cls, f) for f in files.split()}


#: mesh file stem -> (class, family)
MESH_TABLE: dict[str, tuple[str, str]] = {
    **_singles("animal", "armadillo bull bunny00 camel ChineseDragon-10kv cow dino diplodocus pig triceratops"),
    **_families("animal", {"bear": ["bear", "bear_bis"], "lion": ["lion", "lion-head"],
                           "elephant": ["elephant", "elephant-with-holes", "refined_elephant"]}),
    **_singles("human", "homer man mannequin-devil nefertiti head hand femur bones"),
    **_singles("mechanical", "ALSTOM_TEST4 blade couplingdown holes mech-holes-shark spool turbine"),
    **_families("mechanical", {"anchor": ["anchor", "anchor_dense"], "fandisk": ["fandisk", "fandisk_large"],
                               "pinion": ["pinion", "pinion_small"], "rotor": ["rotor", "rotor_small"]}),
    **_singles("blob", "cheese cube-meshed ellipe0.003 helmet retinal"),
    **_families("blob", {"blobby": ["blobby", "blobby-shuffled", "blobby_3cc"],
                         "cylinder": ["cylinder", "cylinder_locally_refined"],
                         "oblong": ["oblong", "oblong-shuffled"], "sphere": ["larger_sphere", "sphere966"]}),
    **_singles("loop", "eight elk handle knot knot1 knot2"),
    **_singles("surface", "horizons mask_cone mesh_with_border patch-01 plane polygon_mesh "
                          "poly2x^2+y^2-0.062500 three_peaks"),
    **_families("surface", {"patch-20": ["patch-20", "patch-30"]}),
}

#: meshes with enough faces that are left out on purpose, and why
EXCLUDED = {
    "boeing": "the only vehicle (and 122 loose components)",
    "cactus": "the only plant",
    "mushroom": "ambiguous between loop and blob (a torus on a cone)",
    "b9_mesh": "unidentified open fragments",
}


# --------------------------------------------------------------------------------------------------
# the .deb

def read_ar(path: str | Path) -> dict[str, tuple[int, int]]:
    """The members of an `ar` archive (a .deb): name -> (offset of its data, size)."""
    path = Path(path)
    members = {}
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{path}: not a .deb / ar archive (no '!<arch>' signature)")
        while True:
            header = f.read(60)
            if not header:
                break
            if len(header) < 60 or header[58:60] != b"`\n":
                raise DataError(f"{path}: truncated or corrupt ar member header at byte {f.tell() - len(header)}")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            members[name] = (f.tell(), size)
            f.seek(size + (size & 1), os.SEEK_CUR)
    return members


def _open_data_tar(deb: Path) -> tarfile.TarFile:
    members = read_ar(deb)
    names = [n for n in members if n.startswith("data.tar")]
    if not names:
        raise DataError(f"{deb}: no data.tar.* member (members: {', '.join(members)})")
    name = names[0]
    offset, size = members[name]
    with open(deb, "rb") as f:
        f.seek(offset)
        payload = io.BytesIO(f.read(size))
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{deb}: its {name} is zstd-compressed, which Python's tarfile cannot read; "
                            f"`pip install zstandard` and try again") from None
        return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(payload), mode="r|")
    if not name.endswith((".xz", ".gz", ".bz2", ".tar")):
        raise DataError(f"{deb}: unknown compression of {name}")
    return tarfile.open(fileobj=payload, mode="r:*")


def extract_deb_meshes(deb: str | Path, out_dir: str | Path) -> list[Path]:
    """Unpack the mesh files of `data/meshes/` (inside the .deb's `.../libcgal-dev/data.tar.gz`) into out_dir,
    flat, by base name only (no member path is trusted). Returns the written files."""
    deb, out_dir = Path(deb), Path(out_dir)
    inner = None
    with _open_data_tar(deb) as outer:
        for member in outer:
            if member.isfile() and member.name.endswith("libcgal-dev/data.tar.gz"):
                inner = outer.extractfile(member).read()
                break
    if inner is None:
        raise DataError(f"{deb}: no usr/share/doc/libcgal-dev/data.tar.gz inside (is it libcgal-demo?)")
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as data:
        for member in data:
            parts = member.name.split("/")
            base = parts[-1]
            if (member.isfile() and "meshes" in parts[:-1] and base.lower().endswith(MESH_SUFFIXES)
                    and base not in ("", ".", "..")):
                target = out_dir / base
                target.write_bytes(data.extractfile(member).read())
                written.append(target)
    if not written:
        raise DataError(f"{deb}: its data.tar.gz has no data/meshes/ files")
    return written


def _deb_missing_message(error: Exception) -> str:
    return (f"could not get the CGAL demo meshes: set ${CGAL_DEB_ENV} to a downloaded copy of {CGAL_DEB_URL} "
            f"(or run `mambakit data fetch cgal-meshes --from FILE`), or point the app at your own folder of "
            f"meshes (one subfolder per class).\n{error}")


def cgal_mesh_dir(local_path: str | Path | None = None, dataset: str = CGAL_MESHES.name) -> Path:
    """The folder of unpacked CGAL meshes, fetching the .deb (verified) and unpacking it once."""
    folder = dataset_dir(dataset) / "meshes"
    done = folder / ".complete"
    if done.is_file():
        return folder
    if dataset == CGAL_MESHES.name:
        register_dataset(CGAL_MESHES)   # a no-op once the app has registered it
    try:
        deb_folder = fetch(dataset, local_path=local_path)
    except DownloadError as e:
        raise DataError(_deb_missing_message(e)) from e
    deb = deb_folder / get_dataset(dataset).files[0].name
    with file_lock(deb_folder / ".meshes.lock"):
        if not done.is_file():
            part = folder.with_name("meshes.part")
            shutil.rmtree(part, ignore_errors=True)
            files = extract_deb_meshes(deb, part)
            (part / ".complete").write_text("\n".join(sorted(p.name for p in files)) + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(part, folder)
    return folder


# --------------------------------------------------------------------------------------------------
# choosing meshes

@dataclass
class Mesh:
    file: str
    cls: str
    family: str
    vertices: np.ndarray      # normalised into the unit sphere (bounding-box centre at 0)
    faces: np.ndarray


def _normalised(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    used = vertices[np.unique(faces)]
    centre = (used.min(0) + used.max(0)) / 2
    radius = np.linalg.norm(used - centre, axis=1).max()
    return (vertices - centre) / radius


def select_meshes(mesh_dir: str | Path, table: dict[str, tuple[str, str]] | None = None,
                  min_faces: int = MIN_FACES) -> tuple[list[Mesh], list[tuple[str, str]]]:
    """The meshes of `table` found in mesh_dir, loaded and normalised, and (file, reason) for each mesh file
    left out: not in the table (excluded on purpose or unlisted), too few faces, unreadable, zero area."""
    table = MESH_TABLE if table is None else table
    kept, dropped = [], []
    for path in sorted(Path(mesh_dir).iterdir()):
        if not path.name.lower().endswith(MESH_SUFFIXES):
            continue
        stem = path.stem
        if path.suffix.lower() != ".off":
            dropped.append((path.name, "not an .off mesh (the table lists .off files)"))
            continue
        if stem not in table:
            dropped.append((path.name, EXCLUDED.get(stem, "not in the class table")))
            continue
        try:
            vertices, faces = load_mesh(path)
        except DataError as e:
            dropped.append((path.name, f"unreadable: {e}"))
            continue
        if len(faces) < min_faces:
            dropped.append((path.name, f"{len(faces)} faces < {min_faces}"))
            continue
        from .data import triangle_areas

        if not np.isfinite(vertices).all() or not triangle_areas(vertices, faces).sum() > 0:
            dropped.append((path.name, "degenerate (zero area or non-finite vertices)"))
            continue
        cls, family = table[stem]
        kept.append(Mesh(path.name, cls, family, _normalised(vertices, faces), faces))
    return kept, dropped


def split_by_family(meshes: list[Mesh], test_fraction: float, seed: int) -> set[str]:
    """The families of the test split: per class, round(test_fraction * families) of them (at least one, and
    at least one left for training), drawn with a generator seeded by (seed, class)."""
    test = set()
    for cls in sorted({m.cls for m in meshes}):
        families = sorted({m.family for m in meshes if m.cls == cls})
        if len(families) < 2:
            raise DataError(f"class {cls!r} has {len(families)} mesh family; a split by mesh needs at least 2")
        n_test = min(len(families) - 1, max(1, round(test_fraction * len(families))))
        rng = np.random.default_rng(_seed_of(seed, "split", cls))
        test.update(families[i] for i in rng.permutation(len(families))[:n_test])
    return test


# --------------------------------------------------------------------------------------------------
# sampling

def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def _pose(points: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float]) -> np.ndarray:
    """Rotation about y, anisotropic scale, back into the unit sphere (centred on the mean)."""
    rotation = rotation_about(1, float(rng.uniform(0, 2 * math.pi))).double().numpy()
    scale = rng.uniform(*scale_range, size=3)
    posed = (points.astype(np.float64) @ rotation.T) * scale
    posed -= posed.mean(0)
    return (posed / np.linalg.norm(posed, axis=1).max()).astype(np.float32)


@dataclass
class _Slabs:
    axis: np.ndarray
    centre: np.ndarray
    cuts: np.ndarray


def principal_slabs(mesh: Mesh, seed: int = 0) -> tuple[_Slabs | None, float]:
    """The part rule's frame: the most distinct principal axis of the surface (PCA of 20,000 area-uniform
    points: the long axis when lambda1/lambda2 >= lambda2/lambda3, else the short one, i.e. the axis of a
    disc), its centre and the 1/3, 2/3 quantiles of |projection|; and that axis' eigenvalue ratio (None for
    the frame when the ratio is below MIN_AXIS_RATIO: no axis is defined, as on a sphere or a cube)."""
    points, _, _ = sample_mesh(mesh.vertices, mesh.faces, 20000, _seed_of(seed, "pca", mesh.file))
    points = points.astype(np.float64)
    centre = points.mean(0)
    _, singular, vt = np.linalg.svd(points - centre, full_matrices=False)
    var = singular ** 2
    long_ratio, short_ratio = var[0] / var[1], var[1] / max(var[2], 1e-300)
    axis, ratio = (vt[0], long_ratio) if long_ratio >= short_ratio else (vt[2], short_ratio)
    if ratio < MIN_AXIS_RATIO:
        return None, float(ratio)
    cuts = np.quantile(np.abs((points - centre) @ axis), [1 / 3, 2 / 3])
    return _Slabs(axis, centre, cuts), float(ratio)


def _part_labels(points: np.ndarray, slabs: _Slabs) -> np.ndarray:
    """0 = the slab through the centre, 1 = the two slabs beside it, 2 = the two ends (or faces of a disc)."""
    return np.digitize(np.abs((points.astype(np.float64) - slabs.centre) @ slabs.axis), slabs.cuts)


def _samples(mesh: Mesh, n_points: int, count: int, seed: int):
    for i in range(count):
        points, _, _ = sample_mesh(mesh.vertices, mesh.faces, n_points, _seed_of(seed, "sample", mesh.file, i))
        yield i, points, np.random.default_rng(_seed_of(seed, "pose", mesh.file, i))


# --------------------------------------------------------------------------------------------------
# the sets

def _cache_path(cache_dir: Path | None, kind: str, **params) -> Path | None:
    if cache_dir is None:
        return None
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    return Path(cache_dir) / f"{kind}-{tag}-v{_SET_VERSION}.pt"


def _save_sets(path: Path, sets: dict, extra: dict) -> None:
    payload = {"extra": extra}
    for split, clouds in sets.items():
        payload[split] = {"pos": torch.stack([c.pos for c in clouds]),
                          "y": torch.stack([c.y for c in clouds]),
                          "category": torch.stack([c.category for c in clouds]) if clouds and
                          getattr(clouds[0], "category", None) is not None else None,
                          "name": [c.name for c in clouds]}
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + f".{os.getpid()}.part")
    torch.save(payload, part)
    os.replace(part, path)


def _load_sets(path: Path) -> dict:
    payload = torch.load(path, weights_only=True)
    extra = payload.pop("extra")
    sets = {}
    for split, fields in payload.items():
        clouds = CloudList(classes=extra["classes"], skipped=[tuple(s) for s in extra["skipped"]])
        for i, name in enumerate(fields["name"]):
            category = None if fields["category"] is None else fields["category"][i]
            clouds.append(make_cloud(fields["pos"][i], y=fields["y"][i], category=category, name=name))
        clouds.parts = extra.get("parts")
        clouds.build_seconds = extra.get("build_seconds")
        sets[split] = clouds
    return sets


def _resolve_meshes(mesh_dir, local_path) -> tuple[Path, Path | None]:
    """(mesh folder, default cache folder): the CGAL cache, or a given folder (then no default cache)."""
    if mesh_dir is not None:
        return Path(mesh_dir), None
    folder = cgal_mesh_dir(local_path)
    return folder, folder.parent / "sets"


def build_cgal_classification(n_points: int = 1024, samples_per_mesh: int = 6, test_fraction: float = 0.3,
                              seed: int = 0, *, mesh_dir: str | Path | None = None,
                              local_path: str | Path | None = None, cache_dir: str | Path | None = None
                              ) -> dict[str, CloudList]:
    """{"train": CloudList, "test": CloudList} of labelled clouds (y = index into CGAL_CLASSES), split by mesh
    family. Built once and cached under the dataset folder (or cache_dir); `.skipped` lists the mesh files
    left out and why, `.build_seconds` the time the build took."""
    folder, default_cache = _resolve_meshes(mesh_dir, local_path)
    cache = _cache_path(Path(cache_dir) if cache_dir else default_cache, "cls", n=n_points, k=samples_per_mesh,
                        t=test_fraction, s=seed)
    if cache is not None and cache.is_file():
        return _load_sets(cache)
    started = time.perf_counter()
    meshes, dropped = select_meshes(folder)
    test_families = split_by_family(meshes, test_fraction, seed)
    sets = {"train": CloudList(classes=CGAL_CLASSES, skipped=dropped),
            "test": CloudList(classes=CGAL_CLASSES, skipped=dropped)}
    for mesh in meshes:
        split = "test" if mesh.family in test_families else "train"
        label = CGAL_CLASSES.index(mesh.cls)
        for i, points, rng in _samples(mesh, n_points, samples_per_mesh, seed):
            sets[split].append(make_cloud(_pose(points, rng, CLS_SCALE), y=[label], name=f"{mesh.file}#{i}"))
    elapsed = time.perf_counter() - started
    for clouds in sets.values():
        clouds.build_seconds = elapsed
        clouds.parts = None
    if cache is not None:
        _save_sets(cache, sets, {"classes": CGAL_CLASSES, "skipped": dropped, "build_seconds": elapsed})
    return sets


def build_cgal_partseg(n_points: int = 1024, samples_per_mesh: int = 6, test_fraction: float = 0.3,
                       seed: int = 0, *, mesh_dir: str | Path | None = None, local_path: str | Path | None = None,
                       cache_dir: str | Path | None = None) -> dict[str, CloudList]:
    """{"train", "test"} clouds with y = per-point part ids (N,) and category = index into CGAL_CLASSES;
    category c owns parts 3c..3c+2 (`.parts[name]` lists them; 18 in all). Split by mesh family as the
    classification set (same seed, same families) less the meshes whose ends cannot be told apart."""
    folder, default_cache = _resolve_meshes(mesh_dir, local_path)
    cache = _cache_path(Path(cache_dir) if cache_dir else default_cache, "seg", n=n_points, k=samples_per_mesh,
                        t=test_fraction, s=seed)
    if cache is not None and cache.is_file():
        return _load_sets(cache)
    started = time.perf_counter()
    meshes, dropped = select_meshes(folder)
    test_families = split_by_family(meshes, test_fraction, seed)
    parts = {cls: [PARTS_PER_CATEGORY * c + p for p in range(PARTS_PER_CATEGORY)]
             for c, cls in enumerate(CGAL_CLASSES)}
    sets = {"train": CloudList(classes=CGAL_CLASSES), "test": CloudList(classes=CGAL_CLASSES)}
    for mesh in meshes:
        slabs, ratio = principal_slabs(mesh, seed)
        if slabs is None:
            dropped.append((mesh.file, f"no distinct principal axis (eigenvalue ratios below {MIN_AXIS_RATIO}: "
                                       f"best {ratio:.3f})"))
            continue
        split = "test" if mesh.family in test_families else "train"
        category = CGAL_CLASSES.index(mesh.cls)
        for i, points, rng in _samples(mesh, n_points, samples_per_mesh, seed):
            labels = PARTS_PER_CATEGORY * category + _part_labels(points, slabs)
            sets[split].append(make_cloud(_pose(points, rng, SEG_SCALE), y=labels, category=category, name=f"{mesh.file}#{i}"))
    elapsed = time.perf_counter() - started
    for clouds in sets.values():
        clouds.skipped, clouds.parts, clouds.build_seconds = list(dropped), parts, elapsed
    if cache is not None:
        _save_sets(cache, sets, {"classes": CGAL_CLASSES, "skipped": dropped, "parts": parts,
                                 "build_seconds": elapsed})
    return sets
