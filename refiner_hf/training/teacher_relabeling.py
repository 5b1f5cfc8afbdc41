"""
Relabeling a training set with a teacher for token labeling: any `AutoModelForImageClassification` classifies every
position of each whole training image, and the top-k scores and classes of every position are written to a packed
relabel store that the trainer's `--relabel_root` reads. [`relabel_training_set`] does it from [`RelabelArguments`] and
the trainer's own [`DataArguments`] (which select the same training images the trainer trains on);
`examples/generate_relabel.py` is its command line.

Each image is resized whole, without cropping, to the teacher's resolution: a map must cover the whole image, because
the trainer cuts each training crop out of it. Each process relabels every num_processes-th image; an interrupted run
started again with the same output skips the images already in complete shards. The output's `relabel_run.json`
records the teacher and its preprocessing, so that a store is only continued with the same ones: another relabeling's
store, or other files, in `--output` are refused (`--overwrite_output_dir` replaces a store).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification

from ..token_labeling import PackedRelabelWriter, RelabelError, finalize_packed_store
from ..token_labeling.store import RUN_FILE, complete_shard_keys, is_store_file, store_directory_entries
from ..token_labeling.teacher import dense_teacher_logits, top_k_maps
from .arguments import ArgumentParser, DataArguments
from .data import decode_image, load_image_data
from .distributed import processes_without_accelerators
from .errors import UsageError, check_model_path, check_output_path, loading_error
from .relabel_targets import iter_relabel_keys


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# A side past this is a typo: a batch of such images alone would take tens of gigabytes.
MAX_TEACHER_IMAGE_SIZE = 4096


def _arg(help: str, **kwargs: Any) -> Any:
    return field(metadata={"help": help}, **kwargs)


@dataclass
class RelabelArguments:
    """The teacher, the store to write and how; the images come from the trainer's [`DataArguments`]."""

    _argument_group_name = "Relabeling"

    teacher: str = _arg("The teacher: a Hub id or a directory of any AutoModelForImageClassification.")
    output: str = _arg("Directory of the packed relabel store to write (or to complete).")
    top_k: int = _arg("Classes kept per position.", default=5)
    teacher_image_size: int | None = _arg(
        "Side the whole images are resized to (default: the teacher's image processor's size, else its config's).",
        default=None,
    )
    batch_size: int = _arg("Images per teacher forward pass, per process.", default=32)
    shard_size: int = _arg("Maps per shard of the store (a shard is the unit of resuming).", default=4096)
    seed: int = _arg("The trainer's --seed (it selects --max_train_samples and the held-out split).", default=42)
    overwrite_output_dir: bool = _arg(
        "Replace a relabel store already in --output that another relabeling (another teacher or preprocessing) "
        "wrote; without it such a store is refused, and one of the same settings is continued.",
        default=False,
    )

    def validate(self) -> None:
        """Raises a [`UsageError`] naming the first bad argument."""
        for name in ("top_k", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        size = self.teacher_image_size
        if size is not None and not 1 <= size <= MAX_TEACHER_IMAGE_SIZE:
            raise UsageError(f"--teacher_image_size must be between 1 and {MAX_TEACHER_IMAGE_SIZE} pixels, got {size}.")
        check_model_path("--teacher", self.teacher)
        check_output_path("--output", self.output)


def parse_relabel_args(
    argv: Sequence[str] | None = None, description: str | None = None
) -> tuple[RelabelArguments, DataArguments]:
    """The command line of `examples/generate_relabel.py`: the relabeling arguments and the trainer's data group."""
    parser = ArgumentParser((RelabelArguments, DataArguments), description=description)
    return parser.parse_dataclasses(argv)


class WholeImages(Dataset):
    """Training images resized whole (no crop) to `size` x `size` and normalised for the teacher, with their keys."""

    def __init__(self, source: datasets.Dataset, indices: Sequence[int], keys: Sequence[str], image_column: str,
                 size: int, mean: Sequence[float], std: Sequence[float]) -> None:  # fmt: skip
        self.source, self.indices, self.keys = source, list(indices), list(keys)
        self.image_column, self.size, self.mean, self.std = image_column, size, list(mean), list(std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, str]:
        index = self.indices[position]
        image = decode_image(self.source[index][self.image_column], index).convert("RGB")
        image = TF.resize(image, [self.size, self.size], interpolation=InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), self.keys[position]


def collate(samples: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def teacher_preprocessing(teacher: str, model, image_size: int | None) -> tuple[int, Sequence[float], Sequence[float]]:
    """The side to resize to and the normalisation: the teacher's image processor's, else ImageNet's."""
    try:
        processor = AutoImageProcessor.from_pretrained(teacher)
    except (OSError, ValueError):
        processor = None
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    if image_size is None:
        sizes = [getattr(processor, "crop_size", None), getattr(processor, "size", None)]
        for size in sizes:
            if isinstance(size, dict):
                image_size = size.get("height") or size.get("shortest_edge")
                if image_size:
                    break
        image_size = image_size or getattr(model.config, "image_size", None)
    if not image_size:
        raise UsageError(f"Cannot tell the input size of {teacher}: give --teacher_image_size.")
    return int(image_size), mean, std


def relabel_training_set(args: RelabelArguments, data_args: DataArguments) -> dict[str, Any]:
    """
    Writes (or completes) the relabel store of the training images `data_args` select. Returns the number of maps
    written by this process (`written`), skipped because already stored (`skipped`), in the store (`stored`, on the
    main process) and the teacher's `num_classes`.
    """
    args.validate()
    data_args.validate()
    if data_args.streaming:
        raise UsageError("Relabeling needs a map-style training set: leave out --streaming.")
    if data_args.relabel_root:
        raise UsageError("--relabel_root is where the trainer reads the maps; the store written here is --output.")
    try:
        return _relabel(args, data_args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # a later run in this process starts afresh


def _relabel(args: RelabelArguments, data_args: DataArguments) -> dict[str, Any]:
    accelerator = Accelerator(cpu=processes_without_accelerators())
    output = Path(args.output)
    with accelerator.main_process_first():
        data = load_image_data(data_args, args.seed)

    try:
        model = AutoModelForImageClassification.from_pretrained(args.teacher).eval().to(accelerator.device)
    except (OSError, ValueError) as error:  # not there, or a model type transformers does not know
        raise loading_error("--teacher", args.teacher, error) from None
    num_classes = model.config.num_labels
    if num_classes < data.num_labels:
        raise RelabelError(
            f"The teacher has {num_classes} classes but the data set {data.num_labels}: the maps must use the "
            "student's label space."
        )
    if args.top_k > num_classes:
        raise UsageError(f"--top_k {args.top_k} is more than the teacher's {num_classes} classes.")
    size, mean, std = teacher_preprocessing(args.teacher, model, args.teacher_image_size)
    settings = relabel_settings(args, size, mean, std, num_classes)
    replace = check_relabel_output(output, settings, args.overwrite_output_dir)  # every process: the same answer
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_relabel_output(output, settings, replace)
    accelerator.wait_for_everyone()

    # Each process takes every num_processes-th image: disjoint slices covering the data set.
    keys = list(iter_relabel_keys(data.train, data_args.image_column_name))
    done = complete_shard_keys(output) if output.is_dir() else set()
    mine = range(accelerator.process_index, len(keys), accelerator.num_processes)
    pending = [index for index in mine if keys[index] not in done]
    images = WholeImages(data.train, pending, [keys[i] for i in pending], data_args.image_column_name, size, mean, std)
    loader = DataLoader(
        images, batch_size=args.batch_size, num_workers=data_args.dataloader_num_workers, collate_fn=collate
    )
    writer = PackedRelabelWriter(output, args.shard_size, shard_prefix=f"rank{accelerator.process_index}")

    bar = tqdm(total=len(pending), desc="relabel", disable=not accelerator.is_local_main_process)
    for pixel_values, batch_keys in loader:
        scores, indices = top_k_maps(dense_teacher_logits(model, pixel_values.to(accelerator.device)), args.top_k)
        for key, key_scores, key_indices in zip(batch_keys, scores.float().cpu(), indices.cpu()):
            writer.add(key, key_scores, key_indices)
        bar.update(len(batch_keys))
    bar.close()
    writer.flush()

    accelerator.wait_for_everyone()
    stored = None
    if accelerator.is_main_process:
        stored = finalize_packed_store(output, num_classes)
        accelerator.print(
            f"Relabeled {len(pending)} images here ({len(done)} already stored); {output} holds {stored} maps.",
            flush=True,
        )
    accelerator.wait_for_everyone()
    return {"written": len(pending), "skipped": len(done), "stored": stored, "num_classes": num_classes}


def relabel_settings(
    args: RelabelArguments, size: int, mean: Sequence[float], std: Sequence[float], num_classes: int
) -> dict[str, Any]:
    """What makes one image's map: the teacher, its input and the classes kept (not which images are relabeled)."""
    teacher = os.path.abspath(os.path.expanduser(args.teacher)) if os.path.isdir(args.teacher) else args.teacher
    return {"teacher": teacher, "top_k": args.top_k, "teacher_image_size": size, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "num_classes": num_classes}  # fmt: skip


def check_relabel_output(output: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """
    Refuses an `--output` that holds anything but a relabel store of these `settings` (which is continued), or, unless
    `overwrite`, a store of other settings or of unknown origin. Returns whether the store there is to be replaced.
    """
    if not output.is_dir():
        return False
    if not store_directory_entries(output, f"--output {output}"):
        return False
    try:
        recorded = json.loads((output / RUN_FILE).read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == settings:
        return False
    if overwrite:
        return True
    if not isinstance(recorded, dict):
        raise RelabelError(
            f"--output {output}: holds a relabel store this command did not write (no readable {RUN_FILE}), so its "
            "maps cannot be told to be this teacher's; give another directory, or --overwrite_output_dir to replace it."
        )
    changed = ", ".join(f"{name} {recorded.get(name)!r}" for name in settings if recorded.get(name) != settings[name])
    raise RelabelError(
        f"--output {output}: holds the maps of another relabeling ({changed}); give the same settings to continue it, "
        "another directory, or --overwrite_output_dir to replace it."
    )


def prepare_relabel_output(output: Path, settings: dict[str, Any], replace: bool) -> None:
    """Removes the replaced store's files (only a store's own files) and records the settings of this relabeling."""
    output.mkdir(parents=True, exist_ok=True)
    if replace:
        for path in output.iterdir():
            if is_store_file(path.name):
                path.unlink()
    run_file = output / RUN_FILE
    if not run_file.exists():
        run_file.write_text(json.dumps(settings, indent=2) + "\n")


__all__ = ["RelabelArguments", "parse_relabel_args", "relabel_training_set"]
