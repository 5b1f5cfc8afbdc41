#!/usr/bin/env python
"""
Relabel a training set with your own teacher for token labeling: any `AutoModelForImageClassification` classifies every
position of each whole training image, and the top-k scores and classes of every position are written to a packed
relabel store that `examples/run_imagenet.py --relabel_root` reads.

    python examples/generate_relabel.py --teacher facebook/convnext-large-224-22k-1k \\
        --dataset_name ILSVRC/imagenet-1k --output relabel/convnext_l --teacher_image_size 448

On several GPUs each process relabels its own slice of the data set:

    accelerate launch --multi_gpu --num_processes 8 examples/generate_relabel.py --teacher ... --output ...

The data arguments are the trainer's and select the same training images (give both the same values, and the trainer's
--seed). Each image is resized whole, without cropping, to the teacher's resolution: a map must cover the whole image,
because the trainer cuts each training crop out of it. An interrupted run continues where it stopped when started again
with the same --output and teacher settings: images already in its complete shards are skipped. A store of another
teacher or preprocessing in --output is refused unless --overwrite_output_dir is given. The relabeling itself is
`refiner_hf.training.teacher_relabeling.relabel_training_set`; this script is its command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refiner_hf.training.errors import run_command
from refiner_hf.training.teacher_relabeling import parse_relabel_args, relabel_training_set


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses the command line and writes (or completes) the relabel store."""
    return relabel_training_set(*parse_relabel_args(argv, description=__doc__))


def stopped_hint() -> str:
    return "The complete shards in --output are kept: run the same command again to continue."


if __name__ == "__main__":
    # Usage errors exit with status 2, bad data (a store of another teacher in --output, bad images) with 1, an
    # interruption with 130 / 143, each as one line (refiner_hf.cli).
    run_command(main, stopped_hint=stopped_hint)
