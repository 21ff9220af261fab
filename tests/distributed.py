"""Run a function on several CPU ranks forked from the test process.

Forking from a parent that has already imported torch, transformers, peft and DeepSpeed costs well
under a second per rank, against 8-10 s for fresh interpreters. The parent never creates a process
group; each child sets the usual launcher variables (loopback master, a free port), runs the
function, and sends back its return value or its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleanup_shm(port: int) -> None:
    """Remove DeepSpeed's shared-memory buffers of a finished run on ``port`` (DeepSpeed leaks them)."""
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _child(fn, rank, world_size, port, queue, args, kwargs):
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
        "LOCAL_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
    })
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensor data into the message; the queue's own pickler would pass
        # shared-memory handles that die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args, **kwargs))))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 600, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked ranks; return the results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args, kwargs), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
                break
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    cleanup_shm(port)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
