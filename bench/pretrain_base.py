"""Pretrain the small Llama base model that bench/quality.py fine-tunes with LoRA, RST and IST.

Why pretrain at all: IST decides which layers to train from how much damping each layer's adapters
changes the loss. On a model initialised at random every layer is equally meaningless, so a
comparison of layer-selection strategies needs a base model whose layers already do something.
No pretrained causal LM can be downloaded here, so this script trains one that fits one CPU core.

What it learns from: the ``instruction`` text (question and answer options) of the *training* splits
of the commonsense tasks in the LLM-Adapters format (ARC-Easy, ARC-Challenge, BoolQ, OpenBookQA;
data from github.com/AGI-Edgerunners/LLM-Adapters, Open Data Commons Attribution License, the
underlying datasets under their own licenses). Neither the prompt template nor the answers
("the correct answer is answer2") are shown, and no test record is read: the base model knows the
language of the questions, and the fine-tune has to teach it the task format and the answers,
which is the situation of the IST paper (a pretrained LM fine-tuned on commonsense_170k).

Texts are byte-tokenised (ist_ds.jobs.data.ByteTokenizer: BOS text EOS), concatenated in a seeded
random order and cut into windows of ``--seq`` tokens. The model is the project's from-scratch
Llama (ist_ds.jobs.models.build_model) with 512 positions, so it can later read whole prompts of up to
512 bytes. AdamW with linear warm-up and cosine decay, one thread.

Output (``save_pretrained``): the Llama weights and config, the byte tokenizer file, and
``pretrain_info.json`` (sizes, steps, losses, time), in ``--out`` (default bench/results/base_model/,
git-ignored).

    nice -n 10 .venv/bin/python bench/pretrain_base.py            # about 12 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ist_ds.jobs.data import ByteTokenizer, load_records  # noqa: E402
from ist_ds.jobs.models import build_model  # noqa: E402

TASKS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")
#: The base architecture: 8 blocks so that IST's default fractions give whole layer counts
#: (train 25% = 2 layers, suppress 50% = 4), hidden 128 with the Llama-7B MLP ratio.
MODEL = dict(num_hidden_layers=8, hidden_size=128, intermediate_size=344, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512)


def pretraining_texts(data_dir: str) -> list[str]:
    """The instruction text of every training record of the four tasks (no template, no answer)."""
    texts = []
    for task in TASKS:
        for record in load_records(os.path.join(data_dir, task, "train.json")):
            texts.append(record["instruction"])
    return texts


def token_windows(texts: list[str], seq: int, seed: int) -> torch.Tensor:
    """Byte-tokenise ``texts`` (BOS text EOS), shuffle them with ``seed``, concatenate, cut into
    windows of ``seq`` tokens (the ragged tail is dropped). Packing wastes no compute on padding."""
    tokenizer = ByteTokenizer()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer.encode(texts[i], add_bos=True))
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq
    return torch.tensor(stream[:n * seq], dtype=torch.long).view(n, seq)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 10% of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [float(model(input_ids=windows[i:i + batch], labels=windows[i:i + batch]).loss)
              for i in range(0, len(windows), batch)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "commonsense"),
                        help="directory with <task>/train.json in the LLM-Adapters format")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "base_model"))
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--val-windows", type=int, default=32, help="windows held out to report a validation loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    windows = token_windows(pretraining_texts(args.data), args.seq, args.seed)
    val, train = windows[:args.val_windows], windows[args.val_windows:]
    model = build_model("llama", seed=args.seed, **MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining a {MODEL['num_hidden_layers']}-layer Llama (hidden {MODEL['hidden_size']}, "
          f"{n_params / 1e6:.2f}M parameters) on {len(train)} windows of {args.seq} byte tokens "
          f"({len(train) * args.seq / 1e6:.1f}M tokens); {args.steps} steps of {args.batch} windows "
          f"= {args.steps * args.batch / len(train):.2f} epochs", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    initial_val = mean_loss(model, val, args.batch)
    model.train()
    start, position, recent = time.perf_counter(), 0, []
    bar = tqdm(range(args.steps), desc="pretrain", unit="step", dynamic_ncols=True, mininterval=5)
    for step in bar:
        if position + args.batch > len(order):  # next epoch, new order
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + step))
            position = 0
        batch = train[order[position:position + args.batch]]
        position += args.batch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [float(loss.detach())])[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    bar.close()
    minutes = (time.perf_counter() - start) / 60
    final_val = mean_loss(model, val, args.batch)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    ByteTokenizer().save_pretrained(args.out)
    info = {"model": MODEL, "parameters": n_params, "steps": args.steps, "batch": args.batch, "seq": args.seq,
            "lr": args.lr, "warmup": args.warmup, "seed": args.seed, "train_windows": len(train),
            "initial_val_loss": initial_val, "final_val_loss": final_val,
            "final_train_loss": sum(recent) / len(recent), "minutes": minutes, "threads": args.threads}
    with open(os.path.join(args.out, "pretrain_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"validation loss {initial_val:.3f} -> {final_val:.3f} nats/byte "
          f"(train {info['final_train_loss']:.3f}) after {minutes:.1f} min; saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
