"""
Reliability of training runs: resuming never runs code planted in a checkpoint, one writer per run directory,
non-finite values stop the run (keeping the last good checkpoint), a damaged newest checkpoint is passed over, the
data reads right (16-bit images, undecodable ones replaced at random and counted once, classes nobody trains).
"""

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from training_utils import read_results, run_in_process, tiny_run_args

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.token_labeling import RelabelError
from refiner_hf.training.checkpointing import (
    CheckpointError,
    CheckpointManager,
    NonFiniteWeightsError,
    TrainingProgress,
    write_manifest,
    write_text_atomically,
)
from refiner_hf.training.data import DataError, decode_image
from refiner_hf.training.run_lock import LOCK_FILE, RunLockedError
from refiner_hf.training.trainer import NonFiniteLossError


# 32 training images in batches of 4 (8 steps per epoch), 16 validation images, a checkpoint every 3 steps.
SMALL = dict(max_train_samples=32, per_device_train_batch_size=4, max_eval_samples=16, per_device_eval_batch_size=16)
ONE_EPOCH = dict(epochs=1, checkpointing_steps=3, **SMALL)


class RunsCode:
    """A pickle payload: unpickling it creates `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def checkpoints_of(output_dir):
    return sorted((output_dir / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run (checkpoints at steps 3, 6, 8) and its model weights."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    run_in_process(tiny_run_args(output_dir, checkpoints_total_limit=5, **ONE_EPOCH))
    return output_dir


def copy_run(source, target):
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    (target / "model").exists() and subprocess.run(["rm", "-r", str(target / "model")], check=True)
    (target / "all_results.json").unlink(missing_ok=True)
    return target


@pytest.mark.parametrize(
    "planted, forged_manifest",
    [
        ("custom_checkpoint_0.pkl", False),  # what accelerate would have unpickled with weights_only=False
        ("random_states_0.pkl", True),  # with a manifest forged to match
        ("optimizer.bin", True),
    ],
)
def test_resuming_never_runs_code_planted_in_a_checkpoint(finished, tmp_path, planted, forged_manifest):
    output_dir = copy_run(finished, tmp_path / "run")
    newest = checkpoints_of(output_dir)[-1]
    marker = tmp_path / "pwned"
    torch.save(RunsCode(str(marker)), newest / planted)
    if forged_manifest:
        write_manifest(newest)
    argv = tiny_run_args(output_dir, resume_from_checkpoint=str(newest), **ONE_EPOCH)
    message = f"{planted}: cannot be read safely" if forged_manifest else f"{planted} is not part of the checkpoint"
    with pytest.raises(CheckpointError, match=message):
        run_in_process(argv)
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_is_passed_over_and_the_run_ends_the_same(finished, tmp_path, capsys):
    for damage, name in [("truncate", "optimizer.bin"), ("flip", "model.safetensors"), ("truncate", "ema.safetensors"),
                         ("flip", "random_states_0.pkl"), ("remove", "training_state.json")]:  # fmt: skip
        output_dir = copy_run(finished, tmp_path / f"{damage}-{name}")
        newest = checkpoints_of(output_dir)[-1]
        path = newest / name
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            path.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
        else:
            path.unlink()
        capsys.readouterr()
        # An explicit path is refused, naming the file ...
        with pytest.raises(CheckpointError, match=rf"{newest.name}: {name} (has|is)"):
            run_in_process(tiny_run_args(output_dir, resume_from_checkpoint=str(newest), **ONE_EPOCH))
        # ... `latest` takes the newest intact one and says so; the run then ends as the uninterrupted one did.
        results = run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **ONE_EPOCH))
        out = capsys.readouterr().out
        assert f"Passing over 1 damaged checkpoint(s): {newest}: {name}" in out
        assert f"Resuming from the newest intact one, {checkpoints_of(output_dir)[-2].name}" in out
        assert results["eval_top1"] == read_results(finished)["eval_top1"], name
        written, expected = output_dir / "model" / "model.safetensors", finished / "model" / "model.safetensors"
        assert written.read_bytes() == expected.read_bytes(), name


def test_a_checkpoint_without_its_manifest_is_incomplete(finished, tmp_path):
    output_dir = copy_run(finished, tmp_path / "run")
    newest = checkpoints_of(output_dir)[-1]
    (newest / "manifest.json").unlink()  # as if a second writer had renamed a half-written save into place
    with pytest.raises(CheckpointError, match=rf"{newest.name} is incomplete: it has no manifest.json"):
        run_in_process(tiny_run_args(output_dir, resume_from_checkpoint=str(newest), **ONE_EPOCH))


def test_a_second_run_on_the_same_directory_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    host = socket.gethostname()
    (output_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": os.getppid(), "started": "earlier"}))
    with pytest.raises(RunLockedError, match=rf"is being written by another run \(process {os.getppid()} on {host}"):
        run_in_process(tiny_run_args(output_dir, max_train_steps=1, **SMALL))
    assert sorted(p.name for p in output_dir.iterdir()) == [LOCK_FILE]  # nothing written

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (output_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": dead.pid, "started": "earlier"}))
    run_in_process(tiny_run_args(output_dir, epochs=1, max_train_steps=2, **SMALL))
    assert f"Took over the lock of {output_dir} from a run that is gone (process {dead.pid}" in capsys.readouterr().out
    assert not (output_dir / LOCK_FILE).exists()  # released at the end


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward, calls = RefinerViTForImageClassification.forward, []

    def diverging(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 5:
                outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(RefinerViTForImageClassification, "forward", diverging)
    output_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 \(epoch 1, batch 5\).*step_00000003"):
        run_in_process(tiny_run_args(output_dir, **ONE_EPOCH))
    assert [p.name for p in checkpoints_of(output_dir)] == ["step_00000003"]
    assert not (output_dir / "model").exists() and not (output_dir / "all_results.json").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    try:
        model = accelerator.prepare(torch.nn.Linear(3, 2))
        progress = TrainingProgress(global_step=1)
        manager = CheckpointManager(accelerator, tmp_path, progress=progress, guarded=[model])
        manager.save(progress)
        with torch.no_grad():
            model.bias[1] = float("inf")
        progress.global_step = 2
        with pytest.raises(NonFiniteWeightsError, match=r"NaN or infinite values at step 2 \(e.g. bias\)"):
            manager.save(progress)
        assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_packed_relabel_store_with_nan_scores_stops_training_naming_the_map(tmp_path):
    from refiner_hf.token_labeling import PackedRelabelWriter, finalize_packed_store
    from refiner_hf.training.data import embedded_image_ids

    writer = PackedRelabelWriter(tmp_path / "store", shard_size=64)
    generator = torch.Generator().manual_seed(0)
    for key in embedded_image_ids("train", 3400):
        writer.add(key, torch.randn(3, 7, 7, generator=generator), torch.randint(0, 10, (3, 7, 7), generator=generator))
    writer.flush()
    finalize_packed_store(tmp_path / "store", num_classes=10)
    for shard in (tmp_path / "store").glob("*.scores.npy"):  # damaged after it was written
        np.save(shard, np.full_like(np.load(shard), np.nan))
    first = (tmp_path / "store" / "shard-00000.keys.txt").read_text().splitlines()[0].split("\t")[0]
    argv = tiny_run_args(tmp_path / "run", relabel_root=tmp_path / "store", epochs=1, **SMALL)
    with pytest.raises(RelabelError, match=rf"map '{first}': scores contain NaN"):
        run_in_process(argv + ["--relabel_full_check"])
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    with pytest.raises(RelabelError, match=r"map 'fashion_mnist/train_\d+': scores contain NaN"):
        run_in_process(argv)  # met during training: stopped there, naming it


def test_sixteen_bit_training_images_keep_their_brightness():
    gray = np.linspace(0, 255, 64, dtype=np.uint8).reshape(8, 8)
    for value in (PIL.Image.fromarray(gray.astype(np.uint16) * 257), gray.astype(np.uint16) * 257):
        image = decode_image(value, 0)
        assert image.mode == "L" and np.array_equal(np.asarray(image), gray)


def image_dataset(labels: list[int]):
    import datasets

    from refiner_hf.training.data import load_embedded_dataset

    pixels = load_embedded_dataset()["train"][: len(labels)]["image"]
    images = []
    for array in pixels:
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["bag", "boot", "coat"])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_a_class_nobody_trains_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    image_dataset([0, 1] * 8).to_parquet(data / "train.parquet")  # no coat to train on ...
    image_dataset([0, 1, 2] * 2).to_parquet(data / "validation.parquet")  # ... but coats to evaluate
    argv = tiny_run_args(tmp_path / "run", dataset_name=data, cache_dir=tmp_path / "cache", max_train_samples=None,
                         max_eval_samples=None, per_device_train_batch_size=4, epochs=1)  # fmt: skip
    with pytest.raises(DataError, match=r"classes with no training image: 'coat' \(2\); a model trained on these"):
        run_in_process(argv)
    # Left out by --max_train_samples only: said, and trained.
    results = run_in_process(
        tiny_run_args(tmp_path / "small", max_train_samples=8, epochs=1, per_device_train_batch_size=4)
    )
    assert "Note: --max_train_samples 8 leaves no training image of some classes" in capsys.readouterr().out
    assert results["global_step"] == 2


def test_a_model_too_large_to_be_meant_is_refused_with_the_flag_that_allows_it(tmp_path):
    from refiner_hf.training.errors import UsageError

    overrides = json.dumps({"num_hidden_layers": 100_000})
    with pytest.raises(UsageError, match=r"describes a model of [\d,]+ parameters.*--allow_large_model"):
        run_in_process(tiny_run_args(tmp_path / "run", config_overrides=overrides, **SMALL))


def test_a_write_stopped_midway_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "all_results.json"
    write_text_atomically(target, '{"eval_top1": 0.5}\n')
    assert target.read_text() == '{"eval_top1": 0.5}\n' and sorted(p.name for p in tmp_path.iterdir()) == [target.name]

    def stopped_midway(self, text, *args, **kwargs):
        with open(self, "w") as file:
            file.write(text[:5])  # half the text, then the run is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(type(target), "write_text", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(target, '{"eval_top1": 0.75}\n')
    assert target.read_text() == '{"eval_top1": 0.5}\n'  # the old record, not half of the new one
