"""Synthetic models and data shared by the tests and the benchmarks (bench/common.py imports this
file by path).

The model is a random-initialised Llama from :func:`ist_ds.jobs.models.build_model` with LoRA on its
default targets; the data are random byte sequences with ``labels = input_ids`` (the model is random,
so content does not matter). Both are pure functions of their seeds, so two processes (or ranks)
that call them with the same arguments hold bit-identical copies, which the tests' comparisons
across ranks and against the single-process trainer rely on.
"""

from __future__ import annotations

import torch

#: Tokens per row of :func:`make_data` unless told otherwise.
SEQ = 16
#: Rows per rank and micro-batch in :func:`global_batch` unless told otherwise.
MICRO = 2


def make_model(seed: int = 0, num_layers: int = 8, *, r: int = 4, alpha: int = 8, dropout: float = 0.0,
               **config):
    """A tiny Llama with ``num_layers`` blocks (``config`` overrides the rest of its config), wrapped
    with LoRA of rank ``r``."""
    from ist_ds.jobs.models import apply_peft, build_model

    model = build_model("llama", seed=seed, num_hidden_layers=num_layers, **config)
    return apply_peft(model, "lora", r=r, alpha=alpha, dropout=dropout)


def make_data(n: int = 64, seq: int = SEQ, seed: int = 1) -> list[dict]:
    """``n`` rows of ``seq`` random token ids below 256, with a full attention mask and labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 256, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return rows


def global_batch(data: list[dict], step: int, world: int, micro: int = MICRO) -> list[dict]:
    """The rows of optimizer step ``step`` for ``world`` ranks of ``micro`` rows each (rank ``r`` takes
    rows ``r * micro`` to ``(r + 1) * micro``): a window sliding through ``data``."""
    start = (step * micro * world) % (len(data) - micro * world)
    return data[start:start + micro * world]
