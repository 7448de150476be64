"""Shared data plumbing: the cache folder, checksummed downloads and the dataset registry.

    from mambakit.data import fetch
    folder = fetch("etth1")            # mambakit_home()/datasets/etth1/, every file present and verified

See `mambakit.data.registry` for how an app declares a dataset, `mambakit.data.download` for the download
contract (resume, verify, atomic placement, offline mode) and `mambakit.data.cache` for the cache layout.
"""

from mambakit.data.cache import file_lock, is_offline, mambakit_home, sha256_file
from mambakit.data.download import (ChecksumError, DownloadError, OfflineError, UnverifiedDownloadWarning,
                                    download_url, extract_wheel_member, fetch_package_member)
from mambakit.data.errors import DataError  # noqa: F401  (re-exported)
from mambakit.data.registry import (DatasetEntry, LocalSource, PackageSource, RemoteFile, UnknownEntryError,
                                    UrlSource, cached_files, dataset_dir, fetch, fetch_file, get_dataset,
                                    list_datasets, register_dataset, unregister_dataset)
from mambakit.data.transforms import register_transform

__all__ = [
    "mambakit_home", "is_offline", "sha256_file", "file_lock",
    "DownloadError", "ChecksumError", "OfflineError", "UnverifiedDownloadWarning",
    "download_url", "fetch_package_member", "extract_wheel_member",
    "UrlSource", "PackageSource", "LocalSource", "RemoteFile", "DatasetEntry", "UnknownEntryError",
    "register_dataset", "unregister_dataset", "get_dataset", "list_datasets", "dataset_dir", "cached_files",
    "fetch", "fetch_file", "register_transform",
]
