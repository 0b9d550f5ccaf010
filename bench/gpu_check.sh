#!/usr/bin/env bash
# GPU check for mergekit-lore: one command on a fresh H100/H200 machine with CUDA torch and no
# network. mergekit and this package are installed from the wheels of bench/gpu_wheels.sh
# (made beforehand where the package registry is reachable, carried in .whl or $GPU_CHECK_WHEELS)
# by bench/gpu_setup.sh, unless PYTHON's environment has them already. Writes everything to one file:
#   bench/results/gpu_check_<host>_<date>.md   (or $GPU_CHECK_OUT)
# Steps (each under its own time limit, whole script < 8 min on one H100/H200):
#   1. the cuda-marked tests
#   2. SVT kernel bench on 4096x11008, 3584x18944, 152064x3584 (bf16-free float32 kernels)
#   3. a Qwen2.5-7B-shaped end-to-end merge, 2 fine-tunes + base, bf16, mergekit-yaml --cuda:
#      lore (base_model, anchor) vs ties vs linear (GPU_CHECK_LAYERS layers, default 2)
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
timeout 120 "$PYTHON" -m pytest -q -m cuda tests/ >> "$OUT" 2>&1 || { echo "(tests FAILED or timed out: status $?)" >> "$OUT"; status=1; }
{ echo '```'; echo; echo "## 2. SVT kernel (float32 on GPU)"; echo; } >> "$OUT"
timeout 150 "$PYTHON" bench/bench_svt.py --device cuda --shapes 4096x11008,3584x18944,152064x3584 \
    --runs 3 --timeout 60 --out "$WORK/svt.md" > "$WORK/svt.log" 2>&1 \
    && cat "$WORK/svt.md" >> "$OUT" \
    || { echo "(SVT bench FAILED or timed out: status $?; the shapes it finished, then its log)"; \
         cat "$WORK/svt.md" 2>/dev/null || true; tail -30 "$WORK/svt.log"; status=1; } >> "$OUT"
{ echo; echo "## 3. Qwen2.5-7B-shaped merge, $LAYERS layers, 2 fine-tunes + base, bf16, --cuda"; echo; } >> "$OUT"
timeout 270 "$PYTHON" bench/bench_e2e.py --cuda --hidden 3584 --intermediate 18944 --heads 28 --kv-heads 4 \
    --vocab 152064 --layers "$LAYERS" --dtype bfloat16 --ft-rank 16 --ft-strength 0.05 --ft-noise 0.002 \
    --inputs 2 --runs 1 --configs "linear,ties,lore base_model (anchor)" --timeout 200 \
    --workdir "$WORK/e2e" --out "$WORK/e2e.md" > "$WORK/e2e.log" 2>&1 \
    && cat "$WORK/e2e.md" >> "$OUT" || { echo "(e2e bench FAILED or timed out: status $?)"; tail -30 "$WORK/e2e.log"; status=1; } >> "$OUT"
echo "gpu_check: results in $OUT (status $status)"
exit $status
