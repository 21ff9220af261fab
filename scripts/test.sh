#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU (2 ranks stand in for a cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed's JIT-built ops live with the environment they were built for.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
bash scripts/setup.sh
# The venv's bin first: DeepSpeed's JIT builds run the first `ninja` on PATH, and the venv's ninja
# (1.13 here) and the system's (1.11) rewrite each other's build logs, so mixing them rebuilds the ops
# (40-70 s each time, other ranks waiting on the build lock). Every process of a job uses the venv's.
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
