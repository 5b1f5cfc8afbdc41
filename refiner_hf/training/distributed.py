"""Launch-time and multi-process details of the trainer that accelerate leaves to the script."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DistributedType
from timm.utils import distribute_bn
from torch import nn


def processes_without_accelerators() -> bool:
    """
    Whether several processes were started (`accelerate launch --multi_gpu`, torchrun) on a machine without GPUs:
    accelerate then forms a gloo group on CPU only when told to use the CPU (`Accelerator(cpu=True)`).
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def single_process_warning(accelerator: Accelerator) -> str | None:
    """
    A warning when several CPU processes were asked for but one started: `accelerate launch --cpu --num_processes N`
    starts them through MPI only, and otherwise runs the script once (exporting MASTER_ADDR but no WORLD_SIZE).
    """
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if accelerator.num_processes == 1 and cpu_launch and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        return (
            "Warning: running ONE process. `accelerate launch --cpu --num_processes N` needs MPI (mpirun) to start "
            "several; on a machine without GPUs use `accelerate launch --multi_gpu --num_processes N "
            "examples/run_imagenet.py ...` (or examples/accelerate_configs/cpu_2proc.yaml), which runs them on CPU."
        )
    return None


def synchronize_batchnorm_statistics(accelerator: Accelerator, *modules: nn.Module) -> None:
    """
    Gives every process process 0's BatchNorm running statistics (timm's `distribute_bn`), before evaluating or
    saving: training updates each process's from its own batches, and DDP broadcasts them only at the next forward.
    """
    data_parallel = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP)
    if accelerator.num_processes > 1 and accelerator.distributed_type in data_parallel:
        for module in modules:
            distribute_bn(module, accelerator.num_processes, reduce=False)


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """
    The unsharded weights of a prepared model (collective under FSDP: every process must call it), or None when the
    unwrapped model already holds them.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.get_state_dict(model)
    return None


__all__ = [
    "full_state_dict",
    "processes_without_accelerators",
    "single_process_warning",
    "synchronize_batchnorm_statistics",
]
