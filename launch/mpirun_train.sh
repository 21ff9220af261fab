#!/usr/bin/env bash
# Run an IST job under Open MPI's mpirun: one process per GPU (per CPU rank on a machine without one).
# Rank, world size and local rank come from OMPI_COMM_WORLD_*; MASTER_ADDR/MASTER_PORT are exported
# when set, else the ranks agree on them with mpi4py (rank 0's host, 127.0.0.1 on a single host).
#
#   NP=2 bash launch/mpirun_train.sh --config configs/quickstart.yaml
#   NP=16 HOSTFILE=launch/hostfile.example MASTER_ADDR=node-a MASTER_PORT=29500 \
#       bash launch/mpirun_train.sh --config configs/paper_llama7b_lora.yaml
#
# Environment: NP (processes, default 2), HOSTFILE (Open MPI hostfile, same "host slots=N" format as
# DeepSpeed's), PYTHON (default .venv/bin/python if present, else python), MPIRUN_ARGS (extra mpirun
# options, e.g. "--mca btl_tcp_if_include ib0" or "--oversubscribe"), ENTRY (the script each rank runs,
# default launch/train.py). Arguments go to the script.
# See docs/launch.md.
set -euo pipefail
cd "$(dirname "$0")/.."

NP=${NP:-2}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

args=(-n "$NP" --bind-to none --map-by slot)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
# mpirun starts remote ranks with a bare environment: forward what the job reads.
for name in $(compgen -e); do
  case "$name" in
    MASTER_ADDR|MASTER_PORT|OMP_NUM_THREADS|PATH|LD_LIBRARY_PATH|PYTHONPATH|HF_HOME|HF_HUB_OFFLINE|\
    TRANSFORMERS_OFFLINE|DS_ACCELERATOR|TORCH_EXTENSIONS_DIR|CUDA_VISIBLE_DEVICES|GLOO_SOCKET_IFNAME|\
    NCCL_*|TORCH_NCCL_*|TORCH_DISTRIBUTED_DEBUG|PYTHONWARNINGS)
      args+=(-x "$name") ;;
  esac
done
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$PYTHON" "${ENTRY:-launch/train.py}" "$@"
