#!/usr/bin/env python
"""
Relabel a training set with your own teacher for token labeling: any `AutoModelForImageClassification` classifies every
position of each whole training image, and the top-k scores and classes of every position are written to a packed
relabel store that `examples/run_imagenet.py --relabel_root` reads.

    python examples/generate_relabel.py --teacher facebook/convnext-large-224-22k-1k \\
        --dataset_name ILSVRC/imagenet-1k --output relabel/convnext_l --teacher_image_size 448

On several GPUs each process relabels its own slice of the data set:

    accelerate launch --multi_gpu --num_processes 8 examples/generate_relabel.py --teacher ... --output ...

The data arguments are the trainer's and select the same training images (give both the same values). Each image is
resized whole, without cropping, to the teacher's resolution: a map must cover the whole image, because the trainer
cuts each training crop out of it. An interrupted run continues where it stopped when started again with the same
--output: images already in its complete shards are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification

import refiner_hf  # noqa: F401  (registers Refiner-ViT with the Auto classes)
from refiner_hf.token_labeling import PackedRelabelWriter, RelabelError, finalize_packed_store
from refiner_hf.token_labeling.teacher import dense_teacher_logits, top_k_maps
from refiner_hf.training.arguments import ArgumentParser, TrainingArguments
from refiner_hf.training.data import decode_image, load_image_data
from refiner_hf.training.distributed import processes_without_accelerators
from refiner_hf.training.errors import UsageError, check_model_path, loading_error, run_command
from refiner_hf.training.relabel_targets import iter_relabel_keys


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The trainer's arguments that select the training images; the others do not matter here.
DATA_FIELDS = (
    "dataset_name", "dataset_config", "train_dir", "validation_dir", "train_split", "validation_split",
    "train_val_split", "image_column_name", "label_column_name", "max_train_samples", "seed", "cache_dir",
)  # fmt: skip


def _arg(help: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RelabelArguments:
    """Arguments of `examples/generate_relabel.py`."""

    teacher: str = field(
        metadata={"help": "The teacher: a Hub id or a directory of any AutoModelForImageClassification."}
    )
    output: str = field(metadata={"help": "Directory of the packed relabel store to write (or to complete)."})
    top_k: int = _arg("Classes kept per position.", default=5)
    teacher_image_size: int | None = _arg(
        "Side the whole images are resized to (default: the teacher's image processor's size, else its config's)."
    )
    batch_size: int = _arg("Images per teacher forward pass, per process.", default=32)
    shard_size: int = _arg("Maps per shard of the store (a shard is the unit of resuming).", default=4096)
    dataloader_num_workers: int = _arg("Image decoding worker processes per process.", default=4)
    # The trainer's data selection (see refiner_hf/training/arguments.py).
    dataset_name: str | None = _arg("A `datasets` Hub id (e.g. ILSVRC/imagenet-1k) or a local dataset directory.")
    dataset_config: str | None = _arg("The configuration name of --dataset_name.")
    train_dir: str | None = _arg("A local `imagefolder` tree of training images.")
    validation_dir: str | None = _arg("A local `imagefolder` tree of validation images.")
    train_split: str = _arg("Name of the training split.", default="train")
    validation_split: str = _arg("Name of the validation split.", default="validation")
    train_val_split: float = _arg("As the trainer's: the fraction held out without a validation split.", default=0.15)
    image_column_name: str = _arg("Column holding the images.", default="image")
    label_column_name: str = _arg("Column holding the class indices.", default="label")
    max_train_samples: int | None = _arg("As the trainer's: only the first N training samples after a seeded shuffle.")
    seed: int = _arg("The trainer's seed (it selects --max_train_samples and the held-out split).", default=42)
    cache_dir: str | None = _arg("Where `datasets` caches downloaded and prepared data.")

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        check_model_path("--teacher", self.teacher)
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise UsageError(f"--output {self.output} is a file; give a directory for the relabel store.")

    def training_arguments(self) -> TrainingArguments:
        """The trainer's arguments with this run's data selection (checked as the trainer checks them)."""
        names = {f.name for f in fields(TrainingArguments)}
        args = TrainingArguments(**{name: getattr(self, name) for name in DATA_FIELDS if name in names})
        args.validate()
        return args


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


def stored_keys(output: Path) -> set[str]:
    """Keys already in complete shards of `output`, whichever process (rank prefix) wrote them."""
    keys: set[str] = set()
    for path in output.glob("*.keys.txt"):
        keys.update(path.read_text().splitlines())
    return keys


def relabel(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes (or completes) the relabel store; returns the number of maps written and stored."""
    args = ArgumentParser(RelabelArguments, description=__doc__).parse_dataclass(argv)
    args.validate()
    accelerator = Accelerator(cpu=processes_without_accelerators())
    output = Path(args.output)
    with accelerator.main_process_first():
        data = load_image_data(args.training_arguments())
    if not isinstance(data.train, datasets.Dataset):
        raise UsageError("Relabeling needs a map-style training set (no streaming).")

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
    size, mean, std = teacher_preprocessing(args.teacher, model, args.teacher_image_size)

    # Each process takes every num_processes-th image: disjoint slices covering the data set.
    keys = list(iter_relabel_keys(data.train, args.image_column_name))
    done = stored_keys(output) if output.is_dir() else set()
    mine = range(accelerator.process_index, len(keys), accelerator.num_processes)
    pending = [index for index in mine if keys[index] not in done]
    images = WholeImages(data.train, pending, [keys[i] for i in pending], args.image_column_name, size, mean, std)
    loader = DataLoader(images, batch_size=args.batch_size, num_workers=args.dataloader_num_workers, collate_fn=collate)
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


main = relabel


if __name__ == "__main__":
    run_command(relabel, usage_errors=(RelabelError,))
