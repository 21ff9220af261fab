#!/usr/bin/env python
"""FSDP2 + LoRA + IST from a recipe: ``launch/train.py`` with ``configs/fsdp_ist.yaml`` as the default recipe.

    torchrun --nproc_per_node 2 launch/fsdp_train.py --set training.max_steps=30
    torchrun --nproc_per_node 2 launch/fsdp_train.py --set model.dtype=bfloat16 --set training.save_every=30
    torchrun --nproc_per_node 2 launch/fsdp_train.py --resume

Every option is ``launch/train.py``'s (``--config``, ``--set section.key=value``, ``--resume``); the
recipe format is the one of every backend (``backend.name: fsdp``, docs/config.md, docs/fsdp.md).
"""

import os
import sys

from ist_ds.jobs.cli import main

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "fsdp_ist.yaml")

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        args = ["--config", DEFAULT_RECIPE, *args]
    sys.exit(main(["train", *args]))
