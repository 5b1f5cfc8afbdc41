"""Helpers shared by the benchmarks: the models compared, the machine description, timing."""

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import ViTConfig, ViTForImageClassification

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification
from refiner_hf.cpu_kernels import kernels_available


MODELS = ("refiner-vit-s", "refiner-vit-m", "refiner-vit-l")


def add_common_arguments(parser) -> None:
    parser.add_argument("--model", choices=MODELS, default="refiner-vit-s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice).")
    parser.add_argument("--seed", type=int, default=0)


def refiner(name: str, image_size: int, seed: int = 0) -> RefinerViTForImageClassification:
    """A Refiner-ViT preset with random weights (and random BatchNorm statistics, as after training)."""
    torch.manual_seed(seed)
    model = RefinerViTForImageClassification(RefinerViTConfig.from_preset(name, image_size=image_size))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def deit_small_vit(image_size: int, seed: int = 0) -> ViTForImageClassification:
    """A transformers ViT of DeiT-S size (hidden 384, 12 layers, 6 heads, MLP 1536, patch 16) with random weights."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=image_size,
        patch_size=16,
        num_labels=1000,
    )
    return ViTForImageClassification(config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, PyTorch {torch.__version__}, "
        f"fused refinement kernels {'built' if kernels_available() else 'unavailable'}"
    )


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call over `repeats` calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], device: torch.device, rounds: int, seconds_per_round: float
) -> dict[str, float]:
    """
    Median seconds per call of each candidate, measured in alternation (round 1: A, B, C; round 2: A, B, C; ...), so
    that a slow phase of a shared machine hits them all alike.
    """
    repeats = {}
    for name, fn in candidates.items():
        once = time_call(fn, device, 1)  # also a warm-up
        repeats[name] = max(1, int(seconds_per_round / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(time_call(fn, device, repeats[name]))
    return {name: statistics.median(values) for name, values in samples.items()}
