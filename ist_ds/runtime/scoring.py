"""The importance update's forward passes: one scoring batch, K suppressed losses, averaged globally.

Each update takes one global batch of ``scoring_batch_size`` examples from its own shuffled stream
(identical on every rank, reshuffled when exhausted, like the reference's private DataLoader). With
``W`` ranks each rank runs its contiguous shard of that batch; every rank sums the token losses and
counts the tokens of its shard, and one all-reduce turns those into the loss of the whole batch.
The result equals a single process scoring the whole batch (``sum / count`` is the token mean the
model's own loss computes), while the forward cost per rank falls as ``1 / W``.

All ranks run the same number of forwards in the same order (ZeRO-3 and FSDP gather parameters
inside each forward, so a rank that skipped one would hang the others); a rank whose shard is empty
runs a forward on a stand-in example and counts it with weight zero.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from ist_ds.model.layer_map import LayerMap
from ist_ds.runtime.collectives import Collectives, LocalCollectives
from ist_ds.model.suppression import suppress

IGNORE_INDEX = -100


class ScoringStream:
    """An endless, seeded stream of global scoring batches (lists of dataset indices)."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int = 0) -> None:
        if dataset_size < 1:
            raise ValueError("the scoring data is empty")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            self._perm = torch.randperm(self.dataset_size, generator=g).tolist()
        return self._perm

    def next_indices(self) -> list[int]:
        """The next global batch; the last one of an epoch may be short, as with ``drop_last=False``."""
        if self.position >= self.dataset_size:
            self.epoch += 1
            self.position = 0
            self._perm = None
        perm = self._permutation()
        batch = perm[self.position:self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "dataset_size": self.dataset_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state["seed"])
        self._perm = None


def shard_micro_batches(indices: Sequence[int], rank: int, world_size: int,
                        micro_batch_size: int | None) -> list[list[int]]:
    """This rank's contiguous shard of ``indices``, cut into the same number of pieces on every rank."""
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    shard = list(indices[start:start + base + (1 if rank < extra else 0)])
    largest = base + (1 if extra else 0)
    pieces = 1 if micro_batch_size is None else max(1, math.ceil(largest / micro_batch_size))
    size, rest = divmod(len(shard), pieces)
    out, pos = [], 0
    for p in range(pieces):
        step = size + (1 if p < rest else 0)
        out.append(shard[pos:pos + step])
        pos += step
    return out


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labelled positions, and their count (float64)."""
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (shift_labels != IGNORE_INDEX).sum()
    return total.double(), count.double()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off for the scoring forwards, the previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def default_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The logits of a Hugging Face causal LM (labels are scored here, not by the model).

    A model whose config asks for a KV cache would build one in every scoring forward and never read
    it; turning it off makes the forward about 6% cheaper (measured on the benchmark model).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(getattr(model, "config", None), "use_cache", False):
        inputs.setdefault("use_cache", False)
    return model(**inputs).logits


class ImportanceScorer:
    """Computes the K suppressed scoring losses that drive the importance update (the controller's
    :class:`~ist_ds.runtime.controller.Scorer`)."""

    def __init__(self, model: torch.nn.Module, layer_map: LayerMap, dataset, collate_fn: Callable | None,
                 stream: ScoringStream, suppression_scale: float, collectives: Collectives | None = None,
                 device: torch.device | str = "cpu", micro_batch_size: int | None = None,
                 forward: Callable[[torch.nn.Module, dict], torch.Tensor] = default_forward) -> None:
        self.model = model
        self.layer_map = layer_map
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.stream = stream
        self.scale = suppression_scale
        self.comm = collectives or LocalCollectives()
        self.device = torch.device(device)
        self.micro_batch_size = micro_batch_size
        self.forward = forward
        self.last_seconds = 0.0
        self.last_batch_tokens = 0

    def _batches(self) -> list[tuple[dict, float]]:
        indices = self.stream.next_indices()
        pieces = shard_micro_batches(indices, self.comm.rank, self.comm.world_size, self.micro_batch_size)
        out = []
        for piece in pieces:
            weight = 1.0 if piece else 0.0
            examples = [self.dataset[i] for i in (piece or indices[:1])]
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in self.collate_fn(examples).items()}
            out.append((batch, weight))
        return out

    def losses(self, suppression_sets: Sequence[Sequence[int]]) -> list[float]:
        """The global scoring loss under each suppression set (the same list on every rank)."""
        start = time.perf_counter()
        batches = self._batches()
        sums = torch.zeros(len(suppression_sets), 2, dtype=torch.float64)
        with eval_mode(self.model), torch.no_grad():
            for k, layer_set in enumerate(suppression_sets):
                with suppress(self.layer_map, layer_set, self.scale):
                    for batch, weight in batches:
                        total, count = token_loss_sum(self.forward(self.model, batch), batch["labels"])
                        sums[k, 0] += weight * total.cpu()
                        sums[k, 1] += weight * count.cpu()
        sums = self.comm.all_reduce_sum(sums)
        self.last_batch_tokens = int(sums[0, 1])
        if self.last_batch_tokens == 0:
            raise ValueError("the scoring batch has no labelled tokens (every label is -100)")
        self.last_seconds = time.perf_counter() - start
        return (sums[:, 0] / sums[:, 1]).tolist()

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
