"""Step time of IST vs uniform LoRA, the importance update's share, and scoring time at 1 vs 2 ranks.

Run from the repository root (about 6 minutes on 2 cores):

    .venv/bin/python bench/speed.py                 # 30 steps per engine, profile, scoring 1 vs 2 ranks
    .venv/bin/python bench/speed.py --steps 10 --no-profile   # a quick look

The script forks its own ranks (gloo, loopback, one thread per rank; see bench/common.py).

1. Step time, 2 ranks, DeepSpeed ZeRO-2, fp32, AdamW (torch): every rank builds the engines to compare
   in one process (uniform LoRA with ``ist.enabled: false``, the same with one param group per layer
   (``strategy: all``), and IST at the reference defaults: N_u = 2 of 8, T = 10, K = 3, scoring batch
   16, optimizer state kept) and alternates them step by step (ABCCBA order). Global training batch
   16 = 8 per rank x 256 tokens. A step is forward + backward + ``engine.step()``, which for IST
   includes the importance update every T-th step. Reported: the median step; IST's median without
   the update; the mean update time; IST's amortised step ``median_without_update + update / T``;
   and the plain mean over whole T-step cycles. The target is judged on the last (wall time over
   whole cycles, each holding one update): an IST step's backward stops at its lowest selected
   layer, so IST's step time varies with the selection, and the median of its plain steps is not
   their mean. The median-based estimate is printed beside it.
2. Where IST's time goes besides the model: IST's own bookkeeping per step (selection, requires_grad,
   state moves, agreement check) and the optimizer gate, timed by wrapping them; then a cProfile of
   rank 0 over IST steps, listing the ist_ds functions.
3. Scoring (the K suppressed forwards on the global scoring batch of 16, plus the all-reduce) per
   rank at 1 rank and at 2 ranks, median of several calls of ``controller.update_importance()``.

Ratios and PASS/FAIL against the targets are printed last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

GLOBAL_BATCH = 16
TARGET_STEP = 0.95
TARGET_SCORING = 0.55

ENGINES = {
    "uniform": {"enabled": False},
    "all": {"strategy": "all"},
    "ist": {},  # reference defaults
}


def _timed(obj, name, sink):
    """Replace ``obj.name`` by a wrapper that appends its wall time to ``sink``."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def _build(kind, stage, micro, data):
    import ist_ds

    model = common.make_model()
    cfg = common.ds_config(stage, micro, ENGINES[kind])
    engine, *_ = ist_ds.initialize(model=model, model_parameters=common.trainable(model), config=cfg,
                                   scoring_data=data, scoring_collate_fn=common.collate)
    return engine


def _one_step(engine, batch):
    forward, backward, step = common.step_phases(engine, batch)
    return forward + backward + step, forward, backward, step


def _speed_rank(rank, world, steps, warmup, kinds, profile_steps, scoring_reps):
    data = common.make_data(128)
    micro = GLOBAL_BATCH // world
    engines = {k: _build(k, 2, micro, data) for k in kinds}
    ist = engines["ist"].ist
    ctrl = ist.controller

    # IST's own per-step bookkeeping and the optimizer gate, timed from outside
    costs = {"select": [], "check": [], "gate_total": [], "gate_inner": []}
    _timed(ctrl, "_select", costs["select"])
    _timed(ctrl, "_check", costs["check"])
    _timed(ctrl.gate, "_inner_step", costs["gate_inner"])
    _timed(ctrl.gate.optimizer, "step", costs["gate_total"])

    times = {k: [] for k in kinds}
    updates = []  # (position in IST's list, update seconds)
    for step in range(warmup + steps):
        if step == warmup:
            for sink in costs.values():
                sink.clear()
        for kind in (kinds if step % 2 == 0 else list(reversed(kinds))):  # ABC CBA ...
            engine = engines[kind]
            batch = common.rank_batch(data, engine.global_steps, rank, world, micro)
            before = ctrl.importance.num_updates
            t = _one_step(engine, batch)
            if step < warmup:
                continue
            times[kind].append(t)
            if kind == "ist" and ctrl.importance.num_updates != before:
                updates.append((len(times["ist"]) - 1, ctrl.last_update_seconds))
    n_ist_steps = engines["ist"].global_steps
    costs = {k: list(v) for k, v in costs.items()}

    prof_text = None
    if profile_steps:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(profile_steps):
            engine = engines["ist"]
            _one_step(engine, common.rank_batch(data, engine.global_steps, rank, world, micro))
        prof.disable()
        if rank == 0:
            s = io.StringIO()
            stats = pstats.Stats(prof, stream=s)
            stats.sort_stats("cumulative").print_stats(r"ist_ds", 25)
            total = sum(v[3] for k, v in stats.stats.items() if k[2] == "_one_step")
            prof_text = (total, s.getvalue())

    # scoring time per rank at 2 ranks vs 1 rank, side by side: the IST engine's own scorer (each rank
    # scores its half of the global batch of 16, losses all-reduced) alternated with the same scorer
    # over single-process collectives run by rank 0 alone (the whole batch of 16, what a 1-rank job
    # does) while rank 1 waits at a barrier
    import torch.distributed as dist

    from ist_ds.runtime.collectives import LocalCollectives
    from ist_ds.runtime.scoring import ImportanceScorer, ScoringStream

    cfg = ctrl.config
    solo = ImportanceScorer(engines["ist"].module, ctrl.layer_map, data, common.collate,
                            ScoringStream(len(data), cfg.scoring_batch_size, seed=cfg.seed),
                            cfg.suppression_scale, LocalCollectives(), engines["ist"].device,
                            cfg.scoring_micro_batch_size)
    gen = torch.Generator().manual_seed(99)
    scoring = {"2 ranks": [], "1 rank": []}
    for rep in range(scoring_reps + 1):
        sets = ctrl.importance.sample_suppression_sets(gen)
        ctrl.scorer.losses(sets)
        if rep:
            scoring["2 ranks"].append(ctrl.scorer.last_seconds)
        dist.barrier()
        if rank == 0:
            solo.losses(sets)
            if rep:
                scoring["1 rank"].append(solo.last_seconds)
        dist.barrier()
    for e in engines.values():
        e.destroy()
    return {"times": times, "updates": updates, "costs": costs, "prof": prof_text,
            "scoring": scoring, "n_ist_steps": n_ist_steps, "T": ctrl.config.update_interval}


def _summary(res):
    T = res["T"]
    upd_pos = {p for p, _ in res["updates"]}
    total = {k: [t[0] for t in v] for k, v in res["times"].items()}
    ist_plain = [t for i, t in enumerate(total["ist"]) if i not in upd_pos]
    upd = [s for _, s in res["updates"]]
    upd_mean = sum(upd) / len(upd) if upd else float("nan")
    amort = common.median(ist_plain) + upd_mean / T
    # plain means over whole cycles of T IST steps
    n = (len(total["ist"]) // T) * T
    mean_ist = sum(total["ist"][:n]) / n if n else float("nan")
    mean_uni = sum(total["uniform"][:n]) / n if n else float("nan")
    return {"total": total, "ist_plain": ist_plain, "upd_mean": upd_mean, "amort": amort,
            "mean_ist": mean_ist, "mean_uni": mean_uni, "n_cycle": n, "n_upd": len(upd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="measured steps per engine (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scoring-reps", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-all", action="store_true", help="skip the strategy=all engine")
    args = ap.parse_args(argv)
    kinds = ["uniform", "ist"] if args.no_all else ["uniform", "all", "ist"]

    load_before = os.getloadavg()
    start = time.perf_counter()
    two = common.run_ranks(_speed_rank, 2, args.steps, args.warmup, kinds,
                           0 if args.no_profile else args.profile_steps, args.scoring_reps)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()

    print(f"# bench/speed.py: 2 ranks (forked, gloo, CPU, 1 thread each), ZeRO-2 fp32, global batch "
          f"{GLOBAL_BATCH} x {common.SEQ} tokens, {args.steps} measured steps per engine, wall {wall:.0f} s")
    print(f"# load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} cores\n")
    sums = [_summary(r) for r in two]

    print("## Step time per rank (s): forward + backward + engine.step()\n")
    headers = ["engine", "rank", "median step", "median fwd", "median bwd", "median step()", "mean over cycles"]
    body = []
    for rk, (res, s) in enumerate(zip(two, sums)):
        for kind in kinds:
            t = res["times"][kind]
            mean = sum(x[0] for x in t[:s["n_cycle"]]) / s["n_cycle"] if s["n_cycle"] else float("nan")
            body.append([kind, rk, f"{common.median([x[0] for x in t]):.3f}",
                         f"{common.median([x[1] for x in t]):.3f}", f"{common.median([x[2] for x in t]):.3f}",
                         f"{common.median([x[3] for x in t]):.3f}", f"{mean:.3f}"])
        body.append(["ist, steps without update", rk, f"{common.median(s['ist_plain']):.3f}", "", "", "", ""])
    print(common.table(headers, body))
    print()

    print("Per-rank forward/backward splits are not comparable across ranks: ZeRO-2 reduces gradients "
          "inside backward, so a rank waits there for the slower one; the whole step is.\n")
    print("## IST bookkeeping per step, rank 0 (median, ms)\n")
    c = two[0]["costs"]
    gate_over = [a - b for a, b in zip(c["gate_total"], c["gate_inner"])]
    print(common.table(["what", "median ms", "calls"], [
        ["controller._select (draw, requires_grad, optimizer-state moves)", f"{1e3 * common.median(c['select']):.3f}", len(c["select"])],
        ["controller._check (fingerprint + all-reduce)", f"{1e3 * common.median(c['check']):.3f}", len(c["check"])],
        ["optimizer gate around the inner step (per call)", f"{1e3 * common.median(gate_over):.3f}", len(gate_over)],
    ]))
    print()
    if two[0]["prof"]:
        total, text = two[0]["prof"]
        print(f"## cProfile of rank 0 over {args.profile_steps} IST steps ({total:.2f} s under the profiler), "
              "ist_ds functions by cumulative time\n")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        start_i = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
        print("```\n" + "\n".join(lines[start_i:]) + "\n```\n")

    one = two[0]["scoring"]["1 rank"]
    sc1, sc2 = common.median(one), max(common.median(r["scoring"]["2 ranks"]) for r in two)
    print("## Scoring (one importance update: K=3 suppressed forwards of the global batch of 16), s per rank\n")
    print(common.table(["ranks", "median s (worst rank)", "samples (alternated)"], [
        ["1", f"{sc1:.3f}", ", ".join(f"{x:.2f}" for x in one)],
        ["2", f"{sc2:.3f}", " | ".join(", ".join(f"{x:.2f}" for x in r["scoring"]["2 ranks"]) for r in two)],
    ]))
    print()

    print("## Ratios and targets (same run)\n")
    verdicts = []
    for rk, s in enumerate(sums):
        uni = common.median(s["total"]["uniform"])
        frac = (s["upd_mean"] / two[rk]["T"]) / s["amort"]
        print(f"rank {rk}: IST median step without update / uniform = {common.median(s['ist_plain']) / uni:.3f}")
        if "all" in s["total"]:
            print(f"rank {rk}: strategy=all (per-layer groups) / uniform = {common.median(s['total']['all']) / uni:.3f}")
        print(f"rank {rk}: importance update {s['upd_mean']:.3f} s every {two[rk]['T']} steps "
              f"({s['n_upd']} measured) = {100 * frac:.1f}% of IST's amortised step time")
        if s["n_cycle"]:
            print(f"rank {rk}: mean over {s['n_cycle']} steps (whole cycles), IST / uniform = "
                  f"{s['mean_ist'] / s['mean_uni']:.3f}")
        if "all" in s["total"]:
            all_ = common.median(s["total"]["all"])
            print(f"rank {rk}: decomposition: per-layer param groups (all / uniform) {all_ / uni:.3f} x sparse "
                  f"backward (IST without update / all) {common.median(s['ist_plain']) / all_:.3f} + importance "
                  f"update (update / T / uniform) {s['upd_mean'] / two[rk]['T'] / uni:.3f}")
        # The verdict uses wall time over whole cycles of T steps (every cycle holds one update): an IST
        # step's backward stops at its lowest selected layer, so its step time varies with the
        # selection, not only with noise, and the median of the plain steps is not their mean.
        plain_mean = sum(s["ist_plain"]) / len(s["ist_plain"])
        print(f"rank {rk}: IST steps without update: median {common.median(s['ist_plain']):.3f} s, mean "
              f"{plain_mean:.3f} s; median-based estimate (median + update / T) / uniform median = "
              f"{s['amort'] / uni:.3f}")
        ratio = s["mean_ist"] / s["mean_uni"]
        verdicts.append((f"rank {rk}: IST step time incl. importance update / uniform LoRA = {ratio:.3f} "
                         f"(wall time over {s['n_cycle']} steps, {s['n_upd']} updates) <= {TARGET_STEP}",
                         ratio <= TARGET_STEP))
    ratio = sc2 / sc1
    verdicts.append((f"scoring time per rank, 2 ranks / 1 rank = {sc2:.3f} / {sc1:.3f} = {ratio:.3f} "
                     f"<= {TARGET_SCORING}", ratio <= TARGET_SCORING))
    return common.print_verdicts(verdicts)


if __name__ == "__main__":
    sys.exit(main())
