#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU (2 ranks stand in for a cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
