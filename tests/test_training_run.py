"""
End-to-end runs of the trainer (and its command line, examples/run_imagenet.py) on the embedded data with a tiny
model: the saved model, bad input, bf16, local image folders, streaming, fine-tuning at another resolution, resuming
after SIGKILL, and two processes.
"""

import json
import math
import os
import sys
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from training_utils import (
    ROOT,
    TINY_MODEL,
    TINY_MODEL_WITHOUT_BATCHNORM,
    checkpoint_tensors,
    final_checkpoint,
    kill_script_at,
    read_results,
    run_in_process,
    run_script,
    tiny_run_args,
    write_image_folder,
)
from transformers import AutoImageProcessor, AutoModelForImageClassification

import refiner_hf  # noqa: F401  (registers the model type with the Auto classes)
from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification, hub
from refiner_hf.modeling_refiner_vit import RefinerViTPreTrainedModel
from refiner_hf.training import publishing
from refiner_hf.training.data import BadImageError, DataError, load_embedded_dataset
from refiner_hf.training.tracking import read_metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (2 epochs of 8 steps, EMA on, light augmentation), shared by the tests of its outputs."""
    output_dir = tmp_path_factory.mktemp("trained")
    argv = tiny_run_args(output_dir, checkpointing_steps=5, aa="", reprob=0.0, lr=3e-3, report_to="tensorboard")
    results = run_in_process(argv)
    return output_dir, results


def accuracy_of_saved_model(model_dir, num_samples: int) -> tuple[float, float]:
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    validation = load_embedded_dataset()["validation"]
    images = [PIL.Image.fromarray(validation[i]["image"].astype(np.uint8)) for i in range(num_samples)]
    labels = torch.tensor([validation[i]["label"] for i in range(num_samples)])
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    top5 = logits.topk(5, dim=-1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(-1).float().mean().item()


def test_training_lowers_the_loss_and_saves_a_model_with_the_measured_accuracy(trained):
    output_dir, results = trained
    losses = [r["train/loss"] for r in read_metrics(output_dir / "logs") if "train/loss" in r]
    assert len(losses) == 16 and all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1

    assert results["global_step"] == 16 and results["epochs_completed"] == 2
    assert results["eval_samples"] == 37
    # The kept weights are the better of the raw and the EMA weights of the best evaluation.
    assert results["best_weights"] == results["history"][results["best_epoch"]]["weights"] in ("raw", "ema")
    assert [h["eval_samples"] for h in results["history"]] == [37, 37]
    # The saved directory loads through the Auto classes and gives the accuracy the trainer measured for it.
    top1, top5 = accuracy_of_saved_model(output_dir / "model", 37)
    assert top1 == pytest.approx(results["eval_top1"], abs=1e-6)  # float32 mean vs exact count
    assert top5 == pytest.approx(results["eval_top5"], abs=1e-6)
    assert read_results(output_dir) == json.loads(json.dumps(results))
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))  # the TensorBoard tracker wrote its log

    config = json.loads((output_dir / "model" / "config.json").read_text())
    assert config["id2label"]["1"] == "Trouser" and config["image_size"] == 28
    processor = json.loads((output_dir / "model" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 28, "width": 28}
    card = (output_dir / "model" / "README.md").read_text()
    assert f"{100 * results['eval_top1']:.2f} %" in card and "lr: 0.003" in card and "max_train_samples: 64" in card


def test_checkpoints_are_kept_and_rotated(trained):
    output_dir, results = trained
    # Steps 5, 8 (end of epoch 1), 10, 15 and 16 (end) were saved; the last 3 are kept, and the best one.
    names = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    best = f"step_{8 * (results['best_epoch'] + 1):08d}"
    assert names == sorted({best, "step_00000010", "step_00000015", "step_00000016"})
    progress = json.loads((output_dir / "checkpoints" / "step_00000015" / "training_state.json").read_text())[
        "progress"
    ]
    assert (progress["epoch"], progress["batches_in_epoch"], progress["global_step"]) == (1, 7, 15)


def test_finetuning_at_another_resolution_resizes_and_saves_the_new_size(trained, tmp_path, monkeypatch):
    pretrained, _ = trained
    uploads = []

    def fake_push_to_hub(*args, **kwargs):
        uploads.append((args, kwargs))
        return SimpleNamespace(repo_url=f"https://hub.example/{args[1]}")

    monkeypatch.setattr(hub, "push_to_hub", fake_push_to_hub)
    checked = []  # the Hub check before training (tests/test_hub_newcomer.py tests it)
    monkeypatch.setattr(
        publishing, "check_hub_access", lambda repo_id, *args, **kwargs: checked.append(repo_id) or repo_id
    )
    argv = tiny_run_args(
        tmp_path,
        model_name_or_path=pretrained / "model",
        config_overrides=None,
        image_size=56,
        crop_pct=0.875,
        max_train_steps=2,
    )
    results = run_in_process(argv + ["--push_to_hub", "--hub_model_id", "someone/refiner-vit-tiny-56"])
    assert results["global_step"] == 2
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    processor = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    assert config["image_size"] == 56 and processor["crop_size"] == {"height": 56, "width": 56}
    assert processor["crop_pct"] == 0.875
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    assert model.refiner_vit.embeddings.position_embeddings.shape == (1, 14 * 14 + 1, 32)
    assert len(uploads) == 1 and checked == ["someone/refiner-vit-tiny-56"]
    (directory, repo_id), options = uploads[0]
    assert repo_id == "someone/refiner-vit-tiny-56" and directory == str(tmp_path / "model")
    assert "top-1" in options["commit_message"]


def test_labels_beyond_the_head_and_missing_columns_fail_before_training(tmp_path):
    overrides = json.dumps({**TINY_MODEL, "num_labels": 5})  # a new model's head with fewer classes than the data set
    with pytest.raises(DataError, match="num_labels 5 is fewer than the data set's 10 classes"):
        run_in_process(tiny_run_args(tmp_path / "run", config_overrides=overrides))
    with pytest.raises(DataError, match=r"no label column 'fine_label'; its columns are \['image', 'label'\]"):
        run_in_process(tiny_run_args(tmp_path / "run", label_column_name="fine_label"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_default_run_uses_the_embedded_recipe(tmp_path, capsys):
    # `python examples/run_imagenet.py` with nothing else, cut to 2 steps: the README's first command.
    results = run_in_process(["--output_dir", str(tmp_path), "--max_train_steps", "2", "--report_to", "none"])
    printed = capsys.readouterr().out
    assert "Data: fashion-mnist (embedded subset): 3,400 training / 1,000 validation images, 10 classes" in printed
    assert "64 per process x 1 processes x 1 accumulation steps = global batch 64" in printed
    assert results["global_step"] == 2 and results["eval_samples"] == 1000
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["block_types"] == ["plain", "shared", "refined", "shared", "plain", "shared"]


def test_bf16_autocast_gives_finite_losses(tmp_path, monkeypatch):
    # With activation checkpointing, memory-lean training and clipping as well, which must not change that.
    calls = []
    set_lean = RefinerViTPreTrainedModel.set_memory_lean_training
    monkeypatch.setattr(
        RefinerViTPreTrainedModel,
        "set_memory_lean_training",
        lambda model, enabled=True: calls.append((model, enabled)) or set_lean(model, enabled),
    )
    argv = tiny_run_args(tmp_path, mixed_precision="bf16", max_train_steps=4, epochs=1, clip_grad=1.0)
    results = run_in_process(argv + ["--gradient_checkpointing", "--memory_lean_training"])
    trained, enabled = calls[-1]  # the trainer's own call comes after the model's construction
    assert enabled and all(m.memory_lean_training for m in trained.modules() if hasattr(m, "refiner"))
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "logs") if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert results["eval_samples"] == 37 and 0 <= results["eval_top1"] <= 1


def test_image_folder_tree_with_a_corrupt_image(tmp_path):
    train, validation = tmp_path / "train", tmp_path / "val"
    write_image_folder(train, per_class=8, corrupt="broken.jpg")
    write_image_folder(validation, per_class=3, corrupt="broken-val.jpg")
    base = tiny_run_args(
        tmp_path / "run", train_dir=train, validation_dir=validation, max_train_samples=None, max_eval_samples=None,
        cache_dir=tmp_path / "cache", epochs=2, per_device_train_batch_size=4,
    )  # fmt: skip
    with pytest.raises(BadImageError, match=r"Cannot decode image \d+ \(.*broken.jpg\)"):
        run_in_process(base)

    results = run_in_process(base + ["--skip_bad_images", "--output_dir", str(tmp_path / "skipping")])
    # 25 training images in batches of 4 (6 steps per epoch); each epoch meets the corrupt one once, and the
    # validation split's corrupt image is left out of the 10 counted.
    assert results["global_step"] == 12
    assert results["eval_samples"] == 9
    assert [h["bad_images"] for h in results["history"]] == [2, 2]
    assert results["bad_images_skipped"] == 2  # images, not the times they were met
    config = json.loads((tmp_path / "skipping" / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["Pullover", "T-shirt-top", "Trouser"]


def test_streamed_image_folder_trains_equal_steps_per_epoch(tmp_path):
    train, validation = tmp_path / "train", tmp_path / "val"
    write_image_folder(train, per_class=10)
    write_image_folder(validation, per_class=3)
    argv = tiny_run_args(
        tmp_path / "run", train_dir=train, validation_dir=validation, streaming=True, max_train_samples=None,
        max_eval_samples=None, cache_dir=tmp_path / "cache", train_samples_per_epoch=30,
    )  # fmt: skip
    results = run_in_process(argv)
    # 30 streamed images make 3 full batches of 8 per epoch.
    assert results["global_step"] == 6 and results["eval_samples"] == 9
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "logs") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_after_sigkill_mid_epoch_gives_the_same_weights(tmp_path):
    # Mixing, stochastic depth, RandAugment and erasing all draw random numbers: the resumed run must replay them.
    common = dict(mixup=0.8, cutmix=1.0, drop_path=0.1, checkpointing_steps=3, epochs=2)
    reference = tmp_path / "reference"
    run_script(tiny_run_args(reference, **common))

    interrupted = tmp_path / "interrupted"
    # The interrupted run also loads its data with a worker process: the data must not depend on it.
    argv = tiny_run_args(interrupted, dataloader_num_workers=1, **common)
    kill_script_at(argv, lambda line: line.startswith("Saved checkpoint") and "batch 3)" in line)
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints and checkpoints[-1] in ("step_00000003", "step_00000006")  # mid-epoch
    assert not (interrupted / "all_results.json").exists()

    resumed = run_script(argv + ["--resume_from_checkpoint", "latest"])
    assert f"Resumed from {interrupted / 'checkpoints' / checkpoints[-1]}: epoch 1, batch" in resumed.stdout

    expected, actual = (
        checkpoint_tensors(final_checkpoint(reference)),
        checkpoint_tensors(final_checkpoint(interrupted)),
    )
    assert expected.keys() == actual.keys() and any(k.startswith("ema.") for k in expected)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name  # bitwise
    reference_results, resumed_results = read_results(reference), read_results(interrupted)
    for key in ("eval_top1", "eval_top5", "global_step", "best_epoch"):
        assert reference_results[key] == resumed_results[key], key
    for a, b in zip(reference_results["history"], resumed_results["history"]):
        assert (a["eval_top1"], a["ema_top1"]) == (b["eval_top1"], b["ema_top1"])


def one_and_two_process_runs(
    tmp_path, argv: Callable[..., list[str]], per_device_batch: int
) -> tuple[dict, dict, dict, dict]:
    """
    The same training (`argv(output_dir, **overrides)`) on 1 process with 2 accumulation steps and on 2 processes, a
    global batch of twice `per_device_batch` either way. Both run with one CPU thread per process (torchrun's default
    for each of the two; `subprocess_env` sets it for the one): on CPU the thread count sets the order of float sums,
    and AdamW's first steps magnify those last-bit differences. Returns both results and final checkpoints.
    """
    run_script(argv(tmp_path / "one", gradient_accumulation_steps=2))
    # `accelerate launch --cpu --num_processes 2` starts one process unless MPI is installed (a known accelerate
    # limitation, huggingface/accelerate#2741); `--multi_gpu` starts both through torchrun, and the trainer runs them
    # on CPU over gloo.
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]  # fmt: skip
    output = run_script(argv(tmp_path / "two"), launcher=launch).stdout
    batch = f"{per_device_batch} per process x 2 processes x 1 accumulation steps = global batch {2 * per_device_batch}"
    assert batch in output and "cpu:0, 1 thread," in output, output
    return (
        read_results(tmp_path / "one"),
        read_results(tmp_path / "two"),
        checkpoint_tensors(final_checkpoint(tmp_path / "one")),
        checkpoint_tensors(final_checkpoint(tmp_path / "two")),
    )


def tiny_runs_without_mixing(model: dict) -> Callable[..., list[str]]:
    """Tiny runs of 2 epochs in batches of 8, without mixing and stochastic depth (each process draws its own)."""
    return lambda output_dir, **overrides: tiny_run_args(
        output_dir, model=model, epochs=2, per_device_train_batch_size=8, **overrides
    )


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # A model without BatchNorm: see the next test for what BatchNorm changes.
    one_results, two_results, expected, actual = one_and_two_process_runs(
        tmp_path, tiny_runs_without_mixing(TINY_MODEL_WITHOUT_BATCHNORM), per_device_batch=8
    )
    # Each of the 37 validation images is counted exactly once (accelerate pads the last batches of 2 x 8).
    assert one_results["eval_samples"] == two_results["eval_samples"] == 37
    assert one_results["global_step"] == two_results["global_step"] == 8
    assert [h["eval_samples"] for h in two_results["history"]] == [37, 37]
    for key in ("eval_top1", "eval_top5"):
        assert one_results[key] == two_results[key], key
    # The weights and their EMA are bitwise equal: the same micro-batches, and the average of 2 processes' gradients,
    # (g1 + g2) / 2, equals the accumulation of g1 / 2 and g2 / 2 exactly in floating point.
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    for a, b in zip(one_results["history"], two_results["history"]):
        # Per-process mean losses averaged, against one mean: equal up to the order of the float32 sums.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_two_processes_train_the_embedded_recipe_as_one_process_with_accumulation(tmp_path):
    # The default run's recipe and model (BatchNorm in the stem and the refinements, EMA, a loader worker), 12 steps
    # of a global batch of 8. Training normalises each micro-batch with its own statistics either way, so every
    # parameter (and its EMA) is equal. The running statistics are not: one process updates them with both
    # micro-batches of a step, while with two processes each sees one and process 0's are kept (DDP, then broadcast
    # before evaluation).
    def embedded_run(output_dir, **overrides):
        values = dict(output_dir=output_dir, epochs=2, warmup_epochs=0, max_train_steps=12, seed=7,
                      per_device_train_batch_size=4, max_eval_samples=37, report_to="none", **overrides)  # fmt: skip
        return [item for key, value in values.items() for item in (f"--{key}", str(value))]

    one_results, two_results, expected, actual = one_and_two_process_runs(tmp_path, embedded_run, per_device_batch=4)
    assert one_results["global_step"] == two_results["global_step"] == 12
    statistics = [name for name in expected if ".running_" in name or name.endswith("num_batches_tracked")]
    assert len(statistics) == 2 * 19 * 3  # model and EMA: 19 BatchNorms (3 in the stem, 4 per refinement) x 3 buffers
    parameters = expected.keys() - set(statistics)
    recipe = yaml.safe_load((ROOT / "examples" / "recipes" / "embedded_fashion_mnist.yaml").read_text())
    model = RefinerViTForImageClassification(RefinerViTConfig(**recipe["config_overrides"], num_labels=10))
    assert parameters == {f"{kind}.{name}" for kind in ("model", "ema.module") for name, _ in model.named_parameters()}
    for name in parameters:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    num_batches = [name for name in statistics if name.endswith("num_batches_tracked")]
    assert {int(expected[name]) for name in num_batches} == {24} and {int(actual[name]) for name in num_batches} == {12}
