"""
The torch side of the trainer's data: the training sampler and datasets, the evaluation dataset, their collators and
DataLoaders.

Every training sample is augmented under [`seeded_rng`] keyed by (seed, epoch, index), and the training sampler yields
those keys, so the data a step sees depends only on the seed and the step: resuming mid-epoch, or running on another
number of processes with the same global batch, replays it exactly.

Extension point for dense targets (token labeling): [`TrainingSet`] takes `target_builders`, functions of (example,
crop record) that return an extra per-sample tensor (or a mapping of named tensors), for instance a relabel map cut to
the crop box with `roi_align` and moved with the image's flip and geometric augmentation; the collator stacks each of
them into the batch under its name, next to `crop_boxes`, `flipped` and `indices`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..interruption import leave_stopping_to_the_main_process
from .arguments import Arguments, DataArguments
from .augmentation import CropRecord, TrainTransform, sample_seed, seeded_rng
from .data import (
    SKIP_BAD_IMAGES_HINT,
    BadImageError,
    DataError,
    ImageData,
    WorkerSafeDataError,
    decode_image,
    example_name,
)
from .errors import is_main_process


TargetBuilder = Callable[[Mapping[str, Any], CropRecord], torch.Tensor | Mapping[str, torch.Tensor]]
# With --skip_bad_images, how many undecodable images in a row a training sample may meet before the run stops.
MAX_REPLACEMENTS = 100


@dataclass(frozen=True)
class SampleRecipe:
    """
    How both training sets turn a decoded example into a sample.

    Args:
        image_column, label_column: column names.
        transform: the training transform.
        seed: the run's seed.
        num_labels: the model's number of classes; a label outside [0, num_labels) is an error naming the example.
        skip_bad_images: replace an undecodable image (counted in the sample's `bad_images`) instead of raising a
            [`BadImageError`].
        target_builders: extra per-sample targets, by name (see the module docstring).
    """

    image_column: str
    label_column: str
    transform: TrainTransform
    seed: int
    num_labels: int | None = None
    skip_bad_images: bool = False
    target_builders: Mapping[str, TargetBuilder] = field(default_factory=dict)

    def make_sample(
        self,
        example: Mapping[str, Any],
        image: PIL.Image.Image,
        seed_words: Sequence[int],
        index: int,
        bad_images: Sequence[int | str] = (),
    ) -> dict[str, Any]:
        """The augmented sample of `example` (decoded as `image`), under the random state of `seed_words`."""
        label = example[self.label_column]
        if label is None or isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise WorkerSafeDataError(f"Training example {index} has label {label!r}, not a class index.")
        if label < 0 or (self.num_labels is not None and label >= self.num_labels):
            raise WorkerSafeDataError(
                f"Training example {index} has label {label}, outside the model's {self.num_labels} classes."
            )
        with seeded_rng(*seed_words):
            pixel_values, crop = self.transform(image)
        sample = {
            "pixel_values": pixel_values,
            "labels": int(label),
            "crop": crop,
            "index": index,
            "bad_images": list(bad_images),
            # Seeds what is drawn for this sample after collation (random erasing of the mixed batch).
            "sample_seed": sample_seed(*seed_words),
        }
        for name, build in self.target_builders.items():
            built = build(example, crop)
            if isinstance(built, Mapping):  # a builder of several targets names them
                sample.update(built)
            else:
                sample[name] = built
        return sample


def with_skip_hint(error: BadImageError) -> BadImageError:
    """The error of an image that cannot be decoded, saying how to go on without it."""
    bad = BadImageError(f"{str(error).rstrip('. ')}; {SKIP_BAD_IMAGES_HINT}")
    if not is_main_process():
        # The command line prints errors on the main process only, as every process meets the same argument errors;
        # a bad image is met by the one process whose share holds it, which says so itself.
        print(f"{Path(sys.argv[0]).name}: error: {bad}", file=sys.stderr, flush=True)
    return bad


@dataclass(frozen=True)
class WorkerInit:
    """
    The loaders' `worker_init_fn`: a worker leaves Ctrl-C and SIGTERM to the main process, which stops it (see
    [`leave_stopping_to_the_main_process`]), then runs `then` (another `worker_init_fn`) if given. Torch seeds the
    worker from the loader's generator before this runs.
    """

    then: Callable[[int], None] | None = None

    def __call__(self, worker_id: int) -> None:
        leave_stopping_to_the_main_process()
        if self.then is not None:
            self.then(worker_id)


# Training data


class SampleKey(NamedTuple):
    """What the training sampler yields: the epoch and the data set index of a sample."""

    epoch: int
    index: int


class EpochSampler(Sampler[SampleKey]):
    """
    A random permutation of the data set per epoch, seeded by (seed, epoch) alone: every process computes the same
    order (accelerate then gives each process its batches), and a resumed run recomputes it.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[SampleKey]:
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        )
        for index in torch.randperm(self.num_samples, generator=generator).tolist():
            yield SampleKey(self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples


class TrainingSet(Dataset):
    """
    Map-style training set: `dataset[SampleKey(epoch, index)]` decodes example `index` of `source` (a `datasets`
    split, images undecoded) and makes it a sample with `recipe`, under the random state of (seed, epoch, index).
    """

    def __init__(self, source: datasets.Dataset, recipe: SampleRecipe) -> None:
        self.source = source
        self.recipe = recipe

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        epoch, index = key
        bad_images: list[int] = []
        position, draws = index, None
        # A bad image is replaced, so that batches keep their size (mixup pairs, equal DDP batches), by an image drawn
        # at random under the sample's seed: its neighbour would be seen twice as often.
        for _ in range(MAX_REPLACEMENTS):
            example = self.source[position]
            try:
                image = decode_image(example[self.recipe.image_column], position)
            except BadImageError as error:
                if not self.recipe.skip_bad_images:
                    raise with_skip_hint(error) from None
                bad_images.append(position)
                draws = draws or np.random.default_rng([self.recipe.seed, epoch, index])
                position = int(draws.integers(len(self.source)))
                continue
            seed_words = (self.recipe.seed, epoch, position)
            return self.recipe.make_sample(example, image, seed_words, index=position, bad_images=bad_images)
        raise BadImageError(
            f"{MAX_REPLACEMENTS} images in a row could not be decoded (e.g. image {bad_images[0]}): most of the "
            f"{len(self.source)} training images are damaged."
        )


class StreamingTrainingSet(IterableDataset):
    """
    Streamed training set for one process: its shards of the shuffled stream (`datasets.distributed.
    split_dataset_by_node`), cut to exactly `batches_per_epoch` full batches so that every process runs the same number
    of steps (the stream restarts if this process's part runs short).

    Samples are keyed by (seed, epoch, process, worker, position), and `set_skip(n)` skips the first `n` batches of the
    epoch without decoding them, so a resumed epoch replays the same data with the same number of processes and
    workers.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        recipe: SampleRecipe,
        process_index: int,
        batch_size: int,
        batches_per_epoch: int,
    ) -> None:
        self.stream = stream
        self.recipe = recipe
        self.process_index = process_index
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def set_skip(self, batches: int) -> None:
        self.skip_batches = batches

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # The DataLoader takes whole batches from the workers in turn: worker w makes batches w, w + W, ...
        batches = len(range(worker_id, self.batches_per_epoch, num_workers))
        skipped = len(range(worker_id, self.skip_batches, num_workers))
        quota, skip = batches * self.batch_size, skipped * self.batch_size
        position, bad_images = 0, []
        while position < quota:
            produced_this_pass = False
            for example in self.stream:
                produced_this_pass = True
                if position >= quota:
                    return
                position += 1
                if position <= skip:
                    continue
                try:
                    image = decode_image(example[self.recipe.image_column], position - 1)
                except BadImageError as error:
                    if not self.recipe.skip_bad_images:
                        raise with_skip_hint(error) from None
                    # The next example takes its place. (Skipped batches are not decoded, so a resumed streamed epoch
                    # that had bad images before the checkpoint is shifted by that many examples.)
                    bad_images.append(example_name(example[self.recipe.image_column], position - 1))
                    position -= 1
                    continue
                key = (self.recipe.seed, self.epoch, self.process_index, worker_id, position - 1)
                yield self.recipe.make_sample(example, image, key, index=position - 1, bad_images=bad_images)
                bad_images = []
            if not produced_this_pass:
                raise WorkerSafeDataError("The streamed training set is empty for this process.")


def collate_training_batch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """
    Stacks training samples into `pixel_values` (B, 3, H, W), `labels` (B,), `crop_boxes` (B, 4: x0, y0, x1, y1 as
    fractions of the original image), `flipped` (B,), `indices` (B,), `sample_seeds` (B,: each sample's own seed for
    what is drawn after collation), `bad_images` (a list of the undecodable images replaced) and every extra target.
    """
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "labels": torch.tensor([s["labels"] for s in samples], dtype=torch.long),
        "crop_boxes": torch.tensor([s["crop"].box_xyxy_normalized() for s in samples], dtype=torch.float32),
        "flipped": torch.tensor([s["crop"].flipped for s in samples], dtype=torch.bool),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "sample_seeds": torch.tensor([s["sample_seed"] for s in samples], dtype=torch.long),
        "bad_images": [bad for s in samples for bad in s["bad_images"]],
    }
    for name in samples[0].keys() - {"pixel_values", "labels", "crop", "index", "bad_images", "sample_seed"}:
        batch[name] = torch.stack([s[name] for s in samples])
    return batch


# Evaluation data


class EvaluationSet(Dataset):
    """Validation examples, decoded; an undecodable image is `None` with `skip_bad_images`, else an error."""

    def __init__(self, source: datasets.Dataset, image_column: str, label_column: str, skip_bad_images: bool = False):
        self.source = source
        self.image_column = image_column
        self.label_column = label_column
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[index]
        try:
            image = decode_image(example[self.image_column], index)
        except BadImageError as error:
            if not self.skip_bad_images:
                raise with_skip_hint(error) from None
            image = None
        return {"image": image, "label": int(example[self.label_column])}


class EvaluationCollator:
    """
    Prepares validation batches with the model's own image processor (what `pipeline("image-classification")` runs),
    so the accuracy measured in training is the accuracy users get. Undecodable images become a blank image with
    `valid = False`, which keeps every process's batch shape and lets the evaluation leave them out of the counts.
    """

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        size = self.image_processor.crop_size["height"], self.image_processor.crop_size["width"]
        images = [s["image"] if s["image"] is not None else PIL.Image.new("RGB", size[::-1]) for s in samples]
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return {
            "pixel_values": pixel_values,
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "valid": torch.tensor([s["image"] is not None for s in samples], dtype=torch.bool),
        }


def streaming_epoch_size(data_args: DataArguments, train: datasets.IterableDataset) -> int:
    """Number of examples in a streamed training split, from the arguments or the data set's metadata."""
    if data_args.train_samples_per_epoch is not None:
        return data_args.train_samples_per_epoch
    splits = getattr(train.info, "splits", None) or {}
    split = splits.get(data_args.train_split) if hasattr(splits, "get") else None
    if split is not None and split.num_examples:
        return split.num_examples
    raise DataError(
        "The streamed training set does not state its size; give --train_samples_per_epoch (e.g. 1281167 for "
        "ImageNet-1k)."
    )


def check_one_step_fits(
    num_samples: int, batch_size: int, num_processes: int, accumulation: int, even_batches: bool = False
) -> None:
    """
    Raises a [`DataError`] naming the sizes when an epoch of `num_samples` does not fill one optimizer step: every
    batch is full (so that mixing pairs, BatchNorm statistics and the processes' shares stay the recipe's), and a
    smaller training set would train nothing at all.
    """
    global_batch = batch_size * num_processes * accumulation
    if num_samples >= global_batch:
        return
    largest = num_samples // (num_processes * accumulation)
    if even_batches:
        largest -= largest % 2
    step = f"{batch_size} per process x {num_processes} processes x {accumulation} accumulation steps = {global_batch}"
    if largest >= (2 if even_batches else 1):
        fix = f"Lower --per_device_train_batch_size to {largest} or less"
        fix += " (even: mixup/CutMix pair the images of a batch)" if even_batches else ""
        fix += " or train on more images."
    else:
        fix = "Train on more images."
    raise DataError(
        f"The training set has {num_samples} images, fewer than one optimizer step takes ({step}): an epoch would "
        f"train nothing. {fix}"
    )


def batches_per_process(
    num_samples: int, batch_size: int, num_processes: int, accumulation: int, even_batches: bool = False
) -> int:
    """Full batches each process takes from an epoch of `num_samples`, a multiple of the accumulation steps."""
    check_one_step_fits(num_samples, batch_size, num_processes, accumulation, even_batches)
    batches = num_samples // (batch_size * num_processes)
    return batches - batches % accumulation


def build_training_loader(
    args: Arguments,
    data: ImageData,
    transform: TrainTransform,
    num_labels: int,
    process_index: int,
    num_processes: int,
    target_builders: Mapping[str, TargetBuilder] | None = None,
) -> tuple[TrainingSet | StreamingTrainingSet, DataLoader]:
    """
    The training set and its DataLoader: for a map-style set, batches of a seeded per-epoch permutation (accelerate
    hands each process its share when the loader is prepared); for a streamed set, this process's shards of the
    stream shuffled with the run's seed. `target_builders` add per-sample targets (e.g. dense labels) to the batches.
    """
    recipe = SampleRecipe(
        image_column=args.data.image_column_name,
        label_column=args.data.label_column_name,
        transform=transform,
        seed=args.training.seed,
        num_labels=num_labels,
        skip_bad_images=args.data.skip_bad_images,
        target_builders=dict(target_builders or {}),
    )
    # The loader's own generator draws the worker seeds instead of torch's global one, so creating a loader (as a
    # resumed run does) leaves the global random stream as it was; augmentation is seeded per sample anyway.
    options = dict(
        batch_size=args.training.per_device_train_batch_size,
        collate_fn=collate_training_batch,
        num_workers=args.data.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.training.seed),
        worker_init_fn=WorkerInit(),
    )
    if isinstance(data.train, datasets.IterableDataset):
        # Shuffled with the run's seed before the split, so every process skips the others' shards of one order.
        stream = data.train.shuffle(seed=args.training.seed, buffer_size=args.data.shuffle_buffer_size)
        stream = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
        batches = batches_per_process(
            streaming_epoch_size(args.data, data.train),
            args.training.per_device_train_batch_size,
            num_processes,
            args.training.gradient_accumulation_steps,
            args.training.mixing_enabled,
        )
        train_set = StreamingTrainingSet(
            stream,
            recipe,
            process_index=process_index,
            batch_size=args.training.per_device_train_batch_size,
            batches_per_epoch=batches,
        )
        return train_set, DataLoader(train_set, **options)
    train_set = TrainingSet(data.train, recipe)
    check_one_step_fits(
        len(train_set),
        args.training.per_device_train_batch_size,
        num_processes,
        args.training.gradient_accumulation_steps,
        args.training.mixing_enabled,
    )
    sampler = EpochSampler(len(train_set), seed=args.training.seed)
    return train_set, DataLoader(train_set, sampler=sampler, drop_last=True, **options)


def build_evaluation_loader(args: Arguments, data: ImageData, image_processor) -> DataLoader:
    """Validation batches prepared by the model's image processor, in order."""
    return DataLoader(
        EvaluationSet(
            data.validation, args.data.image_column_name, args.data.label_column_name, args.data.skip_bad_images
        ),
        batch_size=args.training.per_device_eval_batch_size,
        collate_fn=EvaluationCollator(image_processor),
        num_workers=args.data.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.training.seed),
        worker_init_fn=WorkerInit(),
    )


__all__ = [
    "EpochSampler",
    "EvaluationCollator",
    "EvaluationSet",
    "SampleKey",
    "StreamingTrainingSet",
    "TargetBuilder",
    "TrainingSet",
    "WorkerInit",
    "batches_per_process",
    "check_one_step_fits",
    "build_evaluation_loader",
    "build_training_loader",
    "collate_training_batch",
    "streaming_epoch_size",
]
