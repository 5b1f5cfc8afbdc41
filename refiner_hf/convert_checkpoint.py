"""
Command line: convert an original Refiner-ViT checkpoint into a Hub model directory (and optionally upload it).

    refiner-vit-convert --checkpoint Refiner_ViT_L_448.pth
    python convert/convert_refiner_timm_to_hf.py --checkpoint run/model_best.pth.tar --weights raw --output-dir my-model

The configuration is inferred from the tensors. Before anything is reported as done, the written directory is proved:
every tensor in the weights file equals the converted one bit for bit, the configuration and both image-processor
backends load back equal, the remote code is there, and the model loaded back from disk reproduces the converted
model's logits on a real photo within float rounding. Only then is the directory moved into place, so a failure (or an
interruption) leaves nothing behind.

With `--push-to-hub REPO_ID` the Hub is checked before the conversion (not offline, a valid id, a token it accepts, the
repository there or created); an upload that fails afterwards is one line with the `hf upload` command that uploads
the written directory, and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from transformers.utils import logging

from .assets import sample_image_path
from .cli import ArgumentParser, DataError, UsageError, check_input_file, check_output_path, command_status
from .configuration_refiner_vit import PRESETS
from .conversion import MAX_TOKENS, load_original_weights, model_from_original_state_dict
from .hub import UploadError, build_model_card, check_hub_access, imagenet_1k_id2label, upload_model_directory
from .image_processing_refiner_vit import image_processor_for_config
from .model_directory import (
    OutputLock,
    check_output_directory,
    logits_on_image,
    save_model_directory,
    verify_model_directory,
)
from .modeling_refiner_vit import RefinerViTForImageClassification


PROG = "refiner-vit-convert"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=PROG,
        description="Convert an original Refiner-ViT checkpoint (timm training checkpoint, bare or DDP state dict) "
        "into a self-contained Hugging Face model directory.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="The original checkpoint file.")
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="Where to write the model (default: the preset's name, e.g. refiner-vit-l-448, in the current directory).",
    )
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        help="Which weights of a timm checkpoint to convert (default: EMA when present, the published accuracies' "
        "weights).",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="Resolution of the converted model (default: inferred from the position embedding, which is resized "
        "when another size is given).",
    )
    parser.add_argument("--crop-pct", type=float, help="Evaluation crop ratio (default: the preset's published one).")
    parser.add_argument("--num-attention-heads", type=int, help="Only needed when no block refines its attention.")
    parser.add_argument(
        "--layer-norm-eps", type=float, default=1e-6, help="LayerNorm epsilon (1e-6 in the released models)."
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="Convert weights with NaN or infinite values (refused by default, naming the tensors).",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_TOKENS,
        help=f"Refuse a position embedding of more tokens than this (default {MAX_TOKENS}: 1024 px at patch 16); the "
        "attention maps of the check on a photo grow with its square.",
    )
    parser.add_argument("--image", type=Path, default=sample_image_path(), help="Photo for the sanity check.")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the directory to this Hub model repository.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a model directory written before at --output-dir (never a folder holding other files).",
    )
    return parser.parse_args(argv)


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def model_card(
    model: RefinerViTForImageClassification,
    args: argparse.Namespace,
    weights: str,
    crop_pct: float,
    checksum: str,
    name: str,
) -> str:
    config = model.config
    preset = config.matching_preset()
    published = PRESETS[preset].top1 if preset in PRESETS else None
    details = {
        "Architecture": preset or "custom Refiner-ViT",
        "Source checkpoint": f"`{args.checkpoint.name}`",
        "Source sha256": f"`{checksum}`",
        "Weights": "EMA (model exponential moving average)" if weights == "ema" else "raw (not EMA)",
        "Resolution": f"{config.image_size} x {config.image_size}",
        "Eval crop_pct": crop_pct,
        "Parameters": f"{model.num_parameters():,}",
        "Classes": config.num_labels,
        "Published ImageNet-1k top-1": f"{published} % (the paper's figure, not re-measured)" if published else "n/a",
    }
    summary = (
        f"Refiner-ViT image classifier converted from the original checkpoint `{args.checkpoint.name}` "
        f"({'EMA' if weights == 'ema' else 'raw'} weights) with `refiner-vit-convert`. Converted models reproduce "
        "the original code's outputs."
    )
    datasets = ["imagenet-1k"] if config.num_labels == 1000 else None
    return build_model_card(config, args.push_to_hub or name, summary, details, datasets=datasets)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses flag values that cannot be meant, before anything is read."""
    positive = {
        "--image-size": args.image_size,
        "--crop-pct": args.crop_pct,
        "--max-tokens": args.max_tokens,
        "--layer-norm-eps": args.layer_norm_eps,
        "--num-attention-heads": args.num_attention_heads,
    }
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} {value}: give a positive number (or leave {flag} out for the default).")
    if args.output_dir is not None:
        check_output_path("--output-dir", args.output_dir)


def resize(model: RefinerViTForImageClassification, image_size: int, max_tokens: int | None) -> None:
    """Resizes the position embedding to `image_size` px, refusing a size off the patch grid or of too many tokens."""
    patch = model.config.patch_size
    if image_size % patch:
        raise UsageError(
            f"--image-size {image_size}: not a multiple of the model's patch size {patch}; choose e.g. "
            f"{max(patch, image_size // patch * patch)}."
        )
    tokens = (image_size // patch) ** 2 + 1
    if max_tokens is not None and tokens > max_tokens:
        gib = model.config.num_attention_heads * tokens**2 * 4 / 2**30
        raise UsageError(
            f"--image-size {image_size}: {tokens:,} tokens at patch {patch}, more than --max-tokens {max_tokens:,}; "
            f"each attention map of one image would take {gib:,.1f} GiB. Raise --max-tokens only if this machine has "
            "the memory."
        )
    print(f"Resizing the position embedding from {model.config.image_size} to {image_size} px.")
    model.resize_position_embeddings(image_size)


def convert(args: argparse.Namespace) -> Path:
    """The command: refusals of what cannot work first, then the conversion under the output directory's lock."""
    check_arguments(args)
    if args.push_to_hub:
        # Before minutes of conversion: the Hub answers, the token is accepted and the repository is there (created
        # now if needed); the card and the upload then use its full id.
        args.push_to_hub = check_hub_access(
            args.push_to_hub, "--push-to-hub", "--push-to-hub", private=args.private or None
        )
    if args.output_dir is None:
        return convert_checked(args)
    # Refused before minutes of work, not after; one writer at a time from the start (a second one is refused now).
    check_output_directory(args.output_dir, args.overwrite, protected=[args.checkpoint], overwrite_flag="--overwrite")
    with OutputLock(args.output_dir):
        return convert_checked(args)


def convert_checked(args: argparse.Namespace) -> Path:
    """Converts, checks and writes the model directory (and uploads it with --push-to-hub)."""

    def check_output(directory: Path) -> None:
        check_output_directory(directory, args.overwrite, protected=[args.checkpoint], overwrite_flag="--overwrite")

    image = load_photo(args.image)
    original = load_original_weights(args.checkpoint, args.weights)
    print(
        f"Loaded {args.checkpoint}: {len(original.state_dict)} tensors, using the {original.weights.upper()} weights"
        + (" (EMA weights are also present)" if original.has_ema and original.weights == "raw" else "")
    )
    model = model_from_original_state_dict(
        original.state_dict,
        num_attention_heads=args.num_attention_heads,
        source=str(args.checkpoint),
        allow_non_finite=args.allow_non_finite,
        max_tokens=args.max_tokens,
        layer_norm_eps=args.layer_norm_eps,
    )
    print(f"Every original tensor was mapped exactly once with its shape ({len(original.state_dict)} tensors).")
    if args.image_size and args.image_size != model.config.image_size:
        resize(model, args.image_size, args.max_tokens)
    if model.config.num_labels == 1000:
        model.config.id2label = imagenet_1k_id2label()
        model.config.label2id = {label: index for index, label in model.config.id2label.items()}
    processor = image_processor_for_config(model.config, args.crop_pct)
    name = model.config.matching_preset() or f"{args.checkpoint.stem}-hf"
    output_dir = args.output_dir or Path(name)
    if args.output_dir is None:
        check_output(output_dir)
    print(
        f"Architecture: {model.config.matching_preset() or 'custom'}; block types {model.config.block_types}; "
        f"{model.num_parameters():,} parameters; crop_pct {processor.crop_pct}."
    )

    expected = logits_on_image(model, processor, image)
    card = model_card(model, args, original.weights, processor.crop_pct, sha256_of(args.checkpoint), output_dir.name)

    def verify(directory: Path) -> None:
        check = verify_model_directory(
            directory, model, processor, image, expected_logits=expected, allow_non_finite=args.allow_non_finite
        )
        print(
            f"Reloaded from disk: all {check.num_tensors} tensors bitwise equal, configuration and both processor "
            f"backends load back equal; logits on {args.image.name} match the converted model (max difference "
            f"{check.max_difference:.1g}, tolerance {check.tolerance:.1g})."
        )

    save_model_directory(
        model,
        processor,
        output_dir,
        model_card=card,
        overwrite=args.overwrite,
        verify=verify,
        protected=[args.checkpoint],
        overwrite_flag="--overwrite",
    )
    if model.config.num_labels == 1000:
        top = expected.softmax(-1)[0].topk(5)
        print(f"Top 5 on {args.image.name}:")
        for probability, index in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {probability:.3f}  {model.config.id2label[index]}")
    print(f"Wrote {output_dir}")
    if args.push_to_hub:
        commit = upload_model_directory(
            output_dir,
            args.push_to_hub,
            commit_message=f"Convert {args.checkpoint.name} ({original.weights} weights)",
            private=args.private or None,
        )
        print(f"Uploaded to {args.push_to_hub}: {commit.commit_url}")
    return output_dir


def load_photo(path: Path) -> Image.Image:
    """The check's photo in RGB; a path that is not a regular file, or not an image, is a one-line error."""
    check_input_file("--image", path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:  # unreadable or not an image
        raise DataError(f"Cannot read the check photo {path} ({error}); pass a readable image with --image.") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status (see `refiner_hf.cli` for the error policy)."""
    logging.disable_progress_bar()
    return command_status(lambda: convert(parse_args(argv)), PROG)


__all__ = ["UploadError", "convert", "main", "parse_args"]


if __name__ == "__main__":
    sys.exit(main())
