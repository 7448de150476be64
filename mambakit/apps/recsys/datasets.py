"""Registry entries of the recommendation datasets (`mambakit data list`, `mambakit data fetch NAME`).

- ml-100k (the embedded default): RecBole's own atomic files of MovieLens-100k, shipped inside the
  `recbole` 1.2.1 wheel (`recbole/dataset_example/ml-100k/`), so a machine that only sees a package index
  gets them with `pip download --no-deps`; the same bytes are in RecBole's git tag v1.2.1. sha256 pinned.
- ml-1m and amazon-beauty: RecBole's dataset hosting (the zip archives RecBole's own auto-download uses,
  listed in `recbole/properties/dataset/url.yaml`). They could not be downloaded here (no internet besides
  the package index), so their sha256 is not pinned: fetching them prints the computed hash with an
  "unverified" warning. The app reads the atomic files straight out of the zip.

MovieLens is distributed by GroupLens under terms that restrict redistribution (RecBole redistributes it
anyway); the Amazon review data (McAuley et al.) are for research use. Cite the originals.
"""

from __future__ import annotations

from mambakit.data import DatasetEntry, LocalSource, PackageSource, RemoteFile, UrlSource

__all__ = ["ML_100K", "ML_1M", "AMAZON_BEAUTY", "DATASETS"]

_RECBOLE_RAW = "https://raw.githubusercontent.com/RUCAIBox/RecBole/v1.2.1/recbole/dataset_example/ml-100k/"
_RECBOLE_S3 = "https://recbole.s3-accelerate.amazonaws.com/ProcessedDatasets/"

_ML100K_SHA256 = {
    "ml-100k.inter": ("4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff", 1979230),
    "ml-100k.item": ("51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532", 66632),
    "ml-100k.user": ("4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972", 22697),
}

ML_100K = DatasetEntry(
    name="ml-100k", app="recsys",
    description="MovieLens-100k in RecBole's atomic format (100,000 ratings, 943 users, 1,682 movies, titles)",
    files=[RemoteFile(name, sha256=sha, size=size, sources=[
        PackageSource("recbole", "1.2.1", f"recbole/dataset_example/ml-100k/{name}"),
        UrlSource(_RECBOLE_RAW + name),
        LocalSource(env="MAMBAKIT_ML100K"),
    ]) for name, (sha, size) in _ML100K_SHA256.items()],
    homepage="https://grouplens.org/datasets/movielens/100k/",
    licence="GroupLens MovieLens terms (research use, no redistribution); files from RecBole (MIT code)",
    citation="F. M. Harper, J. A. Konstan. The MovieLens Datasets: History and Context. ACM TiiS 5(4), 2015.",
)

ML_1M = DatasetEntry(
    name="ml-1m", app="recsys",
    description="MovieLens-1M in RecBole's atomic format (1,000,209 ratings, 6,040 users, 3,706 movies); "
                "RecBole's zip, sha256 not pinned",
    files=[RemoteFile("ml-1m.zip", sha256=None, sources=[
        UrlSource(_RECBOLE_S3 + "MovieLens/ml-1m.zip"),
        LocalSource(env="MAMBAKIT_ML1M"),
    ])],
    homepage="https://grouplens.org/datasets/movielens/1m/",
    licence="GroupLens MovieLens terms (research use, no redistribution)",
    citation="F. M. Harper, J. A. Konstan. The MovieLens Datasets: History and Context. ACM TiiS 5(4), 2015.",
)

AMAZON_BEAUTY = DatasetEntry(
    name="amazon-beauty", app="recsys",
    description="Amazon Beauty ratings (2014 release) in RecBole's atomic format; RecBole's zip, sha256 not "
                "pinned",
    files=[RemoteFile("Amazon_Beauty.zip", sha256=None, sources=[
        UrlSource(_RECBOLE_S3 + "Amazon_ratings/Amazon_Beauty.zip"),
        LocalSource(env="MAMBAKIT_AMAZON_BEAUTY"),
    ])],
    homepage="https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html",
    licence="Amazon review data (McAuley et al.): research use",
    citation="R. He, J. McAuley. Ups and downs: Modeling the visual evolution of fashion trends with one-class "
             "collaborative filtering. WWW 2016.",
)

DATASETS = [ML_100K, ML_1M, AMAZON_BEAUTY]
