"""download_url against a real HTTP server on 127.0.0.1: success, resume, checksums, errors, offline mode."""

import hashlib
import os
import socket
import warnings
from pathlib import Path

import pytest

from mambakit.data import (ChecksumError, DownloadError, OfflineError, UnverifiedDownloadWarning, download_url,
                           is_offline, mambakit_home, sha256_file)
from mambakit.data import download as download_module
from mambakit.data.testing import FileServer

DATA = os.urandom(300_000)   # a few 64 KiB chunks, so a connection can break in the middle of the body
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with FileServer({"blob.bin": DATA}) as s:
        yield s


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(download_module, "RETRY_WAIT_S", 0.0)
    monkeypatch.delenv("MAMBAKIT_OFFLINE", raising=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_download_success_verifies_and_places(server, tmp_path):
    dest = tmp_path / "out" / "blob.bin"
    assert download_url(server.url("blob.bin"), dest, SHA, progress=False) == dest
    assert dest.read_bytes() == DATA
    assert _leftovers(dest.parent) == ["blob.bin"]          # no .part left behind
    assert server.requests_for("blob.bin") == [None]


def test_present_file_with_right_hash_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(DATA)
    download_url(server.url("blob.bin"), dest, SHA, progress=False)
    assert server.requests == []


def test_present_file_with_wrong_hash_is_replaced(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    with pytest.warns(UserWarning, match="differs from the pinned"):
        download_url(server.url("blob.bin"), dest, SHA, progress=False)
    assert dest.read_bytes() == DATA


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    server.drop_after["blob.bin"] = [100_000]
    dest = tmp_path / "blob.bin"
    download_url(server.url("blob.bin"), dest, SHA, progress=False)
    assert dest.read_bytes() == DATA
    # The first attempt got 100,000 bytes; the second asked for the rest only.
    assert server.requests_for("blob.bin") == [None, "bytes=100000-"]


def test_partial_file_survives_failure_and_next_call_resumes(server, tmp_path):
    server.drop_after["blob.bin"] = [70_000, 50_000]          # two broken attempts, retries=1
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="partial file .* is kept"):
        download_url(server.url("blob.bin"), dest, SHA, progress=False, retries=1)
    part = dest.with_name("blob.bin.part")
    assert not dest.exists()
    assert part.stat().st_size == 120_000 and part.read_bytes() == DATA[:120_000]
    download_url(server.url("blob.bin"), dest, SHA, progress=False)
    assert dest.read_bytes() == DATA and not part.exists()
    assert server.requests_for("blob.bin") == [None, "bytes=70000-", "bytes=120000-"]


def test_server_ignoring_range_restarts_from_scratch(tmp_path):
    with FileServer({"blob.bin": DATA}, ignore_range=True) as server:
        dest = tmp_path / "blob.bin"
        dest.with_name("blob.bin.part").write_bytes(b"x" * 5000)   # a stale partial file
        download_url(server.url("blob.bin"), dest, SHA, progress=False)
        assert dest.read_bytes() == DATA
        assert server.requests_for("blob.bin") == ["bytes=5000-"]


def test_complete_partial_file_answered_416_is_kept(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(DATA)
    download_url(server.url("blob.bin"), dest, SHA, progress=False)
    assert dest.read_bytes() == DATA
    assert server.requests_for("blob.bin") == [f"bytes={len(DATA)}-"]


def test_checksum_mismatch_is_refused_and_nothing_is_left(server, tmp_path):
    dest = tmp_path / "blob.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download_url(server.url("blob.bin"), dest, wrong, progress=False)
    message = str(info.value)
    assert server.url("blob.bin") in message and wrong in message and SHA in message
    assert _leftovers(tmp_path) == []


def test_size_mismatch_is_refused(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"expected 10 bytes, got {len(DATA)}"):
        download_url(server.url("blob.bin"), tmp_path / "blob.bin", None, progress=False, size=10)
    assert _leftovers(tmp_path) == []


def test_404_names_the_url(server, tmp_path):
    url = server.url("missing.bin")
    with pytest.raises(DownloadError) as info:
        download_url(url, tmp_path / "missing.bin", progress=False)
    assert url in str(info.value) and "404" in str(info.value)
    assert not isinstance(info.value, ChecksumError)
    assert _leftovers(tmp_path) == []


def test_unreachable_host_names_the_url(tmp_path):
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(DownloadError, match=f"could not reach {url}"):
        download_url(url, tmp_path / "x.bin", progress=False, timeout=5)


def test_offline_mode_refuses_to_download(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "1")
    dest = tmp_path / "blob.bin"
    with pytest.raises(OfflineError) as info:
        download_url(server.url("blob.bin"), dest, SHA, progress=False)
    assert "MAMBAKIT_OFFLINE=1" in str(info.value) and str(dest) in str(info.value)
    assert server.requests == []
    dest.write_bytes(DATA)              # what is cached is still served
    assert download_url(server.url("blob.bin"), dest, SHA, progress=False) == dest


def test_unpinned_download_warns_with_the_computed_hash(server, tmp_path):
    with pytest.warns(UnverifiedDownloadWarning, match=SHA):
        download_url(server.url("blob.bin"), tmp_path / "blob.bin", None, progress=False)


def test_pinned_download_does_not_warn(server, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        download_url(server.url("blob.bin"), tmp_path / "blob.bin", SHA.upper(), progress=False)


def test_malformed_sha256_is_a_value_error(server, tmp_path):
    with pytest.raises(ValueError, match="64 hex digits"):
        download_url(server.url("blob.bin"), tmp_path / "blob.bin", "abc", progress=False)


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(DATA)
    assert sha256_file(path) == SHA


def test_cache_home_and_offline_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAKIT_HOME", str(tmp_path / "a" / "b"))
    assert mambakit_home() == (tmp_path / "a" / "b").resolve() and mambakit_home().is_dir()
    monkeypatch.delenv("MAMBAKIT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mambakit_home() == (tmp_path / "home" / ".cache" / "mambakit").resolve()
    for value, expected in [("1", True), ("TRUE", True), ("on", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("MAMBAKIT_OFFLINE", value)
        assert is_offline() is expected
    monkeypatch.setenv("MAMBAKIT_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="MAMBAKIT_OFFLINE='maybe'"):
        is_offline()


def test_concurrent_callers_download_once(server, tmp_path):
    """Every rank of a torchrun job may ask for the same file at once: one downloads, the others wait for the
    lock and then find the file in place."""
    import threading

    dest = tmp_path / "blob.bin"
    results, errors = [], []

    def worker():
        try:
            results.append(download_url(server.url("blob.bin"), dest, SHA, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and results == [dest] * 4
    assert dest.read_bytes() == DATA
    assert server.requests_for("blob.bin") == [None]


def test_a_host_that_never_answers_is_unreachable_not_a_broken_transfer(tmp_path):
    """A port that accepts the connection (the kernel's backlog) but never answers: every attempt times out
    before a byte arrives. The error says the URL could not be reached and leaves no partial file."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.bin"
        with pytest.raises(DownloadError) as info:
            download_url(url, tmp_path / "x.bin", progress=False, timeout=0.3, retries=1)
    message = str(info.value)
    assert message.startswith(f"could not reach {url}: ") and "(2 attempts)" in message, message
    assert "partial file" not in message
    assert _leftovers(tmp_path) == []
