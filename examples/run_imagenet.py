#!/usr/bin/env python
"""
Train or fine-tune Refiner-ViT on an image classification data set with accelerate: on one CPU, one GPU, several
GPUs or several nodes, with the same script.

Without arguments it trains a small Refiner-ViT on the Fashion-MNIST subset shipped with the package (a few minutes
on two CPU cores) and writes the model to outputs/refiner-vit-fashion-mnist/model:

    python examples/run_imagenet.py

Pretraining Refiner-ViT-S on ImageNet with the paper's recipe on 8 GPUs, then fine-tuning it at 384 px:

    accelerate launch --config_file examples/accelerate_configs/ddp_8gpu.yaml examples/run_imagenet.py \\
        --recipe refiner_vit_s.yaml --dataset_name ILSVRC/imagenet-1k --output_dir outputs/refiner-vit-s
    accelerate launch --config_file examples/accelerate_configs/ddp_8gpu.yaml examples/run_imagenet.py \\
        --recipe refiner_vit_s_384_finetune.yaml --dataset_name ILSVRC/imagenet-1k \\
        --model_name_or_path outputs/refiner-vit-s/model --output_dir outputs/refiner-vit-s-384

Token labeling (the training behind the published accuracies) with a teacher's relabel maps, e.g. the NFNet-F6 set
packed with `refiner-vit-pack-relabel` or maps made by examples/generate_relabel.py:

    accelerate launch --config_file examples/accelerate_configs/ddp_8gpu.yaml examples/run_imagenet.py \\
        --recipe refiner_vit_s_relabel.yaml --dataset_name ILSVRC/imagenet-1k --relabel_root relabel/nfnet_packed \\
        --output_dir outputs/refiner-vit-s-relabel

Fine-tuning a trained model on your own image folders (the model's image processor is kept, and a new classifier head
is trained when the classes differ; without --recipe, examples/recipes/finetune_own_data.yaml applies):

    python examples/run_imagenet.py --model_name_or_path outputs/refiner-vit-fashion-mnist/model \
        --train_dir data/train --validation_dir data/val --output_dir outputs/my-classes

A recipe (examples/recipes/*.yaml) sets the arguments and the command line overrides it; the log's first lines name
the recipe in force and `--help` lists every argument with the defaults that apply to the other arguments given.
An interrupted run, wherever it was stopped, finishes what was left with `--resume_from_checkpoint latest`, ending
with the model directory an uninterrupted run writes.

A problem with the arguments or the data stops the run with one line, `run_imagenet.py: error: ...`, and exit status 2
(a flag's value) or 1 (the data, a file); under `accelerate launch` the main process prints it, and
`accelerate launch -q` leaves out the launcher's own traceback that follows it.

The output directory holds model/ (the best weights so far, with the image processor and a model card: a directory
`AutoModelForImageClassification.from_pretrained` loads), checkpoints/, logs/ (metrics.jsonl and the trackers' files)
and all_results.json. The training itself is `refiner_hf.training.trainer.train`; this script is its command line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refiner_hf.training.arguments import parse_args
from refiner_hf.training.errors import CommandError, is_main_process, run_command
from refiner_hf.training.trainer import STOPPING_ERRORS, resume_hint, train


RECIPES = Path(__file__).resolve().parent / "recipes"
# Under `accelerate launch` every process parses the same arguments and meets the same error, which only the main
# process prints. The launcher ends all processes as soon as one exits, so the others wait (at most this long) for
# the main process to print it and exit first.
ARGUMENT_ERROR_WAIT_S = 30.0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses the command line (over the recipe it names or implies, from `examples/recipes`) and trains."""
    try:
        args = parse_args(argv, recipe_dirs=[RECIPES])
    except CommandError:
        if not is_main_process():
            time.sleep(ARGUMENT_ERROR_WAIT_S)
        raise
    return train(args)


if __name__ == "__main__":
    # Ctrl-C or SIGTERM: one line with the step reached, the checkpoint to resume from and the command that resumes.
    run_command(main, usage_errors=STOPPING_ERRORS, stopped_hint=resume_hint)
