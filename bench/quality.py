"""Quality at small scale: uniform LoRA vs RST vs IST on the commonsense tasks, 3 seeds each.

A small replica of the IST paper's main comparison (Yao et al., EMNLP 2024 Findings, Table 1:
LLaMA-7B + LoRA fine-tuned on commonsense_170k, accuracy on the commonsense test sets), scaled to
what one CPU core does in about 40 minutes:

* base model: the 8-layer byte-level Llama that bench/pretrain_base.py trains (``--base``);
* data: the LLM-Adapters commonsense tasks ARC-Easy, ARC-Challenge, BoolQ and OpenBookQA
  (github.com/AGI-Edgerunners/LLM-Adapters, Open Data Commons Attribution License; the underlying
  datasets under their own licenses). Training uses the four training splits mixed, as
  commonsense_170k mixes its tasks; only records whose prompt, answer and EOS fit in ``--cutoff``
  byte tokens are used (a truncated record loses its answer, and the model could not see it);
* fine-tuning: the project's own job path, ``ist_ds.jobs.runner.run`` with ``backend.name: single``
  (what ``python launch/train.py --config ... --set backend.name=single`` runs), LoRA r=16, alpha=32
  on q, k, v, up, down; the same steps, batch, learning rate and data order for every method of a
  seed. Methods: ``uniform`` (``ist.strategy: all``, every layer every step), ``rst`` (2 of 8 layers
  uniformly at random per step) and ``ist`` (2 of 8 by learned importance);
* evaluation, per task on a fixed subsample of its test split (``--test-per-task`` records drawn
  with seed 0 among those that fit ``--cutoff``): held-out token loss and multiple-choice accuracy
  with ``ist_ds.jobs.evaluation`` (every label of the task is put into the record's output text; the
  label whose output tokens get the highest log-likelihood is the prediction).

The per-run numbers go to ``bench/results/quality.json``; the summary tables (mean ± std over seeds
per task and overall) are printed last; ``docs/img/quality.png`` is drawn from this file and, when it
exists, ``bench/results/quality_minilm.json`` (bench/quality_minilm.py, the pretrained-encoder row).

    nice -n 10 .venv/bin/python bench/quality.py > bench/results/quality.txt 2>&1

This module also holds what both quality scripts share: the task list, mean ± std, the tables and
the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

TASKS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")
METHODS = ("uniform", "rst", "ist")
DATA = os.path.join(ROOT, "..", "shared", "data", "commonsense")
RESULTS = os.path.join(HERE, "results")
PLOT = os.path.join(ROOT, "docs", "img", "quality.png")


# ------------------------------------------------------------------ shared by both quality scripts
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the per-seed numbers."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def overall_accuracy(accuracy: dict[str, float]) -> float:
    """Mean of the per-task accuracies (every task has the same number of test records here)."""
    return statistics.fmean(accuracy[t] for t in TASKS)


def summary_tables(runs: list[dict], references: dict[str, dict] | None = None,
                   with_loss: bool = True) -> str:
    """Markdown tables of accuracy (and held-out loss) per method and task, mean ± std over seeds.

    ``references`` are single evaluations printed above the methods (the model before fine-tuning,
    the majority label), without a spread.
    """
    from common import table

    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    out = []
    metrics = [("accuracy", "multiple-choice accuracy (%)", 100.0, 1)]
    if with_loss:
        metrics.append(("loss", "held-out loss (nats per byte token)", 1.0, 3))
    for key, title, factor, digits in metrics:
        headers = ["method", "seeds", *TASKS, "overall"]
        rows = []
        for name, ref in (references or {}).items():
            if key in ref:
                vals = [ref[key][t] * factor for t in TASKS]
                rows.append([name, "-", *(f"{v:.{digits}f}" for v in vals), f"{statistics.fmean(vals):.{digits}f}"])
        for m in methods:
            mine = [r for r in runs if r["method"] == m]
            cells = []
            for t in TASKS:
                mu, sd = mean_std([r[key][t] * factor for r in mine])
                cells.append(f"{mu:.{digits}f} ± {sd:.{digits}f}")
            mu, sd = mean_std([statistics.fmean(r[key][t] for t in TASKS) * factor for r in mine])
            rows.append([m, str(len(mine)), *cells, f"{mu:.{digits}f} ± {sd:.{digits}f}"])
        out.append(f"{title}, mean ± std over seeds; overall = mean of the four tasks\n\n{table(headers, rows)}")
    return "\n\n".join(out)


def draw_plot(path: str = PLOT) -> None:
    """Accuracy per method and task, error bars = std over seeds; one panel per results file found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name in ("quality.json", "quality_minilm.json"):
        file = os.path.join(RESULTS, name)
        if os.path.isfile(file):
            with open(file) as f:
                panels.append(json.load(f))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.6 * len(panels)), squeeze=False)
    colours = {"uniform": "#4c72b0", "rst": "#dd8452", "ist": "#55a868"}
    labels = {"uniform": "uniform LoRA", "rst": "RST", "ist": "IST"}
    groups = [*TASKS, "overall"]
    for ax, panel in zip(axes[:, 0], panels):
        runs = panel["runs"]
        methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            mine = [r for r in runs if r["method"] == m]
            stats = [mean_std([100 * r["accuracy"][t] for r in mine]) for t in TASKS]
            stats.append(mean_std([100 * overall_accuracy(r["accuracy"]) for r in mine]))
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3,
                   color=colours[m], label=f"{labels[m]} ({len(mine)} seeds)")
        for name, ref in panel.get("references", {}).items():
            # The floor (always the most frequent label) and the model before fine-tuning.
            style = ("dotted", "black", "majority label") if name.startswith("majority") else \
                ("dashed", "grey", "not fine-tuned")
            vals = [100 * ref["accuracy"][t] for t in TASKS]
            vals.append(statistics.fmean(vals))
            for i, v in enumerate(vals):
                ax.hlines(v, i - 0.45, i + 0.45, colors=style[1], linestyles=style[0],
                          label=style[2] if i == 0 else None)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(panel["title"], fontsize=10)
        ax.legend(fontsize=8, ncol=3, loc="upper center")
        ax.set_ylim(0, 100)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fixed_sample(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` records drawn with a fixed seed (all of them when there are fewer), in file order."""
    if len(records) <= n:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def majority_accuracy(train: list[dict], test: list[dict]) -> float:
    """Accuracy of always answering the most frequent training label: the floor a model must beat."""
    counts: dict[str, int] = {}
    for r in train:
        counts[r["answer"]] = counts.get(r["answer"], 0) + 1
    top = max(counts, key=counts.get)
    return sum(r["answer"] == top for r in test) / len(test)


# ------------------------------------------------------------------------------------ this row
LORA = dict(method="lora", r=16, alpha=32, dropout=0.0)


def fits(record: dict, tokenizer, cutoff: int) -> bool:
    """Whether prompt + output + EOS fits in ``cutoff`` tokens, so the answer is never truncated."""
    from ist_ds.jobs.data import encode_with, generate_prompt

    text = generate_prompt(record["instruction"], record.get("input", ""), record["output"])
    return len(encode_with(tokenizer, text)) + 1 <= cutoff


def ist_block(method: str, seed: int, args) -> dict:
    """The recipe's ``ist`` block of one method; the counts are stated in the output."""
    if method == "uniform":
        return {"strategy": "all", "seed": seed}
    block = {"strategy": method, "train_layers": args.train_layers, "seed": seed, "optimizer_state": "keep"}
    if method == "ist":
        block.update(suppress_layers=args.suppress_layers, num_suppression_sets=args.suppression_sets,
                     update_interval=args.update_interval)
    return block


def recipe_dict(method: str, seed: int, train_file: str, out_dir: str, args) -> dict:
    """The job recipe (the YAML a user would write) of one fine-tune."""
    return {
        "model": {"path": args.base},
        "peft": dict(LORA),
        "data": {"train": train_file, "tokenizer": args.base, "cutoff_len": args.cutoff, "train_on_inputs": True},
        "training": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "global_batch_size": args.batch,
                     "lr": args.lr, "max_grad_norm": 1.0, "seed": seed, "log_every": 25, "progress": False,
                     "tensorboard": False},
        "backend": {"name": "single"},
        "ist": ist_block(method, seed, args),
        "output_dir": out_dir,
    }


def evaluate(model, tokenizer, tests: dict[str, list[dict]], cutoff: int) -> tuple[dict, dict]:
    """Held-out loss and multiple-choice accuracy per task, with ist_ds.jobs.evaluation."""
    from ist_ds.runtime.collectives import LocalCollectives
    from ist_ds.jobs.data import InstructionDataset, PadCollator
    from ist_ds.jobs.evaluation import choice_accuracy, evaluate_loss
    from ist_ds.runtime.scoring import default_forward

    comm, collate = LocalCollectives(), PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    loss, accuracy = {}, {}
    for task, records in tests.items():
        dataset = InstructionDataset(records, tokenizer, cutoff_len=cutoff, train_on_inputs=True)
        loss[task] = evaluate_loss(model, dataset, collate, 8, "cpu", comm, default_forward)
        accuracy[task] = choice_accuracy(model, records, tokenizer, "cpu", comm, default_forward, cutoff_len=cutoff)
    return loss, accuracy


def load_finetuned(base: str, adapter_dir: str | None):
    """The base model, with the adapter a job wrote (``<output_dir>/adapter``) when given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=os.path.join(RESULTS, "base_model"))
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "quality"), help="job outputs (git-ignored)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--train-layers", type=int, default=2, help="N_u (of 8 layers: the spec's 25%%)")
    parser.add_argument("--suppress-layers", type=int, default=4, help="N_s (of 8 layers: the spec's 50%%)")
    parser.add_argument("--suppression-sets", type=int, default=3, help="K")
    parser.add_argument("--update-interval", type=int, default=5,
                        help="T (the spec: 10; 5 here, for more updates in a short run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-json", default=os.path.join(RESULTS, "quality.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ist_ds.jobs.data import load_records, load_tokenizer
    from ist_ds.jobs.recipe import Recipe
    from ist_ds.jobs.runner import run

    started = time.perf_counter()
    tokenizer = load_tokenizer(args.base)
    os.makedirs(args.work, exist_ok=True)
    train, tests, references = [], {}, {"majority label": {"accuracy": {}}}
    for task in TASKS:
        task_train = [r for r in load_records(os.path.join(args.data, task, "train.json")) if fits(r, tokenizer, args.cutoff)]
        task_test = [r for r in load_records(os.path.join(args.data, task, "test.json")) if fits(r, tokenizer, args.cutoff)]
        tests[task] = fixed_sample(task_test, args.test_per_task)
        references["majority label"]["accuracy"][task] = majority_accuracy(task_train, tests[task])
        print(f"{task}: {len(task_train)} training records fit {args.cutoff} byte tokens; "
              f"{len(task_test)} test records do, {len(tests[task])} drawn (seed 0)", flush=True)
        train.extend(task_train)
    random.Random(0).shuffle(train)
    train_file = os.path.join(args.work, "commonsense_mix_train.json")  # no test.json beside it: no job eval
    with open(train_file, "w") as f:
        json.dump(train, f)
    with open(os.path.join(args.base, "pretrain_info.json")) as f:
        base_info = json.load(f)
    print(f"training mix: {len(train)} records; base model {args.base} "
          f"({base_info['model']['num_hidden_layers']} layers, {base_info['parameters'] / 1e6:.2f}M parameters)")
    print(f"every fine-tune: {args.steps} steps x batch {args.batch} ({args.steps * args.batch} examples, "
          f"{args.steps * args.batch / len(train):.2f} epochs), lr {args.lr} constant, LoRA r={LORA['r']} "
          f"alpha={LORA['alpha']} on q,k,v,up,down; RST/IST train N_u={args.train_layers} layers per step; "
          f"IST: N_s={args.suppress_layers}, K={args.suppression_sets}, T={args.update_interval}, eta=10, "
          f"lambda=0.25, B_imp=16", flush=True)

    t0 = time.perf_counter()
    base_loss, base_acc = evaluate(load_finetuned(args.base, None), tokenizer, tests, args.cutoff)
    references["base model, not fine-tuned"] = {"loss": base_loss, "accuracy": base_acc}
    print(f"base model before fine-tuning: accuracy {json.dumps({t: round(a, 3) for t, a in base_acc.items()})}, "
          f"loss {json.dumps({t: round(v, 3) for t, v in base_loss.items()})} ({time.perf_counter() - t0:.0f} s)",
          flush=True)

    runs = []
    for seed in args.seeds:
        for method in args.methods:
            out_dir = os.path.join(args.work, f"{method}_seed{seed}")
            print(f"\n=== {method}, seed {seed} ===", flush=True)
            t0 = time.perf_counter()
            summary = run(Recipe.from_dict(recipe_dict(method, seed, train_file, out_dir, args)))
            train_s = time.perf_counter() - t0
            model = load_finetuned(args.base, os.path.join(out_dir, "adapter"))
            loss, accuracy = evaluate(model, tokenizer, tests, args.cutoff)
            eval_s = time.perf_counter() - t0 - train_s
            record = {"method": method, "seed": seed, "loss": loss, "accuracy": accuracy,
                      "final_train_loss": summary["final_train_loss"], "train_seconds": train_s,
                      "eval_seconds": eval_s, "importance": summary.get("importance"),
                      "selection_counts": summary.get("selection_counts")}
            runs.append(record)
            print(f"{method} seed {seed}: train loss {summary['final_train_loss']:.4f}; accuracy "
                  f"{json.dumps({t: round(a, 3) for t, a in accuracy.items()})} overall "
                  f"{overall_accuracy(accuracy):.3f}; held-out loss "
                  f"{json.dumps({t: round(v, 4) for t, v in loss.items()})}; train {train_s:.0f} s, eval {eval_s:.0f} s",
                  flush=True)
            if record["importance"] is not None:
                print(f"  importance (-score) per layer {[round(v, 4) for v in record['importance']]}, "
                      f"steps trained {record['selection_counts']}", flush=True)
            result = {"title": f"Byte-level Llama, {base_info['model']['num_hidden_layers']} layers "
                               f"({base_info['parameters'] / 1e6:.1f}M, pretrained here), LoRA r={LORA['r']}: "
                               f"{args.steps} steps x {args.batch}, {args.test_per_task} test records per task",
                      "args": vars(args), "references": references, "runs": runs}
            with open(args.out_json, "w") as f:
                json.dump(result, f, indent=2)

    draw_plot()
    minutes = (time.perf_counter() - started) / 60
    print(f"\n## Byte-level Llama: uniform LoRA vs RST vs IST ({len(args.seeds)} seeds, {minutes:.1f} min in all)\n")
    print(summary_tables(runs, references))
    print("\nseconds per fine-tune (train + eval), mean over seeds: " + ", ".join(
        f"{m} {statistics.fmean(r['train_seconds'] for r in runs if r['method'] == m):.0f} + "
        f"{statistics.fmean(r['eval_seconds'] for r in runs if r['method'] == m):.0f}"
        for m in args.methods))


if __name__ == "__main__":
    main()
