"""Image data sets that several training scripts read, found offline first."""

import gzip
import shutil
import subprocess
from pathlib import Path

from train.common import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package dataset-fashion-mnist puts the original gzipped idx files."""

FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def fashion_mnist(data_dir: Path, train: bool, log=print):
    """torchvision's ``FashionMNIST`` (official 60k/10k split) under ``data_dir``, from the first source that has it:

    1. ``data_dir`` already holding it (``DIR/FashionMNIST/raw/``, as torchvision lays it out);
    2. Debian's ``dataset-fashion-mnist`` (installed with apt-get when missing and apt-get can run): its files are
       unpacked into ``DIR/FashionMNIST/raw/``, where torchvision finds them (Debian recompressed them, so the
       ``.gz`` checksums torchvision knows do not match; the idx contents are the originals);
    3. torchvision's ``download=True``, for machines with internet.

    Says which source was used; raises ``DataError`` with one line when none works.
    """
    from torchvision import datasets

    raw = Path(data_dir) / "FashionMNIST" / "raw"
    if all((raw / name.removesuffix(".gz")).exists() for name in FASHION_MNIST_FILES):
        source = f"{raw}"
    elif _debian_fashion_mnist():
        raw.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            with gzip.open(DEBIAN_FASHION_MNIST / name) as packed, open(raw / name.removesuffix(".gz"), "wb") as idx:
                shutil.copyfileobj(packed, idx)
        source = f"Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})"
    else:
        source = "torchvision download"
    try:
        dataset = datasets.FashionMNIST(root=data_dir, train=train, download=True)
    except Exception as error:  # URLError, checksum or format errors: one line, not a traceback
        raise DataError(f"no Fashion-MNIST: not in {raw}, not in {DEBIAN_FASHION_MNIST} (apt-get install "
                        f"dataset-fashion-mnist), and the download failed: {type(error).__name__}: {error}") from None
    if train:
        log(f"Fashion-MNIST from {source}: {len(dataset)} training images")
    return dataset


def _debian_fashion_mnist() -> bool:
    """Whether Debian's files are there, installing the package first when apt-get can run (as root)."""
    if not all((DEBIAN_FASHION_MNIST / name).is_file() for name in FASHION_MNIST_FILES) and shutil.which("apt-get"):
        print("Fashion-MNIST: installing Debian's dataset-fashion-mnist (apt-get)...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], capture_output=True)
    return all((DEBIAN_FASHION_MNIST / name).is_file() for name in FASHION_MNIST_FILES)
