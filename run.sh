#!/usr/bin/env bash
# One entry point that sets up a fresh Debian machine and runs what you ask:
#   bash run.sh demo    build + install, then `python -m modelopt_c demo`
#   bash run.sh test    build + install, then the test suite (the leak loops: add -m isolated)
#   bash run.sh bench [--quick|--full]   build + install, then the benchmarks
# Set-up is idempotent and skipped when everything is already there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

need_apt=()
pkg-config --exists msgpack 2>/dev/null || need_apt+=(libmsgpack-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "run.sh: installing ${need_apt[*]} with apt-get" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

# torch first and pinned, so nothing resolves a newer (multi-GB CUDA) build.
pip_quiet=(-q --disable-pip-version-check)
$PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || $PY -m pip install "${pip_quiet[@]}" torch==2.13.0
$PY -c "import pydantic, pytest, modelopt.torch.opt, safetensors.torch, numpy, matplotlib, transformers, accelerate, tqdm, mypy, nbclient, nbformat, ipykernel" 2>/dev/null \
    || $PY -m pip install "${pip_quiet[@]}" torch==2.13.0 "pydantic>=2" pytest nvidia-modelopt \
        huggingface_hub safetensors numpy matplotlib transformers accelerate tqdm mypy nbclient nbformat ipykernel
# the extension, built against the installed torch
$PY -m pip install "${pip_quiet[@]}" --no-build-isolation -e . >/dev/null

case "${1:-demo}" in
    demo) shift || true; exec $PY -m modelopt_c demo "$@" ;;
    test) shift; exec $PY -m pytest -q "$@" ;;
    bench) shift; exec $PY benchmarks/run.py "$@" ;;
    *) echo "usage: bash run.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
