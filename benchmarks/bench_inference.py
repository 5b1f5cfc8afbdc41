"""
Inference throughput of Refiner-ViT: the reference path (`model.set_fast_inference(False)`), the fast path
(`model.set_fast_inference(True)`: its fused kernels, C++ on CPU and Triton on CUDA, and its PyTorch implementation),
the ONNX export run by ONNX Runtime (fp32 and int8 linear layers; CPU), the original code's `Refiner_ViT` (with
`--original-checkout`; under AMP, float16 autocast, on CUDA at bf16), a transformers `ViTForImageClassification` of
DeiT-S size with SDPA and timm's `deit_small_patch16_224`, both with random weights; in fp32, bf16 (autocast) and
compiled (`torch.compile`). Prints images per second, the ratios fast / reference, fast / DeiT-S, fast / timm DeiT-S,
fast / DeiT-S per multiply-add (the throughput ratio times Refiner-ViT's multiply-adds over the ViT's) and ONNX
Runtime / fast; it is a benchmark, not a test.

    python benchmarks/bench_inference.py                                  # Refiner-ViT-S, 224 px, batch 1 and 8
    python benchmarks/bench_inference.py --batch-size 8 --no-compile
    python benchmarks/bench_inference.py --model refiner-vit-l --image-size 448 --dtype fp32 --no-compile --rounds 3 \\
        --reference-max-batch 1
    python benchmarks/bench_inference.py --model refiner-vit-l --image-size 448 --batch-size 64 --device cuda \\
        --dtype bf16 --no-compile --original-checkout ../Refiner_ViT

Method: every engine is timed in a process of its own. Engines that share a process share its threads' waiting, and
under load from other processes PyTorch's threads lose far more than ONNX Runtime's, so timing them in alternation in
one process gave ratios that said more about the load than about the engines. Each child (this script with
`--worker`) builds its model from the same seed (the same weights in every process; the ONNX export is made once, by
the parent, and the children only open it), then for each batch size and precision, eager and then compiled, warms
up and times about `--seconds` of calls; imports, model building and compilation are not timed. One child runs at a
time, with as many threads (PyTorch's, or ONNX Runtime's intra-op threads) as the parent's PyTorch uses
(`--threads`). The engines take turns: round 1 runs each engine's process once, round 2 again, and so on for
`--rounds` rounds; each figure is the best (fewest seconds per call) of its rounds. Compiled rows compile again in
each round's process (Inductor's on-disk cache shortens all but the first).

Busy machine: before each child and after each round, while nothing of the benchmark runs, /proc/stat is sampled for
half a second: the CPUs that other processes kept busy are printed per round and written to the JSON, and above 0.25
CPUs on average a "WARNING: the machine is busy" line says the figures are not reliable. The self-check (on by
default; `--no-self-check`) also times the fast path and ONNX Runtime fp32 (or else the DeiT-S-size ViT) in alternation
in one process, as this benchmark used to, and prints both against their own processes' figures, with a warning when
one differs by more than 25 %.

ONNX Runtime runs in the fp32 eager rows on CPU (`--no-onnx` leaves it out; it needs the `export` extra); timm's DeiT-S
needs timm (the `train` and `test` extras).
"""

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import (
    TINY_MODEL,
    add_common_arguments,
    amp_dtype,
    busy_warning,
    deit_small_vit,
    interleaved_samples,
    load_summary,
    machine_description,
    multiply_adds,
    original_refiner,
    refiner,
    sample_other_load,
    timm_deit_small,
    write_json,
)

import refiner_hf
from refiner_hf.cpu_kernels import set_kernels_enabled
from refiner_hf.triton_support import set_triton_enabled


# The goal for inference on a GPU: the fast path within 0.8x of the DeiT-S-size ViT's throughput per multiply-add.
GOAL_PER_MULTIPLY_ADD = 0.8
# The targets of the default path (the fast path) in fp32 eager rows: (engine, other engine, least ratio of their
# images per second, the (model, image size) it applies to, None: any). At least 0.9x timm's DeiT-S for
# Refiner-ViT-S at 224 px, at least 10x the original code for Refiner-ViT-L at 448 px (the released model), and ONNX
# Runtime fp32 at least as fast as the default path.
TARGETS = (
    ("fast", "timm-deit-s", 0.9, ("refiner-vit-s", 224)),
    ("fast", "original", 10.0, ("refiner-vit-l", 448)),
    ("onnx-fp32", "fast", 1.0, None),
)
NAMES = {
    "reference": "reference",
    "fast": "fast (fused kernels)",
    "fast-pytorch": "fast (PyTorch)",
    "onnx-fp32": "ONNX Runtime fp32",
    "onnx-int8": "ONNX Runtime int8",
    "original": "original code",
    "deit-s": "DeiT-S-size ViT",
    "timm-deit-s": "timm DeiT-S",
}
ONNX_FILES = {"onnx-fp32": "model.onnx", "onnx-int8": "model_quantized.onnx"}
# Other processes' load (CPUs, on average) above which the figures are flagged, and each sample's length.
BUSY_SAMPLE_SECONDS = 0.5
# The self-check's limit on the difference between an engine's figure in a shared process and in its own.
SELF_CHECK_TOLERANCE = 0.25
# The line of a worker's standard output that carries its result (other output may precede it).
RESULT_PREFIX = "bench_inference result: "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--no-compile", action="store_true", help="Skip the torch.compile measurements.")
    parser.add_argument("--no-onnx", action="store_true", help="Skip the ONNX Runtime measurements.")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=tuple(NAMES),
        metavar="ENGINE",
        help=f"The engines to time, of {', '.join(NAMES)} (default: every one available: ONNX Runtime on CPU in "
        "fp32 unless --no-onnx, `original` with --original-checkout, `timm-deit-s` with timm installed).",
    )
    parser.add_argument(
        "--reference-max-batch",
        type=int,
        help="Measure the reference path and the original code only up to this batch size: they materialise every "
        "expanded attention map (Refiner-ViT-L at 448 px and batch 8 needs about 18 GB).",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="Rounds, each running every engine's process once (best kept)."
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="Approximate length of one measurement.")
    parser.add_argument(
        "--self-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also time the fast path and one other engine in one shared process and compare (default: on).",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a child's task, as JSON
    parser.add_argument("--tiny-model", action="store_true", help=argparse.SUPPRESS)  # the tests' 4-block model
    args = parser.parse_args(argv)
    if args.tiny_model:
        args.model = TINY_MODEL
    return args


# The worker: one process, its engines, their timings.


def without_fused_kernels(fn: Callable[[], object]) -> Callable[[], object]:
    """Runs fn with the fused kernels (C++ and Triton) switched off: the fast path's PyTorch implementation."""

    def run():
        previous_cpu, previous_triton = set_kernels_enabled(False), set_triton_enabled(False)
        try:
            return fn()
        finally:
            set_kernels_enabled(previous_cpu)
            set_triton_enabled(previous_triton)

    return run


def build_engine(name: str, spec: dict, device: torch.device):
    """An engine's model (in evaluation mode on `device`) or, for ONNX Runtime, its session of the parent's export."""
    if name in ONNX_FILES:
        from refiner_hf.onnx_export import onnx_session

        # Threads that sleep between runs, as in the shared-process self-check (spinning ones would slow the other).
        return onnx_session(Path(spec["onnx_dir"]) / ONNX_FILES[name], threads=spec["threads"], spinning=False)
    if name in ("reference", "fast", "fast-pytorch"):
        # The path is set either way: the model's default may change.
        model = refiner(spec["model"], spec["image_size"], spec["seed"]).set_fast_inference(name != "reference")
    elif name == "original":
        model = original_refiner(Path(spec["original_checkout"]), spec["model"], spec["image_size"], spec["seed"])
    elif name == "deit-s":
        model = deit_small_vit(spec["image_size"], spec["seed"])
    elif name == "timm-deit-s":
        model = timm_deit_small(spec["image_size"], spec["seed"])
    else:
        raise ValueError(f"unknown engine {name!r}")
    return model.to(device).eval()


def engine_call(name: str, model, pixel_values: torch.Tensor, dtype: str, device: torch.device) -> Callable:
    """One inference of `pixel_values` by an engine, as a callable returning its logits."""
    if name in ONNX_FILES:
        inputs = {"pixel_values": pixel_values.cpu().numpy()}
        return lambda: model.run(["logits"], inputs)
    autocast_dtype = amp_dtype(name, dtype, device)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = model(pixel_values)
            return output if name in ("original", "timm-deit-s") else output.logits

    return without_fused_kernels(forward) if name == "fast-pytorch" else forward


def measure(spec: dict) -> dict:
    """
    A worker's task: builds `spec["engines"]` and, for each of `spec["configurations"]` (batch size, dtype, mode),
    times them in alternation over `spec["rounds"]` rounds of about `spec["seconds"]` each (one engine: one
    measurement). Returns per configuration the seconds per call of each engine in each round, and the seconds of its
    first call (with `torch.compile`, the compilation); model building and first calls are not in the timings.
    """
    device = torch.device(spec["device"])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    try:
        began = time.perf_counter()
        models = {name: build_engine(name, spec, device) for name in spec["engines"]}
        build_s = time.perf_counter() - began
        compiled = None
        torch.manual_seed(spec["seed"])
        results = []
        for configuration in spec["configurations"]:
            runners = models
            if configuration["mode"] == "compiled":
                if compiled is None:
                    # Every batch size and precision is its own graph of the same wrapper: without room for them all,
                    # dynamo would fall back to eager after the default limit of 8 and time the wrong thing.
                    torch._dynamo.config.recompile_limit = 64
                    compiled = {name: torch.compile(model) for name, model in models.items()}
                runners = compiled
            size = spec["image_size"]
            pixel_values = torch.randn(configuration["batch_size"], 3, size, size, device=device)
            candidates = {
                name: engine_call(name, runner, pixel_values, configuration["dtype"], device)
                for name, runner in runners.items()
            }
            first_call_s = {}
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                first_call_s[name] = time.perf_counter() - start
            samples = interleaved_samples(candidates, device, spec["rounds"], spec["seconds"])
            results.append({**configuration, "seconds_per_call": samples, "first_call_s": first_call_s})
        return {"build_s": build_s, "results": results}
    finally:
        torch.set_num_threads(previous_threads)


class WorkerError(RuntimeError):
    """A worker process failed; the message is the last line of its error output."""


def run_worker(spec: dict) -> dict:
    """[`measure`]`(spec)` in a child process of its own (this script with `--worker`), its result read back."""
    env = dict(os.environ)
    checkout = Path(refiner_hf.__file__).resolve().parents[1]
    if (checkout / "setup.cfg").is_file():  # the parent's refiner_hf (a checkout) in the child too
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    results = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not results:
        lines = completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"]
        raise WorkerError(lines[-1])
    return json.loads(results[-1][len(RESULT_PREFIX) :])


# The parent: which engines, the checks, the rounds, the self-check, the tables.


def choose_engines(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The engines asked for (default: every available one); exits naming the reason for one that cannot run."""
    reasons = {}
    for name in ONNX_FILES:
        if args.no_onnx:
            reasons[name] = "--no-onnx"
        elif device.type != "cpu":
            reasons[name] = "ONNX Runtime is measured on CPU only"
        elif "fp32" not in args.dtype:
            reasons[name] = "ONNX Runtime runs in the fp32 rows only"
        elif importlib.util.find_spec("onnxruntime") is None:
            reasons[name] = "ONNX Runtime is not installed (the `export` extra)"
    if not args.original_checkout:
        reasons["original"] = "it needs --original-checkout"
    if importlib.util.find_spec("timm") is None:
        reasons["timm-deit-s"] = "timm is not installed"
    if args.engines is None:
        if "timm-deit-s" in reasons:
            print(f"# timm DeiT-S not measured: {reasons['timm-deit-s']}")
        return [name for name in NAMES if name not in reasons]
    refused = [f"{name} ({reasons[name]})" for name in args.engines if name in reasons]
    if refused:
        raise SystemExit(f"bench_inference: cannot measure {', '.join(refused)}.")
    return [name for name in NAMES if name in args.engines]


def engine_configurations(name: str, configurations: list[dict], args: argparse.Namespace) -> list[dict]:
    """The configurations an engine is timed in: ONNX Runtime in fp32 eager only, the fast path's PyTorch
    implementation eager only (a compiled graph keeps the kernels it was traced with), the reference and the original
    code up to --reference-max-batch."""
    chosen = []
    for configuration in configurations:
        if name in ONNX_FILES and (configuration["mode"], configuration["dtype"]) != ("eager", "fp32"):
            continue
        if name == "fast-pytorch" and configuration["mode"] != "eager":
            continue
        limit = args.reference_max_batch
        if name in ("reference", "original") and limit is not None and configuration["batch_size"] > limit:
            continue
        chosen.append(configuration)
    return chosen


def key(configuration: dict) -> tuple[str, str, int]:
    return configuration["mode"], configuration["dtype"], configuration["batch_size"]


def self_check_differences(
    own: dict[str, float], shared: dict[str, float], tolerance: float = SELF_CHECK_TOLERANCE
) -> tuple[dict[str, float], list[str]]:
    """
    Each engine's throughput (images per second) in the shared process relative to its own process's (-0.1: 10 %
    slower when shared), and the engines whose two figures differ by more than `tolerance` of the own process's.
    """
    differences = {name: shared[name] / own[name] - 1.0 for name in shared if name in own}
    return differences, [name for name, value in differences.items() if abs(value) > tolerance]


def self_check_plan(plan: dict[str, list[dict]]) -> tuple[dict, list[str]] | None:
    """The shared-process check's configuration (eager, fp32 if measured, the first batch size) and its engines: the
    fast path and ONNX Runtime fp32, or else the DeiT-S-size ViT (or timm's); None without two of them."""
    if "fast" not in plan:
        return None
    eager = [c for c in plan["fast"] if c["mode"] == "eager"]
    configuration = next((c for c in eager if c["dtype"] == "fp32"), eager[0] if eager else None)
    if configuration is None:
        return None
    for other in ("onnx-fp32", "deit-s", "timm-deit-s"):
        if any(key(c) == key(configuration) for c in plan.get(other, [])):
            return configuration, ["fast", other]
    return None


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args.worker))), flush=True)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    engines = choose_engines(args, device)

    # The checks, once, here; the children only time.
    reference = refiner(args.model, args.image_size, args.seed).set_fast_inference(False).to(device).eval()
    fast = copy.deepcopy(reference).set_fast_inference(True)
    macs = {
        "refiner": multiply_adds(reference, args.image_size, device),  # the same work on every path
        "deit-s": multiply_adds(
            deit_small_vit(args.image_size, args.seed, "eager").to(device), args.image_size, device
        ),
    }
    with torch.no_grad():  # also builds the fused kernels (cached on disk) before any child needs them
        check = torch.randn(2, 3, args.image_size, args.image_size, device=device)
        expected = reference(check).logits
        difference = (fast(check).logits - expected).abs().max().item()
    machine = machine_description(device)
    print(f"# {args.model} at {args.image_size} px on {machine}")
    print(f"# multiply-adds per image: Refiner-ViT {macs['refiner'] / 1e9:.2f} G, DeiT-S-size ViT "
          f"{macs['deit-s'] / 1e9:.2f} G")  # fmt: skip
    if "timm-deit-s" in engines:
        print(f"# timm DeiT-S: timm {importlib.metadata.version('timm')}'s deit_small_patch16_224, random weights")
    print(f"# fast vs reference, fp32 logits: max abs difference {difference:.2e}")
    if "original" in engines:
        original = original_refiner(args.original_checkout, args.model, args.image_size, args.seed)
        counts = [sum(p.numel() for p in model.parameters()) for model in (original, reference)]
        print(f"# original code from {args.original_checkout}: {counts[0]:,} parameters (here: {counts[1]:,})")
        del original
    work_dir = tempfile.TemporaryDirectory(prefix="bench_inference_")
    onnx_differences = {}
    if any(name in ONNX_FILES for name in engines):
        onnx_differences = export_and_check_onnx(reference, Path(work_dir.name), check, expected, threads)
    del reference, fast, check, expected
    gc.collect()  # the children get the memory
    if device.type == "cuda":
        torch.cuda.empty_cache()

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    configurations = [
        {"mode": mode, "dtype": dtype, "batch_size": batch_size}
        for mode in modes
        for dtype in args.dtype
        for batch_size in args.batch_size
    ]
    plan = {name: engine_configurations(name, configurations, args) for name in engines}
    plan = {name: chosen for name, chosen in plan.items() if chosen}
    base = {"model": args.model, "image_size": args.image_size, "seed": args.seed, "device": str(device),
            "threads": threads, "seconds": args.seconds, "onnx_dir": work_dir.name,
            "original_checkout": str(args.original_checkout) if args.original_checkout else None}  # fmt: skip
    print(f"# each engine timed in a process of its own ({threads} thread{'s' * (threads != 1)}), one at a time, in "
          f"{args.rounds} round{'s' * (args.rounds != 1)} of {args.seconds:g} s per configuration; best round "
          "kept")  # fmt: skip

    samples: dict[tuple, dict[str, list[float]]] = {key(c): {} for c in configurations}
    first_calls: dict[tuple, dict[str, float]] = {key(c): {} for c in configurations}
    loads: list[list[float | None]] = []
    failures: dict[str, str] = {}
    for round_index in range(args.rounds):
        began = time.perf_counter()
        round_loads = []
        for name, chosen in plan.items():
            if name in failures:
                continue
            round_loads.append(sample_other_load(BUSY_SAMPLE_SECONDS))
            try:
                result = run_worker({**base, "engines": [name], "configurations": chosen, "rounds": 1})
            except WorkerError as error:  # one engine failing (e.g. out of memory) leaves the others' figures
                failures[name] = str(error)
                print(f"# {NAMES[name]}: FAILED in round {round_index + 1}: {error}")
                continue
            for measured in result["results"]:
                samples[key(measured)].setdefault(name, []).extend(measured["seconds_per_call"][name])
                if round_index == 0:
                    first_calls[key(measured)][name] = measured["first_call_s"][name]
        round_loads.append(sample_other_load(BUSY_SAMPLE_SECONDS))
        loads.append(round_loads)
        summary = load_summary(round_loads)
        load_text = (
            "unknown (no /proc/stat)"
            if summary["mean_cpus"] is None
            else f"mean {summary['mean_cpus']:.2f} CPUs, at most {summary['max_cpus']:.2f}"
        )
        print(f"# round {round_index + 1}/{args.rounds} in {time.perf_counter() - began:.0f} s; other processes' "
              f"load between the engines' processes: {load_text}")  # fmt: skip

    rows = []
    for configuration in configurations:
        measured = {name: values for name, values in samples[key(configuration)].items() if values}
        if not measured:
            continue
        batch_size, dtype, mode = configuration["batch_size"], configuration["dtype"], configuration["mode"]
        images = {name: batch_size / min(values) for name, values in measured.items()}
        per_mac = None
        if "fast" in images and "deit-s" in images:
            per_mac = images["fast"] * macs["refiner"] / (images["deit-s"] * macs["deit-s"])
        goal_met = per_mac >= GOAL_PER_MULTIPLY_ADD if dtype == "bf16" and per_mac is not None else None
        rows.append({"batch_size": batch_size, "dtype": dtype, "mode": mode, "images_per_s": images,
                     "seconds_per_call": measured, "first_call_s": first_calls[key(configuration)],
                     "fast_vs_deit_per_multiply_add": per_mac, "goal_met": goal_met})  # fmt: skip
        print(f"# batch {batch_size} {dtype} {mode}: "
              + ", ".join(f"{name} {value:.2f} img/s" for name, value in images.items()))  # fmt: skip
        if mode == "compiled":
            compile_s = first_calls[key(configuration)]
            print(f"# compiled for batch {batch_size}, {dtype} in round 1: "
                  + ", ".join(f"{name} {value:.0f} s" for name, value in compile_s.items()))  # fmt: skip

    self_check = None
    if args.self_check:
        self_check = run_self_check(args, base, plan, samples, failures, loads)
    other_load = load_summary([value for round_loads in loads for value in round_loads])
    if other_load["mean_cpus"] is None:
        print("# other processes' load between the measurements: unknown (no /proc/stat)")
    else:
        print(f"# other processes' load between the measurements: mean {other_load['mean_cpus']:.2f} CPUs, at most "
              f"{other_load['max_cpus']:.2f} ({len(other_load['samples'])} samples of {BUSY_SAMPLE_SECONDS:g} s "
              "each)")  # fmt: skip
        if other_load["busy"]:
            print(busy_warning(other_load))

    print()
    print(table(rows))
    onnx_rows = [row for row in rows if "onnx-fp32" in row["images_per_s"]]
    if onnx_rows:
        print()
        print(onnx_table(onnx_rows))
    goal_rows = [row for row in rows if row["goal_met"] is not None]
    if goal_rows:
        print()
        print(f"Goal (bf16 fast path vs DeiT-S-size ViT, throughput per multiply-add >= {GOAL_PER_MULTIPLY_ADD}x): "
              + ", ".join(f"batch {row['batch_size']} {row['mode']} {row['fast_vs_deit_per_multiply_add']:.2f}x "
                          f"({'met' if row['goal_met'] else 'not met'})" for row in goal_rows))  # fmt: skip
    targets = target_results(rows, (args.model, args.image_size))
    if targets:
        print()
        print("Targets (fp32, eager): " + "; ".join(
            f"{NAMES[t['engine']]} / {NAMES[t['other']]} at batch {t['batch_size']} {t['ratio']:.2f}x, target >= "
            f"{t['target']:g}x ({'met' if t['met'] else 'not met'})" for t in targets))  # fmt: skip
    figures = {"benchmark": "inference", "machine": machine, "model": args.model, "image_size": args.image_size,
               "threads": threads, "method": "each engine in a process of its own, one at a time; best of rounds",
               "rounds": args.rounds, "seconds": args.seconds, "engines": list(plan), "multiply_adds": macs,
               "fast_vs_reference_difference": difference, "onnx_vs_reference_difference": onnx_differences,
               "rows": rows, "goal_per_multiply_add": GOAL_PER_MULTIPLY_ADD, "other_load": other_load,
               "self_check": self_check, "targets": targets, "failures": failures}  # fmt: skip
    write_json(args.json, figures)
    work_dir.cleanup()
    if failures:
        sys.exit(1)
    return figures


def run_self_check(
    args: argparse.Namespace,
    base: dict,
    plan: dict[str, list[dict]],
    samples: dict[tuple, dict[str, list[float]]],
    failures: dict[str, str],
    loads: list[list[float | None]],
) -> dict | None:
    """Times the fast path and one other engine in alternation in one process (best of --rounds) and compares each
    with its own process's figure; the load samples around it join `loads`."""
    chosen = self_check_plan({name: value for name, value in plan.items() if name not in failures})
    if chosen is None:
        print("# self-check skipped: it needs the fast path and ONNX Runtime fp32 or a DeiT-S in an eager row")
        return None
    configuration, engines = chosen
    loads.append([sample_other_load(BUSY_SAMPLE_SECONDS)])
    try:
        result = run_worker({**base, "engines": engines, "configurations": [configuration], "rounds": args.rounds})
    except WorkerError as error:
        print(f"# self-check FAILED: {error}")
        return {"configuration": configuration, "engines": engines, "error": str(error)}
    finally:
        loads[-1].append(sample_other_load(BUSY_SAMPLE_SECONDS))
    batch_size = configuration["batch_size"]
    shared = {name: batch_size / min(values) for name, values in result["results"][0]["seconds_per_call"].items()}
    own = {name: batch_size / min(samples[key(configuration)][name]) for name in engines}
    differences, flagged = self_check_differences(own, shared)
    print(f"# self-check, batch {batch_size} {configuration['dtype']} eager, {NAMES[engines[0]]} and "
          f"{NAMES[engines[1]]} in alternation in one process (best of {args.rounds}), against their own processes: "
          + "; ".join(f"{NAMES[name]} {shared[name]:.2f} img/s shared, {own[name]:.2f} alone "
                      f"({differences[name]:+.0%})" for name in engines))  # fmt: skip
    if flagged:
        one = len(flagged) == 1
        print(f"# WARNING: self-check: {' and '.join(NAMES[name] for name in flagged)} "
              f"{'differs' if one else 'differ'} by more than {SELF_CHECK_TOLERANCE:.0%} between the shared process "
              f"and {'its' if one else 'their'} own: engines timed in one process disturb each other here (or the "
              "load changed); only figures from separate processes compare.")  # fmt: skip
    return {"configuration": configuration, "engines": engines, "shared_images_per_s": shared,
            "own_images_per_s": own, "shared_vs_own": differences, "flagged": flagged,
            "tolerance": SELF_CHECK_TOLERANCE}  # fmt: skip


def export_and_check_onnx(model, directory: Path, check: torch.Tensor, expected: torch.Tensor, threads: int) -> dict:
    """Exports `model` to `directory` (model.onnx, and model_quantized.onnx with int8 linear layers), for the
    children to open, and prints each one's difference from the reference logits."""
    from refiner_hf.onnx_export import export_onnx, onnx_session, quantize_int8

    start = time.perf_counter()
    export_onnx(model, directory / ONNX_FILES["onnx-fp32"])
    quantize_int8(directory / ONNX_FILES["onnx-fp32"], directory / ONNX_FILES["onnx-int8"])
    sizes = {name: (directory / file).stat().st_size / 1e6 for name, file in ONNX_FILES.items()}
    print(
        f"# exported to ONNX (and quantized) in {time.perf_counter() - start:.0f} s: model.onnx "
        f"{sizes['onnx-fp32']:.1f} MB, model_quantized.onnx {sizes['onnx-int8']:.1f} MB"
    )
    differences = {}
    for name, file in ONNX_FILES.items():
        session = onnx_session(directory / file, threads=threads, spinning=False)
        logits = session.run(["logits"], {"pixel_values": check.cpu().numpy()})[0]
        differences[name] = float(abs(logits - expected.cpu().numpy()).max())
        print(f"# {name} vs reference, logits: max abs difference {differences[name]:.2e}")
    return differences


def target_results(rows: list[dict], measured: tuple[str, int]) -> list[dict]:
    """The [`TARGETS`] that apply to the `measured` (model, image size), checked on every fp32 eager row that has
    both engines."""
    results = []
    for row in rows:
        if (row["dtype"], row["mode"]) != ("fp32", "eager"):
            continue
        images = row["images_per_s"]
        for engine, other, target, applies_to in TARGETS:
            if applies_to in (None, measured) and engine in images and other in images:
                ratio = images[engine] / images[other]
                results.append({"engine": engine, "other": other, "batch_size": row["batch_size"], "ratio": ratio,
                                "target": target, "met": ratio >= target})  # fmt: skip
    return results


def table(rows: list[dict]) -> str:
    names = [name for name in NAMES if any(name in row["images_per_s"] for row in rows)]
    header = " | ".join(f"{NAMES[name]} img/s" for name in names)
    lines = [
        f"| batch | precision | mode | {header} | fast / reference | fast / DeiT-S | fast / timm DeiT-S "
        "| fast / DeiT-S per multiply-add |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for row in rows:
        images = row["images_per_s"]
        values = " | ".join(rate(images, name) for name in names)
        per_mac = row["fast_vs_deit_per_multiply_add"]
        lines.append(
            f"| {row['batch_size']} | {row['dtype']} | {row['mode']} | {values} | "
            f"{ratio(images, 'fast', 'reference')} | {ratio(images, 'fast', 'deit-s')} | "
            f"{ratio(images, 'fast', 'timm-deit-s')} | {'–' if per_mac is None else f'**{per_mac:.2f}x**'} |"
        )
    return "\n".join(lines)


def onnx_table(rows: list[dict]) -> str:
    lines = [
        "| batch | reference img/s | fast img/s | ONNX Runtime fp32 img/s | ONNX Runtime int8 img/s "
        "| DeiT-S-size ViT img/s | timm DeiT-S img/s | ORT fp32 / fast | ORT int8 / fast | ORT int8 / DeiT-S "
        "| ORT int8 / timm DeiT-S |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        images = row["images_per_s"]
        lines.append(
            f"| {row['batch_size']} | {rate(images, 'reference')} | {rate(images, 'fast')} | "
            f"{rate(images, 'onnx-fp32')} | {rate(images, 'onnx-int8')} | {rate(images, 'deit-s')} | "
            f"{rate(images, 'timm-deit-s')} | {ratio(images, 'onnx-fp32', 'fast')} | "
            f"{ratio(images, 'onnx-int8', 'fast')} | {ratio(images, 'onnx-int8', 'deit-s')} | "
            f"{ratio(images, 'onnx-int8', 'timm-deit-s')} |"
        )
    return "\n".join(lines)


def rate(images: dict[str, float], name: str) -> str:
    return f"{images[name]:.2f}" if name in images else "–"


def ratio(images: dict[str, float], name: str, other: str) -> str:
    return f"{images[name] / images[other]:.2f}x" if name in images and other in images else "–"


if __name__ == "__main__":
    main()
