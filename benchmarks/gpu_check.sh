#!/usr/bin/env bash
# The GPU check of Refiner-ViT's Triton kernels, in one run of under 8 minutes on one CUDA GPU:
#   1. the Triton kernel tests (tests/test_triton_kernels.py) on CUDA tensors, compiled, without the interpreter;
#   2. the training benchmark: Refiner-ViT-S at 224 px, batch 64, bf16 autocast: reference, memory-lean (PyTorch),
#      memory-lean (Triton), the original code under AMP (with a checkout of it) and a DeiT-S-size ViT with SDPA;
#   3. the inference benchmark at batch 64 in bf16 autocast: Refiner-ViT-S at 224 px and Refiner-ViT-L at 448 px;
#   4. a trainer smoke run on CUDA in bf16 (the embedded default run, memory-lean, 300 steps), then its resume to
#      step 400.
# Every stage has its own time limit within the whole run's; a failing stage does not stop the later ones.
#
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR] [ORIGINAL_CHECKOUT]
#
# OUTPUT_DIR (default gpu_check_results/) receives summary.md (the GPU, each stage's outcome and every figure), one
# log per stage and the benchmarks' figures as JSON. ORIGINAL_CHECKOUT (or the environment's ORIGINAL_CHECKOUT) is a
# checkout of github.com/zhoudaquan/Refiner_ViT, imported from where it is (never copied), with the installed timm;
# without it the original code's rows, and the training goal measured against them, are missing. PYTHON names the
# interpreter (default: python). Exit status 0 only when every stage passed; 2 when there is no CUDA device.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-gpu_check_results}")"
ORIGINAL="${2:-${ORIGINAL_CHECKOUT:-}}"
PYTHON="${PYTHON:-python}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"  # the whole run; under 8 minutes with the setup around it

if [[ -n "$ORIGINAL" ]]; then
    ORIGINAL="$(realpath -m "$ORIGINAL")"
    if [[ ! -f "$ORIGINAL/models/refined_transformer.py" ]]; then
        echo "gpu_check: $ORIGINAL is not a checkout of the original Refiner_ViT (no models/refined_transformer.py)." >&2
        exit 1
    fi
fi

cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's refiner_hf, whatever else is installed

# No CUDA device, no check: the figures would be CPU figures, and the kernel tests would run nothing on a GPU.
ERRORS="$(mktemp)"
trap 'rm -f "$ERRORS"' EXIT
if ! GPU="$("$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"PyTorch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False).")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
      f"{torch.cuda.device_count()} visible; PyTorch {torch.__version__}, CUDA {torch.version.cuda}")
' 2>"$ERRORS")"; then
    echo "gpu_check: no CUDA GPU here: $(tail -n 1 "$ERRORS")" >&2
    echo "gpu_check: this check measures on a GPU and stops here; nothing was run or written." >&2
    exit 2
fi
if ! TRITON="$("$PYTHON" -c 'import triton; print(triton.__version__)' 2>"$ERRORS")"; then
    echo "gpu_check: Triton cannot be imported ($(tail -n 1 "$ERRORS")): the kernels under test would not run." >&2
    exit 1
fi

mkdir -p "$OUT" || exit 1
SUMMARY="$OUT/summary.md"
START=$(date +%s)
FAILED=()
{
    echo "# Refiner-ViT GPU check"
    echo
    echo "GPU: $GPU; Triton $TRITON"
    echo "Commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "Original code: ${ORIGINAL:-not given (its rows and the training goal are missing)}"
} >"$SUMMARY"
echo "gpu_check: GPU: $GPU"
echo "gpu_check: writing to $OUT"
if [[ -n "$ORIGINAL" ]] && ! "$PYTHON" -c 'import timm' 2>/dev/null; then
    echo "gpu_check: the original code needs timm, which is not installed: its rows will fail." | tee -a "$SUMMARY"
fi

# stage NAME LIMIT_S COMMAND...: runs COMMAND under the smaller of LIMIT_S and the run's remaining time, its output
# in NAME.log; the figures it prints (lines of #, | or Goal) go into the summary.
stage() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    {
        echo
        echo "## $name"
        echo
    } >>"$SUMMARY"
    if ((limit < 15)); then
        echo "SKIPPED: the run's $BUDGET_S s were spent." | tee -a "$SUMMARY"
        FAILED+=("$name")
        return 1
    fi
    echo "gpu_check: $name (limit ${limit} s) ..."
    local began=$(date +%s) status
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    local took=$(($(date +%s) - began))
    echo '```' >>"$SUMMARY"
    grep -E '^(#|\||Goal|[0-9]+ (passed|failed)|FAILED|ERROR|Resumed from|Best:)' "$OUT/$name.log" >>"$SUMMARY"
    echo '```' >>"$SUMMARY"
    if ((status == 0)); then
        echo "PASSED in $took s" | tee -a "$SUMMARY"
        return 0
    fi
    if ((status == 124 || status == 137)); then
        echo "FAILED: over its limit of $limit s (log: $name.log)" | tee -a "$SUMMARY"
    else
        echo "FAILED: exit status $status after $took s (log: $name.log)" | tee -a "$SUMMARY"
    fi
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
    FAILED+=("$name")
    return 1
}

ORIGINAL_ARGS=()
TRAIN_MODES=(reference lean-pytorch lean deit-s)
if [[ -n "$ORIGINAL" ]]; then
    ORIGINAL_ARGS=(--original-checkout "$ORIGINAL")
    TRAIN_MODES+=(original)
fi

# 1. The kernels against the reference on the GPU (compiled; float32 references without TF32).
stage triton_tests 90 env REFINER_HF_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_triton_kernels.py

# 2. Training: each mode in its own process; 2 warm-up steps compile the kernels, 5 timed steps.
stage bench_train 150 "$PYTHON" benchmarks/bench_train.py --device cuda --model refiner-vit-s --image-size 224 \
    --batch-size 64 --dtype bf16 --steps 5 --modes "${TRAIN_MODES[@]}" "${ORIGINAL_ARGS[@]}" \
    --json "$OUT/bench_train_s224.json"

# 3. Inference at batch 64 in bf16, eager (torch.compile's compilation alone would not fit in the run). Each engine
#    runs in a process of its own, which costs its start-up (imports, CUDA, the model) every round: one round here.
stage bench_inference_s224 90 "$PYTHON" benchmarks/bench_inference.py --device cuda --model refiner-vit-s \
    --image-size 224 --batch-size 64 --dtype bf16 --no-compile --rounds 1 --seconds 0.5 --no-self-check \
    "${ORIGINAL_ARGS[@]}" --json "$OUT/bench_inference_s224.json"
stage bench_inference_l448 120 "$PYTHON" benchmarks/bench_inference.py --device cuda --model refiner-vit-l \
    --image-size 448 --batch-size 64 --dtype bf16 --no-compile --rounds 1 --seconds 0.5 --no-self-check \
    "${ORIGINAL_ARGS[@]}" --json "$OUT/bench_inference_l448.json"

# 4. The trainer on CUDA in bf16: the embedded default run stopped at step 300, then resumed to step 400.
SMOKE="$OUT/trainer_smoke"
rm -rf "$SMOKE"
SMOKE_ARGS=(--mixed_precision bf16 --memory_lean_training --dataloader_num_workers 4 --logging_steps 50
    --output_dir "$SMOKE")
if stage trainer_smoke 80 "$PYTHON" examples/run_imagenet.py "${SMOKE_ARGS[@]}" --max_train_steps 300; then
    stage trainer_resume 50 "$PYTHON" examples/run_imagenet.py "${SMOKE_ARGS[@]}" --max_train_steps 400 \
        --resume_from_checkpoint latest
    # The runs were on the GPU in bf16, the resume continued from step 300 and ended at 400, the model learned.
    stage trainer_checks 15 "$PYTHON" - "$SMOKE" "$OUT/trainer_smoke.log" "$OUT/trainer_resume.log" <<'EOF'
import json, re, sys
from pathlib import Path

smoke, first, second = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), Path(sys.argv[3]).read_text()
results = json.loads((smoke / "all_results.json").read_text())
checks = {
    "trained on CUDA in bf16": re.search(r"global batch \d+ \(cuda[:0-9]*, bf16\)", first) is not None,
    "resumed at step 300": re.search(r"Resumed from \S+: .*step 300 ", second) is not None,
    "ended at step 400": results["global_step"] == 400,
    "top-1 above chance (10 classes)": results["eval_top1"] > 0.2,
}
print(f"# trainer smoke run: step {results['global_step']}, top-1 {results['eval_top1']:.3f}, top-5 "
      f"{results['eval_top5']:.3f} ({results['best_weights']} weights)")
for name, passed in checks.items():
    print(f"# {name}: {'yes' if passed else 'NO'}")
sys.exit(0 if all(checks.values()) else 1)
EOF
fi

TOTAL=$(($(date +%s) - START))
{
    echo
    echo "## Outcome"
    echo
    if ((${#FAILED[@]})); then
        echo "FAILED stages: ${FAILED[*]} ($TOTAL s)"
    else
        echo "All stages passed in $TOTAL s."
    fi
} >>"$SUMMARY"
echo "gpu_check: $(tail -n 1 "$SUMMARY"); figures and logs in $OUT (summary.md)"
((${#FAILED[@]} == 0))
