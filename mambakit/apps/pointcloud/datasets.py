"""The point-cloud app's registered datasets (cheap to import: `mambakit data list` loads it).

cgal-meshes: Debian bookworm's `libcgal-demo` 5.5.1-2 package (24 MB), pinned by sha256. Its
`usr/share/doc/libcgal-dev/data.tar.gz` holds CGAL's demo data, whose `data/meshes/` has 138 .off meshes
(animals, people, mechanical parts, primitives, surface patches). `mambakit.apps.pointcloud.cgal` unpacks the
.deb in pure Python and builds the app's offline classification and part-segmentation sets from them.
A copy of the .deb downloaded elsewhere is taken from $MAMBAKIT_CGAL_DEB (or `mambakit data fetch
cgal-meshes --from FILE`).

ModelNet40, ScanObjectNN and ShapeNetPart are not redistributable here: the readers in `data.py` read the
files users already have.
"""

from mambakit.data import DatasetEntry, LocalSource, RemoteFile, UrlSource

__all__ = ["CGAL_DEB_URL", "CGAL_DEB_ENV", "CGAL_MESHES", "DATASETS"]

CGAL_DEB_URL = "http://deb.debian.org/debian/pool/main/c/cgal/libcgal-demo_5.5.1-2_all.deb"
CGAL_DEB_ENV = "MAMBAKIT_CGAL_DEB"

CGAL_MESHES = DatasetEntry(
    name="cgal-meshes", app="pointcloud",
    description="CGAL 5.5.1 demo meshes (138 .off files) from Debian's libcgal-demo package; the app builds a "
                "6-class mesh classification set and a part-segmentation set from them",
    files=[RemoteFile("libcgal-demo_5.5.1-2_all.deb",
                      sha256="78b09b23d4d6d1bf15552a1060b419ab3fc09918486462faed197e5fc6ac3735", size=24358884,
                      sources=[UrlSource(CGAL_DEB_URL), LocalSource(env=CGAL_DEB_ENV)])],
    homepage="https://packages.debian.org/bookworm/libcgal-demo",
    licence="CGAL: GPL-3+ / LGPL-3+ (Debian copyright file); the meshes carry no per-file licence",
    citation="The CGAL Project: CGAL User and Reference Manual, 5.5.1 (2022)")
DATASETS = [CGAL_MESHES]
