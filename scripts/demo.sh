#!/usr/bin/env bash
# Set up (idempotent) and run the embedded quick start: a tiny Llama + LoRA + IST on 2 CPU ranks
# through the deepspeed launcher (on a GPU machine, the same job on 2 GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed's JIT-built ops live with the environment they were built for.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
bash scripts/setup.sh
# The venv's bin first: DeepSpeed's JIT builds run the first `ninja` on PATH, and the venv's ninja
# (1.13 here) and the system's (1.11) rewrite each other's build logs, so mixing them rebuilds the ops
# (40-70 s each time, other ranks waiting on the build lock). Every process of a job uses the venv's.
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
exec .venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/quickstart.yaml "$@"
