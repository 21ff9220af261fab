#!/usr/bin/env bash
# One-time (idempotent) set-up of ist_ds on a fresh Linux machine: system MPI, the .venv, the
# package, and DeepSpeed's JIT-built CPU ops. Safe to re-run; finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed's JIT-built ops live with the environment they were built for.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}

PY=${PYTHON:-python3}

# mpi4py needs a system MPI; numactl serves `deepspeed --bind_cores_to_rank`.
if ! dpkg -s libopenmpi-dev openmpi-bin numactl >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin numactl >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: anything that pulls torch later must find this CPU/CUDA build in place.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .

# The venv's bin first: DeepSpeed's JIT builds run the first `ninja` on PATH, and the venv's ninja
# (1.13 here) and the system's (1.11) rewrite each other's build logs, so mixing them rebuilds the ops
# (40-70 s each time, other ranks waiting on the build lock). Every process of a job uses the venv's.
export PATH="$PWD/.venv/bin:$PATH"
# DeepSpeed compiles its CPU communication and CPU-Adam ops on first use (about 1-2 min each on
# 2 cores); build them once here, into ~/.cache/torch_extensions, not inside a job or a test.
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DS_ACCELERATOR=cpu .venv/bin/python - <<'PYEOF'
import logging
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
for builder in (ShareMemCommBuilder(), CPUAdamBuilder()):
    builder.load(verbose=False)
PYEOF
fi
echo "ist_ds set up in $(pwd)/.venv"
