"""
The trainer's token-labeling targets (Jiang et al., "All Tokens Matter"): naming training images by their relabel
key, the checks made before training, and the target builder that turns each sample's relabel map into the teacher's
labels of its tokens and of its crop, following the sample's augmentation (their mixing is in `mixing.py`).

An image's relabel key is `relabel_key` of its original file name (`datasets` ImageNet: the file name; an
`imagefolder`: the path, whose parent directory is the class), or its `image_id` for the embedded Fashion-MNIST set.
`examples/generate_relabel.py` names the maps it writes with the same [`example_relabel_key`].
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import torch

from ..token_labeling import (
    PerFileRelabelStore,
    RelabelError,
    check_relabel_coverage,
    crop_soft_labels,
    open_relabel_store,
    relabel_key,
)
from ..token_labeling.store import RelabelStore
from .arguments import DataArguments, ModelArguments
from .augmentation import CropRecord
from .data import EMBEDDED_ID_COLUMN
from .errors import UsageError


# Names of the batch entries holding the teacher's labels: the tokens' (B, C, S, S) and the crops' (B, C).
DENSE_LABELS = "dense_labels"
RELABEL_CLASS_TARGETS = "relabel_class_targets"


def relabel_key_of_value(image_value: Any, image_id: Any = None) -> str | None:
    """The relabel key of an image column value (a `datasets` image dict or a path), else of the image's id."""
    path = image_value.get("path") if isinstance(image_value, dict) else image_value
    if not isinstance(path, str):
        path = None
    if path:
        return relabel_key(str(path))
    if image_id is not None:
        return str(image_id)
    return None


def example_relabel_key(example: Mapping[str, Any], image_column: str, index: int | None = None) -> str:
    """The relabel key of one example; a [`RelabelError`] when the example has neither a file name nor an id."""
    key = relabel_key_of_value(example.get(image_column), example.get(EMBEDDED_ID_COLUMN))
    if key is None:
        where = f"Training example {index}" if index is not None else "A training example"
        raise RelabelError(
            f"{where} has no file name (nor an `{EMBEDDED_ID_COLUMN}`) to look its relabel map up by; token labeling "
            "needs images stored with their original file names."
        )
    return key


def iter_relabel_keys(split: datasets.Dataset, image_column: str, batch_size: int = 65536) -> Iterator[str]:
    """
    The relabel keys of a map-style split, in order, read from the file names (and ids) alone: an `Image` column is
    flattened (zero-copy) so that its `path` is read without the image bytes.
    """
    feature = split.features.get(image_column)
    path_column = image_column if isinstance(feature, datasets.Value) and feature.dtype == "string" else None
    if isinstance(feature, datasets.Image):
        split = split.flatten()
        path_column = f"{image_column}.path"
    columns = [name for name in (path_column, EMBEDDED_ID_COLUMN) if name in split.column_names]
    if not columns:
        example_relabel_key({}, image_column, 0)  # raises: the images have neither file names nor ids
    position = 0
    for batch in split.select_columns(columns).with_format(None).iter(batch_size=batch_size):
        count = len(batch[columns[0]])
        paths = batch.get(path_column) or [None] * count
        ids = batch.get(EMBEDDED_ID_COLUMN) or [None] * count
        for path, image_id in zip(paths, ids):
            key = relabel_key_of_value(path, image_id)
            if key is None:
                example_relabel_key({}, image_column, position)  # raises, naming the example
            position += 1
            yield key


class DenseLabelBuilder:
    """
    A `target_builders` entry of the training set: a sample's teacher labels from its relabel map
    ([`crop_soft_labels`]): `dense_labels` `(num_classes, size, size)`, the map cut to the sample's crop box on the
    token grid, flipped with the image and moved with every geometric augmentation (rotation, shear, translation), in
    the order the image had them (on the crop, or on the whole image before the crop with the token-labeling order),
    and `relabel_class_targets` `(num_classes,)`, the crop's box pooled to one position: the class token's
    target of the original training. Both are label-smoothed like the class targets.

    Args:
        relabel_root: the relabel store's directory (packed or per-file).
        image_column: the data set's image column (its file names give the keys).
        output_size: side of the model's token grid.
        num_classes: classes of the model's head.
        normalization: "softmax" (stored logits) or "sum" (stored probabilities).
        smoothing: label smoothing.
        layout: "hw" (map rows are the image's y) or "wh" (transposed maps).
        store: the store already opened from `relabel_root`, if any.
    """

    def __init__(
        self,
        relabel_root: str | os.PathLike,
        image_column: str,
        output_size: int,
        num_classes: int,
        normalization: str,
        smoothing: float = 0.0,
        layout: str = "hw",
        store: RelabelStore | None = None,
    ) -> None:
        self.relabel_root = relabel_root
        self.image_column = image_column
        self.output_size = output_size
        self.num_classes = num_classes
        self.normalization = normalization
        self.smoothing = smoothing
        self.layout = layout
        self._store = store
        self._reopened = False

    @property
    def store(self) -> RelabelStore:
        if self._store is None:
            self._store = open_relabel_store(
                self.relabel_root, num_classes=self.num_classes, warn_unverified=not self._reopened
            )
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn / forkserver get the builder pickled: they reopen a packed store rather
        # than receive copies of its memory-mapped shards (and do not repeat its warnings); a per-file store travels
        # as it is, with the map shape found from its sample.
        keep = isinstance(self._store, PerFileRelabelStore)
        return {**self.__dict__, "_store": self._store if keep else None, "_reopened": True}

    def __call__(self, example: Mapping[str, Any], crop: CropRecord) -> dict[str, torch.Tensor]:
        key = example_relabel_key(example, self.image_column)
        if key not in self.store:  # a streamed set cannot be checked before training: name the image here
            raise RelabelError(f"No relabel map for training image {key!r} in {self.relabel_root}.")
        labels = crop_soft_labels(
            self.store[key],
            crop_box=(crop.top, crop.left, crop.height, crop.width),
            image_size=(crop.image_height, crop.image_width),
            output_size=self.output_size,
            num_classes=self.num_classes,
            flipped=crop.flipped,
            normalization=self.normalization,
            smoothing=self.smoothing,
            layout=self.layout,
            geometry=crop.geometry,
            output_size_pixels=crop.geometry_size,
            augmented_before_crop=crop.augmented_before_crop,
        )
        return {DENSE_LABELS: labels.dense, RELABEL_CLASS_TARGETS: labels.class_target}


def token_grid_size(model) -> int:
    """Side of the model's token grid at its training resolution."""
    size = model.config.image_size
    height, width = model.refiner_vit.embeddings.patch_embeddings.grid_size(size, size)
    if height != width:
        raise UsageError(f"Token labeling needs a square token grid, the model has {height} x {width}.")
    return height


def configure_token_labeling(model, args: ModelArguments) -> None:
    """Applies `--dense_weight` and `--mix_token` to the model's configuration (saved with the model)."""
    if args.dense_weight is not None:
        model.config.aux_loss_weight = args.dense_weight
    if args.mix_token and model.aux_classifier is None:
        raise UsageError("--mix_token needs the model's auxiliary head (config `use_aux_head`).")
    model.config.use_mix_token = args.mix_token


def build_dense_label_builder(args: DataArguments, smoothing: float, model, train_split) -> DenseLabelBuilder:
    """
    Opens `--relabel_root` and checks it against the model and the training set before training starts: the model
    has the auxiliary head, `--relabel_size` is its token grid, the store's class count matches the head and its maps
    have one (k, h, w) shape with k ≤ classes, and every training image has a map (the missing ones are named, with
    their count; a streamed set is checked image by image as it is read).
    """
    if model.aux_classifier is None:
        raise UsageError(
            "--relabel_root trains the auxiliary head with dense labels, but the model has none: build it with "
            "`use_aux_head` (the default of every preset)."
        )
    grid = token_grid_size(model)
    size = args.relabel_size if args.relabel_size is not None else grid
    if size != grid:
        raise UsageError(
            f"--relabel_size {size} differs from the model's token grid {grid} x {grid} "
            f"({model.config.image_size} px); give --relabel_size {grid}."
        )
    num_classes = model.config.num_labels
    store = open_relabel_store(args.relabel_root, num_classes=num_classes, full_check=args.relabel_full_check)
    k, height, width = store.map_shape
    if k > num_classes or min(k, height, width) < 1:
        raise RelabelError(
            f"{args.relabel_root}: maps of shape (k, h, w) = {(k, height, width)} do not fit a head of {num_classes} "
            "classes."
        )
    if isinstance(train_split, datasets.Dataset):
        try:
            check_relabel_coverage(store, list(iter_relabel_keys(train_split, args.image_column_name)))
        except RelabelError as error:
            raise RelabelError(
                f"{error} examples/generate_relabel.py relabels the training images its data arguments select: give "
                "it this run's (--dataset_name or --train_dir, --max_train_samples, --seed)."
            ) from None
    return DenseLabelBuilder(
        args.relabel_root,
        args.image_column_name,
        size,
        num_classes,
        args.relabel_normalization,
        smoothing=smoothing,
        layout=args.relabel_layout,
        store=store,
    )


__all__ = [
    "DENSE_LABELS",
    "RELABEL_CLASS_TARGETS",
    "DenseLabelBuilder",
    "build_dense_label_builder",
    "configure_token_labeling",
    "example_relabel_key",
    "iter_relabel_keys",
    "relabel_key_of_value",
    "token_grid_size",
]
