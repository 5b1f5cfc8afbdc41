"""
Classify an image with Refiner-ViT.

With no arguments, converts the tiny original checkpoint bundled with the tests (random weights: its prediction is
arbitrary, it shows the whole path), saves it as a Hugging Face model directory, and classifies the bundled photo
through `pipeline("image-classification")`, printing the top 5.

    python examples/classify_image.py
    python examples/classify_image.py --checkpoint Refiner_ViT_L_448.pth --image photo.jpg
    python examples/classify_image.py --model path/to/converted-dir --image photo.jpg
"""

import argparse
import tempfile
from pathlib import Path

from transformers import pipeline
from transformers.utils import logging

from refiner_hf import convert_original_checkpoint
from refiner_hf.assets import sample_image_path
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.loading import NO_IMAGE_PROCESSOR, load_image_processor_checked, load_model_checked
from refiner_hf.training.errors import ArgumentParser, UsageError, check_model_path, run_command


BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "released_tiny.pth"


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="A converted model directory or Hub id.")
    source.add_argument(
        "--checkpoint", type=Path, default=BUNDLED_CHECKPOINT, help="An original Refiner-ViT checkpoint to convert."
    )
    parser.add_argument("--image", default=str(sample_image_path()), help="Image file or URL.")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--weights", choices=("ema", "raw"), help="Weights of a timm checkpoint (default: EMA).")
    args = parser.parse_args()
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """One-line errors for a model, checkpoint or image that is not there, before anything is loaded."""
    if args.model is not None:
        check_model_path("--model", args.model)
    elif not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file.")
    if not args.image.startswith(("http://", "https://")) and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image}: no such file (give an image file or an http(s) URL).")


def main() -> None:
    args = parse_args()
    check_inputs(args)
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model = convert_original_checkpoint(args.checkpoint, weights=args.weights)
            model.save_pretrained(tmp)
            image_processor_for_config(model.config).save_pretrained(tmp)
            model_dir = tmp
            print(
                f"Converted {args.checkpoint} ({model.config.matching_preset() or 'custom architecture'}, "
                f"{model.num_parameters():,} parameters)"
            )
        # Every tensor checked (missing, unexpected, non-finite: one-line errors) and the model's own processor
        # (an invalid one is an error; only one that is not there falls back to the evaluation processor).
        model = load_model_checked(model_dir, "--model").model.eval()
        processor, note = load_image_processor_checked(model_dir, model.config, "--model")
        if note.startswith(NO_IMAGE_PROCESSOR):
            print(f"{model_dir}: {note}.")
        classifier = pipeline("image-classification", model=model, image_processor=processor)
        print(f"Top {args.top_k} for {args.image}:")
        for rank, prediction in enumerate(classifier(args.image, top_k=args.top_k), start=1):
            print(f"  {rank}. {prediction['label']:<30} {prediction['score']:.4f}")


if __name__ == "__main__":
    run_command(main)
