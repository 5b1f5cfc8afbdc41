"""Helpers shared by the benchmarks: the models compared, the machine description, timing, multiply-adds."""

import importlib.util
import json
import os
import platform
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
# A 4-block model with every block type, for the benchmarks' own tests (not a preset, not offered by --model).
TINY_MODEL = "tiny"
TINY_FIELDS = {
    "patch_size": 8,
    "hidden_size": 24,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "mlp_ratio": 2.0,
    "block_types": ["refined", "shared", "plain", "shared"],
    "refine_expansion": 2,
    "stem_hidden_sizes": [4, 8, 8],
    "num_labels": 5,
}


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
    """A Refiner-ViT preset (or [`TINY_MODEL`]) with random weights (and random BatchNorm statistics, as after
    training): the same weights for the same seed, in any process."""
    torch.manual_seed(seed)
    if name == TINY_MODEL:
        config = RefinerViTConfig(image_size=image_size, **TINY_FIELDS)
    else:
        config = RefinerViTConfig.from_preset(name, image_size=image_size)
    return with_trained_batch_norm_statistics(RefinerViTForImageClassification(config))


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


def timm_deit_small(image_size: int, seed: int = 0) -> torch.nn.Module:
    """timm's `deit_small_patch16_224` at `image_size` with random weights: DeiT-S as its authors' library runs it
    (needs timm, which the `train` and `test` extras install)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("deit_small_patch16_224", pretrained=False, img_size=image_size)


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


def interleaved_samples(
    candidates: dict[str, Callable[[], object]], device: torch.device, rounds: int, seconds_per_round: float
) -> dict[str, list[float]]:
    """
    Seconds per call of each candidate in each round, measured in alternation (round 1: A, B, C; round 2: A, B, C;
    ...), each round about `seconds_per_round` of calls, after a warm-up call (which compiles kernels, Triton's per
    dtype and shape, and fills caches) and a call that sizes the rounds.
    """
    repeats = {}
    for name, fn in candidates.items():
        fn()
        once = time_call(fn, device, 1)
        repeats[name] = max(1, int(seconds_per_round / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(time_call(fn, device, repeats[name]))
    return samples


# How busy the machine is: CPU time from /proc/stat (Linux) less this process's and its finished children's.


def cpu_times() -> tuple[int, int, int] | None:
    """Clock ticks the machine's CPUs spent busy (steal included) and in all since boot, and the number of CPUs, from
    /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ([int(v) for v in lines[0].split()[1:9]] + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal  # guest time is inside user time already
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return busy, busy + idle + iowait, max(cpus, 1)


def own_cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for."""
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def other_cpus(
    before: tuple[int, int, int], after: tuple[int, int, int], own_seconds: float, ticks_per_second: int | None = None
) -> float:
    """CPUs (on average) kept busy by other processes between two [`cpu_times`] readings, in which this process and
    its children used `own_seconds` of CPU time."""
    ticks_per_second = ticks_per_second or os.sysconf("SC_CLK_TCK")
    busy, total, cpus = after[0] - before[0], after[1] - before[1], after[2]
    if total <= 0:
        return 0.0
    elapsed = total / cpus / ticks_per_second
    return max(0.0, (busy / ticks_per_second - own_seconds) / elapsed)


def sample_other_load(seconds: float = 0.5) -> float | None:
    """CPUs kept busy by other processes over the next `seconds`, for which this process sleeps (None without
    /proc/stat). Call it while no child is running."""
    before, own = cpu_times(), own_cpu_seconds()
    time.sleep(seconds)
    after = cpu_times()
    if before is None or after is None:
        return None
    return other_cpus(before, after, own_cpu_seconds() - own)


# Other processes keeping more CPUs than this busy on average make a benchmark's figures unreliable.
BUSY_CPUS = 0.25


def load_summary(samples: list[float | None]) -> dict:
    """Other processes' load over the samples: mean and maximum CPUs, and whether the machine counts as busy."""
    known = [value for value in samples if value is not None]
    if not known:
        return {"samples": samples, "mean_cpus": None, "max_cpus": None, "busy": None, "threshold_cpus": BUSY_CPUS}
    mean = sum(known) / len(known)
    return {"samples": samples, "mean_cpus": mean, "max_cpus": max(known), "busy": mean > BUSY_CPUS,
            "threshold_cpus": BUSY_CPUS}  # fmt: skip


def busy_warning(summary: dict) -> str | None:
    """The warning line for a busy machine ([`load_summary`]), or None."""
    if not summary["busy"]:
        return None
    return (f"# WARNING: the machine is busy (other processes kept {summary['mean_cpus']:.2f} CPUs busy on average, up "
            f"to {summary['max_cpus']:.2f}, above {BUSY_CPUS}): these figures are not reliable; measure again on an "
            "idle machine.")  # fmt: skip
