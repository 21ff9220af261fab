import os
import sys

# Tests run on the CPU: DeepSpeed's CPU accelerator, gloo, no hub access, one thread per rank.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))


import glob

import pytest


@pytest.fixture(autouse=True)
def _no_leaked_shared_memory():
    """DeepSpeed's CPU all-reduce buffers in /dev/shm outlive their processes; remove the ones a test made."""
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    for path in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
