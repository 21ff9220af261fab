"""Who am I in the job? Rank, world size and master address from whichever launcher started us.

``deepspeed``, ``torchrun`` and ``torch.distributed.run`` export ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` themselves. ``mpirun`` (Open MPI) and SLURM's ``srun``
export their own variables instead; :func:`discover` maps them onto the torch names so that every
launcher ends in the same ``env://`` initialisation. An explicit ``MASTER_ADDR`` always wins.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess

logger = logging.getLogger(__name__)


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Without scontrol: "node[01-04],gpu7" -> "node01"; "a,b" -> "a".
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def discover(env: dict | None = None) -> dict:
    """Return the variables ``env://`` needs, filled in from Open MPI or SLURM when absent.

    Updates and returns ``env`` (``os.environ`` by default). Raises ``RuntimeError`` when a launcher
    is detected but a master address cannot be determined.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return env
    if "OMPI_COMM_WORLD_RANK" in env:  # mpirun / deepspeed --launcher openmpi
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        env["LOCAL_WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _mpi_master_addr()
    elif "SLURM_PROCID" in env:  # srun
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise RuntimeError("SLURM_PROCID is set but no SLURM_JOB_NODELIST; export MASTER_ADDR")
            env["MASTER_ADDR"] = _first_slurm_host(nodelist)
    else:  # a plain single process
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return env


def _mpi_master_addr() -> str:
    """Rank 0's host name, broadcast with mpi4py (what DeepSpeed's MPI discovery does)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("started by mpirun without MASTER_ADDR, and mpi4py is missing to find rank 0's "
                           "address; export MASTER_ADDR or install mpi4py") from e
    import socket

    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None, root=0)


def init_process_group(backend: str | None = None, timeout_s: int = 600) -> tuple[int, int, int]:
    """Initialise ``torch.distributed`` from the environment; returns (rank, world size, local rank).

    A single process with no launcher variables gets no process group. ``timeout_s`` bounds every
    collective, so a rank that died or cannot reach the master ends the job with an error instead
    of a hang.
    """
    import torch
    import torch.distributed as dist

    env = discover()
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 - re-raised with the address that failed
            raise RuntimeError(f"rank {rank} could not join the job at {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
                               f"within {timeout_s} s ({e}); check that every node can reach the master "
                               "address and that all ranks were started") from e
    return rank, world, local
