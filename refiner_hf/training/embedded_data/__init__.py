"""
The Fashion-MNIST subset used by the trainer when no data set is given (see README.md here), and plain access to it
(NumPy only, no `datasets`): its class names and single images, e.g. to show a model trained on it one of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


SUBSET_FILE = Path(__file__).parent / "fashion_mnist_subset.npz"


def class_names() -> list[str]:
    """The ten Fashion-MNIST class names, in label order (`T-shirt/top`, `Trouser`, ...)."""
    with np.load(SUBSET_FILE) as arrays:
        return [str(name) for name in arrays["class_names"]]


def image(split: str, index: int) -> tuple[np.ndarray, int]:
    """Image `index` of `split` ("train" or "validation") as a 28x28 `uint8` array, with its label."""
    with np.load(SUBSET_FILE) as arrays:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if not 0 <= index < len(images):
            raise IndexError(f"The embedded {split} split has {len(images)} images; there is no image {index}.")
        return images[index].astype(np.uint8), int(labels[index])


__all__ = ["SUBSET_FILE", "class_names", "image"]
