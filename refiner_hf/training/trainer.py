"""
The training loop of Refiner-ViT with accelerate: [`train`] runs one training run from its [`Arguments`] (see
`arguments.py`; `examples/run_imagenet.py` is its command line) on one CPU, one GPU, several GPUs or several nodes,
and returns its results.

A run checks everything it can before training (arguments, data, model, relabel maps), holds its output directory
([`lock_run_directory`]) and refuses one that holds a previous run unless it resumes it or is asked to replace it
([`claim_run_directory`]), trains and evaluates epoch by epoch, checkpoints atomically and keeps the best weights in
`OUTPUT_DIR/model`. Resumed (`--resume_from_checkpoint latest`) wherever it was stopped, it finishes what was left
and ends with the model directory an uninterrupted run writes. The output directory holds model/ (the best weights
so far, with the image processor and a model card: a directory `AutoModelForImageClassification.from_pretrained`
loads), checkpoints/, logs/ (metrics.jsonl and the trackers' files) and all_results.json.

Each checkpoint records the run's id and its settings ([`run_settings`]: the arguments that change what is computed):
a resume refuses the checkpoints of another run, and settings that differ from the checkpoint's unless
`--allow_changed_settings` is given (the log and the model card then say what changed).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, send_to_device, set_seed
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..interruption import interruption_behind
from ..model_directory import save_model_directory
from ..modeling_refiner_vit import ModelTooLargeError, RefinerViTForImageClassification, RefinerViTPreTrainedModel
from ..token_labeling import RelabelError
from .arguments import AUGMENTATION_KEYWORDS, MIXING_KEYWORDS, OPTIMIZER_KEYWORDS, SCHEDULE_KEYWORDS, Arguments
from .augmentation import TrainTransform
from .card import base_model_id, card_data_description, card_hub_dataset, card_model_name, training_model_card
from .checkpointing import (
    CheckpointError,
    CheckpointManager,
    NonFiniteWeightsError,
    TrainingProgress,
    changed_settings,
    describe_changes,
    write_text_atomically,
)
from .data import ImageData, check_labels, load_image_data
from .distributed import (
    full_state_dict,
    processes_without_accelerators,
    single_process_warning,
    synchronize_batchnorm_statistics,
)
from .ema import build_model_ema
from .errors import DataError, UsageError
from .evaluation import EMA_WEIGHTS, better_weights, evaluate_classifier
from .loaders import build_evaluation_loader, build_training_loader
from .mixing import BatchMixing, mix_batch
from .model_setup import build_model, convert_sync_batchnorm
from .optim import build_optimizer, build_scheduler
from .publishing import check_push_to_hub, upload_trained_model
from .relabel_targets import DENSE_LABELS, build_dense_label_builder, configure_token_labeling
from .run_lock import (
    RUN_OUTPUTS,
    PreviousRunError,
    RunLock,
    RunLockedError,
    claim_run_directory,
    lock_run_directory,
)
from .tracking import format_epoch_summary, tracker_config, trackers_for


@dataclass
class Run:
    """Everything a training run works with, built by [`setup`]."""

    args: Arguments
    accelerator: Accelerator
    output_dir: Path
    data: ImageData
    model: torch.nn.Module
    image_processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ModelEmaV3 | None
    mixing: BatchMixing
    train_set: Any
    train_loader: DataLoader
    eval_loader: DataLoader
    progress: TrainingProgress
    checkpoints: CheckpointManager
    notes: list[str]
    lock: RunLock | None = None  # held by the main process while the run writes into output_dir
    # The best step whose weights this process has written to output_dir/model (a resumed run writes them again).
    model_written_step: int | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def streaming(self) -> bool:
        return self.args.data.streaming


def setup(args: Arguments) -> Run:
    """Data, model, optimisation and checkpoints, with every check done before training starts."""
    output_dir = Path(
        args.training.output_dir or ("outputs/refiner-vit" + ("-fashion-mnist" if args.data.uses_embedded_data else ""))
    )
    resuming, overwrite = args.training.resume_from_checkpoint, args.training.overwrite_output_dir
    if resuming and overwrite:
        raise UsageError(
            f"--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint {resuming} would resume: "
            "give one of them."
        )
    if overwrite:
        check_inputs_survive_overwrite(args, output_dir)
    cpu = processes_without_accelerators()
    state = PartialState(cpu=cpu)
    check_push_to_hub(args, output_dir)  # before any work: the Hub answers and the repository is there
    lock = lock_run_directory(state, output_dir)  # before anything is written there
    try:
        claim_run_directory(state, output_dir, resuming=bool(resuming), overwrite=overwrite)
        accelerator = Accelerator(
            gradient_accumulation_steps=args.training.gradient_accumulation_steps,
            mixed_precision=args.training.mixed_precision,
            log_with=trackers_for(args.training.report_to, output_dir / "logs"),
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
            cpu=cpu,
        )
        return build_run(args, accelerator, output_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


# Arguments naming what a run reads, which --overwrite_output_dir must not remove before it is read.
INPUT_PATH_ARGUMENTS = (
    "model_name_or_path", "config_name", "dataset_name", "train_dir", "validation_dir", "relabel_root", "cache_dir",
    "recipe",
)  # fmt: skip


def check_inputs_survive_overwrite(args: Arguments, output_dir: Path) -> None:
    """Refuses `--overwrite_output_dir` when what it removes holds one of the run's inputs (e.g. fine-tuning
    OUTPUT_DIR/model into the same OUTPUT_DIR)."""
    removed = [(output_dir / name).resolve() for name in RUN_OUTPUTS]
    for name in INPUT_PATH_ARGUMENTS:
        value = args.flat().get(name)
        if not value or not Path(value).exists():
            continue
        path = Path(value).resolve()
        for target in removed:
            if path == target or path.is_relative_to(target):
                raise UsageError(
                    f"--{name} {value} lies in {target}, which --overwrite_output_dir removes before the run reads it: "
                    "choose another --output_dir."
                )


def build_run(args: Arguments, accelerator: Accelerator, output_dir: Path, lock: RunLock | None) -> Run:
    """Data, model, optimisation and checkpoints (resumed when asked), with every check done before training."""
    if warning := single_process_warning(accelerator):
        accelerator.print(warning, flush=True)
    # Seeds differ per process (stochastic depth and mixing draw independently, as in timm); the initial weights are
    # process 0's, which DDP broadcasts. Data order and augmentation have their own seeds (training/loaders.py).
    set_seed(args.training.seed, device_specific=True)
    if accelerator.distributed_type == DistributedType.FSDP and args.training.model_ema:
        raise UsageError("The model EMA keeps a full copy of the weights, which FSDP shards: pass --no_model_ema.")

    with accelerator.main_process_first():
        data = load_image_data(args.data, args.training.seed)
    if args.model.allow_large_model:
        RefinerViTPreTrainedModel.max_parameters = None
    try:
        built = build_model(args.model, data.num_labels, data.class_names, cache_dir=args.data.cache_dir)
    except ModelTooLargeError as error:
        raise UsageError(str(ModelTooLargeError(error.count, error.limit, "pass --allow_large_model"))) from None
    model, image_processor = built.model, built.image_processor
    check_labels(data, args.data.label_column_name, model.config.num_labels)
    configure_token_labeling(model, args.model)
    target_builders = {}
    if args.data.relabel_root:
        target_builders[DENSE_LABELS] = build_dense_label_builder(args.data, args.training.smoothing, model, data.train)
    if args.model.sync_batchnorm:
        model = convert_sync_batchnorm(model, accelerator.device, accelerator.num_processes)

    transform = TrainTransform(
        image_size=model.config.image_size,
        mean=image_processor.image_mean,
        std=image_processor.image_std,
        **args.training.keywords(AUGMENTATION_KEYWORDS),
    )
    train_set, train_loader = build_training_loader(
        args,
        data,
        transform,
        model.config.num_labels,
        accelerator.process_index,
        accelerator.num_processes,
        target_builders=target_builders,
    )
    eval_loader = build_evaluation_loader(args, data, image_processor)
    mixing = BatchMixing(
        model.config.num_labels, **args.training.keywords(MIXING_KEYWORDS), erasing=transform.batch_erasing
    )
    optimizer = build_optimizer(model, **args.training.keywords(OPTIMIZER_KEYWORDS))
    if args.data.streaming:
        # A streamed training set is already split between processes: accelerate only moves its batches.
        model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    scheduler = build_scheduler(
        optimizer,
        updates_per_epoch=math.ceil(len(train_loader) / args.training.gradient_accumulation_steps),
        **args.training.keywords(SCHEDULE_KEYWORDS),
    )
    ema = None
    if args.training.model_ema:
        ema = build_model_ema(
            accelerator.unwrap_model(model), args.training.model_ema_decay, args.training.model_ema_warmup
        )

    # What a resumed run needs besides the model, the optimizer and the random states (saved as JSON and safetensors).
    progress = TrainingProgress()
    checkpoints = CheckpointManager(
        accelerator,
        output_dir / "checkpoints",
        args.training.checkpoints_total_limit,
        progress=progress,
        scheduler=scheduler,
        ema=ema,
        guarded=[accelerator.unwrap_model(model), *([ema] if ema is not None else [])],
        optimizer=optimizer,
        settings=run_settings(args, accelerator),
        batches_per_epoch=len(train_loader),
        total_epochs=args.training.total_epochs,
    )
    run = Run(
        args, accelerator, output_dir, data, model, image_processor, optimizer, scheduler, ema, mixing, train_set,
        train_loader, eval_loader, progress, checkpoints, built.notes, lock,
    )  # fmt: skip
    if args.training.resume_from_checkpoint:
        resume(run)
    if progress.run_id is None:  # a new run (or one resumed from a checkpoint that records no id)
        (progress.run_id,) = broadcast_object_list([uuid.uuid4().hex])
    accelerator.init_trackers("refiner-vit", config=tracker_config(args.recipe_values()))
    return run


# Arguments that do not change what a run computes, which a resumed run may change freely: where it writes and how
# often, what it logs and to which trackers, data loading workers, the evaluation batch, where it stops
# (--max_train_steps: the schedule does not depend on it), recomputation that saves memory (the same gradients),
# checks, and the Hub. Every other argument is a setting the checkpoints record and a resume compares.
FREE_SETTINGS = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "allow_changed_settings", "logging_steps",
        "report_to", "dataloader_num_workers", "checkpointing_steps", "checkpoints_total_limit", "cache_dir",
        "per_device_eval_batch_size", "max_train_steps", "gradient_checkpointing", "memory_lean_training",
        "allow_large_model", "relabel_full_check", "push_to_hub", "hub_model_id", "hub_private",
    }
)  # fmt: skip


def run_settings(args: Arguments, accelerator: Accelerator) -> dict[str, Any]:
    """
    The run's settings: every argument that changes what it computes (not [`FREE_SETTINGS`]), the precision in force
    and the number of processes, as JSON values.
    """
    settings = {name: value for name, value in args.recipe_values().items() if name not in FREE_SETTINGS}
    settings["mixed_precision"] = accelerator.mixed_precision
    settings["num_processes"] = accelerator.num_processes
    return json.loads(json.dumps(settings))


class ChangedSettingsError(UsageError):
    """A resume with settings other than those its checkpoint was trained with, without `--allow_changed_settings`."""


class MixedRunsError(DataError):
    """A checkpoint resumed into a directory holding checkpoints of another run."""


def check_same_run(run: Run, checkpoint: Path, run_id: str | None) -> None:
    """Refuses to resume `checkpoint` (of run `run_id`) among checkpoints of another run in the output directory."""
    if run_id is None:
        return
    others = sorted(path.name for path, other in run.checkpoints.run_ids().items() if other != run_id)
    if others:
        raise MixedRunsError(
            f"{run.checkpoints.directory} holds checkpoints of another run ({', '.join(others)}) than {checkpoint} "
            "(a run started there without --overwrite_output_dir): resuming would mix them. Move the ones not to "
            "resume elsewhere, or start over with --overwrite_output_dir."
        )


def check_settings(run: Run, checkpoint: Path, recorded: dict[str, Any] | None) -> dict[str, list[Any]]:
    """
    Compares this run's settings with those `checkpoint` records: a change is refused, naming every changed
    setting, unless `--allow_changed_settings` is given; then it is said, and returned for the model card.
    """
    accelerator = run.accelerator
    if recorded is None:
        accelerator.print(
            f"Warning: {checkpoint} records no settings (written by an earlier version of the trainer): resuming "
            "without checking that this run's are the ones it was trained with.",
            flush=True,
        )
        return {}
    changes = changed_settings(recorded, run.checkpoints.settings)
    if not changes:
        return {}
    if not run.args.training.allow_changed_settings:
        raise ChangedSettingsError(
            f"{checkpoint} was trained with other settings: {describe_changes(changes)}. Resume with the checkpoint's "
            "settings, pass --allow_changed_settings to go on with the new ones (the model card records them), or "
            "start over with --overwrite_output_dir."
        )
    accelerator.print(
        f"Resuming {checkpoint} with changed settings (--allow_changed_settings): {describe_changes(changes)}; the "
        "model card records them.",
        flush=True,
    )
    return changes


def resume(run: Run) -> None:
    checkpoint = run.checkpoints.resolve(run.args.training.resume_from_checkpoint)
    if checkpoint is None:
        written = [name for name in ("model", "all_results.json") if (run.output_dir / name).exists()]
        if written:
            raise PreviousRunError(
                f"--resume_from_checkpoint latest: {run.checkpoints.directory} holds no checkpoint to resume, but "
                f"{run.output_dir} holds a previous run's {' and '.join(written)}, which starting from scratch would "
                "replace: pass --overwrite_output_dir instead to start over."
            )
        run.accelerator.print(f"No checkpoint in {run.checkpoints.directory} yet: starting from scratch.", flush=True)
        return
    state = run.checkpoints.read_state(checkpoint)
    check_same_run(run, checkpoint, state["progress"]["run_id"])
    changes = check_settings(run, checkpoint, state.get("settings"))
    run.checkpoints.check_position(state)
    if changes:
        # The checkpoint's schedule and optimizer hyperparameters (lr, weight decay, betas) are the old settings': the
        # new ones are kept, else a changed --lr or --epochs would silently not apply.
        state = {**state, "scheduler": run.scheduler.state_dict()}
        groups = [{key: value for key, value in g.items() if key != "params"} for g in run.optimizer.param_groups]
    run.checkpoints.load(checkpoint, state)
    progress = run.progress
    if changes:
        for group, hyperparameters in zip(run.optimizer.param_groups, groups):
            group.update(hyperparameters)
        progress.settings_changes.append({"step": progress.global_step, "changes": changes})
    if not training_finished(run):
        left = "training continues"
    elif evaluation_due(run):
        left = "training finished; its final evaluation, the model directory and the results are left"
    else:
        left = "training and evaluation finished; the model directory and the results are left"
    run.accelerator.print(
        f"Resumed from {checkpoint}: epoch {progress.epoch + 1}, batch {progress.batches_in_epoch} of "
        f"{run.batches_per_epoch}, step {progress.global_step} ({left}).",
        flush=True,
    )


def describe(run: Run) -> str:
    args, accelerator = run.args, run.accelerator
    config = accelerator.unwrap_model(run.model).config
    num_train = (
        len(run.data.train) if not run.streaming else run.batches_per_epoch * args.training.per_device_train_batch_size
    )
    global_batch = (
        args.training.per_device_train_batch_size
        * accelerator.num_processes
        * args.training.gradient_accumulation_steps
    )
    updates = math.ceil(run.batches_per_epoch / args.training.gradient_accumulation_steps)
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    # On CPU the thread count sets the order of floating-point sums, so runs compare bitwise only at equal counts
    # (torchrun starts each process with one thread); the line makes the difference visible.
    num_threads = torch.get_num_threads()
    threads = f", {num_threads} thread{'s' * (num_threads != 1)}" if accelerator.device.type == "cpu" else ""
    return (
        f"Recipe: {args.recipe_source}\n"
        f"Data: {run.data.description}: {num_train:,}{' per process' if run.streaming else ''} training / "
        f"{len(run.data.validation):,} validation images, {config.num_labels} classes\n"
        f"Model: {config.matching_preset() or 'custom Refiner-ViT'}, "
        f"{sum(p.numel() for p in run.model.parameters()):,} parameters, {config.image_size} px, "
        f"eval crop_pct {run.image_processor.crop_pct}\n"
        + "".join(f"  {note}\n" for note in run.notes)
        + f"Batch: {args.training.per_device_train_batch_size} per process x {accelerator.num_processes} processes x "
        f"{args.training.gradient_accumulation_steps} accumulation steps = global batch {global_batch} "
        f"({accelerator.device}{threads}, {precision})\n"
        f"Schedule: {updates} steps per epoch, {args.training.total_epochs} epochs ({args.training.epochs} cosine + "
        f"{args.training.cooldown_epochs} cooldown), warmup {args.training.warmup_epochs:g} epochs from "
        f"{args.training.warmup_lr:g}, lr {args.training.lr:g} updated per {args.training.lr_schedule_unit}, "
        + (
            f"EMA decay {args.training.model_ema_decay:g}{' with warmup' if args.training.model_ema_warmup else ''}"
            if args.training.model_ema
            else "no EMA"
        )
        + (f", stopping after step {args.training.max_train_steps}" if args.training.max_train_steps else "")
        + (
            f"\nToken labeling: relabel maps {args.data.relabel_root} ({args.data.relabel_normalization}, "
            f"{args.data.relabel_layout}), class target: {args.training.relabel_class_target.replace('_', ' ')}, "
            f"dense weight {config.aux_loss_weight:g}, MixToken {'on' if args.model.mix_token else 'off'}, CutMix of "
            f"dense labels: {args.training.dense_label_cutmix}"
            if args.data.relabel_root
            else ""
        )
        + (
            f"\nAttention similarity regulariser: {config.attention_similarity_weight:g} x the first "
            f"{config.attention_similarity_pairs} pairs of consecutive maps"
            if config.attention_similarity_pairs
            else ""
        )
    )


class EpochTotals:
    """
    The sums behind an epoch's training statistics (batch losses, batches, images) and the undecodable images met, on
    this process since the last checkpoint; [`fold_into`] adds them, over all processes, to the checkpointed
    `progress.epoch_totals` and `progress.epoch_bad_images`. A resumed run starts from the same sums at the same place
    as an uninterrupted one, so both report the same.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        self.counts = [0, 0]  # batches, images
        self.bad_images: set[int | str] = set()

    def add(self, loss: torch.Tensor, images: int, bad_images: list[int | str]) -> None:
        self.loss_sum += loss.double()
        self.counts = [self.counts[0] + 1, self.counts[1] + images]
        self.bad_images.update(bad_images)

    def fold_into(self, progress: TrainingProgress) -> None:
        local = torch.cat(
            [self.loss_sum[None], torch.tensor(self.counts, dtype=torch.float64, device=self.loss_sum.device)]
        )
        summed = self.accelerator.reduce(local, reduction="sum").tolist()
        progress.epoch_totals = [
            progress.epoch_totals[0] + summed[0],
            *(int(total) + int(count) for total, count in zip(progress.epoch_totals[1:], summed[1:])),
        ]
        met = set(progress.epoch_bad_images).union(*gather_object([sorted(self.bad_images, key=str)]))
        progress.epoch_bad_images = sorted(met, key=str)
        progress.bad_training_images = sorted(met.union(progress.bad_training_images), key=str)
        self.loss_sum.zero_()
        self.counts = [0, 0]
        self.bad_images = set()


def epoch_statistics(run: Run, images: int, seconds: float) -> dict[str, Any]:
    """The epoch's training statistics from `progress.epoch_totals`; the throughput is this process's run's."""
    loss_sum, batches, _ = run.progress.epoch_totals
    return {
        "train_loss": loss_sum / batches if batches else float("nan"),
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_second": images / seconds if seconds > 0 else 0.0,
        "bad_images": len(run.progress.epoch_bad_images),
        "epoch_seconds": seconds,
    }


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """
    Trains from the run's position in `epoch` to its end (or to `--max_train_steps`), saving checkpoints every
    `--checkpointing_steps`. Returns the epoch's training statistics, summed over processes (and over the part of the
    epoch trained before a resume).
    """
    args, accelerator, progress, model = run.args, run.accelerator, run.progress, run.model
    skipped = progress.batches_in_epoch
    run.scheduler.step(epoch)  # per-epoch schedule (the original's); a no-op with --lr_schedule_unit step
    run.scheduler.step_update(progress.global_step)  # per-step schedule; a no-op per epoch
    if run.streaming:
        run.train_set.set_epoch(epoch)
        run.train_set.set_skip(skipped)
        batches = run.train_loader
    else:
        run.train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(run.train_loader, skipped) if skipped else run.train_loader

    start, trained_images = time.perf_counter(), 0
    totals = EpochTotals(accelerator)  # since the last checkpoint, folded into `progress` at each one
    window: list[torch.Tensor] = []  # losses since the last log
    window_start, window_images = time.perf_counter(), 0
    bar = tqdm(
        total=run.batches_per_epoch,
        initial=skipped,
        desc=f"epoch {epoch + 1}/{args.training.total_epochs}",
        disable=not accelerator.is_local_main_process,
        leave=False,
    )
    model.train()
    # Closed however the epoch ends, so that a stop's one-line message does not follow the half-drawn bar.
    try:
        for batch in batches:
            if run.streaming:
                batch = send_to_device(batch, accelerator.device)
            # With --relabel_root the batch has `dense_labels`, mixed like the images; without them the model gives
            # every token its image's target.
            pixel_values, targets, dense_labels = mix_batch(
                run.mixing,
                batch,
                epoch,
                class_target=args.training.relabel_class_target,
                cutmix_mode=args.training.dense_label_cutmix,
            )
            with accelerator.accumulate(model):
                loss = model(
                    pixel_values=pixel_values, labels=targets, dense_labels=dense_labels, mix_token=args.model.mix_token
                ).loss
                check_finite_loss(run, loss, batch, epoch)  # before the loss reaches the weights
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.training.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), args.training.clip_grad)
                run.optimizer.step()
                run.optimizer.zero_grad()
            progress.batches_in_epoch += 1
            totals.add(loss.detach(), pixel_values.shape[0], batch["bad_images"])
            window.append(loss.detach().float())
            trained_images += pixel_values.shape[0]
            window_images += pixel_values.shape[0]
            bar.update(1)
            if not accelerator.sync_gradients:
                continue

            progress.global_step += 1
            if run.ema is not None:
                run.ema.update(
                    accelerator.unwrap_model(model),
                    step=progress.global_step if args.training.model_ema_warmup else None,
                )
            run.scheduler.step_update(progress.global_step)
            lr = run.optimizer.param_groups[0]["lr"]
            if progress.global_step % args.training.logging_steps == 0:
                mean_loss = accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
                seen = accelerator.reduce(
                    torch.tensor(window_images, device=accelerator.device), reduction="sum"
                ).item()
                speed = seen / (time.perf_counter() - window_start)
                accelerator.log(
                    {"train/loss": mean_loss, "train/lr": lr, "train/images_per_second": speed},
                    step=progress.global_step,
                )
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
                window, window_start, window_images = [], time.perf_counter(), 0
            end_of_epoch = progress.batches_in_epoch == run.batches_per_epoch
            if (
                args.training.checkpointing_steps
                and progress.global_step % args.training.checkpointing_steps == 0
                and not end_of_epoch
            ):
                totals.fold_into(progress)
                path = run.checkpoints.save(progress)
                accelerator.print(
                    f"Saved checkpoint {path} (epoch {epoch + 1}, batch {progress.batches_in_epoch})", flush=True
                )
            if args.training.max_train_steps and progress.global_step >= args.training.max_train_steps:
                break
    finally:
        bar.close()
    totals.fold_into(progress)
    seconds = time.perf_counter() - start
    images = accelerator.reduce(torch.tensor(trained_images, device=accelerator.device), reduction="sum").item()
    return epoch_statistics(run, images, seconds)


class NonFiniteLossError(DataError, RuntimeError):
    """The training loss became NaN or infinite; the run stops before it changes the weights."""


def check_finite_loss(run: Run, loss: torch.Tensor, batch: dict[str, Any], epoch: int) -> None:
    """
    Stops the run, on every process at once, when a loss is not finite, naming the step and the images behind it:
    those of the batch whose pixels or dense labels are not finite when there are any, else the whole batch.
    """
    accelerator, progress = run.accelerator, run.progress
    not_finite = (~torch.isfinite(loss.detach())).float()
    if accelerator.reduce(not_finite, reduction="sum").item() == 0:  # accelerate reduces by sum or mean only
        return
    indices = batch["indices"].tolist()
    inputs = [batch["pixel_values"]] + ([batch[DENSE_LABELS]] if DENSE_LABELS in batch else [])
    bad_inputs = torch.stack([~torch.isfinite(x.flatten(1)).all(1) for x in inputs]).any(0).tolist()
    culprits = [index for index, bad in zip(indices, bad_inputs) if bad]
    images = (
        f"training images {culprits} have non-finite pixels or dense labels"
        if culprits
        else f"the batch held training images {indices}" + ("" if not_finite.item() else " (on another process)")
    )
    raise NonFiniteLossError(
        f"The training loss is {loss.item()} at step {progress.global_step + 1} (epoch {epoch + 1}, batch "
        f"{progress.batches_in_epoch + 1}): {images}. The run stopped before the loss reached the weights. "
        + run.checkpoints.recovery_advice()
    )


def evaluate_epoch(run: Run, epoch: int, stats: dict[str, Any]) -> bool:
    """
    Evaluates the model (and its EMA) after the training so far, records the epoch's summary and the best weights,
    logs and prints it. Returns whether these weights are the best so far (the caller checkpoints, then saves them).
    """
    accelerator, progress = run.accelerator, run.progress
    synchronize_batchnorm_statistics(accelerator, run.model, *([run.ema.module] if run.ema is not None else []))
    results = evaluate_classifier(accelerator, run.model, run.eval_loader)
    summary = {"epoch": epoch, "step": progress.global_step, **stats}
    summary.update(eval_top1=results["top1"], eval_top5=results["top5"])
    summary.update(eval_samples=results["num_samples"], bad_images=stats["bad_images"] + results["bad_images"])
    ema_results = None
    if run.ema is not None:
        ema_results = evaluate_classifier(accelerator, run.ema.module, run.eval_loader)
        summary.update(ema_top1=ema_results["top1"], ema_top5=ema_results["top5"])
    # The better of the raw and the EMA weights is this evaluation's candidate (an EMA lagging behind a short run's
    # weights is not kept); it replaces the best so far only when its top-1 is higher (ties keep the earlier one).
    weights, best = better_weights(results, ema_results)
    summary["weights"] = weights
    improved = progress.best_metric is None or best["top1"] > progress.best_metric
    if improved:
        progress.best_metric, progress.best_epoch, progress.best_weights = best["top1"], epoch, weights
        progress.best_step = progress.global_step
    progress.evaluated_step = progress.global_step
    summary.update(best_top1=progress.best_metric, best_epoch=progress.best_epoch, best_weights=progress.best_weights)
    progress.bad_validation_images = results["bad_images"]
    progress.history.append(summary)
    accelerator.log({f"epoch/{key}": value for key, value in summary.items()}, step=progress.global_step)
    accelerator.print(format_epoch_summary(epoch, run.args.training.total_epochs, summary), flush=True)
    return improved


def best_summary(progress: TrainingProgress) -> dict[str, Any] | None:
    """The summary of the evaluation that found the best weights."""
    return next((h for h in progress.history if h.get("step") == progress.best_step), None)


def best_metrics(progress: TrainingProgress) -> dict[str, Any] | None:
    """Top-1, top-5 and the number of validation images of the best weights."""
    summary = best_summary(progress)
    if summary is None:
        return None
    prefix = "ema" if progress.best_weights == EMA_WEIGHTS else "eval"
    return {
        "top1": summary[f"{prefix}_top1"],
        "top5": summary[f"{prefix}_top5"],
        "num_samples": summary["eval_samples"],
    }


def save_best_model(run: Run) -> None:
    """Writes the run's current weights (the best so far), its image processor and a model card to output_dir/model."""
    accelerator, args, progress = run.accelerator, run.args, run.progress
    keep_ema = run.ema is not None and progress.best_weights == EMA_WEIGHTS  # the weights evaluate_epoch chose
    model = run.ema.module if keep_ema else accelerator.unwrap_model(run.model)
    state_dict = full_state_dict(accelerator, run.model) if not keep_ema else None
    if accelerator.is_main_process:
        if state_dict is not None:  # FSDP: a plain copy of the model holding the gathered weights
            model = RefinerViTForImageClassification(model.config)
            model.load_state_dict(state_dict)
        model_dir = run.output_dir / "model"
        metrics = {**best_metrics(progress), "epoch": progress.best_epoch, "epochs": args.training.total_epochs}
        card = training_model_card(
            model.config,
            card_model_name(args.training.hub_model_id, run.output_dir),
            data_description=card_data_description(args.data, run.data),
            recipe=args.model_card_recipe(),
            metrics={**metrics, "weights": progress.best_weights, "model_ema": run.ema is not None},
            num_parameters=sum(p.numel() for p in model.parameters()),
            settings_changes=progress.settings_changes,
            hub_dataset=card_hub_dataset(args.data),
            base_model=base_model_id(args.model.model_name_or_path),
        )
        save_model_directory(model, run.image_processor, model_dir, model_card=card, overwrite=True)
    accelerator.wait_for_everyone()
    run.model_written_step = progress.best_step


def training_finished(run: Run) -> bool:
    """Whether the run has trained all it was asked to (its epochs, or `--max_train_steps`)."""
    args, progress = run.args, run.progress
    return progress.epoch >= args.training.total_epochs or bool(
        args.training.max_train_steps and progress.global_step >= args.training.max_train_steps
    )


def evaluation_due(run: Run) -> bool:
    """Whether training happened since the last evaluation (e.g. a run killed during its final evaluation)."""
    return run.progress.global_step > 0 and run.progress.evaluated_step != run.progress.global_step


def train_and_evaluate(run: Run) -> None:
    """
    Trains and evaluates epoch by epoch from the run's position to its end. After each evaluation the state is
    checkpointed, then the best weights are written to output_dir/model; the final state (training finished and
    evaluated) is a checkpoint too, so a run killed anywhere resumes to the same end.
    """
    accelerator, progress, args = run.accelerator, run.progress, run.args.training
    while True:
        epoch = progress.epoch
        if not training_finished(run):
            stats = train_epoch(run, epoch)
        elif evaluation_due(run):  # resumed after the training's last checkpoint, before its evaluation was saved
            stats = epoch_statistics(run, 0, 0.0)
        else:
            return
        improved = evaluate_epoch(run, epoch, stats)
        stopped_early = bool(args.max_train_steps and progress.global_step >= args.max_train_steps)
        # The epoch is complete unless the run stopped mid-epoch (--max_train_steps): a longer run resumes at the same
        # batch. (Deciding by the batch count alone re-trained an epoch for ever when a position was beyond it.)
        complete = progress.batches_in_epoch >= run.batches_per_epoch or not stopped_early
        if complete:
            progress.epoch, progress.batches_in_epoch = epoch + 1, 0
            progress.epoch_totals, progress.epoch_bad_images = [0.0, 0, 0], []
        path = run.checkpoints.save(progress)
        accelerator.print(f"Saved checkpoint {path}", flush=True)
        if improved:
            save_best_model(run)


def ensure_model_directory(run: Run) -> Path | None:
    """
    Makes sure output_dir/model holds the best weights when the run ends. A resumed run writes them again from their
    checkpoint (a kill may have interrupted their writing, or come before it): the same weights, processor and card
    an uninterrupted run wrote. Returns the directory, or None when no weights were evaluated.
    """
    accelerator, progress = run.accelerator, run.progress
    model_dir = run.output_dir / "model"
    if progress.best_step is None or run.model_written_step == progress.best_step:
        return model_dir if progress.best_step is not None else None
    if progress.best_step != progress.global_step:  # the best weights are an earlier checkpoint's: load them
        checkpoint = run.checkpoints.of_step(progress.best_step)
        if checkpoint is None:
            if model_dir.is_dir():
                accelerator.print(
                    f"The checkpoint of the best weights (step {progress.best_step}) is gone: keeping {model_dir} "
                    "as it is.",
                    flush=True,
                )
                return model_dir
            raise UsageError(
                f"The best weights (step {progress.best_step}) are in neither {model_dir} nor a checkpoint of "
                f"{run.checkpoints.directory}: they cannot be written."
            )
        final_state = copy.deepcopy(progress.state_dict())
        run.checkpoints.load(checkpoint)
        progress.load_state_dict(final_state)
    save_best_model(run)
    accelerator.print(f"Wrote the best weights (step {progress.best_step}) to {model_dir}", flush=True)
    return model_dir


def finish(run: Run, model_dir: Path | None, seconds: float) -> dict[str, Any]:
    """Writes all_results.json, uploads the model when asked, and returns the run's results."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    best = best_metrics(progress)
    results = {
        "model_dir": str(model_dir) if model_dir is not None and model_dir.is_dir() else None,
        "best_weights": progress.best_weights,
        "best_epoch": progress.best_epoch,
        "eval_top1": best["top1"] if best else None,
        "eval_top5": best["top5"] if best else None,
        "eval_samples": best["num_samples"] if best else None,
        "global_step": progress.global_step,
        "epochs_completed": progress.epoch,
        "bad_images_skipped": len(progress.bad_training_images) + progress.bad_validation_images,
        "train_seconds_this_run": seconds,
        "history": progress.history,
    }
    if accelerator.is_main_process:
        write_text_atomically(run.output_dir / "all_results.json", json.dumps(results, indent=2) + "\n")
        if results["model_dir"] is not None:
            accelerator.print(
                f"Best: {100 * results['eval_top1']:.2f} % top-1, {100 * results['eval_top5']:.2f} % top-5 "
                f"({progress.best_weights} weights, epoch {progress.best_epoch + 1}); model saved to "
                f"{results['model_dir']}",
                flush=True,
            )
    # An upload that fails leaves a finished run (model directory, all_results.json, closed trackers): one line with
    # the `hf upload` command, exit status 1 as the converter's.
    if failure := upload_trained_model(run, results, card_data_description(args.data, run.data)):
        accelerator.end_training()
        raise failure
    return results


def train(args: Arguments) -> dict[str, Any]:
    """
    Runs the training the arguments describe (see [`parse_args`] for the command line's) and returns its results, also
    written to `OUTPUT_DIR/all_results.json`. Accelerate's process-wide state is reset at the end, so that another run
    can follow in the same process.

    Raises:
        `UsageError` (and the errors in [`STOPPING_ERRORS`]): a problem with the arguments, the data, the relabel maps
            or a checkpoint, or a run stopped on a non-finite loss; the message names it and what to do.
    """
    global _current_run
    _current_run = None
    try:
        run = setup(args)
        _current_run = run
        try:
            run.accelerator.print(describe(run), flush=True)
            start = time.perf_counter()
            train_and_evaluate(run)
            model_dir = ensure_model_directory(run)
            results = finish(run, model_dir, time.perf_counter() - start)
            run.accelerator.end_training()
        except RuntimeError as error:
            # A DataLoader worker that the same Ctrl-C or SIGTERM stopped, reported while the run unwound: the
            # interruption is what happened.
            stop = interruption_behind(error)
            if stop is None:
                raise
            raise stop from None
        finally:
            if run.lock is not None:
                run.lock.release()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return results


# The run [`train`] works on (or last worked on) in this process, for [`resume_hint`].
_current_run: Run | None = None


def resume_command(argv: list[str], program: str) -> str:
    """
    The command that resumes a run started with `argv`: the same arguments without `--resume_from_checkpoint` and
    `--overwrite_output_dir` (which would remove what is to be resumed), plus `--resume_from_checkpoint latest`.
    """
    kept, skip_value = [], False
    for item in argv:
        if skip_value:
            skip_value = False
            if not item.startswith("--"):
                continue
        name = item.split("=", 1)[0]
        if name == "--resume_from_checkpoint":
            skip_value = "=" not in item
            continue
        if name == "--overwrite_output_dir":
            # a bool flag takes an optional value (`--overwrite_output_dir true`)
            skip_value = "=" not in item
            continue
        kept.append(item)
    launcher = "accelerate launch [the same launch options]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python"
    return f"{launcher} {shlex.join([program, *kept, '--resume_from_checkpoint', 'latest'])}"


def resume_hint(argv: list[str] | None = None, program: str | None = None) -> str:
    """
    What the command line says after a run was stopped (Ctrl-C, SIGTERM): the step reached, the checkpoint a resume
    starts from, and the command that resumes.
    """
    argv = sys.argv[1:] if argv is None else argv
    program = program or sys.argv[0]
    run = _current_run
    if run is None:
        where = "It was stopped before training started"
    else:
        latest = run.checkpoints.latest()
        saved = f"resuming starts from {latest}" if latest else "no checkpoint was written yet, so resuming starts over"
        where = f"It was stopped at step {run.progress.global_step}; {saved}"
    return f"{where}: {resume_command(argv, program)}"


# Errors a run stops on that are about its inputs or its state, not bugs: the command line shows them as one line.
STOPPING_ERRORS = (UsageError, RelabelError, CheckpointError, RunLockedError, NonFiniteLossError, NonFiniteWeightsError)


__all__ = [
    "FREE_SETTINGS",
    "STOPPING_ERRORS",
    "ChangedSettingsError",
    "MixedRunsError",
    "NonFiniteLossError",
    "Run",
    "resume_command",
    "resume_hint",
    "run_settings",
    "train",
]
