"""Helpers shared by the benchmarks: the models compared, the machine description, timing, multiply-adds."""

import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification
from refiner_hf.cpu_kernels import kernels_available
from refiner_hf.triton_support import triton_enabled


MODELS = ("refiner-vit-s", "refiner-vit-m", "refiner-vit-l")


def add_common_arguments(parser) -> None:
    parser.add_argument("--model", choices=MODELS, default="refiner-vit-s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--original-checkout",
        type=Path,
        help="A checkout of the original code (github.com/zhoudaquan/Refiner_ViT; its models/ package is imported from "
        "there, with the installed timm) to measure its Refiner_ViT too, under AMP as its training script runs it.",
    )
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")


def with_trained_batch_norm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm running statistics, as after training (fresh ones would make folded BatchNorms trivial)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def refiner(name: str, image_size: int, seed: int = 0) -> RefinerViTForImageClassification:
    """A Refiner-ViT preset with random weights (and random BatchNorm statistics, as after training)."""
    torch.manual_seed(seed)
    model = RefinerViTForImageClassification(RefinerViTConfig.from_preset(name, image_size=image_size))
    return with_trained_batch_norm_statistics(model)


def deit_small_vit(image_size: int, seed: int = 0, attention: str = "sdpa") -> ViTForImageClassification:
    """A transformers ViT of DeiT-S size (hidden 384, 12 layers, 6 heads, MLP 1536, patch 16) with random weights and
    PyTorch's scaled-dot-product attention (SDPA; "eager" to count its multiply-adds, which the FLOP counter misses
    in some SDPA kernels)."""
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
    config._attn_implementation = attention
    return ViTForImageClassification(config)


ORIGINAL_CONSTRUCTORS = {
    "refiner-vit-s": "Refiner_ViT_S",
    "refiner-vit-m": "Refiner_ViT_M",
    "refiner-vit-l": "Refiner_ViT_L",
}


def original_refiner(checkout: Path, name: str, image_size: int, seed: int = 0) -> torch.nn.Module:
    """
    The original code's `Refiner_ViT` preset (from `checkout/models`, never copied here) with random weights and
    BatchNorm statistics, the dense head as in the presets here and no MixToken (whose box sampling uses `np.int`,
    which NumPy 1.24 removed): the same architecture and work as `refiner(name, image_size)`.
    """
    package = Path(checkout) / "models"
    if not (package / "refined_transformer.py").is_file():
        raise SystemExit(f"--original-checkout {checkout}: no models/refined_transformer.py there.")
    module_name = "refiner_vit_original_models"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, package / "__init__.py", submodule_search_locations=[str(package)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        with warnings.catch_warnings():  # its timm.models.layers / registry imports are deprecated, not broken
            warnings.simplefilter("ignore", FutureWarning)
            spec.loader.exec_module(module)
    torch.manual_seed(seed)
    constructor = getattr(sys.modules[module_name], ORIGINAL_CONSTRUCTORS[name])
    model = constructor(img_size=image_size, mix_token=False, return_dense=True)
    return with_trained_batch_norm_statistics(model)


def amp_dtype(model_name: str, precision: str, device: torch.device) -> torch.dtype | None:
    """
    The autocast dtype of a model at a precision ("fp32": none): bfloat16 for bf16, except the original code on CUDA,
    which runs under AMP as its training script (`--amp`) does: float16 (with a gradient scaler when training).
    """
    if precision == "fp32":
        return None
    if model_name == "original" and device.type == "cuda":
        return torch.float16
    return torch.bfloat16


def multiply_adds(model: torch.nn.Module, image_size: int, device: torch.device) -> float:
    """Multiply-adds of one image's evaluation forward (matrix products, convolutions, attention), from PyTorch's FLOP
    counter. Count a Refiner-ViT on its reference path: fused kernels are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2


def write_json(path: Path | None, figures: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return gpu_description(device)
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


def gpu_description(device: torch.device) -> str:
    """The CUDA device, its memory and the software measured with, for the figures' heading."""
    properties = torch.cuda.get_device_properties(device)
    import triton

    return (
        f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), PyTorch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, Triton {triton.__version__}, Triton kernels {'on' if triton_enabled() else 'off'}"
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
        fn()  # warm-up: a first call compiles kernels (Triton's per dtype and shape) and fills caches
        once = time_call(fn, device, 1)
        repeats[name] = max(1, int(seconds_per_round / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(time_call(fn, device, repeats[name]))
    return {name: statistics.median(values) for name, values in samples.items()}
