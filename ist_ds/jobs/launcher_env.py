"""``mpirun`` and SLURM ``srun`` name a rank with their own variables: map them onto torch's.

``deepspeed``, ``torchrun`` and ``torch.distributed.run`` export ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` themselves; ``mpirun`` (Open MPI, and the Hydra
launchers of MPICH / Intel MPI, MVAPICH2) and SLURM's ``srun`` do not. :func:`apply_mpi` and
:func:`apply_slurm` fill in the torch names from theirs, so that every launcher ends in the same
``env://`` initialisation (:func:`ist_ds.jobs.dist_env.discover` decides which one applies).
Explicit ``MASTER_ADDR`` / ``MASTER_PORT`` always win. Without ``MASTER_ADDR``:

* under MPI, rank 0's host name is broadcast with mpi4py (``127.0.0.1`` when every rank runs on
  rank 0's host), and so is a free port chosen by rank 0 when ``MASTER_PORT`` is unset too;
* under SLURM, the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (``scontrol show
  hostnames`` when available, else :func:`expand_nodelist`), and ``MASTER_PORT`` defaults to
  ``10000 + SLURM_JOB_ID % 22768`` so that two jobs sharing a node do not collide, and below Linux's
  default ephemeral port range (32768-60999), where the kernel could have handed the port to an
  outgoing connection (``launch/slurm_train.sbatch`` reads the node's actual range).
"""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
from collections.abc import MutableMapping

from ist_ds.core.errors import ISTLaunchError

SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 22768  # 10000..32767


# ------------------------------------------------------------------------------------------ SLURM
def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list the way ``scontrol show hostnames`` does, in order.

    ``"node[01-04,07]"`` -> ``node01 node02 node03 node04 node07``; ``"gpu-a[3-4],gpu-b1"`` ->
    ``gpu-a3 gpu-a4 gpu-b1``; several bracket groups in one name expand as a product
    (``"r[1-2]n[1-2]"`` -> ``r1n1 r1n2 r2n1 r2n2``); zero padding follows the lower bound's width.
    """
    if not isinstance(nodelist, str) or not nodelist.strip():
        raise ISTLaunchError(f"empty SLURM node list {nodelist!r}")
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_name(name, nodelist))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a[1,2],b"`` -> ``["a[1,2]", "b"]``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ISTLaunchError(f"unbalanced ']' in SLURM node list {text!r}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ISTLaunchError(f"unbalanced '[' in SLURM node list {text!r}")
    parts.append(current)
    parts = [p.strip() for p in parts]
    if any(not p for p in parts):
        raise ISTLaunchError(f"empty host name in SLURM node list {text!r}")
    return parts


def _expand_name(name: str, whole: str) -> list[str]:
    pieces = re.split(r"(\[[^\]]*\])", name)  # literal, [ranges], literal, ...
    choices: list[list[str]] = []
    for piece in pieces:
        if piece.startswith("["):
            choices.append(_expand_ranges(piece[1:-1], whole))
        elif piece:
            if "[" in piece or "]" in piece:
                raise ISTLaunchError(f"nested brackets in SLURM node list {whole!r}")
            choices.append([piece])
    return ["".join(parts) for parts in itertools.product(*choices)]


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ISTLaunchError(f"bad range {item!r} in SLURM node list {whole!r}")
        low, high = m.group(1), m.group(2)
        if high is None:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ISTLaunchError(f"descending range {item!r} in SLURM node list {whole!r}")
        width = len(low)
        out.extend(str(i).zfill(width) for i in range(int(low), int(high) + 1))
    return out


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when present, else our parser."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)[0]


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``)."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ISTLaunchError(f"cannot read SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not 0 <= node_id < len(counts):
        raise ISTLaunchError(f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def apply_slurm(env: MutableMapping[str, str]) -> None:
    """Fill ``env``'s torch variables from SLURM's (``SLURM_PROCID`` is set)."""
    env["RANK"] = env["SLURM_PROCID"]
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if not ntasks:
        raise ISTLaunchError("SLURM_PROCID is set but neither SLURM_NTASKS nor SLURM_STEP_NUM_TASKS; "
                             "start the job with srun, or export RANK/WORLD_SIZE yourself")
    env["WORLD_SIZE"] = ntasks
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        env["LOCAL_WORLD_SIZE"] = str(tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))))
    elif "SLURM_NTASKS_PER_NODE" in env:
        env["LOCAL_WORLD_SIZE"] = env["SLURM_NTASKS_PER_NODE"]
    if "SLURM_NODEID" in env:
        env.setdefault("NODE_RANK", env["SLURM_NODEID"])
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ISTLaunchError("SLURM_PROCID is set but no SLURM_JOB_NODELIST to find the master; export MASTER_ADDR")
        env["MASTER_ADDR"] = first_slurm_host(nodelist)
    if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
        env["MASTER_PORT"] = str(SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN)


# ------------------------------------------------------------------------------------------ MPI
MPI_VARIABLES = (  # (rank, size, local rank, local size): Open MPI, then MPICH / Intel MPI (Hydra), MVAPICH2
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
)


def apply_mpi(env: MutableMapping[str, str], names: tuple[str, str, str, str]) -> None:
    """Fill ``env``'s torch variables from an MPI launcher's ``names`` (one row of :data:`MPI_VARIABLES`)."""
    rank, size, local, local_size = names
    if size not in env:
        raise ISTLaunchError(f"{rank} is set but {size} is not; export RANK/WORLD_SIZE yourself")
    env["RANK"], env["WORLD_SIZE"] = env[rank], env[size]
    env["LOCAL_RANK"] = env.get(local, "0")
    if local_size in env:
        env["LOCAL_WORLD_SIZE"] = env[local_size]
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        addr, port = _mpi_master(env.get("MASTER_ADDR"), env.get("MASTER_PORT"))
        env.setdefault("MASTER_ADDR", addr)
        env.setdefault("MASTER_PORT", port)


def _mpi_master(addr: str | None, port: str | None) -> tuple[str, str]:
    """Rank 0's address and a port, agreed on by every rank with mpi4py (what DeepSpeed's MPI discovery
    does, but staying on loopback when the whole job runs on one host)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ISTLaunchError("started by mpirun without MASTER_ADDR/MASTER_PORT, and mpi4py is missing to agree "
                             "on them; export both (mpirun -x MASTER_ADDR=... -x MASTER_PORT=...) or install "
                             "mpi4py") from e
    comm = MPI.COMM_WORLD
    host = socket.gethostname()
    hosts = comm.allgather(host)
    if addr is None:
        addr = "127.0.0.1" if all(h == hosts[0] for h in hosts) else hosts[0]
    if port is None:
        port = comm.bcast(str(free_port()) if comm.Get_rank() == 0 else None, root=0)
    return addr, port


def free_port(host: str = "") -> int:
    """A TCP port nothing listens on right now (on all interfaces by default)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = ["MPI_VARIABLES", "apply_mpi", "apply_slurm", "expand_nodelist", "first_slurm_host", "free_port",
           "tasks_on_node"]
