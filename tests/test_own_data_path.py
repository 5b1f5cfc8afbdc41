"""
The newcomer's path through the trainer: the better of the raw and the EMA weights is the one kept (and said), a run
on own data without a GPU picks a CPU-sized recipe, and fine-tuning a trained model on a small folder gives a useful
model.
"""

import json
import shutil
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from training_utils import (
    RECIPES,
    ROOT,
    TINY_MODEL_WITHOUT_BATCHNORM,
    checkpoint_tensors,
    read_results,
    run_in_process,
    tiny_run_args,
)
from transformers import AutoImageProcessor, AutoModelForImageClassification

import refiner_hf  # noqa: F401  (registers the model type with the Auto classes)
from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.training import arguments
from refiner_hf.training.arguments import fit_workers, parse_args
from refiner_hf.training.checkpointing import check_progress_state
from refiner_hf.training.evaluation import better_weights
from refiner_hf.training.tracking import format_epoch_summary


def colour_folder(root, per_class: int, seed: int) -> None:
    """An imagefolder tree of 28x28 PNGs of 3 classes (red, green, blue): a grey of random brightness with a little
    noise, the class's channel raised; a tiny model tells them apart within a few steps."""
    rng = np.random.default_rng(seed)
    for channel, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.full((28, 28, 3), rng.integers(0, 100)) + rng.integers(0, 20, (28, 28, 3))
            pixels[..., channel] += 130
            PIL.Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")


def accuracy_of_saved_model(model_dir, folder) -> tuple[float, float]:
    """Top-1 and top-5 of a saved model directory on an imagefolder tree."""
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    files = sorted(folder.rglob("*.png"))
    labels = torch.tensor([model.config.label2id[path.parent.name] for path in files])
    with torch.no_grad():
        logits = model(**processor([PIL.Image.open(path) for path in files], return_tensors="pt")).logits
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(-1).float().mean().item()


# The raw and the EMA weights


def test_better_weights_compares_top1_then_top5_and_gives_ties_to_the_ema():
    raw, ema = {"top1": 0.6, "top5": 0.9}, {"top1": 0.1, "top5": 0.5}
    assert better_weights(raw, ema) == ("raw", raw)
    assert better_weights(ema, raw) == ("ema", raw)
    assert better_weights(raw, None) == ("raw", raw)
    assert better_weights({"top1": 0.5, "top5": 0.9}, {"top1": 0.5, "top5": 0.8})[0] == "raw"
    assert better_weights({"top1": 0.5, "top5": 0.8}, {"top1": 0.5, "top5": 0.8})[0] == "ema"


def test_checkpoints_of_earlier_versions_name_the_raw_weights_model():
    state = {"best_weights": "model", "best_metric": 0.5, "best_epoch": 0, "best_step": 0}
    defaults = {
        "epoch": 0, "batches_in_epoch": 0, "global_step": 0, "evaluated_step": 0, "bad_training_images": [],
        "bad_validation_images": 0, "epoch_totals": [0.0, 0, 0], "epoch_bad_images": [], "history": [],
    }  # fmt: skip
    assert check_progress_state({**defaults, **state}, "training_state.json")["best_weights"] == "raw"


# A run whose EMA lags far behind its weights: decay 0.9999 without warmup over 16 steps leaves the average next to
# the random initialisation, while the weights learn.
LAGGING_EMA = {"model_ema_decay": 0.9999, "model_ema_warmup": False, "aa": "", "reprob": 0.0, "lr": 3e-3}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    colour_folder(root / "train", 16, seed=0)
    colour_folder(root / "val", 8, seed=1)
    return root


def lagging_run_args(output_dir, colours) -> list[str]:
    """Two epochs of 6 steps on the colour folders, with the EMA lagging far behind."""
    return tiny_run_args(
        output_dir, recipe="embedded_fashion_mnist.yaml", train_dir=colours / "train", validation_dir=colours / "val",
        max_train_samples=None, max_eval_samples=None, **LAGGING_EMA,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lagging(tmp_path_factory, colours):
    output_dir = tmp_path_factory.mktemp("lagging")
    results = run_in_process(lagging_run_args(output_dir, colours))
    return output_dir, results


def test_a_lagging_ema_is_not_kept_the_raw_weights_are_saved_with_their_accuracy(lagging, colours):
    output_dir, results = lagging
    history = results["history"]
    assert [h["weights"] for h in history] == ["raw", "raw"]
    assert all(h["eval_top1"] > h["ema_top1"] + 0.1 for h in history)
    assert results["best_weights"] == "raw"
    best = history[results["best_epoch"]]
    assert results["eval_top1"] == best["eval_top1"] == max(h["eval_top1"] for h in history)
    # The saved model is the raw weights of the best evaluation: it gives the accuracy logged for them.
    top1, top5 = accuracy_of_saved_model(output_dir / "model", colours / "val")
    assert top1 == pytest.approx(results["eval_top1"], abs=1e-6)
    assert top5 == pytest.approx(results["eval_top5"], abs=1e-6)
    checkpoint = output_dir / "checkpoints" / f"step_{best['step']:08d}"
    saved = load_file(output_dir / "model" / "model.safetensors")
    raw = checkpoint_tensors(checkpoint)
    assert all(torch.equal(saved[name], raw[f"model.{name}"]) for name in saved)
    assert read_results(output_dir)["best_weights"] == "raw"
    card = (output_dir / "model" / "README.md").read_text()
    assert f"{100 * results['eval_top1']:.2f} %" in card


def test_the_epoch_line_and_the_final_line_say_which_weights():
    summary = {
        "train_loss": 1.0, "lr": 1e-3, "images_per_second": 10.0, "eval_top1": 0.62, "eval_top5": 0.9,
        "ema_top1": 0.1, "ema_top5": 0.5, "best_top1": 0.62, "best_epoch": 2, "best_weights": "raw",
        "epoch_seconds": 1.0,
    }  # fmt: skip
    assert "best 62.00 (raw, epoch 3)" in format_epoch_summary(2, 10, summary)


def test_a_resumed_run_keeps_the_choice_and_writes_the_same_weights(lagging, colours, tmp_path, capsys):
    reference_dir, reference = lagging
    output_dir = tmp_path / "run"
    argv = lagging_run_args(output_dir, colours)
    run_in_process(argv + ["--max_train_steps", "6"])  # stopped after the first epoch's evaluation
    state = json.loads((output_dir / "checkpoints" / "step_00000006" / "training_state.json").read_text())
    assert state["progress"]["best_weights"] == "raw"
    # The model directory is lost (e.g. killed while writing it): the resume writes the chosen weights again.
    shutil.rmtree(output_dir / "model")
    capsys.readouterr()
    resumed = run_in_process(argv + ["--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert resumed["best_weights"] == reference["best_weights"] == "raw"
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert resumed["eval_top1"] == reference["eval_top1"]
    assert f"(raw weights, epoch {reference['best_epoch'] + 1})" in out
    saved = load_file(output_dir / "model" / "model.safetensors")
    expected = load_file(reference_dir / "model" / "model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[name], expected[name]) for name in saved)


def test_with_a_fast_ema_the_kept_weights_are_still_the_better_ones(colours, tmp_path):
    # A fast average (decay 0.5) is all but the weights; ties, which a tiny run may give, go to the EMA.
    output_dir = tmp_path / "run"
    results = run_in_process([*lagging_run_args(output_dir, colours), "--model_ema_decay", "0.5", "--epochs", "1"])
    (only,) = results["history"]
    expected = "raw" if (only["eval_top1"], only["eval_top5"]) > (only["ema_top1"], only["ema_top5"]) else "ema"
    assert results["best_weights"] == only["weights"] == expected
    top1, _ = accuracy_of_saved_model(output_dir / "model", colours / "val")
    assert top1 == pytest.approx(results["eval_top1"], abs=1e-6)


# Own data on a CPU


def cpu_machine(monkeypatch, cpus: int = 2) -> None:
    monkeypatch.setattr(arguments, "accelerator_available", lambda: False)
    monkeypatch.setattr(arguments, "available_cpus", lambda: cpus)


def test_own_data_without_a_gpu_picks_the_cpu_recipe_and_says_how_to_get_the_papers(monkeypatch, tmp_path, capsys):
    cpu_machine(monkeypatch)
    for data in (["--train_dir", str(tmp_path)], ["--dataset_name", "x"]):
        args = parse_args(data, recipe_dirs=[RECIPES])
        assert args.training.recipe == str(RECIPES / "own_data_cpu.yaml")
        assert args.recipe_source == (
            f"{RECIPES / 'own_data_cpu.yaml'} (your data on a machine without a GPU, no --recipe or model argument: a "
            "small Refiner-ViT at 64 px; --recipe refiner_vit_s.yaml trains the paper's Refiner-ViT-S at 224 px "
            "instead, --model_name_or_path fine-tunes a trained model)"
        )
        config = args.model.config_overrides_dict()
        assert (config["image_size"], config["patch_size"], args.model.model) == (64, 8, None)
        assert set(config["block_types"]) == {"plain", "shared", "refined"}
        assert (args.training.epochs, args.training.model_ema, args.data.dataloader_num_workers) == (40, True, 1)
    assert capsys.readouterr().out == ""  # the recipe's one worker fits: no line


def test_with_a_gpu_or_a_model_argument_the_choice_stays(monkeypatch, tmp_path):
    cpu_machine(monkeypatch, cpus=64)
    data = ["--train_dir", str(tmp_path)]
    for model in (["--model", "refiner-vit-s"], ["--config_overrides", '{"hidden_size": 64}']):
        assert parse_args(data + model, recipe_dirs=[RECIPES]).training.recipe is None
    assert parse_args(data + ["--recipe", "refiner_vit_s.yaml"], recipe_dirs=[RECIPES]).model.model == "refiner-vit-s"
    assert parse_args([], recipe_dirs=[RECIPES]).training.recipe == str(RECIPES / "embedded_fashion_mnist.yaml")
    monkeypatch.setattr(arguments, "accelerator_available", lambda: True)
    args = parse_args(data, recipe_dirs=[RECIPES])
    assert args.training.recipe is None and args.training.epochs == 300 and args.data.dataloader_num_workers == 8


def test_loader_workers_are_never_more_than_the_cpus_with_one_line(monkeypatch, tmp_path, capsys):
    cpu_machine(monkeypatch, cpus=2)
    args = parse_args(["--recipe", "refiner_vit_s.yaml", "--train_dir", str(tmp_path)], recipe_dirs=[RECIPES])
    assert args.data.dataloader_num_workers == 2
    assert capsys.readouterr().out.splitlines() == [
        "Note: --dataloader_num_workers 8 is more than the 2 CPUs here: using 2."
    ]
    args = parse_args(["--dataloader_num_workers", "3", "--train_dir", str(tmp_path)], recipe_dirs=[RECIPES])
    assert args.data.dataloader_num_workers == 2
    assert capsys.readouterr().out.splitlines() == [
        "Note: --dataloader_num_workers 3 is more than the 2 CPUs here: using 2."
    ]
    args = parse_args(["--dataloader_num_workers", "0", "--train_dir", str(tmp_path)], recipe_dirs=[RECIPES])
    assert args.data.dataloader_num_workers == 0 and capsys.readouterr().out == ""
    data = parse_args([], recipe_dirs=[RECIPES]).data
    data.dataloader_num_workers = 4
    assert fit_workers(data, cpus=1) == "Note: --dataloader_num_workers 4 is more than the 1 CPU here: using 1."
    assert data.dataloader_num_workers == 1


# Fine-tuning on a small folder


def test_the_finetuning_recipe_is_sized_for_a_small_folder(monkeypatch):
    cpu_machine(monkeypatch)
    args = parse_args(["--model_name_or_path", "some/model", "--dataset_name", "x"], recipe_dirs=[RECIPES])
    training = args.training
    assert args.training.recipe == str(RECIPES / "finetune_own_data.yaml")
    assert (training.lr, training.epochs, training.warmup_epochs, training.per_device_train_batch_size) == (
        1e-3, 20, 2, 16,
    )  # fmt: skip
    assert (training.lr_schedule_unit, training.model_ema, training.aa, training.mixup) == ("step", False, None, 0.0)
    assert args.data.dataloader_num_workers == 1 and args.model.config_overrides is None


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    """Benchmark data set (a): 30 + 30 images of 3 Fashion-MNIST classes from the embedded validation split."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from finetune_small_folder import write_fashion_folders
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    root = tmp_path_factory.mktemp("fashion")
    write_fashion_folders(root)
    return root


def test_the_finetuning_recipe_learns_a_small_folder(fashion_folder, tmp_path, monkeypatch):
    # A tiny model without BatchNorm stands for the trained one (its heads are new and random, as in a fine-tuning
    # run); the recipe's learning rate and steps take it well above chance (1/3) on the held-out images.
    cpu_machine(monkeypatch)
    base = tmp_path / "base"
    config = RefinerViTConfig(**TINY_MODEL_WITHOUT_BATCHNORM, num_labels=10)
    torch.manual_seed(0)
    RefinerViTForImageClassification(config).save_pretrained(base)
    image_processor_for_config(config, crop_pct=1.0).save_pretrained(base)
    argv = ["--model_name_or_path", str(base), "--train_dir", str(fashion_folder / "train"), "--validation_dir",
            str(fashion_folder / "val"), "--output_dir", str(tmp_path / "run"), "--report_to", "none",
            "--dataloader_num_workers", "0"]  # fmt: skip
    results = run_in_process(argv)
    assert results["eval_samples"] == 90 and results["global_step"] == 100
    assert results["eval_top1"] >= 0.55


def test_an_interrupted_folder_build_is_never_taken_for_a_finished_one(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from finetune_small_folder import build_atomically
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def interrupted(root, seed):
        (root / "train").mkdir(parents=True)
        raise KeyboardInterrupt

    def complete(root, seed):
        (root / "train").mkdir(parents=True)
        (root / "train" / "seed.txt").write_text(str(seed))

    data = tmp_path / "photos-seed2"
    with pytest.raises(KeyboardInterrupt):
        build_atomically(interrupted, data, 2)
    assert not data.exists()
    build_atomically(complete, data, 2)  # the next run starts over, past the partial folder
    assert (data / "train" / "seed.txt").read_text() == "2"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos-seed2"]
