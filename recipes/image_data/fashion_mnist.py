"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: works with no Hub access.

The package holds the original IDX files (60,000 training and 10,000 test images, 28x28
grayscale, 10 classes, MIT licence). No root is needed to get them::

    apt-get download dataset-fashion-mnist          # the .deb, into the current folder
    dpkg-deb -x dataset-fashion-mnist_*.deb DIR     # IDX files in DIR/usr/share/datasets/fashion-mnist/

:func:`obtain` does exactly that into the recipe's data folder (``data/`` in the repository,
git-ignored); ``apt-get install dataset-fashion-mnist`` (root) puts them in
``/usr/share/datasets/fashion-mnist``, which is used too. As a script::

    python recipes/image_data/fashion_mnist.py [--data-dir data]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["CLASS_NAMES", "DEB_PACKAGE", "find_idx_dir", "obtain", "read_idx", "load_fashion_mnist"]

DEB_PACKAGE = "dataset-fashion-mnist"
_IDX_SUBDIR = Path("usr/share/datasets/fashion-mnist")
SYSTEM_DIR = Path("/") / _IDX_SUBDIR
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"]
HOW_TO_GET = (
    "Get Fashion-MNIST with `python recipes/image_data/fashion_mnist.py --data-dir DATA_DIR` "
    f"(runs `apt-get download {DEB_PACKAGE}` and `dpkg-deb -x` into DATA_DIR, no root needed), "
    f"or `sudo apt-get install {DEB_PACKAGE}`, or with Hub access unset HF_DATASETS_OFFLINE.")

# IDX element types (third byte of the magic number).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def find_idx_dir(data_dir: str | Path) -> Path | None:
    """Folder holding the four IDX files: under ``data_dir``, else the system install, else None."""
    for folder in (Path(data_dir) / "fashion_mnist" / _IDX_SUBDIR, SYSTEM_DIR):
        if _complete(folder):
            return folder
    return None


def obtain(data_dir: str | Path) -> Path:
    """Download and unpack the Debian package into ``data_dir/fashion_mnist``; return the IDX dir.

    Raises ``RuntimeError`` (with the manual steps) when ``apt-get``/``dpkg-deb`` are missing or fail.
    """
    found = find_idx_dir(data_dir)
    if found is not None:
        return found
    tools = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if tools:
        raise RuntimeError(f"Fashion-MNIST is not in {data_dir} and {tools} not found here. {HOW_TO_GET}")
    target = Path(data_dir) / "fashion_mnist"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp, check=True,
                           capture_output=True, text=True)
            debs = sorted(Path(tmp).glob(f"{DEB_PACKAGE}_*.deb"))
            if not debs:
                raise RuntimeError("apt-get download produced no .deb file")
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"`{' '.join(err.cmd)}` failed: {err.stderr.strip()[-500:]}\n"
                               f"(`apt-get update` first may help). {HOW_TO_GET}") from err
    if not _complete(target / _IDX_SUBDIR):
        raise RuntimeError(f"{DEB_PACKAGE} did not contain the IDX files expected in {_IDX_SUBDIR}")
    return target / _IDX_SUBDIR


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as an array: magic ``0 0 dtype ndim``, big-endian dims."""
    path = Path(path)
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, expected {expected} for shape {dims}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(data_dir: str | Path, download: bool = True):
    """``DatasetDict`` with ``train``/``test`` splits, columns ``image`` (PIL) and ``label``.

    The Arrow version is cached in ``data_dir/fashion_mnist/arrow`` (encoding 70k PNGs takes ~10 s).
    """
    import datasets

    cache = Path(data_dir) / "fashion_mnist" / "arrow"
    if (cache / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(cache))
    folder = obtain(data_dir) if download else find_idx_dir(data_dir)
    if folder is None:
        raise FileNotFoundError(f"Fashion-MNIST not found in {data_dir}. {HOW_TO_GET}")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASS_NAMES)})
    splits = {}
    for split, (images, labels) in FILES.items():
        x, y = read_idx(folder / images), read_idx(folder / labels)
        if len(x) != len(y):
            raise ValueError(f"{split}: {len(x)} images but {len(y)} labels in {folder}")
        splits[split] = datasets.Dataset.from_dict({"image": list(x), "label": y.astype(np.int64)},
                                                   features=features)
    dataset = datasets.DatasetDict(splits)
    # Written beside the cache and renamed into place, so that a run starting meanwhile (a study's
    # second worker) finds the whole cache or none, never a half-written one.
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="arrow.", dir=cache.parent))
    dataset.save_to_disk(str(staging))
    try:
        staging.rename(cache)
    except OSError:  # another run put its (identical) cache there first
        shutil.rmtree(staging, ignore_errors=True)
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="cache folder (default: data)")
    args = parser.parse_args()
    dataset = load_fashion_mnist(args.data_dir)
    print({split: len(ds) for split, ds in dataset.items()}, "->", Path(args.data_dir).resolve())


if __name__ == "__main__":
    main()
