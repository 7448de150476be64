"""The CGAL demo-mesh sets: the .deb unpacked in pure Python (a tiny fake .deb served from 127.0.0.1, so a
fresh clone without network passes), the class table and split by mesh family, the part rule, determinism and
the cache. The real .deb is checked when a copy is at hand ($MAMBAKIT_CGAL_DEB or /tmp)."""

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from mambakit.apps.pointcloud import cgal
from mambakit.apps.pointcloud.cgal import (CGAL_CLASSES, MESH_TABLE, build_cgal_classification,
                                           build_cgal_partseg, cgal_mesh_dir, extract_deb_meshes, read_ar,
                                           select_meshes, split_by_family)
from mambakit.apps.pointcloud.datasets import CGAL_DEB_URL, CGAL_MESHES
from mambakit.data import DataError, DatasetEntry, LocalSource, RemoteFile, UrlSource, register_dataset
from mambakit.data.registry import unregister_dataset
from mambakit.data.testing import FileServer

REAL_DEB = Path(os.environ.get("MAMBAKIT_CGAL_DEB") or "/tmp/libcgal-demo_5.5.1-2_all.deb")


def off_text(mesh) -> str:
    lines = ["OFF", f"{len(mesh.vertices)} {len(mesh.faces)} 0"]
    lines += [" ".join(f"{c:.6f}" for c in v) for v in mesh.vertices]
    lines += ["3 " + " ".join(map(str, f)) for f in mesh.faces]
    return "\n".join(lines) + "\n"


def ellipsoid(scale):
    mesh = trimesh.creation.icosphere(subdivisions=3)
    mesh.vertices = mesh.vertices * np.asarray(scale)
    return mesh


def fake_meshes() -> dict[str, str]:
    """Files named after table entries: three 'animals' (elongated ellipsoids) and three 'loops' (tori), one
    mesh too coarse, one excluded on purpose, one unknown."""
    return {
        "cow.off": off_text(ellipsoid((3, 1, 1))), "bull.off": off_text(ellipsoid((2.5, 1.2, 1))),
        "pig.off": off_text(ellipsoid((1, 1, 2.8))),
        "knot.off": off_text(trimesh.creation.torus(1.0, 0.3)), "eight.off": off_text(trimesh.creation.torus(1.0, 0.5)),
        "handle.off": off_text(trimesh.creation.torus(1.0, 0.2)),
        "sphere966.off": off_text(trimesh.creation.icosphere(subdivisions=1)),
        "boeing.off": off_text(ellipsoid((1, 1, 1))), "mystery.off": off_text(ellipsoid((1, 2, 1))),
    }


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ar_bytes(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += [header, data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def fake_deb(meshes: dict[str, str] | None = None, data_member: str = "data.tar.xz") -> bytes:
    meshes = fake_meshes() if meshes is None else meshes
    inner = {f"data/meshes/{name}": text.encode() for name, text in meshes.items()}
    inner["data/points_3/cloud.xyz"] = b"0 0 0\n"                       # not under meshes/: left out
    inner_tgz = tar_bytes(inner, "w:gz")
    mode = {"data.tar.xz": "w:xz", "data.tar.gz": "w:gz"}.get(data_member, "w")
    outer = tar_bytes({"./usr/share/doc/libcgal-dev/data.tar.gz": inner_tgz,
                       "./usr/share/doc/libcgal-demo/copyright": b"GPL"}, mode)
    return ar_bytes({"debian-binary": b"2.0\n", "control.tar.xz": b"x", data_member: outer})


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meshes")
    for name, text in fake_meshes().items():
        (folder / name).write_text(text)
    (folder / "notes.txt").write_text("not a mesh")
    return folder


# ----------------------------------------------------------------------------------------------- the .deb

def test_ar_and_nested_tars_unpack_flat(tmp_path):
    deb = tmp_path / "fake.deb"
    deb.write_bytes(fake_deb())
    members = read_ar(deb)
    assert list(members) == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    offset, size = members["debian-binary"]
    assert deb.read_bytes()[offset:offset + size] == b"2.0\n"
    written = extract_deb_meshes(deb, tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(fake_meshes())
    assert (tmp_path / "out" / "cow.off").read_text() == fake_meshes()["cow.off"]


def test_bad_debs_say_what_is_wrong(tmp_path):
    deb = tmp_path / "not.deb"
    deb.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(DataError, match=r"not\.deb: not a \.deb / ar archive"):
        read_ar(deb)
    deb.write_bytes(fake_deb(data_member="data.tar.zst"))
    with pytest.raises(DataError, match=r"data\.tar\.zst is zstd-compressed.*pip install zstandard"):
        extract_deb_meshes(deb, tmp_path / "out")
    deb.write_bytes(ar_bytes({"debian-binary": b"2.0\n", "data.tar.gz": tar_bytes({"a": b"1"}, "w:gz")}))
    with pytest.raises(DataError, match="no usr/share/doc/libcgal-dev/data.tar.gz inside"):
        extract_deb_meshes(deb, tmp_path / "out")


@pytest.fixture
def served_entry(monkeypatch, tmp_path):
    """A registry entry like cgal-meshes whose .deb is the fake one, on a local HTTP server."""
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAMBAKIT_OFFLINE", raising=False)
    monkeypatch.delenv("MAMBAKIT_CGAL_DEB_TEST", raising=False)
    data = fake_deb()
    with FileServer({"libcgal-demo_test_all.deb": data}) as server:
        entry = DatasetEntry(name="cgal-meshes-test", app="pointcloud", description="fake",
                             files=[RemoteFile("libcgal-demo_test_all.deb", sha256=hashlib.sha256(data).hexdigest(),
                                               size=len(data),
                                               sources=[UrlSource(server.url("libcgal-demo_test_all.deb")),
                                                        LocalSource(env="MAMBAKIT_CGAL_DEB_TEST")])])
        register_dataset(entry, replace=True)
        yield server, data
        unregister_dataset(entry.name)


def test_download_verify_unpack_once(served_entry):
    server, _ = served_entry
    folder = cgal_mesh_dir(dataset="cgal-meshes-test")
    assert sorted(p.name for p in folder.glob("*.off")) == sorted(fake_meshes())
    assert (folder / ".complete").read_text().split() == sorted(fake_meshes())
    assert cgal_mesh_dir(dataset="cgal-meshes-test") == folder
    assert len(server.requests_for("libcgal-demo_test_all.deb")) == 1


def test_unreachable_mirror_says_in_one_line_what_to_do(served_entry, tmp_path, monkeypatch):
    server, data = served_entry
    server.files.clear()                                              # the mirror answers 404
    with pytest.raises(DataError) as caught:
        cgal_mesh_dir(dataset="cgal-meshes-test")
    first_line = str(caught.value).splitlines()[0]
    assert "$MAMBAKIT_CGAL_DEB" in first_line and CGAL_DEB_URL in first_line and "folder of meshes" in first_line
    copy = tmp_path / "downloaded.deb"
    copy.write_bytes(data)
    monkeypatch.setenv("MAMBAKIT_CGAL_DEB_TEST", str(copy))            # the local source then serves it
    assert (cgal_mesh_dir(dataset="cgal-meshes-test") / "cow.off").is_file()


def test_registered_entry_pins_the_debian_file():
    remote = CGAL_MESHES.files[0]
    assert remote.sha256 == "78b09b23d4d6d1bf15552a1060b419ab3fc09918486462faed197e5fc6ac3735"
    assert remote.sources[0].url == CGAL_DEB_URL and remote.sources[1].env == "MAMBAKIT_CGAL_DEB"


# ------------------------------------------------------------------------------------------------ the sets

def test_selection_reasons_and_split_by_family(mesh_dir):
    kept, dropped = select_meshes(mesh_dir)
    assert sorted(m.file for m in kept) == ["bull.off", "cow.off", "eight.off", "handle.off", "knot.off", "pig.off"]
    reasons = dict(dropped)
    assert reasons["sphere966.off"] == "80 faces < 500"
    assert "vehicle" in reasons["boeing.off"] and reasons["mystery.off"] == "not in the class table"
    for m in kept:                                                      # normalised into the unit sphere
        assert np.linalg.norm(m.vertices, axis=1).max() == pytest.approx(1.0)
    test = split_by_family(kept, 0.34, seed=0)
    assert len(test & {"cow", "bull", "pig"}) == 1 and len(test & {"knot", "eight", "handle"}) == 1
    assert split_by_family(kept, 0.34, seed=0) == test


def test_near_duplicate_meshes_share_a_family():
    """The split is by family, so these pairs can never land on both sides."""
    for a, b in [("elephant", "refined_elephant"), ("rotor", "rotor_small"), ("blobby", "blobby-shuffled"),
                 ("fandisk", "fandisk_large"), ("lion", "lion-head"), ("patch-20", "patch-30")]:
        assert MESH_TABLE[a] == MESH_TABLE[b]
    assert {cls for cls, _ in MESH_TABLE.values()} == set(CGAL_CLASSES)
    assert not set(cgal.EXCLUDED) & set(MESH_TABLE)


def test_classification_set_is_deterministic_and_cached(mesh_dir, tmp_path, monkeypatch):
    sets = build_cgal_classification(n_points=128, samples_per_mesh=2, test_fraction=0.34, mesh_dir=mesh_dir,
                                      cache_dir=tmp_path)
    train, test = sets["train"], sets["test"]
    assert (len(train), len(test)) == (8, 4)
    meshes = lambda clouds: {c.name.split("#")[0] for c in clouds}
    assert not meshes(train) & meshes(test)
    assert sorted(int(c.y) for c in test) == [0, 0, 4, 4]                # one family of each class
    for c in train:
        assert c.pos.shape == (128, 3)
        assert c.pos.norm(dim=1).max().item() == pytest.approx(1.0, abs=1e-5)
    assert train.classes == CGAL_CLASSES and "80 faces < 500" in dict(train.skipped).values()
    again = build_cgal_classification(n_points=128, samples_per_mesh=2, test_fraction=0.34, mesh_dir=mesh_dir)
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(train, again["train"]))
    other = build_cgal_classification(n_points=128, samples_per_mesh=2, test_fraction=0.34, seed=1,
                                      mesh_dir=mesh_dir)
    assert not torch.equal(other["train"][0].pos, train[0].pos)
    monkeypatch.setattr(cgal, "select_meshes", lambda *a, **k: pytest.fail("the cached set was not used"))
    cached = build_cgal_classification(n_points=128, samples_per_mesh=2, test_fraction=0.34, mesh_dir=mesh_dir,
                                       cache_dir=tmp_path)
    assert [c.name for c in cached["test"]] == [c.name for c in test]
    assert all(torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y) for a, b in zip(cached["test"], test))


def test_part_rule_cuts_along_the_distinct_axis():
    mesh = cgal.Mesh("cigar.off", "animal", "cigar", ellipsoid((3, 1, 1)).vertices / 3,
                     ellipsoid((3, 1, 1)).faces)
    slabs, ratio = cgal.principal_slabs(mesh)
    assert ratio > 5 and abs(slabs.axis[0]) == pytest.approx(1, abs=1e-2)
    points = np.array([[0.0, 0.3, 0], [0.5, 0, 0], [-0.95, 0, 0.1], [0.95, 0, 0]])
    assert cgal._part_labels(points, slabs).tolist() == [0, 1, 2, 2]     # symmetric: both ends are part 2
    disc = ellipsoid((1, 1, 0.2))
    slabs, _ = cgal.principal_slabs(cgal.Mesh("disc.off", "blob", "disc", disc.vertices, disc.faces))
    assert abs(slabs.axis[2]) == pytest.approx(1, abs=1e-2)                # a disc is cut across its thickness
    ball = trimesh.creation.icosphere(subdivisions=3)
    assert cgal.principal_slabs(cgal.Mesh("ball.off", "blob", "ball", ball.vertices, ball.faces))[0] is None


def test_partseg_set_labels_within_the_category(mesh_dir):
    sets = build_cgal_partseg(n_points=120, samples_per_mesh=2, test_fraction=0.34, mesh_dir=mesh_dir)
    train = sets["train"]
    assert train.parts["loop"] == [12, 13, 14] and len(train) + len(sets["test"]) == 12
    for c in train:
        parts = train.parts[CGAL_CLASSES[int(c.category)]]
        assert c.y.shape == (120,) and set(c.y.tolist()) <= set(parts)
        counts = torch.bincount(c.y - parts[0], minlength=3).float() / 120
        assert counts.min() > 0.2                                       # the tercile cuts balance the parts


# ------------------------------------------------------------------------------------------- the real .deb

@pytest.mark.skipif(not REAL_DEB.is_file(), reason=f"no copy of libcgal-demo at {REAL_DEB} "
                                                   f"(set MAMBAKIT_CGAL_DEB to run this test)")
def test_real_deb_meshes_match_the_table(tmp_path):
    digest = hashlib.sha256(REAL_DEB.read_bytes()).hexdigest()
    assert digest == CGAL_MESHES.files[0].sha256
    files = extract_deb_meshes(REAL_DEB, tmp_path)
    assert sum(p.suffix == ".off" for p in files) == 138
    kept, dropped = select_meshes(tmp_path)
    assert sorted(m.file[:-4] for m in kept) == sorted(MESH_TABLE)        # every listed mesh is usable
    counts = {cls: len({m.family for m in kept if m.cls == cls}) for cls in CGAL_CLASSES}
    assert counts == {"animal": 13, "human": 8, "mechanical": 11, "blob": 9, "loop": 6, "surface": 9}
    test = split_by_family(kept, 0.3, seed=0)
    assert len(test) == 4 + 2 + 3 + 3 + 2 + 3
