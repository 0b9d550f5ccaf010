#!/usr/bin/env bash
# Run mergekit 0.1.5's own test suite (from its PyPI sdist) against the installed
# mergekit with mergekit-lore installed, so every test parametrized over the
# registered merge methods also runs for `lore`. Fails on any failure.
# Usage: .ci/mergekit_suite.sh PYTHON [pytest args...]
set -euo pipefail
python="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; shift
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: mergekit==0.1.5 -d "$work" 2>/dev/null
tar -xzf "$work"/mergekit-0.1.5.tar.gz -C "$work"
suite="$work/mergekit-0.1.5"
rm -rf "$suite/mergekit"            # test the installed mergekit, not the sdist's copy
touch "$suite/tests/__init__.py"
cp "$here/mergekit_tests/common.py" "$suite/tests/common.py"
"$python" -c "import mergekit.merge_methods as m; assert 'lore' in {x.spec.name for x in m.registered_methods()}, 'lore is not registered'"
cd "$suite"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  "$python" -m pytest -q -p no:cacheprovider -o addopts="" "$@" tests
