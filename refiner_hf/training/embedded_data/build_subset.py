"""
Rebuilds `fashion_mnist_subset.npz` from the full Fashion-MNIST files (Debian's `dataset-fashion-mnist` package
installs them in /usr/share/datasets/fashion-mnist):

    python -m refiner_hf.training.embedded_data.build_subset [FASHION_MNIST_DIR]

The subset is class-balanced: the first `TRAIN_PER_CLASS` images of each class from the training file and the first
`VALIDATION_PER_CLASS` of each class from the test file, in their original order.
"""

import gzip
import sys
from pathlib import Path

import numpy as np


CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
TRAIN_PER_CLASS = 340
VALIDATION_PER_CLASS = 100
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format: big-endian header, then uint8 data)."""
    data = gzip.decompress(path.read_bytes())
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def balanced_subset(images: np.ndarray, labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))]))
    return images[keep], labels[keep]


def main(source: Path = DEFAULT_SOURCE) -> None:
    train = balanced_subset(
        read_idx(source / "train-images-idx3-ubyte.gz"),
        read_idx(source / "train-labels-idx1-ubyte.gz"),
        TRAIN_PER_CLASS,
    )
    validation = balanced_subset(
        read_idx(source / "t10k-images-idx3-ubyte.gz"),
        read_idx(source / "t10k-labels-idx1-ubyte.gz"),
        VALIDATION_PER_CLASS,
    )
    np.savez_compressed(
        Path(__file__).with_name("fashion_mnist_subset.npz"),
        train_images=train[0],
        train_labels=train[1],
        validation_images=validation[0],
        validation_labels=validation[1],
        class_names=np.array(CLASS_NAMES),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE)
