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
import queue as queue_module
import socket
import time
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
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                # A rank killed by a signal (a segfault, the OOM killer) never reports: say so at once
                # instead of waiting for the timeout while the other ranks hang in a collective.
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append("; ".join(f"rank {r} died with exit code {code}" for r, code in dead))
                elif time.monotonic() > deadline:
                    errors.append(f"no result from ranks {sorted(set(range(world_size)) - set(results))} "
                                  f"within {timeout:.0f} s")
                continue
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
