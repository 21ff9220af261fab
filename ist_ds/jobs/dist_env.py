"""Who am I in the job? Rank, world size and master address from whichever launcher started us.

``deepspeed``, ``torchrun`` and ``torch.distributed.run`` export ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` themselves. ``mpirun`` (Open MPI, and the Hydra
launchers of MPICH / Intel MPI) and SLURM's ``srun`` export their own variables instead;
:func:`discover` maps them onto the torch names so that every launcher ends in the same ``env://``
initialisation. Explicit ``MASTER_ADDR`` / ``MASTER_PORT`` always win.

Without ``MASTER_ADDR``:

* under MPI, rank 0's host name is broadcast with mpi4py (``127.0.0.1`` when every rank runs on
  rank 0's host), and so is a free port chosen by rank 0 when ``MASTER_PORT`` is unset too;
* under SLURM, the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (``scontrol show
  hostnames`` when available, else :func:`expand_nodelist`), and ``MASTER_PORT`` defaults to
  ``10000 + SLURM_JOB_ID % 22768`` so that two jobs sharing a node do not collide, and below Linux's
  default ephemeral port range (32768-60999), where the kernel could have handed the port to an
  outgoing connection (``launch/slurm_train.sbatch`` reads the node's actual range).

:func:`init_distributed` then joins the job with a bounded wait: a rank that cannot reach the master,
or a master whose peers never arrive, fails after ``timeout_s`` with :class:`ISTLaunchError` naming
the address, instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time

from ist_ds.core.errors import ISTError

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 22768  # 10000..32767


class ISTLaunchError(ISTError, RuntimeError):
    """The job could not be formed: launcher variables missing or inconsistent, the master unreachable,
    or peers that never joined. The message names the address and what to check."""


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


def _slurm(env) -> None:
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


def _mpi(env, names) -> None:
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


# ------------------------------------------------------------------------------------------ discovery
def free_port(host: str = "") -> int:
    """A TCP port nothing listens on right now (on all interfaces by default)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def discover(env: dict | None = None) -> dict:
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
            _mpi(env, mpi)
        elif "SLURM_PROCID" in env:
            _slurm(env)
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


def init_process_group(backend: str | None = None, timeout_s: int = 600) -> tuple[int, int, int]:
    """Initialise ``torch.distributed`` from the environment; returns (rank, world size, local rank).

    A single process with no launcher variables gets no process group. Kept for callers of the
    first API; :func:`init_distributed` is the general form.
    """
    return init_distributed("torch", backend=backend, timeout_s=timeout_s)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def release_shm_buffers(env: dict | None = None) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer, if there is one.

    DeepSpeed's CPU communication op maps a buffer in ``/dev/shm`` named after the master address,
    port and rank, and never unlinks it: every CPU job would leave tens of MB of shared memory behind
    until reboot. The mapping stays valid for this process; only the name goes.
    """
    import glob

    env = os.environ if env is None else env
    addr, port, rank = env.get("MASTER_ADDR"), env.get("MASTER_PORT"), env.get("RANK")
    if not (addr and port and rank):
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass
