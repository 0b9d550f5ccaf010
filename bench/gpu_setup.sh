#!/usr/bin/env bash
# Readies PYTHON's environment for bench/gpu_check.sh on a machine without network: installs the
# wheels that bench/gpu_wheels.sh made (if DIR holds any), so that `mergekit-yaml` can be run and
# registers `lore` at start-up (through the installed .pth), then checks both. Exit 2, with the
# reason, when they do not hold.
#   bench/gpu_setup.sh [DIR]        DIR default $GPU_CHECK_WHEELS or .whl
# gpu_check.sh sources it: where the environment cannot be written, the wheels go to a folder of
# their own ($GPU_SETUP_SITE), whose .pth files a sitecustomize there processes, and the caller
# gets PYTHONPATH and PATH for it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
DIR="${1:-${GPU_CHECK_WHEELS:-.whl}}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=("$DIR"/*.whl)
shopt -u nullglob
install=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
if [ ${#wheels[@]} -gt 0 ] && ! "$PYTHON" "${install[@]}" "${wheels[@]}" >&2; then
    site="${GPU_SETUP_SITE:-${TMPDIR:-/tmp}/mergekit-lore-site}"
    echo "gpu_setup: the environment of '$PYTHON' cannot take the wheels; installing them into $site" >&2
    if ! "$PYTHON" "${install[@]}" --target "$site" "${wheels[@]}" >&2; then
        echo "gpu_setup: could not install the ${#wheels[@]} wheels of $DIR for '$PYTHON'." >&2
        exit 2
    fi
    printf 'import site\nsite.addsitedir(%s)  # runs its .pth files: mergekit-lore registers lore\n' \
        "'$site'" > "$site/sitecustomize.py"
    export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"
fi
if ! why=$("$PYTHON" - 2>&1 <<'EOF'
import shutil

import mergekit.merge_methods as methods

try:  # before importing mergekit_lore, which registers it too
    methods.get("lore")
except RuntimeError:
    raise SystemExit("mergekit does not register 'lore' at start-up (mergekit-lore's .pth is not installed)")
from mergekit_lore.runner import console_script

script = shutil.which(console_script("mergekit-yaml"))
if script is None:
    raise SystemExit("no mergekit-yaml beside this interpreter or on PATH")
print(script)
EOF
); then
    echo "gpu_setup: '$PYTHON' is not ready: ${why##*$'\n'}" >&2
    echo "gpu_setup: run bench/gpu_wheels.sh where the package registry is reachable and carry its folder (.whl) here." >&2
    exit 2
fi
echo "gpu_setup: ready, $why (${#wheels[@]} wheels installed from $DIR)" >&2
