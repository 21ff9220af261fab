"""Shared pieces of the benchmarks: the model, synthetic data, DeepSpeed configs, a 2-rank launcher.

The benchmark model is a random-initialised Llama (8 blocks, hidden 256, intermediate 688, 4 heads,
byte vocabulary of 259) with LoRA r=32, alpha=64 on q, k, v, up, down (the IST paper's recipe,
scaled down). The intermediate size keeps Llama-7B's ratio (11008 / 4096); the byte vocabulary keeps
the logits a small share of the activations, as they are in a 7B model.

Ranks are forked from the parent (which has already imported torch, DeepSpeed, transformers and
peft), each with the usual launcher variables (loopback master, a free port, ``OMP_NUM_THREADS=1``).
The parent never joins a process group; it collects what each rank returns and prints the tables.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import sys
import time
import traceback
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# DeepSpeed JIT-builds its CPU collective op into TORCH_EXTENSIONS_DIR. Checkouts with different venvs
# that share the default directory rebuild it on every process start (the include paths differ, so
# the build files flip between them), and a rank waits on the build lock for a minute or more. The
# benchmarks therefore build into a directory of their own per venv (built once, ~1 minute).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "torch_extensions_ist_bench",
    __import__("hashlib").sha1(sys.prefix.encode()).hexdigest()[:10]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The synthetic model and data are the tests' own (tests/helpers.py), one copy for both.
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import torch  # noqa: E402

import helpers  # noqa: E402

MODEL = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=688, num_attention_heads=4,
             num_key_value_heads=4)
LORA = dict(r=32, alpha=64, dropout=0.0)
SEQ = 256


def quiet() -> None:
    """Silence DeepSpeed's and transformers' per-step logging inside the ranks."""
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "ist_ds"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
    except Exception:  # noqa: BLE001
        pass


def make_model(seed: int = 0, **overrides):
    """The benchmark model (:data:`MODEL`, ``overrides`` on top) with LoRA as in :data:`LORA`."""
    config = {**MODEL, **overrides}
    return helpers.make_model(seed, config.pop("num_hidden_layers"), **LORA, **config)


def make_data(n: int = 64, seq: int = SEQ, seed: int = 1) -> list[dict]:
    """Random byte sequences with labels = inputs (the model is random, so content does not matter)."""
    return helpers.make_data(n, seq, seed)


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def rank_batch(data: list[dict], step: int, rank: int, world: int, micro: int) -> dict:
    """This rank's micro-batch of global step ``step`` (contiguous shards of a sliding window)."""
    glob = micro * world
    start = (step * glob) % (len(data) - glob + 1)
    return collate(data[start + rank * micro:start + (rank + 1) * micro])


def ds_config(stage: int, micro: int, ist: dict | None, lr: float = 2e-4, weight_decay: float = 0.0,
              bf16: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if ist is not None:
        cfg["ist"] = ist
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class CommCounter:
    """Bytes this rank hands to torch.distributed collectives while :attr:`active` is true.

    Installed in a rank before its process group exists (DeepSpeed caches some collective functions
    when it initialises), it wraps the module-level functions that DeepSpeed's torch backend and
    FSDP2 call. A collective counts the bytes of its largest tensor argument: the all-reduced tensor,
    the gathered output of an all-gather, the input of a reduce-scatter.
    """

    NAMES = ("all_reduce", "reduce", "broadcast", "reduce_scatter", "reduce_scatter_tensor", "all_gather",
             "all_gather_into_tensor", "_all_gather_base", "_reduce_scatter_base", "all_reduce_coalesced")

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.active = False
        self.bytes = 0
        self.calls = 0
        for module in (dist, c10d):  # FSDP2 and DeepSpeed reach the functions through either
            for name in self.NAMES:
                fn = getattr(module, name, None)
                if fn is not None:
                    setattr(module, name, self._wrap(fn))

    @staticmethod
    def _nbytes(x) -> int:
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(CommCounter._nbytes(t) for t in x)
        return 0

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            if self.active:  # the largest tensor argument: all-reduce's tensor, all-gather's output, ...
                self.bytes += max((self._nbytes(a) for a in (*args, *kwargs.values())), default=0)
                self.calls += 1
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        return counted


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------- forked ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, queue, args):
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "LOCAL_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    })
    torch.set_num_threads(1)
    quiet()
    code = 0
    try:
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - re-raised in the parent with the rank
        queue.put((rank, "error", traceback.format_exc()))
        code = 1
    # Flush the result to the parent before anything else can go wrong, then leave without the
    # interpreter's teardown (process-group and extension destructors are not needed here).
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_T0 = None


def log(msg: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    global _T0
    import time

    if _T0 is None:
        _T0 = time.perf_counter()
    rank = os.environ.get("RANK", "-")
    try:
        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        rss = float("nan")
    print(f"[{time.perf_counter() - _T0:7.1f}s rank {rank} rss {rss:.0f} MiB] {msg}", file=sys.stderr, flush=True)


def preload_ops() -> None:
    """Load DeepSpeed's CPU shared-memory collective op once in the parent.

    Every ``deepspeed.init_distributed`` on the CPU accelerator loads (and JIT-checks) this op; done in
    each forked rank it costs 20-40 s per rank, done once here the forks inherit the loaded module.
    """
    try:
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
    except Exception as exc:  # noqa: BLE001 - the ranks will load it themselves
        log(f"could not preload the shm collective op: {exc}")


def run_ranks(fn, world: int, *args, timeout: float = 1200) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` forked CPU ranks; the results by rank."""
    import deepspeed  # noqa: F401  (imported once in the parent, inherited by the forks)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    preload_ops()

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, queue, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    grace = None  # once a rank has died or failed, wait a little for the others, not the full timeout
    try:
        while len(results) + len(errors) < world and time.monotonic() < (grace or deadline):
            try:
                rank, status, value = queue.get(timeout=2)
            except queue_mod.Empty:
                if grace is None and any(p.exitcode not in (None, 0) for p in procs):
                    grace = time.monotonic() + 20
                continue
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
                grace = grace or time.monotonic() + 20
                continue
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
    for r, p in enumerate(procs):
        if r not in results and not any(e.startswith(f"rank {r} ") for e in errors):
            errors.append(f"rank {r} returned nothing (exit code {p.exitcode}; a negative code is the "
                          f"signal that ended it, -9 is also what the kernel's OOM killer sends)")
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also readable on a terminal)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_verdicts(verdicts: list[tuple[str, bool]], infos: list[str] = ()) -> int:
    """The last lines of a benchmark: INFO lines, then PASS/FAIL per target; the exit code (0: all pass)."""
    for line in infos:
        print(f"INFO  {line}")
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def step_phases(engine, batch) -> tuple[float, float, float]:
    """(forward, backward, ``engine.step()``) seconds of one training step on a DeepSpeed engine."""
    t0 = time.perf_counter()
    loss = engine(**batch).loss
    t1 = time.perf_counter()
    engine.backward(loss)
    t2 = time.perf_counter()
    engine.step()
    return t1 - t0, t2 - t1, time.perf_counter() - t2
