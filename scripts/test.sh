#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU (2 ranks stand in for a cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed's JIT-built ops live with the environment they were built for.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
bash scripts/setup.sh
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
