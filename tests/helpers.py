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


def same_tensors(a, b) -> bool:
    """Two lists of tensors, equal to the bit."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def same_states(a, b) -> bool:
    """Two lists of optimizer-state dicts, equal to the bit (tensors) and by value (the rest)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if torch.is_tensor(x[k]) != torch.is_tensor(y[k]):
                return False
            if torch.is_tensor(x[k]) and not torch.equal(x[k], y[k]):
                return False
            if not torch.is_tensor(x[k]) and x[k] != y[k]:
                return False
    return True


def check_step(step: int, mode: str, num_layers: int, selected, now_selected, before_p: dict, after_p: dict,
               before_s: dict, after_s: dict, before_m: dict | None = None, after_m: dict | None = None) -> None:
    """The IST invariants of one optimizer step, per layer (dicts keyed by layer index: the layer's full
    parameters, its optimizer states and, on ZeRO, its fp32 masters):

    - a selected layer's parameters changed; an unselected one's are bit-identical, and so is its master;
    - ``keep``: an unselected layer's optimizer state is bit-identical;
    - ``offload``/``drop``: a layer not selected for the next step holds no state;
    - ``drop``: a layer whose state was dropped restarts its optimizer at step 1.
    """
    for layer in range(num_layers):
        if layer in selected:
            assert not same_tensors(before_p[layer], after_p[layer]), f"step {step}: selected layer {layer} did not change"
            continue
        assert same_tensors(before_p[layer], after_p[layer]), f"step {step}: unselected layer {layer} changed"
        if before_m and after_m and before_m.get(layer) and after_m.get(layer):
            assert same_tensors(before_m[layer], after_m[layer]), f"step {step}: master of layer {layer} changed"
        if mode == "keep":
            assert same_states(before_s[layer], after_s[layer]), \
                f"step {step}: state of layer {layer} changed: {before_s[layer]} -> {after_s[layer]}; selected {selected}"
    if mode in ("offload", "drop"):
        for layer in range(num_layers):
            if layer not in now_selected:
                assert after_s[layer] == [], f"step {step}: unselected layer {layer} still holds state"
    if mode == "drop":
        for layer in selected:
            if before_s[layer] == [] and after_s[layer]:
                assert all(float(s["step"]) == 1 for s in after_s[layer] if "step" in s), \
                    f"step {step}: dropped layer {layer} did not restart at step 1"
