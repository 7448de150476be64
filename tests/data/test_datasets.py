"""The dataset registry and fetch(): sources in order, local paths, offline mode, transforms, app discovery."""

import gzip
import hashlib
import lzma
import pickle
import warnings

import pytest

from mambakit.apps import register_app, unregister_app
from mambakit.data import (ChecksumError, DatasetEntry, DownloadError, LocalSource, OfflineError, PackageSource,
                           RemoteFile, UnknownEntryError, UrlSource, cached_files, dataset_dir, fetch, fetch_file,
                           get_dataset, list_datasets, register_dataset, unregister_dataset)
from mambakit.data import download as download_module
from mambakit.data.testing import FileServer
from mambakit.engine.app import App

CSV = b"date,value\n2020-01-01,1.5\n2020-01-02,2.5\n"
CSV_SHA = hashlib.sha256(CSV).hexdigest()
LABELS = b"id,label\n1,a\n2,b\n"
LABELS_SHA = hashlib.sha256(LABELS).hexdigest()


@pytest.fixture(autouse=True)
def _isolation(tmp_path, monkeypatch):
    """A fresh cache per test, online, and no dataset left registered afterwards."""
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAMBAKIT_OFFLINE", raising=False)
    monkeypatch.setattr(download_module, "RETRY_WAIT_S", 0.0)
    from mambakit.data import registry
    monkeypatch.setattr(registry, "_DATASETS", {})


@pytest.fixture
def server():
    with FileServer({"mirror/series.csv": CSV, "labels.csv": LABELS,
                     "series.csv.gz": gzip.compress(CSV, mtime=0)}) as s:
        yield s


def _entry(server, *sources, name="toy", **file_kwargs):
    return DatasetEntry(name=name, app="testapp", description="a toy series",
                        files=[RemoteFile("series.csv", file_kwargs.pop("sha256", CSV_SHA), list(sources), **file_kwargs)])


def test_fetch_tries_sources_in_order(server):
    register_dataset(_entry(server, UrlSource(server.url("gone/series.csv")), UrlSource(server.url("mirror/series.csv"))))
    folder = fetch("toy", progress=False)
    assert folder == dataset_dir("toy")
    assert (folder / "series.csv").read_bytes() == CSV
    assert [p for p, _ in server.requests] == ["/gone/series.csv", "/mirror/series.csv"]
    fetch("toy", progress=False)                     # cached: no more requests
    assert len(server.requests) == 2


def test_all_sources_failing_lists_every_attempt(server):
    register_dataset(_entry(server, UrlSource(server.url("a/series.csv")), UrlSource(server.url("b/series.csv")),
                            LocalSource(env="TOY_DATA_PATH")))
    with pytest.raises(DownloadError) as info:
        fetch("toy", progress=False)
    message = str(info.value)
    for expected in (server.url("a/series.csv"), server.url("b/series.csv"), "404", "$TOY_DATA_PATH is not set",
                     "mambakit data fetch toy --from"):
        assert expected in message
    assert not (dataset_dir("toy") / "series.csv").exists()


def test_local_source_from_environment_variable(server, tmp_path, monkeypatch):
    local = tmp_path / "mine" / "series.csv"
    local.parent.mkdir()
    local.write_bytes(CSV)
    monkeypatch.setenv("TOY_DATA_PATH", str(local))
    register_dataset(_entry(server, UrlSource(server.url("gone/series.csv")), LocalSource(env="TOY_DATA_PATH")))
    assert fetch_file("toy", "series.csv", progress=False).read_bytes() == CSV


def test_local_source_with_wrong_content_is_refused(server, tmp_path, monkeypatch):
    local = tmp_path / "series.csv"
    local.write_bytes(b"not the data")
    monkeypatch.setenv("TOY_DATA_PATH", str(local))
    register_dataset(_entry(server, LocalSource(env="TOY_DATA_PATH")))
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch("toy", progress=False)
    assert local.read_bytes() == b"not the data"              # the user's file is untouched
    assert not (dataset_dir("toy") / "series.csv").exists()


def test_from_path_replaces_the_sources(server, tmp_path):
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv"))))
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "series.csv").write_bytes(CSV)
    assert (fetch("toy", local_path=folder, progress=False) / "series.csv").read_bytes() == CSV
    assert server.requests == []


def test_from_path_is_strict(server, tmp_path):
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv"))))
    with pytest.raises(DownloadError, match="no file named series.csv"):
        fetch("toy", local_path=tmp_path, progress=False)
    wrong = tmp_path / "series.csv"
    wrong.write_bytes(CSV + b"extra\n")
    with pytest.raises(ChecksumError):
        fetch("toy", local_path=wrong, progress=False)
    assert server.requests == []                              # never fell back to the network


def test_from_a_file_needs_a_folder_for_multi_file_datasets(server, tmp_path):
    register_dataset(DatasetEntry("two", "testapp", "two files", [
        RemoteFile("series.csv", CSV_SHA, [UrlSource(server.url("mirror/series.csv"))]),
        RemoteFile("labels.csv", LABELS_SHA, [UrlSource(server.url("labels.csv"))])]))
    (tmp_path / "series.csv").write_bytes(CSV)
    (tmp_path / "labels.csv").write_bytes(LABELS)
    (tmp_path / "other.csv").write_bytes(CSV)
    with pytest.raises(DownloadError, match="has 2 files"):
        fetch("two", local_path=tmp_path / "other.csv", progress=False)
    folder = fetch("two", local_path=tmp_path, progress=False)
    assert sorted(p.name for p in folder.glob("*.csv")) == ["labels.csv", "series.csv"]
    assert cached_files(get_dataset("two")) == ["series.csv", "labels.csv"]


def test_offline_mode_names_the_missing_file_and_how_to_get_it(server, monkeypatch):
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv")),
                            PackageSource("toypkg", "1.0", "toypkg/data/series.csv")))
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        fetch("toy", progress=False)
    message = str(info.value)
    for expected in ("MAMBAKIT_OFFLINE=1", "'toy'", "series.csv", str(dataset_dir("toy") / "series.csv"),
                     server.url("mirror/series.csv"), "toypkg==1.0", "mambakit data fetch toy"):
        assert expected in message
    assert server.requests == []
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "0")
    fetch("toy", progress=False)
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")              # now cached: offline works
    assert (fetch("toy", progress=False) / "series.csv").read_bytes() == CSV


def test_gunzip_transform(server):
    gz = gzip.compress(CSV, mtime=0)
    register_dataset(DatasetEntry("gz", "testapp", "gzipped", [
        RemoteFile("series.csv", hashlib.sha256(gz).hexdigest(), [UrlSource(server.url("series.csv.gz"))],
                   size=len(gz), transform="gunzip")]))
    folder = fetch("gz", progress=False)
    assert (folder / "series.csv").read_bytes() == CSV
    assert not any((folder / ".raw").glob("series.csv*"))     # the raw file is gone once transformed


def test_xz_pickle_transform_needs_a_pinned_hash_and_converts(tmp_path):
    pd = pytest.importorskip("pandas")
    with pytest.raises(ValueError, match="needs a pinned sha256"):
        RemoteFile("x.csv", None, [UrlSource("https://example.org/x.xz")], transform="xz-pickle-to-csv")
    frame = pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]}, index=pd.Index(["r1", "r2"], name="row"))
    raw = tmp_path / "x.xz"
    raw.write_bytes(lzma.compress(pickle.dumps(frame)))
    from mambakit.data.transforms import get_transform
    get_transform("xz-pickle-to-csv")(raw, tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text() == "row,a,b\nr1,1,0.5\nr2,2,1.5\n"


def test_callable_transform_failure_leaves_nothing(server):
    def broken(raw, out):
        out.write_text("half")
        raise RuntimeError("boom")
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv")), transform=broken))
    with pytest.raises(DownloadError, match="transform 'broken' failed: RuntimeError: boom"):
        fetch("toy", progress=False)
    assert not (dataset_dir("toy") / "series.csv").exists()
    assert not (dataset_dir("toy") / "series.csv.part").exists()


def test_declaration_errors():
    with pytest.raises(ValueError, match="unknown transform 'unrar'"):
        RemoteFile("x", None, [], transform="unrar")
    with pytest.raises(ValueError, match="plain file name"):
        RemoteFile("a/b.csv", None, [])
    with pytest.raises(TypeError, match="must be UrlSource"):
        RemoteFile("x", None, ["https://example.org/x"])
    with pytest.raises(ValueError, match="not an http"):
        UrlSource("example.org/x")
    with pytest.raises(ValueError, match="duplicate file names"):
        DatasetEntry("d", "a", "", [RemoteFile("x", None, []), RemoteFile("x", None, [])])
    with pytest.raises(ValueError, match="files is empty"):
        DatasetEntry("d", "a", "", [])


def test_registry_duplicates_and_lookup_errors(server):
    entry = register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv"))))
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv"))))   # equal: a no-op
    other = _entry(server, UrlSource(server.url("elsewhere/series.csv")))
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(other)
    register_dataset(other, replace=True)
    assert get_dataset("toy") is other and entry is not other
    with pytest.raises(UnknownEntryError, match="unknown dataset 'tyo' \\(did you mean 'toy'\\?\\)"):
        get_dataset("tyo")
    with pytest.raises(UnknownEntryError, match="no file 'series.cvs' \\(did you mean 'series.csv'\\?\\)"):
        fetch_file("toy", "series.cvs")
    unregister_dataset("toy")
    with pytest.raises(UnknownEntryError):
        get_dataset("toy")


def test_datasets_of_discovered_apps_are_registered(server):
    entry = _entry(server, UrlSource(server.url("mirror/series.csv")), name="from-app")
    register_app(App(name="dataapp", description="an app with a dataset", datasets=[entry]))
    try:
        assert get_dataset("from-app") is entry
        assert entry in list_datasets()
    finally:
        unregister_app("dataapp")


def test_verify_refetches_a_damaged_cached_file(server):
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv"))))
    path = fetch_file("toy", "series.csv", progress=False)
    path.write_bytes(b"damaged")
    assert fetch_file("toy", "series.csv", progress=False).read_bytes() == b"damaged"   # trusted by default
    with pytest.warns(UserWarning, match="differs from the pinned"):
        assert (fetch("toy", verify=True, progress=False) / "series.csv").read_bytes() == CSV
    assert len(server.requests) == 2


# --------------------------------------------------------------------------------------------------
# git blob ids: the pin of a file published in a git repository that could not be hashed here

CSV_BLOB = hashlib.sha1(b"blob %d\0" % len(CSV) + CSV).hexdigest()


def test_git_blob_id_is_what_git_hash_object_prints(tmp_path, etth1_csv):
    from mambakit.data.download import git_blob_id
    for content, blob in ((b"", "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"),
                          (b"hello\n", "ce013625030ba8dba906f756967f9e9ca394464a")):
        (tmp_path / "f").write_bytes(content)
        assert git_blob_id(tmp_path / "f") == blob
    # the blob id `git ls-tree` lists for ETT-small/ETTh1.csv in zhouhaoyi/ETDataset@1d16c8f
    assert git_blob_id(etth1_csv) == "a52c4925778c07c1ef1a2cf6fd01594919717d9e"


def test_a_git_blob_id_verifies_a_download_without_sha256(server, capsys):
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv")), sha256=None, git_blob=CSV_BLOB))
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # no UnverifiedDownloadWarning: the file is pinned
        assert fetch_file("toy", "series.csv", progress=False).read_bytes() == CSV
    assert f"its sha256 is {CSV_SHA}" in capsys.readouterr().err     # the hash to pin, printed


def test_a_wrong_git_blob_id_is_refused_from_urls_and_local_files(server, tmp_path, monkeypatch):
    wrong = "0123456789abcdef0123456789abcdef01234567"
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv")), sha256=None, git_blob=wrong))
    with pytest.raises(DownloadError, match=f"git blob id mismatch: expected {wrong}, got {CSV_BLOB}"):
        fetch("toy", progress=False)
    assert not (dataset_dir("toy") / "series.csv").exists()
    local = tmp_path / "series.csv"
    local.write_bytes(CSV)
    monkeypatch.setenv("TOY_DATA_PATH", str(local))
    register_dataset(_entry(server, LocalSource(env="TOY_DATA_PATH"), sha256=None, git_blob=wrong), replace=True)
    with pytest.raises(DownloadError, match="git blob id mismatch"):
        fetch("toy", progress=False)
    assert local.read_bytes() == CSV and not (dataset_dir("toy") / "series.csv").exists()


def test_verify_refetches_a_cached_file_that_no_longer_matches_its_git_blob(server):
    register_dataset(_entry(server, UrlSource(server.url("mirror/series.csv")), sha256=None, git_blob=CSV_BLOB))
    fetch_file("toy", "series.csv", progress=False).write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="git blob id .* differs from the pinned"):
        assert (fetch("toy", verify=True, progress=False) / "series.csv").read_bytes() == CSV


def test_malformed_or_redundant_git_blob_is_a_declaration_error():
    with pytest.raises(ValueError, match="git_blob must be 40 hex digits"):
        RemoteFile("x.csv", None, [UrlSource("http://127.0.0.1/x.csv")], git_blob="abc")
    with pytest.raises(ValueError, match="give sha256 or git_blob, not both"):
        RemoteFile("x.csv", CSV_SHA, [UrlSource("http://127.0.0.1/x.csv")], git_blob=CSV_BLOB)
