#!/usr/bin/env bash
# The torch version matrix: build the extension and run the default test suite against
# other torch releases than the pinned one, each in its own venv (so the main
# environment keeps torch 2.13.0).  nvidia-modelopt is left out of these venvs (its own
# torch requirements are not ours to test): the tests that need it skip there and run in
# the main CI step.
#
#   .ci/torch_matrix.sh                 every version in TORCH_VERSIONS
#   TORCH_VERSIONS="2.14.1" .ci/torch_matrix.sh
#
# 2.14.1 comes from this machine kind's local wheel store (a CUDA build, run on the CPU);
# the older release from the registry.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
versions=${TORCH_VERSIONS:-"2.9.1 2.14.1"}
work=$(mktemp -d "${TMPDIR:-/tmp}/modelopt_c-matrix.XXXXXX")
trap 'rm -rf "$work"' EXIT

failed=()
for v in $versions; do
    echo "torch_matrix: torch $v" >&2
    venv="$work/venv-$v"
    $PY -m venv "$venv"
    vpy="$venv/bin/python"
    "$vpy" -m pip install -q --disable-pip-version-check "torch==$v" "pydantic>=2" pytest safetensors numpy \
        "setuptools>=69" wheel >"$work/pip-$v.log" 2>&1 || { tail -20 "$work/pip-$v.log"; failed+=("$v (install)"); continue; }
    # a copy of the tracked tree, built in place against this torch
    tree="$work/tree-$v"
    mkdir -p "$tree"
    git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$tree")
    if ! (cd "$tree" && "$vpy" setup.py -q build_ext --inplace >"$work/build-$v.log" 2>&1); then
        tail -30 "$work/build-$v.log"
        failed+=("$v (build)")
        continue
    fi
    "$vpy" -c "import torch; print('torch_matrix: built against', torch.__version__)" >&2
    if ! (cd "$tree" && PYTHONPATH="$tree" "$vpy" -m pytest -q -p no:cacheprovider -x 2>&1 | tail -25); then
        failed+=("$v (tests)")
    fi
    rm -rf "$venv" "$tree"  # each venv is several GB
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "torch_matrix: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "torch_matrix: passed on torch $versions" >&2
