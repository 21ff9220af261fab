#!/usr/bin/env bash
# Start this node's share of a multi-node torchrun job; run the same command on every node.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node-a:29400 bash launch/torchrun_node.sh \
#       --config configs/paper_llama7b_lora.yaml
#
# c10d rendezvous: the agents meet at RDZV_ENDPOINT (a host:port every node reaches; the first
# node's is customary) and agree on the node ranks themselves. Environment: NNODES (default 1),
# NPROC_PER_NODE (default: the GPUs here, else 2), RDZV_ENDPOINT (default 127.0.0.1:29400),
# RDZV_ID (default ist-ds; use a fresh one per job), LOCAL_ADDR (this node's address as the other
# nodes reach it; default: torchrun looks it up), TORCHRUN_ARGS (more torchrun options), PYTHON, ENTRY
# (the script each rank runs, default launch/train.py). Arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
args=(--nnodes "${NNODES:-1}" --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d
      --rdzv_endpoint "${RDZV_ENDPOINT:-127.0.0.1:29400}" --rdzv_id "${RDZV_ID:-ist-ds}")
[ -n "${LOCAL_ADDR:-}" ] && args+=(--local_addr "$LOCAL_ADDR")
# shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of options
args+=(${TORCHRUN_ARGS:-})
exec "$PYTHON" -m torch.distributed.run "${args[@]}" "${ENTRY:-launch/train.py}" "$@"
