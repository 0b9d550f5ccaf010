#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on a device machine (no network there), made here
# (needs the package registry): mergekit and the packages of its that the device image lacks
# (pydantic and its parts, immutables), at the versions this checkout's environment runs, plus
# this package's own wheel (whose .pth registers `lore` at start-up).
#   bench/gpu_wheels.sh [DIR]        DIR default .whl (ignored by git); carry it to the device
# GPU_WHEELS_PYTHON: the device's Python version (default 3.12); PYTHON: this environment's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
TARGET_PYTHON="${GPU_WHEELS_PYTHON:-3.12}"
PYTHON="${PYTHON:-python3}"
# The device image has torch, transformers, peft, accelerate, safetensors, click, tqdm, scipy,
# sentencepiece, protobuf, tokenizers and huggingface-hub; mergekit-yaml imports these besides.
MISSING="mergekit pydantic pydantic-core annotated-types typing-inspection immutables"
if ! pins=$("$PYTHON" - $MISSING <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"not installed in this environment: {' '.join(missing)}")
EOF
); then
    echo "gpu_wheels: run it with the interpreter of an environment where mergekit-lore is installed (PYTHON=...)." >&2
    exit 2
fi
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
    --implementation cp "${platforms[@]}" -d "$DIR" $pins
"$PYTHON" -m pip wheel -q --no-deps -w "$DIR" .
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels in $DIR ($(du -sh "$DIR" | cut -f1)) for Python $TARGET_PYTHON:"
ls "$DIR"
