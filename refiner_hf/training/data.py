"""
Data sets for the trainer: loading (`datasets` Hub ids, local `imagefolder` trees, streaming, and the embedded
Fashion-MNIST subset), the checks that run before training (columns, class names, labels against the head), and image
decoding that names the bad image. The torch datasets, sampler and collators built on them are in `loaders.py`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps

from ..image_processing_refiner_vit_common import integer_pixels_to_uint8, pil_image_to_8_bits
from .arguments import DataArguments
from .embedded_data import SUBSET_FILE
from .errors import DataError, is_main_process


EMBEDDED_DATA = SUBSET_FILE
EMBEDDED_DATASET_NAME = "fashion-mnist (embedded subset)"
# The column naming each embedded image (the arrays have no file names).
EMBEDDED_ID_COLUMN = "image_id"


# Data-set problems (a missing column, labels that do not fit the head, an image that cannot be decoded, ...) are
# `refiner_hf.cli.DataError`s: one line, exit status 1. A bad flag stays a `UsageError` (exit status 2).

# Decoding a huge image can take all the machine's memory: one over Pillow's decompression-bomb limit
# (PIL.Image.MAX_IMAGE_PIXELS, a warning; twice that, an error) is a bad image like any other.
DECOMPRESSION_BOMBS = (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning)
SKIP_BAD_IMAGES_HINT = "pass --skip_bad_images to skip (and count) the images that cannot be decoded."


def original_message(message: str) -> str:
    """
    The message an error had in a DataLoader worker: torch re-raises it in the main process with the worker's
    traceback, whose last line is `module.ErrorClass: message`.
    """
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


class WorkerSafeDataError(DataError):
    """A [`DataError`] that keeps its one-line message when a DataLoader worker raised it (see [`original_message`])."""

    def __init__(self, message: str = "") -> None:
        super().__init__(original_message(str(message)))


class BadImageError(WorkerSafeDataError, ValueError):
    """An image that cannot be decoded; the message names the data set index and, when known, the file."""


@dataclass
class ImageData:
    """The splits to train and evaluate on, with what the checks found out about them."""

    train: datasets.Dataset | datasets.IterableDataset
    validation: datasets.Dataset
    class_names: list[str] | None
    num_labels: int
    description: str


# Loading


def embedded_image_ids(split: str, count: int) -> list[str]:
    """
    Stable names of the embedded images, `fashion_mnist/<split>_<index>`: the arrays have no file names, and relabel
    maps (token labeling) are looked up by name, the same whichever subset or order a run selects.
    """
    return [f"fashion_mnist/{split}_{index:05d}" for index in range(count)]


def with_embedded_image_ids(split: datasets.Dataset, split_name: str) -> datasets.Dataset:
    """An embedded split, in its stored order, with the `image_id` column of [`embedded_image_ids`]."""
    return split.add_column(EMBEDDED_ID_COLUMN, embedded_image_ids(split_name, len(split)))


def load_embedded_dataset() -> datasets.DatasetDict:
    """
    The Fashion-MNIST subset shipped with the package: 3,400 training and 1,000 test images, 28x28 grayscale, stored as
    `uint8` arrays (an `Array2D` image column in NumPy format, which [`decode_image`] turns into PIL images).
    [`load_image_data`] names its images (see [`with_embedded_image_ids`]).
    """
    arrays = np.load(EMBEDDED_DATA)
    class_names = [str(name) for name in arrays["class_names"]]
    features = datasets.Features(
        {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(names=class_names)}
    )
    splits = {
        split: datasets.Dataset.from_dict(
            {"image": arrays[f"{split}_images"], "label": arrays[f"{split}_labels"].astype(np.int64)},
            features=features,
        ).with_format("numpy")
        for split in ("train", "validation")
    }
    return datasets.DatasetDict(splits)


def _load_splits(args: DataArguments) -> tuple[datasets.DatasetDict | datasets.IterableDatasetDict, str]:
    if args.uses_embedded_data:
        return load_embedded_dataset(), EMBEDDED_DATASET_NAME
    if args.dataset_name is not None:
        try:
            loaded = datasets.load_dataset(
                args.dataset_name, args.dataset_config, cache_dir=args.cache_dir, streaming=args.streaming
            )
        except OSError as error:  # not found locally nor on the Hub (or the Hub cannot be reached)
            raise DataError(f"--dataset_name {args.dataset_name}: cannot load it: {_first_line(error)}") from None
        return loaded, args.dataset_name
    folders = {args.train_split: args.train_dir}
    if args.validation_dir is not None:
        folders[args.validation_split] = args.validation_dir
    for flag, folder in zip(("--train_dir", "--validation_dir"), folders.values()):
        check_image_folder(flag, folder)
    data_files = {split: str(Path(folder) / "**") for split, folder in folders.items()}
    loaded = datasets.load_dataset(
        "imagefolder", data_files=data_files, cache_dir=args.cache_dir, streaming=args.streaming
    )
    return loaded, f"imagefolder {args.train_dir}"


def check_image_folder(flag: str, folder: str | Path) -> None:
    """
    Raises a [`DataError`] for an image folder that `imagefolder` would load without labels, saying what the layout
    must be (one sub-folder per class) and what was found: no files, or images directly in the folder (with no class
    sub-folder, or next to them). A folder with an `imagefolder` metadata file (which may hold the labels) is left to
    the column checks.
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    root = Path(folder)
    layout = f"the layout must be one sub-folder per class, each holding that class's images ({folder}/<class>/<image>)"
    if not any(path.is_file() for path in root.rglob("*")):
        raise DataError(f"{flag} {folder}: no files in it; {layout}.")
    entries = sorted(root.iterdir())
    if any(entry.name in ImageFolder.METADATA_FILENAMES for entry in entries):
        return
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    loose = [entry.name for entry in entries if entry.is_file() and entry.suffix.lower() in extensions]
    if not loose:
        return
    classes = [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
    example = f"{len(loose)} image{'s' if len(loose) > 1 else ''} directly in it (e.g. {loose[0]})"
    if not classes:
        raise DataError(f"{flag} {folder}: {example} and no class sub-folder; {layout}.")
    shown = ", ".join(classes[:5]) + (f", ... ({len(classes)} in all)" if len(classes) > 5 else "")
    raise DataError(
        f"{flag} {folder}: {example} next to the class sub-folders ({shown}), which would leave every image "
        f"unlabelled; {layout}: move them into their class's sub-folder."
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_image_data(args: DataArguments, seed: int, num_labels: int | None = None) -> ImageData:
    """
    Loads the training and validation splits the data arguments select and checks them: the image and label columns
    exist in both, the splits have the same class names, and labels are non-negative integers. Map-style training
    sets are shuffled with `seed` before `max_train_samples` are taken; a missing validation split is held out of the
    training split (`train_val_split`, drawn with `seed`). The label range against the model's head is checked by
    [`check_labels`] once the head's size is known.
    """
    splits, description = _load_splits(args)
    if args.train_split not in splits:
        raise DataError(f"{description} has no split {args.train_split!r} (it has {list(splits)}); see --train_split.")
    train = splits[args.train_split]
    if args.uses_embedded_data:
        # Named in the stored order, before any split or selection: relabel maps are found by these names. (Checked
        # first, so that a column error lists the data set's own columns.)
        check_columns(train, args.train_split, args.image_column_name, args.label_column_name)
        train = with_embedded_image_ids(train, args.train_split)
    if args.validation_split in splits:
        validation = splits[args.validation_split]
    elif args.streaming:
        raise DataError(
            f"{description} has no split {args.validation_split!r} (it has {list(splits)}); a streamed data set cannot "
            "be split, so give --validation_split."
        )
    elif args.train_val_split > 0:
        stratify = isinstance(train.features.get(args.label_column_name), datasets.ClassLabel)
        held_out = train.train_test_split(
            test_size=args.train_val_split,
            seed=seed,
            stratify_by_column=args.label_column_name if stratify else None,
        )
        train, validation = held_out["train"], held_out["test"]
    else:
        raise DataError(
            f"{description} has no split {args.validation_split!r} (it has {list(splits)}); give --validation_split, "
            "--validation_dir or a --train_val_split fraction."
        )
    for name, split in ((args.train_split, train), (args.validation_split, validation)):
        check_columns(split, name, args.image_column_name, args.label_column_name)
    if isinstance(validation, datasets.IterableDataset):
        # Evaluation needs the exact size (to count every sample once across processes): the streamed validation
        # split is stored locally, images undecoded.
        stream = _undecoded(validation, args.image_column_name)

        def examples():
            yield from stream

        validation = datasets.Dataset.from_generator(examples, features=stream.features, cache_dir=args.cache_dir)
    class_names = split_class_names(train, validation, args.label_column_name)

    full_train = train
    if isinstance(train, datasets.Dataset):
        if args.max_train_samples is not None:
            train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))

    if isinstance(train, datasets.Dataset):
        check_classes_are_trained(full_train, train, validation, args, class_names)
    train = _undecoded(train, args.image_column_name)
    validation = _undecoded(validation, args.image_column_name)
    labels_in_data = len(class_names) if class_names else _max_label(validation, args.label_column_name) + 1
    if isinstance(train, datasets.Dataset) and not class_names:
        labels_in_data = max(labels_in_data, _max_label(train, args.label_column_name) + 1)
    data = ImageData(train, validation, class_names, num_labels=labels_in_data, description=description)
    if num_labels is not None:
        check_labels(data, args.label_column_name, num_labels)
    return data


def _undecoded(split, image_column: str):
    """Turns off `datasets`' image decoding: images are decoded by [`decode_image`], which names bad files."""
    feature = split.features[image_column] if split.features else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return split.cast_column(image_column, datasets.Image(decode=False))
    return split


def check_columns(split, split_name: str, image_column: str, label_column: str) -> None:
    """Raises a `DataError` naming a missing image or label column and the columns there are."""
    columns = list(split.features) if split.features else list(split.column_names or [])
    for kind, column, flag in (
        ("image", image_column, "--image_column_name"),
        ("label", label_column, "--label_column_name"),
    ):
        if column not in columns:
            raise DataError(
                f"The {split_name!r} split has no {kind} column {column!r}; its columns are {columns}. "
                f"Name the right one with {flag}."
            )
    label_feature = split.features[label_column] if split.features else None
    if label_feature is not None and not (
        isinstance(label_feature, datasets.ClassLabel)
        or (isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint")))
    ):
        raise DataError(
            f"The label column {label_column!r} of the {split_name!r} split holds {label_feature}, not class indices "
            "(a ClassLabel or an integer column)."
        )


def split_class_names(train, validation, label_column: str) -> list[str] | None:
    """The class names of the label column, which both splits must share (a `DataError` names the difference)."""
    train_feature = train.features[label_column] if train.features else None
    validation_feature = validation.features[label_column] if validation.features else None
    names = train_feature.names if isinstance(train_feature, datasets.ClassLabel) else None
    validation_names = validation_feature.names if isinstance(validation_feature, datasets.ClassLabel) else None
    if names is not None and validation_names is not None and names != validation_names:
        only_train = sorted(set(names) - set(validation_names))[:5]
        only_validation = sorted(set(validation_names) - set(names))[:5]
        raise DataError(
            f"The training and validation splits label different classes ({len(names)} vs {len(validation_names)}"
            f" names; only in training: {only_train}, only in validation: {only_validation}, or the order differs). "
            "Give both splits the same class sub-directories or ClassLabel names."
        )
    return names or validation_names


def _max_label(split: datasets.Dataset, label_column: str) -> int:
    labels = np.asarray(split.with_format("numpy")[label_column])
    if labels.size and labels.min() < 0:
        raise DataError(f"The label column {label_column!r} holds negative labels ({int(labels.min())}).")
    return int(labels.max()) if labels.size else -1


def _labels(split: datasets.Dataset, label_column: str) -> np.ndarray:
    return np.asarray(split.select_columns([label_column]).with_format("numpy")[label_column])


def check_classes_are_trained(
    full_train, train, validation, args: DataArguments, class_names: list[str] | None
) -> None:
    """
    Refuses validation classes that the training split has no image of (a head could never learn to predict them),
    and says so when only `--max_train_samples` left them out.
    """
    column = args.label_column_name
    untrained = sorted(set(_labels(validation, column).tolist()) - set(_labels(train, column).tolist()))
    if not untrained:
        return

    def named(labels: list[int]) -> str:
        shown = [f"{class_names[i]!r} ({i})" if class_names and i < len(class_names) else str(i) for i in labels]
        return ", ".join(shown[:5]) + (f", ... ({len(labels)} in all)" if len(labels) > 5 else "")

    missing_everywhere = (
        sorted(set(untrained) - set(_labels(full_train, column).tolist())) if train is not full_train else untrained
    )
    if missing_everywhere:
        raise DataError(
            f"The validation images include classes with no training image: {named(missing_everywhere)}; a model "
            "trained on these data could never predict them. Add training images of those classes, or leave them "
            "out of the validation data."
        )
    if not is_main_process():  # every process of `accelerate launch` meets it: said once
        return
    print(
        f"Note: --max_train_samples {args.max_train_samples} leaves no training image of some classes the validation "
        f"images include ({named(untrained)}); the model cannot learn them in this run.",
        flush=True,
    )


def check_labels(data: ImageData, label_column: str, num_labels: int) -> None:
    """Raises a `DataError` when the data set's labels do not fit a classifier head of `num_labels` classes."""
    if data.num_labels > num_labels:
        raise DataError(
            f"{data.description} has {data.num_labels} classes (labels 0..{data.num_labels - 1}) but the model's "
            f"head has {num_labels} outputs; give the model at least {data.num_labels} labels."
        )


# Decoding


def example_name(value: Any, index: int) -> str:
    """How an image is named in messages: its file path when the data set has one, else its index."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"image {index} ({path})" if path else f"image {index}"


def decode_image(value: Any, index: int) -> PIL.Image.Image:
    """
    Decodes an image column value (`datasets` image dict, path, PIL image or array) completely, so that a corrupt or
    truncated file, or a decompression bomb (an image over Pillow's `MAX_IMAGE_PIXELS`), fails here with a
    [`BadImageError`] naming it rather than later inside a transform (or by taking the machine's memory).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            return _decode(value)
    except DECOMPRESSION_BOMBS as error:
        raise BadImageError(f"Cannot decode {example_name(value, index)}: too large: {error}") from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as error:
        raise BadImageError(f"Cannot decode {example_name(value, index)}: {error}") from error


def _decode(value: Any) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "biu":  # `datasets`' NumPy format widens integer arrays to int64
            value = integer_pixels_to_uint8(value)
        image = PIL.Image.fromarray(value)
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = PIL.Image.open(io.BytesIO(value["bytes"]))
    else:
        image = datasets.Image().decode_example(value if isinstance(value, dict) else {"path": value, "bytes": None})
    image.load()
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
        image = PIL.ImageOps.exif_transpose(image)
    image = pil_image_to_8_bits(image)  # 16-bit and float images keep their brightness, as in the processors
    return image


__all__ = [
    "BadImageError",
    "DECOMPRESSION_BOMBS",
    "WorkerSafeDataError",
    "EMBEDDED_DATASET_NAME",
    "EMBEDDED_ID_COLUMN",
    "ImageData",
    "check_columns",
    "check_image_folder",
    "check_labels",
    "decode_image",
    "embedded_image_ids",
    "example_name",
    "load_embedded_dataset",
    "load_image_data",
    "split_class_names",
    "with_embedded_image_ids",
]
