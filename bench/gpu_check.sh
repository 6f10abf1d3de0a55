#!/usr/bin/env bash
# One-shot GPU validation of the stack (issue 14): the GPU-marked tests, then training throughput at Pythia-1.4B
# shapes beside megatron-core's own GPTModel, eager and compiled. Under 8 minutes on one H100 / H200; every stage
# is time-boxed and a failing stage does not stop the later ones; a short table is printed last.
#
# Before (here, on the CPU machine, which reaches PyPI):   bash bench/gpu_wheels.sh     # -> .whl/ (git-ignored)
# Run (the device tool, one call):
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Stages: install the carried wheels into /tmp/site (megatron-core, DeepSpeed, pydantic, hjson: the GPU machine's
# python3 lacks them; our own code runs from the tree with PYTHONPATH=.); print the GPU; `pytest -m gpu
# tests/test_*gpu*.py` (test_gpu.py: bf16 vs fp32 loss, recompute + dropout, flash / cuDNN SDPA, peak memory vs
# mesh-plan, compiled vs eager; test_init_gpu.py: the model built on the GPU); bench/train_throughput.py --preset
# gpu-1.4b eager, then compiled; then the stage table, the merged throughput table and the targets.
# What comes back in $OUT: gpu_check.log (everything printed), summary.txt (the tables printed last),
# train_throughput_cuda_eager.json, train_throughput_cuda_compiled.json.
# Afterwards commit: the two JSON files into bench/results/ (as they came back), and the measured numbers, the
# targets met / not met and the peak-memory ratios ([gpu] lines of the log) in docs/performance.md "GPU check".
# Locally (no GPU: PY=.venv/bin/python SITE=/tmp/x bash bench/gpu_check.sh) it checks itself: the wheels do not
# install on Python 3.11 (cp312), the tests skip, the throughput stages are skipped for want of CUDA.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
rm -f "$OUT"/train_throughput_cuda_*.json "$OUT/gpu_check.log" "$OUT/summary.txt"  # no stale results in the report
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}  # where the carried wheels are installed (the device README's recipe)
BUDGET=${GPU_CHECK_BUDGET_S:-450}  # the whole script, seconds: ends well inside the 8-minute target
START=$(date +%s)

export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME CAP_S RESERVE_S CMD...: runs CMD for at most CAP_S seconds and never into the last RESERVE_S seconds of
# the budget (kept for the stages after it); records rc and time. rc 124/137: it hit its limit.
stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$(( BUDGET - $(elapsed) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 15 )); then
        echo "=== [$name] SKIPPED: no time left in the ${BUDGET}s budget"
        SUMMARY+=("$(printf '%-20s %-10s %6s' "$name" skipped -)")
        return
    fi
    echo "=== [$name] (limit ${limit}s, at $(elapsed)s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@"
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    local verdict=ok
    (( rc == 124 || rc == 137 )) && verdict=TIMEOUT
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAIL($rc)"
    echo "=== [$name] $verdict in ${took}s"
    SUMMARY+=("$(printf '%-20s %-10s %5ss' "$name" "$verdict" "$took")")
}

install_wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/*.whl: run 'bash bench/gpu_wheels.sh' on the CPU machine and carry .whl"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
}

gpu_info() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          p.multi_processor_count, "SMs")
from importlib.metadata import version  # not imported here: DeepSpeed's import alone takes seconds
print(*(f"{p} {version(p)}" for p in ("megatron-core", "deepspeed", "pydantic", "numpy", "transformers")))
EOF
}

export PY SITE
export -f install_wheels gpu_info  # timeout runs programs, not shell functions: these run under `bash -c`

main() {
stage install 60 380 bash -c install_wheels
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage gpu-info 30 370 bash -c gpu_info
# -s: the tests print their measurements ([gpu] lines: memory ratios, loss gaps, SDPA kernels)
# GPU-marked tests live in tests/test_*gpu*.py (collecting all of tests/ would import modules whose packages, e.g.
# lm-eval, the GPU machine does not have)
stage pytest-gpu 180 230 "$PY" -m pytest -m gpu tests/test_*gpu*.py -q -s -rA -p no:cacheprovider
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "=== no CUDA device visible to $PY: the throughput stages are skipped (a 1.4B model on CPU would only time out)"
    SUMMARY+=("$(printf '%-20s %-10s %6s' throughput skipped -)")
else
stage throughput-eager 120 110 "$PY" bench/train_throughput.py --preset gpu-1.4b --compile off --steps 10 --warmup 3 \
    --out "$OUT/train_throughput_cuda_eager.json"
stage throughput-compiled 300 15 "$PY" bench/train_throughput.py --preset gpu-1.4b --compile on --steps 10 --warmup 3 \
    --out "$OUT/train_throughput_cuda_compiled.json"
fi

{
    echo
    echo "=== stages (budget ${BUDGET}s, total $(elapsed)s)"
    printf '%s\n' "${SUMMARY[@]}"
    jsons=$(ls "$OUT"/train_throughput_cuda_eager.json "$OUT"/train_throughput_cuda_compiled.json 2>/dev/null)
    if [[ -n $jsons ]]; then
        timeout 60 "$PY" bench/train_throughput.py --report $jsons
    else
        echo "no throughput results"
    fi
} | tee "$OUT/summary.txt"
}

# one pipeline, so everything is in the log and the output has ended when the script returns
main 2>&1 | tee -a "$OUT/gpu_check.log"
