#!/usr/bin/env python
"""Run an IST fine-tuning job from a YAML recipe, under any launcher.

    deepspeed --num_gpus 2 launch/train.py --config configs/quickstart.yaml
    torchrun --nproc_per_node 2 launch/train.py --config configs/quickstart.yaml
    python launch/train.py --config configs/quickstart.yaml --set backend.name=single

See docs/launch.md for multi-node, mpirun and SLURM.
"""

import sys

from ist_ds.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
