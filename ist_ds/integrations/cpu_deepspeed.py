"""DeepSpeed jobs of ``transformers.Trainer`` on DeepSpeed's CPU accelerator: let accelerate count the ranks.

accelerate derives the number of processes of a DeepSpeed job from a device backend (NCCL and
friends); with ``DS_ACCELERATOR=cpu`` it finds none, so every rank believes it is alone (wrong
``train_batch_size``, no data sharding). :func:`init_cpu_deepspeed` sets up accelerate's process
state over gloo instead. ``launch/hf_trainer_train.py`` calls it, so that the Trainer launcher runs on
a machine without a GPU; on GPUs and in a single process it does nothing. The accelerate internals it
uses are named in :mod:`ist_ds.compat.transformers`.
"""

from __future__ import annotations

import os

from ist_ds.compat import transformers as hf_compat


def init_cpu_deepspeed(backend: str = "gloo") -> dict:
    """Let accelerate count the ranks of a DeepSpeed job on DeepSpeed's CPU accelerator.

    Call this before each ``TrainingArguments`` and pass what it returns as ``accelerator_config``:
    it sets up accelerate's process state over ``backend`` once (DeepSpeed's ``init_distributed``
    runs as usual), and clears the per-Trainer accelerator state so that a second Trainer in the
    same process gets its own DeepSpeed config.

    Returns ``{"use_configured_state": True}``, or ``{}`` (nothing done) in a single process or when
    DeepSpeed's accelerator is not the CPU one.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return {}
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return {}
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    world = int(os.environ["WORLD_SIZE"])
    shared = hf_compat.accelerate_shared_state()
    if shared and (shared.get("distributed_type") != DistributedType.DEEPSPEED or shared.get("num_processes") != world):
        hf_compat.reset_accelerate_state(reset_partial_state=True)  # as TrainingArguments itself would
    if not hf_compat.accelerate_shared_state():
        previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend=backend)
        finally:
            if previous is None:
                os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    state = PartialState()
    if state.distributed_type != DistributedType.DEEPSPEED or state.num_processes != world:
        raise RuntimeError(f"accelerate set up {state.distributed_type} with {state.num_processes} processes, "
                           f"expected DeepSpeed with WORLD_SIZE={world}")
    hf_compat.reset_accelerate_state(reset_partial_state=False)
    return {"use_configured_state": True}


__all__ = ["init_cpu_deepspeed"]
