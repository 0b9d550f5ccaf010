#!/usr/bin/env bash
# GPU check for mergekit-lore: one command on a fresh H100/H200 machine with CUDA torch and no
# network. mergekit and this package are installed from the wheels of bench/gpu_wheels.sh
# (made beforehand where the package registry is reachable, carried in .whl or $GPU_CHECK_WHEELS)
# by bench/gpu_setup.sh, unless PYTHON's environment has them already. Writes everything to one file:
#   bench/results/gpu_check_<host>_<date>.md   (or $GPU_CHECK_OUT)
# Steps (each under its own time limit, 520 s in all: the script ends within 9 min on one H100/H200):
#   1. the cuda-marked tests (90 s)
#   2. the whole Qwen2.5-7B's merge compute, lore vs ties vs linear, from one matrix of each shape
#      (bench_7b.py, 120 s)
#   3. a Qwen2.5-7B-shaped end-to-end merge, 2 fine-tunes + base, bf16, mergekit-yaml --cuda:
#      lore (base_model, anchor) vs ties vs linear (GPU_CHECK_LAYERS layers, default 2; 210 s)
#   4. SVT kernel bench on 4096x11008, 3584x18944, 152064x3584 (float32 kernels, 100 s)
# Without CUDA, or without mergekit and `lore` registered, it stops at once with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON="${PYTHON:-python3}"
LAYERS="${GPU_CHECK_LAYERS:-2}"
OUT="${GPU_CHECK_OUT:-bench/results/gpu_check_$(hostname)_$(date -u +%Y%m%dT%H%M).md}"
WORK="${GPU_CHECK_WORKDIR:-${TMPDIR:-/tmp}/mergekit-lore-gpu-check}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# one import of torch: its version and whether it sees a CUDA device
if ! probe=$(timeout 60 "$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>/dev/null); then
    echo "gpu_check: '$PYTHON' cannot import torch; set PYTHON to the interpreter that has CUDA torch. Nothing run." >&2
    exit 2
fi
if [ "${probe##* }" != "True" ]; then
    echo "gpu_check: no CUDA device visible to torch (${probe% *}); nothing run." >&2
    exit 2
fi
# mergekit and this package: from bench/gpu_wheels.sh's carried wheels where the machine lacks them
. bench/gpu_setup.sh "${GPU_CHECK_WHEELS:-.whl}"  # sourced: PYTHONPATH and PATH where the wheels went to a folder of their own
mkdir -p "$(dirname "$OUT")" "$WORK"
status=0
{
    echo "# GPU check ($(date -u +%FT%TZ))"
    echo
    "$PYTHON" -c 'import torch; print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}")' \
        2>/dev/null || echo "- (could not describe the GPU through torch)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/- nvidia-smi: /' || true
    echo
    echo "## 1. cuda-marked tests"
    echo
    echo '```'
} > "$OUT"
timeout 90 "$PYTHON" -m pytest -q -m cuda tests/ >> "$OUT" 2>&1 || { echo "(tests FAILED or timed out: status $?)" >> "$OUT"; status=1; }
echo '```' >> "$OUT"

# run_step TITLE SECONDS NAME COMMAND...: COMMAND writes $WORK/NAME.md (its --out), which goes into
# the results; if it fails or runs out of time, what it wrote so far and the end of its log go there
run_step() {
    local title=$1 seconds=$2 name=$3 code
    shift 3
    { echo; echo "## $title"; echo; } >> "$OUT"
    if timeout "$seconds" "$@" > "$WORK/$name.log" 2>&1; then
        cat "$WORK/$name.md" >> "$OUT" 2>/dev/null || echo "($name wrote no results file)" >> "$OUT"
    else
        code=$?
        { echo "($name FAILED or timed out: status $code; what it finished, then its log)"
          cat "$WORK/$name.md" 2>/dev/null || true
          tail -30 "$WORK/$name.log"; } >> "$OUT"
        status=1
    fi
}
run_step "2. Whole Qwen2.5-7B merge compute, per shape: 2 fine-tunes + base, bf16, on the GPU" 120 7b \
    "$PYTHON" bench/bench_7b.py --device cuda --arch qwen2.5-7b --out "$WORK/7b.md"
run_step "3. Qwen2.5-7B-shaped merge, $LAYERS layers, 2 fine-tunes + base, bf16, mergekit-yaml --cuda" 210 e2e \
    "$PYTHON" bench/bench_e2e.py --cuda --hidden 3584 --intermediate 18944 --heads 28 --kv-heads 4 \
    --vocab 152064 --layers "$LAYERS" --dtype bfloat16 --ft-rank 16 --ft-strength 0.05 --ft-noise 0.002 \
    --inputs 2 --runs 1 --configs "linear,ties,lore base_model (anchor)" --timeout 150 --no-split \
    --workdir "$WORK/e2e" --out "$WORK/e2e.md"
run_step "4. SVT kernel (float32 on GPU)" 100 svt \
    "$PYTHON" bench/bench_svt.py --device cuda --shapes 4096x11008,3584x18944,152064x3584 \
    --runs 3 --timeout 40 --out "$WORK/svt.md"
echo "gpu_check: results in $OUT (status $status)"
exit $status
