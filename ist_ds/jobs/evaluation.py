"""Held-out evaluation: token loss and multiple-choice accuracy by log-likelihood, over ranks.

Multiple-choice accuracy follows the usual log-likelihood protocol: for every test record, each
candidate label of the task (``answer1``..``answer5``, ``true``/``false``) is put into the record's
output text in place of the gold label, and the candidate whose output tokens get the highest total
log-probability is the prediction; records of a mix of tasks (a ``task`` field, see
:func:`ist_ds.jobs.data.load_task`) are scored against their own task's labels only. Every rank scores the same number of records (shards padded with
weight-zero repeats), because ZeRO-3 and FSDP need every rank in every forward.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ist_ds.jobs.data import InstructionDataset, PadCollator
from ist_ds.runtime.collectives import Collectives
from ist_ds.runtime.scoring import eval_mode, token_loss_sum


def _even_shard(n: int, rank: int, world: int) -> tuple[list[int], list[float]]:
    per = math.ceil(n / world) if n else 0
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    weights = [1.0] * len(idx)
    while len(idx) < per:  # pad with a repeat that counts for nothing
        idx.append(idx[-1] if idx else 0)
        weights.append(0.0)
    return idx, weights


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataset, collate: Callable, batch_size: int, device,
                  collectives: Collectives, forward: Callable) -> float:
    """Token-mean loss of ``dataset`` over all ranks."""
    idx, weights = _even_shard(len(dataset), collectives.rank, collectives.world_size)
    sums = torch.zeros(2, dtype=torch.float64)
    with eval_mode(model):
        for start in range(0, len(idx), batch_size):
            chunk, w = idx[start:start + batch_size], weights[start:start + batch_size]
            items = [dataset[i] for i in chunk]
            batch = {k: v.to(device) for k, v in collate(items).items()}
            logits = forward(model, batch)
            for row in range(len(chunk)):
                total, count = token_loss_sum(logits[row:row + 1], batch["labels"][row:row + 1])
                sums[0] += w[row] * total.cpu()
                sums[1] += w[row] * count.cpu()
    sums = collectives.all_reduce_sum(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


def label_set(records: Sequence[dict]) -> list[str]:
    return sorted({r["answer"] for r in records if r.get("answer")})


def labels_by_task(records: Sequence[dict]) -> dict:
    """The candidate labels of each task (key: the record's ``task`` field, None without one)."""
    groups: dict = {}
    for r in records:
        groups.setdefault(r.get("task"), []).append(r)
    return {task: label_set(group) for task, group in groups.items()}


@torch.no_grad()
def choice_accuracy(model: torch.nn.Module, records: Sequence[dict], tokenizer, device, collectives: Collectives,
                    forward: Callable, batch_size: int = 8, cutoff_len: int = 256) -> float:
    """Fraction of records whose gold label gets the highest output log-likelihood among the labels."""
    candidates = labels_by_task(records)
    usable = [r for r in records if r.get("answer") and r["answer"] in r["output"]
              and len(candidates[r.get("task")]) >= 2]
    if not usable:
        return float("nan")
    idx, weights = _even_shard(len(usable), collectives.rank, collectives.world_size)
    collate = PadCollator(tokenizer.pad_token_id)
    correct = torch.zeros(2, dtype=torch.float64)
    with eval_mode(model):
        for i, w in zip(idx, weights):
            rec = usable[i]
            labels = candidates[rec.get("task")]
            variants = [dict(rec, output=rec["output"].replace(rec["answer"], cand)) for cand in labels]
            ds = InstructionDataset(variants, tokenizer, cutoff_len=cutoff_len, train_on_inputs=False)
            batch = {k: v.to(device) for k, v in collate([ds[j] for j in range(len(ds))]).items()}
            logits = forward(model, batch).float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = batch["labels"][:, 1:]
            mask = tgt != -100
            ll = (logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
            pred = labels[int(ll.argmax())]
            correct[0] += w * float(pred == rec["answer"])
            correct[1] += w
    correct = collectives.all_reduce_sum(correct)
    return float(correct[0] / correct[1])


@torch.no_grad()
def greedy_answer(model: torch.nn.Module, record: dict, tokenizer, device, forward: Callable,
                  max_new_tokens: int = 32) -> str:
    """The model's greedy continuation of a record's prompt (the template without the output).

    Exactly ``max_new_tokens`` forwards, without a KV cache, on every rank that calls it: sharded
    models (ZeRO-3, FSDP2) need every rank in every forward, so no rank may stop early; the text is
    cut at the first end-of-sequence token afterwards.
    """
    from ist_ds.jobs.data import encode_with, generate_prompt

    prompt = generate_prompt(record["instruction"], record.get("input", ""), "")
    ids = torch.tensor([encode_with(tokenizer, prompt)], device=device)
    start = ids.shape[1]
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    new = ids[0, start:].tolist()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos in new:
        new = new[:new.index(eos)]
    from ist_ds.jobs.data import ByteTokenizer

    text = tokenizer.decode(new) if isinstance(tokenizer, ByteTokenizer) else tokenizer.decode(new, skip_special_tokens=True)
    return text.strip()
