"""The few collectives IST needs, behind one small interface.

The algorithm only ever (a) sums a small tensor of loss sums and token counts across data-parallel
ranks and (b) checks that every rank holds the same IST state; checkpoints also (c) gather a few
small objects (file listings, checksums). :class:`Collectives` is that interface as a protocol;
:class:`LocalCollectives` is the single-process identity; :class:`TorchCollectives` uses
``torch.distributed`` (gloo, NCCL, or whatever DeepSpeed / FSDP initialised).

The protocol lives here, beside its two implementations, rather than beside one consumer: the
controller, the scorer, the checkpoint module and the job's evaluation all take a ``Collectives``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol, runtime_checkable

import torch

from ist_ds.core.errors import ISTAgreementError

logger = logging.getLogger(__name__)


def fingerprint(*parts) -> int:
    """A signed 63-bit hash of tensors, numbers and lists, identical for identical inputs on any rank."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if torch.is_tensor(part):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True) >> 1


@runtime_checkable
class Collectives(Protocol):
    """The collectives IST runs over its data-parallel ranks. Every method is a collective: every
    rank calls it, in the same order, or the job hangs."""

    #: This process's index among the data-parallel ranks: which shard of a scoring or evaluation
    #: batch it runs, and which files of a checkpoint it hashes.
    rank: int
    #: How many data-parallel ranks share the work; part of the setup every rank must agree on.
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device).

        Scoring and evaluation losses are sums of token losses and token counts per shard; summing
        them over ranks gives the loss of the whole global batch, as one process would compute it.
        """
        ...

    def check_agreement(self, value: int, describe: str = "") -> None:
        """Raise :class:`ISTAgreementError` on every rank unless every rank passed the same ``value``.

        The controller hashes its state (step, selection, scores, generator) after every selection:
        ranks that drifted apart would train different layers and silently corrupt the run.
        ``describe`` is this rank's state in words, shown for every rank when they differ.
        """
        ...

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order, on every rank.

        Checkpoints use it to share file listings and checksums (and as a barrier), so that every
        rank reaches the same verdict on a damaged checkpoint.
        """
        ...

    def check_same(self, parts: dict, what: str = "IST setup") -> None:
        """Raise :class:`ISTAgreementError` on every rank unless every rank passed equal ``parts``,
        naming each key that differs. Run once before IST's first collective, so that a rank with
        another config, model or world size fails with a clear message instead of a hang."""
        ...


class LocalCollectives:
    """One process: sums are identities and agreement is trivial."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def check_agreement(self, value: int, describe: str = "") -> None:
        return None

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return [obj]

    def check_same(self, parts: dict, what: str = "IST setup") -> None:
        """Raise :class:`ISTAgreementError` on every rank unless all ranks passed equal ``parts``."""
        return None


class TorchCollectives(LocalCollectives):
    """``torch.distributed`` collectives over ``group`` (the default group when None)."""

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        # NCCL reduces device tensors only; every other backend here takes host tensors.
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        buf = tensor.to(self.device)
        self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM, group=self.group)
        return buf.to(tensor.device)

    def check_agreement(self, value: int, describe: str = "") -> None:
        """Raise :class:`ISTAgreementError` on every rank unless all ranks passed the same ``value``.

        One all-reduce of two int64 (MAX of ``v`` and of ``-v``); only on a mismatch are the
        per-rank descriptions gathered, to name the ranks that differ.
        """
        dist = self._dist
        buf = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        if int(buf[0]) == -int(buf[1]):
            return
        described: list = [None] * self.world_size
        dist.all_gather_object(described, (value, describe), group=self.group)
        lines = "\n".join(f"  rank {r}: {d}" for r, (_, d) in enumerate(described))
        raise ISTAgreementError(
            "IST state differs across ranks; every rank must train the same layers with the same "
            "scores. Check that all ranks use the same 'ist' config and seed, and the same "
            f"model and data.\n{lines}"
        )

    def gather_objects(self, obj) -> list:
        out: list = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def check_same(self, parts: dict, what: str = "IST setup") -> None:
        """Raise :class:`ISTAgreementError` on every rank unless all ranks passed equal ``parts``.

        ``parts`` maps a name (``ist.update_interval``, ``layer map``, ...) to a plain value. One
        all-reduce of a hash; only on a mismatch are the parts gathered, and the error names every
        key that differs with each rank's value.
        """
        value = fingerprint(*[(k, parts[k]) for k in sorted(parts)])
        buf = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        self._dist.all_reduce(buf, op=self._dist.ReduceOp.MAX, group=self.group)
        if int(buf[0]) == -int(buf[1]):
            return
        every = self.gather_objects(parts)
        keys = sorted({k for p in every for k in p})
        differ = [k for k in keys if any(p.get(k, "<missing>") != every[0].get(k, "<missing>") for p in every)]
        lines = []
        for k in differ:
            values = ", ".join(f"rank {r}: {_short(p.get(k, '<missing>'), every[0].get(k))}" for r, p in enumerate(every))
            lines.append(f"  {k}: {values}")
        raise ISTAgreementError(
            f"the {what} differs across ranks ({', '.join(differ)}); every rank must run the same 'ist' config "
            f"on the same model and world size:\n" + "\n".join(lines))


def _short(value, reference) -> str:
    """A value for an error line; for lists, the first entry that differs from ``reference``."""
    if isinstance(value, list) and isinstance(reference, list) and len(value) == len(reference):
        for i, (a, b) in enumerate(zip(value, reference)):
            if a != b:
                return f"[{i}] = {a!r}"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def default_collectives() -> Collectives:
    """TorchCollectives when a process group with several ranks exists, else LocalCollectives."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollectives()
    return LocalCollectives()
