"""Who am I in the job, and joining it: rank, world size and master address from whichever launcher
started us, then the process group, with bounded waits.

``deepspeed``, ``torchrun`` and ``torch.distributed.run`` export ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` themselves. :func:`discover` takes those as they are,
else maps ``mpirun``'s or SLURM's own variables onto them (:mod:`ist_ds.jobs.launcher_env`), else
sets up a plain single process, and checks that the result is consistent.

:func:`init_distributed` then joins the job with a bounded wait: a rank that cannot reach the master,
or a master whose peers never arrive, fails after ``timeout_s`` with :class:`ISTLaunchError` naming
the address, instead of hanging. :func:`release_shm_buffers` removes what DeepSpeed's CPU
communication leaves in ``/dev/shm`` when the job ends.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import signal
import socket
import threading
import time
from collections.abc import MutableMapping

from ist_ds.core.errors import ISTLaunchError
from ist_ds.jobs.launcher_env import MPI_VARIABLES, apply_mpi, apply_slurm, free_port

DEFAULT_MASTER_PORT = 29500


def discover(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Return the variables ``env://`` needs, filled in from MPI or SLURM when absent.

    Updates and returns ``env`` (``os.environ`` by default). Precedence: ``RANK``/``WORLD_SIZE``
    already set (torchrun, deepspeed, or by hand), then MPI (an ``mpirun`` inside an ``sbatch``
    allocation still sees the batch step's ``SLURM_PROCID``), then SLURM. Raises
    :class:`ISTLaunchError` when a launcher is detected but its variables are incomplete.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
    else:
        mpi = next((names for names in MPI_VARIABLES if names[0] in env), None)
        if mpi is not None:
            apply_mpi(env, mpi)
        elif "SLURM_PROCID" in env:
            apply_slurm(env)
        else:  # a plain single process
            env.setdefault("RANK", "0")
            env.setdefault("WORLD_SIZE", "1")
            env.setdefault("LOCAL_RANK", "0")
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            if env["WORLD_SIZE"] == "1":
                env.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))  # a group of one: any free port
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if not env[key].isdigit():
            raise ISTLaunchError(f"{key}={env[key]!r} is not a non-negative integer")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if world < 1 or rank >= world:
        raise ISTLaunchError(f"RANK={rank} does not fit WORLD_SIZE={world}; check the launcher's task count")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    return env


# ------------------------------------------------------------------------------------------ joining
def wait_for_master(addr: str, port: int, timeout_s: float, rank: int = 0) -> None:
    """Block until something accepts TCP connections at ``addr:port``, or raise after ``timeout_s``.

    Non-zero ranks call this before ``init_process_group``: torch's own store client retries for up to
    about twice its timeout and reports a bare socket error; this bounds the wait and names the
    address.
    """
    began = time.monotonic()
    deadline = began + timeout_s
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((addr, port), timeout=min(remaining, 5.0)):
                return
        except socket.gaierror as e:
            raise ISTLaunchError(f"rank {rank}: cannot resolve the master address {addr!r} ({e}); set MASTER_ADDR "
                                 "to a host name or IP address that every node can resolve") from e
        except OSError as e:
            last = e
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise ISTLaunchError(
        f"rank {rank} could not reach the master at {addr}:{port} within {timeout_s:g} s (waited "
        f"{time.monotonic() - began:.1f} s; last error: {last}); check "
        "MASTER_ADDR/MASTER_PORT, that rank 0 was started, and that the port is open between the nodes "
        "(backend.dist_timeout_s sets this limit)")


def init_distributed(framework: str = "torch", backend: str | None = None,
                     timeout_s: float = 600) -> tuple[int, int, int]:
    """Discover the launcher and join the job; returns (rank, world size, local rank).

    ``framework="deepspeed"`` initialises through ``deepspeed.init_distributed`` (always, also for one
    process, as DeepSpeed's engine expects a process group); ``"torch"`` calls
    ``torch.distributed.init_process_group`` when there are several ranks. ``timeout_s`` bounds the
    wait for the master and for the peers (and every later collective): failures raise
    :class:`ISTLaunchError` naming ``MASTER_ADDR:MASTER_PORT``.
    """
    import torch
    import torch.distributed as dist

    env = discover()
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    addr, port = env["MASTER_ADDR"], env["MASTER_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ISTLaunchError(f"MASTER_PORT={port!r} is not a TCP port number")
    if dist.is_initialized() or (framework != "deepspeed" and world == 1):
        return rank, world, local
    if backend is None and framework != "deepspeed":  # DeepSpeed picks its accelerator's backend itself
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=timeout_s)
    start = time.monotonic()
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if world > 1 and (rank != 0 or agent_store):
        wait_for_master(addr, int(port), timeout_s, rank)
    try:
        with _deadline(timeout_s + 30, f"rank {rank} of {world} did not finish joining the job (master {addr}:{port})"):
            if framework == "deepspeed":
                import deepspeed

                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
            else:
                dist.init_process_group(backend, timeout=timeout)
    except ISTLaunchError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the address that failed
        took = time.monotonic() - start
        raise ISTLaunchError(
            f"rank {rank} of {world} could not form the job with the master at {addr}:{port} "
            f"(gave up after {took:.0f} s, timeout {timeout_s:g} s): {_first_line(e)}; check that all {world} "
            "ranks were started with the same MASTER_ADDR/MASTER_PORT and world size, and that every node can "
            "reach the master (backend.dist_timeout_s sets this limit)") from e
    return rank, world, local


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Raise :class:`ISTLaunchError` in the main thread if the block runs longer than ``seconds``.

    The network waits have their own timeouts; this catches the rest, e.g. a JIT-built DeepSpeed op
    whose build lock was left behind by a killed process (every later load then waits forever). Only
    armed in the main thread and when nobody else handles SIGALRM.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)):
        yield
        return

    def expired(signum, frame):
        raise ISTLaunchError(f"{what} within {seconds:g} s; it was stuck in {_where(frame)}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _where(frame) -> str:
    """Where a stuck main thread is, with the fix when it waits on a stale torch-extension build lock."""
    here = f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})" if frame else "an unknown place"
    while frame is not None:
        baton = frame.f_locals.get("self") if frame.f_code.co_name == "wait" else None
        lock = getattr(baton, "lock_file_path", None)
        if lock:
            return (f"{here}, waiting for the build lock {lock} of a JIT-compiled op. If no other process is "
                    f"building it, a killed process left the lock behind: delete {lock} and start again")
        frame = frame.f_back
    return here


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def release_shm_buffers(env: MutableMapping[str, str] | None = None) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer, if there is one.

    DeepSpeed's CPU communication op maps a buffer in ``/dev/shm`` named after the master address,
    port and rank, and never unlinks it: every CPU job would leave tens of MB of shared memory behind
    until reboot. The mapping stays valid for this process; only the name goes.
    """
    env = os.environ if env is None else env
    addr, port, rank = env.get("MASTER_ADDR"), env.get("MASTER_PORT"), env.get("RANK")
    if not (addr and port and rank):
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass


__all__ = ["DEFAULT_MASTER_PORT", "discover", "init_distributed", "release_shm_buffers", "wait_for_master"]
