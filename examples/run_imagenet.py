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

A recipe (examples/recipes/*.yaml) sets the arguments and the command line overrides it (`--help` lists them all).
An interrupted run continues where its last checkpoint left off with `--resume_from_checkpoint latest`.

The output directory holds model/ (the best weights so far, with the image processor and a model card: a directory
`AutoModelForImageClassification.from_pretrained` loads), checkpoints/, logs/ (metrics.jsonl and the trackers' files)
and all_results.json.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import ProjectConfiguration, send_to_device, set_seed
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.hub import image_processor_for_config, push_to_hub
from refiner_hf.model_directory import save_model_directory
from refiner_hf.training.arguments import TrainingArguments, parse_args
from refiner_hf.training.card import training_model_card
from refiner_hf.training.checkpointing import CheckpointManager, TrainingProgress
from refiner_hf.training.data import EMBEDDED_DATASET_NAME, ImageData, check_labels, load_image_data
from refiner_hf.training.distributed import (
    full_state_dict,
    processes_without_accelerators,
    single_process_warning,
    synchronize_batchnorm_statistics,
)
from refiner_hf.training.ema import build_model_ema
from refiner_hf.training.evaluation import evaluate_classifier
from refiner_hf.training.loaders import build_evaluation_loader, build_training_loader
from refiner_hf.training.modeling import build_model, convert_sync_batchnorm
from refiner_hf.training.optim import build_optimizer, build_scheduler
from refiner_hf.training.token_labeling import (
    DENSE_LABELS,
    build_dense_label_builder,
    configure_token_labeling,
    mix_batch,
)
from refiner_hf.training.tracking import format_epoch_summary, tracker_config, trackers_for
from refiner_hf.training.transforms import BatchMixing, TrainTransform


RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass
class Run:
    """Everything a training run works with, built by [`setup`]."""

    args: TrainingArguments
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

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def streaming(self) -> bool:
        return self.args.streaming


def setup(argv: Sequence[str] | None) -> Run:
    """Arguments, data, model, optimisation and checkpoints, with every check done before training starts."""
    args = parse_args(argv, recipe_dirs=[RECIPES])
    output_dir = Path(
        args.output_dir or ("outputs/refiner-vit" + ("-fashion-mnist" if args.uses_embedded_data else ""))
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers_for(args.report_to, output_dir / "logs"),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        cpu=processes_without_accelerators(),
    )
    if warning := single_process_warning(accelerator):
        accelerator.print(warning, flush=True)
    # Seeds differ per process (stochastic depth and mixing draw independently, as in timm); the initial weights are
    # process 0's, which DDP broadcasts. Data order and augmentation have their own seeds (training/loaders.py).
    set_seed(args.seed, device_specific=True)
    if accelerator.distributed_type == DistributedType.FSDP and args.model_ema:
        raise ValueError("The model EMA keeps a full copy of the weights, which FSDP shards: pass --no_model_ema.")

    with accelerator.main_process_first():
        data = load_image_data(args)
    model = build_model(args, data.num_labels, data.class_names)
    check_labels(data, args.label_column_name, model.config.num_labels)
    configure_token_labeling(model, args)
    target_builders = {}
    if args.relabel_root:
        target_builders[DENSE_LABELS] = build_dense_label_builder(args, model, data.train)
    image_processor = image_processor_for_config(model.config, crop_pct=args.crop_pct)
    if args.sync_batchnorm:
        model = convert_sync_batchnorm(model, accelerator.device, accelerator.num_processes)

    transform = TrainTransform(
        image_size=model.config.image_size,
        mean=image_processor.image_mean,
        std=image_processor.image_std,
        scale=args.scale,
        ratio=args.ratio,
        interpolation=args.train_interpolation,
        hflip=args.hflip,
        auto_augment=args.aa,
        color_jitter=args.color_jitter,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
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
        model.config.num_labels,
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        off_epoch=args.mixup_off_epoch,
    )

    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.opt_betas, args.opt_eps)
    if args.streaming:
        # A streamed training set is already split between processes: accelerate only moves its batches.
        model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    scheduler = build_scheduler(
        optimizer,
        args.epochs,
        args.warmup_epochs,
        args.warmup_lr,
        args.min_lr,
        unit=args.lr_schedule_unit,
        updates_per_epoch=math.ceil(len(train_loader) / args.gradient_accumulation_steps),
    )
    ema = None
    if args.model_ema:
        ema = build_model_ema(accelerator.unwrap_model(model), args.model_ema_decay, args.model_ema_warmup)

    # What a resumed run needs besides the model, the optimizer and the random states.
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress, *([ema] if ema is not None else []))
    checkpoints = CheckpointManager(accelerator, output_dir / "checkpoints", args.checkpoints_total_limit)
    run = Run(
        args, accelerator, output_dir, data, model, image_processor, optimizer, scheduler, ema, mixing, train_set,
        train_loader, eval_loader, progress, checkpoints,
    )  # fmt: skip
    if args.resume_from_checkpoint:
        resume(run)
    accelerator.init_trackers("refiner-vit", config=tracker_config(args.recipe_values()))
    return run


def resume(run: Run) -> None:
    checkpoint = run.checkpoints.resolve(run.args.resume_from_checkpoint)
    if checkpoint is None:
        run.accelerator.print(f"No checkpoint in {run.checkpoints.directory} yet: starting from scratch.", flush=True)
        return
    run.accelerator.load_state(str(checkpoint))
    run.accelerator.print(
        f"Resumed from {checkpoint}: epoch {run.progress.epoch + 1}, batch {run.progress.batches_in_epoch} of "
        f"{run.batches_per_epoch}, step {run.progress.global_step}.",
        flush=True,
    )


def describe(run: Run) -> str:
    args, accelerator = run.args, run.accelerator
    config = accelerator.unwrap_model(run.model).config
    num_train = len(run.data.train) if not run.streaming else run.batches_per_epoch * args.per_device_train_batch_size
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    updates = math.ceil(run.batches_per_epoch / args.gradient_accumulation_steps)
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    return (
        f"Data: {run.data.description}: {num_train:,}{' per process' if run.streaming else ''} training / "
        f"{len(run.data.validation):,} validation images, {config.num_labels} classes\n"
        f"Model: {config.matching_preset() or 'custom Refiner-ViT'}, "
        f"{sum(p.numel() for p in run.model.parameters()):,} parameters, {config.image_size} px, "
        f"eval crop_pct {run.image_processor.crop_pct}\n"
        f"Batch: {args.per_device_train_batch_size} per process x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation steps = global batch {global_batch} "
        f"({accelerator.device}, {precision})\n"
        f"Schedule: {updates} steps per epoch, {args.total_epochs} epochs ({args.epochs} cosine + "
        f"{args.cooldown_epochs} cooldown), lr {args.lr:g} updated per {args.lr_schedule_unit}"
        + (f", stopping after step {args.max_train_steps}" if args.max_train_steps else "")
        + (
            f"\nToken labeling: relabel maps {args.relabel_root} ({args.relabel_normalization}), dense weight "
            f"{config.aux_loss_weight:g}, MixToken {'on' if args.mix_token else 'off'}"
            if args.relabel_root
            else ""
        )
    )


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """
    Trains from the run's position in `epoch` to its end (or to `--max_train_steps`), saving checkpoints every
    `--checkpointing_steps`. Returns the epoch's training statistics, summed over processes.
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

    start, losses, images, bad_images, stopped_early = time.perf_counter(), [], 0, 0, False
    window: list[torch.Tensor] = []  # losses since the last log
    window_start, window_images = time.perf_counter(), 0
    bar = tqdm(
        total=run.batches_per_epoch,
        initial=skipped,
        desc=f"epoch {epoch + 1}/{args.total_epochs}",
        disable=not accelerator.is_local_main_process,
        leave=False,
    )
    model.train()
    for batch in batches:
        if run.streaming:
            batch = send_to_device(batch, accelerator.device)
        # With --relabel_root the batch has `dense_labels`, mixed like the images; without them the model gives every
        # token its image's target.
        pixel_values, targets, dense_labels = mix_batch(run.mixing, batch, epoch)
        with accelerator.accumulate(model):
            loss = model(
                pixel_values=pixel_values, labels=targets, dense_labels=dense_labels, mix_token=args.mix_token
            ).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            run.optimizer.step()
            run.optimizer.zero_grad()
        progress.batches_in_epoch += 1
        losses.append(loss.detach().float())
        window.append(losses[-1])
        images += pixel_values.shape[0]
        window_images += pixel_values.shape[0]
        bad_images += int(batch["bad_images"])
        bar.update(1)
        if not accelerator.sync_gradients:
            continue

        progress.global_step += 1
        if run.ema is not None:
            run.ema.update(
                accelerator.unwrap_model(model), step=progress.global_step if args.model_ema_warmup else None
            )
        run.scheduler.step_update(progress.global_step)
        lr = run.optimizer.param_groups[0]["lr"]
        if progress.global_step % args.logging_steps == 0:
            mean_loss = accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
            seen = accelerator.reduce(torch.tensor(window_images, device=accelerator.device), reduction="sum").item()
            speed = seen / (time.perf_counter() - window_start)
            accelerator.log(
                {"train/loss": mean_loss, "train/lr": lr, "train/images_per_second": speed}, step=progress.global_step
            )
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
            window, window_start, window_images = [], time.perf_counter(), 0
        end_of_epoch = progress.batches_in_epoch == run.batches_per_epoch
        if args.checkpointing_steps and progress.global_step % args.checkpointing_steps == 0 and not end_of_epoch:
            path = run.checkpoints.save(progress)
            accelerator.print(
                f"Saved checkpoint {path} (epoch {epoch + 1}, batch {progress.batches_in_epoch})", flush=True
            )
        if args.max_train_steps and progress.global_step >= args.max_train_steps:
            stopped_early = not end_of_epoch
            break
    bar.close()

    seconds = time.perf_counter() - start
    totals = accelerator.reduce(torch.tensor([images, bad_images], device=accelerator.device), reduction="sum")
    mean_loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=accelerator.device)
    return {
        "train_loss": accelerator.reduce(mean_loss, reduction="mean").item(),
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_second": totals[0].item() / seconds,
        "bad_images": int(totals[1]),
        "epoch_seconds": seconds,
        "stopped_early": stopped_early,
    }


def evaluate_epoch(run: Run, epoch: int, stats: dict[str, Any]) -> dict[str, Any]:
    """Evaluates the model (and its EMA), keeps the best weights in output_dir/model, logs and prints the epoch."""
    accelerator, progress = run.accelerator, run.progress
    synchronize_batchnorm_statistics(accelerator, run.model, *([run.ema.module] if run.ema is not None else []))
    results = evaluate_classifier(accelerator, run.model, run.eval_loader)
    summary = {"epoch": epoch, **stats, "eval_top1": results["top1"], "eval_top5": results["top5"]}
    summary.update(eval_samples=results["num_samples"], bad_images=stats["bad_images"] + results["bad_images"])
    weights, best = "model", results
    if run.ema is not None:
        # With the EMA on, the EMA weights are the ones kept (the published accuracies of the original are the EMA's).
        weights, best = "ema", evaluate_classifier(accelerator, run.ema.module, run.eval_loader)
        summary.update(ema_top1=best["top1"], ema_top5=best["top5"])
    if progress.best_metric is None or best["top1"] > progress.best_metric:
        progress.best_metric, progress.best_epoch, progress.best_weights = best["top1"], epoch, weights
        save_best_model(run, best, epoch)
    summary.update(best_top1=progress.best_metric, best_epoch=progress.best_epoch, best_weights=progress.best_weights)
    progress.bad_images += summary["bad_images"]
    summary.pop("stopped_early")
    progress.history.append(summary)
    accelerator.log({f"epoch/{key}": value for key, value in summary.items()}, step=progress.global_step)
    accelerator.print(format_epoch_summary(epoch, run.args.total_epochs, summary), flush=True)
    return summary


def save_best_model(run: Run, metrics: dict[str, Any], epoch: int) -> None:
    """Writes the best weights so far, with the image processor and a model card, to output_dir/model."""
    accelerator, args = run.accelerator, run.args
    model = run.ema.module if run.ema is not None else accelerator.unwrap_model(run.model)
    state_dict = full_state_dict(accelerator, run.model) if run.ema is None else None
    if not accelerator.is_main_process:
        return
    if state_dict is not None:  # FSDP: a plain copy of the model holding the gathered weights
        model = RefinerViTForImageClassification(model.config)
        model.load_state_dict(state_dict)
    model_dir = run.output_dir / "model"
    card = training_model_card(
        model.config,
        args.hub_model_id or str(model_dir),
        data_description=run.data.description,
        recipe=args.recipe_values(),
        metrics={**metrics, "epoch": epoch, "epochs": args.total_epochs, "weights": run.progress.best_weights},
        num_parameters=sum(p.numel() for p in model.parameters()),
        hub_dataset=args.dataset_name if args.dataset_name and not Path(args.dataset_name).exists() else None,
    )
    save_model_directory(model, run.image_processor, model_dir, model_card=card, overwrite=True)


def finish(run: Run, seconds: float) -> dict[str, Any]:
    """Writes all_results.json, uploads the model when asked, and returns the run's results."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    best = next((h for h in progress.history if h["epoch"] == progress.best_epoch), None)
    prefix = "ema" if progress.best_weights == "ema" else "eval"
    results = {
        "model_dir": str(run.output_dir / "model"),
        "best_weights": progress.best_weights,
        "best_epoch": progress.best_epoch,
        "eval_top1": best[f"{prefix}_top1"] if best else None,
        "eval_top5": best[f"{prefix}_top5"] if best else None,
        "eval_samples": best["eval_samples"] if best else None,
        "global_step": progress.global_step,
        "epochs_completed": progress.epoch,
        "bad_images_skipped": progress.bad_images,
        "train_seconds_this_run": seconds,
        "history": progress.history,
    }
    if accelerator.is_main_process:
        (run.output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        if best is not None:
            accelerator.print(
                f"Best: {100 * results['eval_top1']:.2f} % top-1, {100 * results['eval_top5']:.2f} % top-5 "
                f"({progress.best_weights} weights, epoch {progress.best_epoch + 1}); model saved to "
                f"{results['model_dir']}",
                flush=True,
            )
        if args.push_to_hub and best is not None:
            data_name = args.dataset_name or args.train_dir or EMBEDDED_DATASET_NAME
            commit = push_to_hub(
                results["model_dir"],
                args.hub_model_id or run.output_dir.name,
                commit_message=f"Refiner-ViT, {100 * results['eval_top1']:.2f} % top-1 on {data_name}",
                private=args.hub_private,
                token=args.hub_token,
            )
            accelerator.print(f"Uploaded to {commit.repo_url}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    run = setup(argv)
    run.accelerator.print(describe(run), flush=True)
    start = time.perf_counter()
    for epoch in range(run.progress.epoch, run.args.total_epochs):
        if run.args.max_train_steps and run.progress.global_step >= run.args.max_train_steps:
            break
        run.progress.epoch = epoch
        stats = train_epoch(run, epoch)
        stopped_early = stats["stopped_early"]
        evaluate_epoch(run, epoch, stats)
        if not stopped_early:  # else the run stopped mid-epoch: a longer run resumes at the same batch
            run.progress.epoch, run.progress.batches_in_epoch = epoch + 1, 0
        path = run.checkpoints.save(run.progress)
        run.accelerator.print(f"Saved checkpoint {path}", flush=True)
        if stopped_early:
            break
    results = finish(run, time.perf_counter() - start)
    run.accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
