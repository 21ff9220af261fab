"""Memory of IST vs uniform LoRA under DeepSpeed ZeRO-2 and ZeRO-3, 2 CPU ranks.

Run from the repository root (about 5 minutes on 2 cores):

    .venv/bin/python bench/memory.py            # ZeRO-2 and ZeRO-3, 10 steps per row
    .venv/bin/python bench/memory.py --stages 2 --steps 4   # a quick look

The script forks its own 2 ranks (gloo, loopback; see bench/common.py), so no launcher is needed.
Model: Llama, 8 blocks, hidden 256, LoRA r=32 on q,k,v,up,down; micro-batch 4 x 256 tokens per rank;
AdamW (torch), lr 2e-4, fp32; IST defaults (N_u = 2 of 8, T = 10, K = 3, scoring batch 16).

Per rank and per row it measures:

- optimizer-state bytes by location: ``live`` (held by the optimizer, i.e. on the accelerator on a
  GPU machine; here CPU), sampled right after every inner optimizer step so that ``drop`` shows the
  state it re-creates for the selected layers; ``host`` (offloaded by IST). IST rows read
  ``engine.ist.memory_report()``; every row also reads the optimizer's own ``state`` directly;
- trainable-gradient bytes: the gradients autograd produces for the trainable parameters in one step
  (``memory_report()['trainable_param_bytes']``, full size before ZeRO's reduce-scatter), and the
  gradient partitions ZeRO holds after ``backward`` on this rank (ZeRO-2 ``averaged_gradients``;
  ZeRO-3 its flat gradient buffer plus the zero tensors it creates for frozen parameters);
- bytes autograd saves for backward during one forward (``torch.autograd.graph.saved_tensors_hooks``:
  unique storages packed, split into activations and parameter storages);
- drift: the largest absolute change, across a step, of a PEFT parameter of a layer that was not
  trained in that step (must be 0).

A LISA-style row (ZeRO-2 only) switches 2 random layers per step by toggling ``requires_grad`` on a
plain DeepSpeed engine, as LISA does, to show what IST's optimizer gate prevents. Ratios against
uniform LoRA and PASS/FAIL per target are printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

MICRO = 4
TARGET_STATE = 0.27
TARGET_SAVED = 0.72

ROWS = [
    ("uniform LoRA (ist.enabled=false)", {"enabled": False}),
    ("uniform LoRA (strategy=all)", {"strategy": "all"}),
    ("IST keep", {"optimizer_state": "keep"}),
    ("IST offload (host)", {"optimizer_state": "offload"}),
    ("IST drop", {"optimizer_state": "drop"}),
    ("RST keep", {"strategy": "rst"}),
    ("RST drop", {"strategy": "rst", "optimizer_state": "drop"}),
]
LISA = "LISA-style (requires_grad only)"


# ---------------------------------------------------------------------- measurements inside a rank
class SavedTensors:
    """Unique storages autograd packs for backward while the context is active."""

    def __init__(self, params) -> None:
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params if p.numel()}
        self.act: dict[int, int] = {}
        self.par: dict[int, int] = {}

    def _pack(self, t):
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        if n:
            is_param = (isinstance(t, torch.nn.Parameter) or hasattr(t, "ds_id") or ptr in self.param_ptrs
                        or isinstance(getattr(t, "_base", None), torch.nn.Parameter))
            (self.par if is_param else self.act)[ptr] = n
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def activation_bytes(self) -> int:
        return sum(self.act.values())

    @property
    def param_bytes(self) -> int:
        return sum(self.par.values())


def zero_grad_bytes(engine, stage: int) -> int:
    """Bytes of the gradient partitions ZeRO holds on this rank after backward (before step)."""
    opt = engine.optimizer
    tensors = []
    for grads in getattr(opt, "averaged_gradients", {}).values():
        if grads is not None:
            tensors.extend(grads)
    if stage == 3 and getattr(opt, "grad_partitions_flat_buffer", None) is not None:
        tensors.append(opt.grad_partitions_flat_buffer)
    tensors.extend(p.grad for p in engine.module.parameters() if p.grad is not None)
    return common.storage_bytes(tensors)


def lora_snapshot(layer_map, stage: int) -> list[list[torch.Tensor]]:
    import deepspeed

    params = [[p for _, p in layer.params] for layer in layer_map.layers]
    flat = [p for ps in params for p in ps]
    if stage == 3:
        with deepspeed.zero.GatheredParameters(flat):
            return [[p.detach().clone() for p in ps] for ps in params]
    return [[p.detach().clone() for p in ps] for ps in params]


def drift(before, after, trained: list[int]) -> float:
    out = 0.0
    for i, (b, a) in enumerate(zip(before, after)):
        if i not in trained:
            out = max(out, max(float((x - y).abs().max()) for x, y in zip(b, a)))
    return out


def _run(rank, world, stage, name, ist, steps, data, measure_saved):
    import deepspeed

    import ist_ds
    from ist_ds.layers import discover_layers, set_trainable
    from ist_ds.optimizer_state import live_state_bytes

    model = common.make_model()
    layer_map = discover_layers(model)  # before anything freezes parameters
    lisa = ist == LISA
    cfg = common.ds_config(stage, MICRO, None if lisa else ist)
    t0 = time.perf_counter()
    if lisa:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=common.trainable(model), config=cfg)
    else:
        engine, *_ = ist_ds.initialize(model=model, model_parameters=common.trainable(model), config=cfg,
                                       scoring_data=data, scoring_collate_fn=common.collate)
    init_s = time.perf_counter() - t0
    ist_hook = getattr(engine, "ist", None)
    inner = engine.basic_optimizer
    generator = torch.Generator().manual_seed(1234)

    # the live optimizer state right after each inner step (drop re-creates the selected layers' state there)
    peak = {"live": 0}
    inner_step = inner.step

    def measured_step(*args, **kwargs):
        out = inner_step(*args, **kwargs)
        peak["live"] = max(peak["live"], sum(live_state_bytes(inner.state).values()))
        return out

    inner.step = measured_step

    saved_act, saved_par, grad_zero, max_drift, step_s = [], [], [], 0.0, []
    for step in range(steps):
        if lisa:
            chosen = sorted(torch.randperm(layer_map.num_layers, generator=generator)[:2].tolist())
            set_trainable(layer_map, chosen)
        trained = ist_hook.selected_layers if ist_hook is not None else \
            (chosen if lisa else list(range(layer_map.num_layers)))
        before = lora_snapshot(layer_map, stage)
        batch = common.rank_batch(data, step, rank, world, MICRO)
        t0 = time.perf_counter()
        if measure_saved:
            with SavedTensors(list(engine.module.parameters())) as saved:
                loss = engine(**batch).loss
            saved_act.append(saved.activation_bytes)
            saved_par.append(saved.param_bytes)
        else:
            loss = engine(**batch).loss
        engine.backward(loss)
        grad_zero.append(zero_grad_bytes(engine, stage))
        engine.step()
        step_s.append(time.perf_counter() - t0)
        after = lora_snapshot(layer_map, stage)
        max_drift = max(max_drift, drift(before, after, trained))

    end_live = live_state_bytes(inner.state)
    report = ist_hook.memory_report() if ist_hook is not None else None
    if report is not None:
        trainable_bytes = report["trainable_param_bytes"]
    else:
        trainable_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                              for p in engine.module.parameters() if p.requires_grad)
    out = {
        "name": name, "stage": stage, "init_s": init_s, "step_s": common.median(step_s),
        "peak_live": peak["live"], "end_live": sum(end_live.values()),
        "offloaded_host": (report or {}).get("optimizer_state_bytes", {}).get("offloaded_host", 0),
        "offloaded_disk": (report or {}).get("optimizer_state_bytes", {}).get("offloaded_disk", 0),
        "report": report,
        "layers_with_state": sum(1 for t in inner.state if inner.state[t]),
        "trainable_grad_bytes": trainable_bytes,
        "zero_grad_bytes": max(grad_zero),
        "saved_act": saved_act, "saved_par": saved_par,
        "drift": max_drift, "loss": float(loss),
    }
    engine.destroy()
    return out


def _rank_main(rank, world, stages, rows, steps):
    data = common.make_data(64)
    results = []
    for stage in stages:
        for name, ist in rows:
            if ist == LISA and stage != 2:
                continue
            results.append(_run(rank, world, stage, name, ist, steps, data, measure_saved=ist != LISA))
    return results


# ---------------------------------------------------------------------- report
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    rows = ROWS + [(LISA, LISA)]
    start = time.perf_counter()
    results = common.run_ranks(_rank_main, 2, args.stages, rows, args.steps)
    wall = time.perf_counter() - start
    print(f"# bench/memory.py: 2 ranks (forked, gloo, CPU), {args.steps} steps per row, "
          f"micro-batch {MICRO} x {common.SEQ} tokens per rank, wall {wall:.0f} s\n")

    verdicts = []
    for stage in args.stages:
        per_rank = [[r for r in res if r["stage"] == stage] for res in results]
        base = {rk: next(r for r in per_rank[rk] if r["name"] == ROWS[0][0]) for rk in range(2)}
        headers = ["row", "rank", "optim live MiB (peak)", "optim live MiB (end)", "offloaded host MiB",
                   "tensors w/ state", "trainable grad MiB", "ZeRO grad partitions MiB",
                   "saved act MiB (mean)", "saved param MiB", "frozen drift", "step s"]
        body = []
        for rk in range(2):
            for r in per_rank[rk]:
                act = sum(r["saved_act"]) / len(r["saved_act"]) if r["saved_act"] else float("nan")
                par = sum(r["saved_par"]) / len(r["saved_par"]) if r["saved_par"] else float("nan")
                body.append([r["name"], rk, common.mib(r["peak_live"]), common.mib(r["end_live"]),
                             common.mib(r["offloaded_host"]), r["layers_with_state"],
                             common.mib(r["trainable_grad_bytes"]), common.mib(r["zero_grad_bytes"]),
                             common.mib(act), common.mib(par), f"{r['drift']:.3g}", f"{r['step_s']:.2f}"])
        print(f"## ZeRO-{stage}: bytes per rank\n")
        print(common.table(headers, body))
        print()

        # ratios vs uniform LoRA, per rank
        headers = ["row", "rank", "optim live (peak) / uniform", "optim live + host / uniform",
                   "trainable grad / uniform", "ZeRO grad partitions / uniform", "saved act / uniform"]
        body = []
        for rk in range(2):
            b = base[rk]
            b_act = sum(b["saved_act"]) / len(b["saved_act"])
            for r in per_rank[rk]:
                act = sum(r["saved_act"]) / len(r["saved_act"]) if r["saved_act"] else float("nan")
                body.append([r["name"], rk, f"{r['peak_live'] / b['peak_live']:.3f}",
                             f"{(r['peak_live'] + r['offloaded_host']) / b['peak_live']:.3f}",
                             f"{r['trainable_grad_bytes'] / b['trainable_grad_bytes']:.3f}",
                             f"{r['zero_grad_bytes'] / b['zero_grad_bytes']:.3f}",
                             f"{act / b_act:.3f}"])
                if rk == 0 or True:
                    if r["name"] in ("IST drop", "IST offload (host)"):
                        ratio = r["peak_live"] / b["peak_live"]
                        verdicts.append((f"ZeRO-{stage} rank {rk} {r['name']}: live optimizer state / uniform "
                                         f"= {ratio:.3f} <= {TARGET_STATE}", ratio <= TARGET_STATE))
                    if r["name"] == "IST drop":
                        ratio = act / b_act
                        verdicts.append((f"ZeRO-{stage} rank {rk} IST: saved-for-backward activations / uniform "
                                         f"= {ratio:.3f} <= {TARGET_SAVED}", ratio <= TARGET_SAVED))
                    if r["name"].startswith(("IST", "RST", "uniform")):
                        verdicts.append((f"ZeRO-{stage} rank {rk} {r['name']}: untrained layers unchanged "
                                         f"(max drift {r['drift']:.3g})", r["drift"] == 0.0))
        print(f"## ZeRO-{stage}: ratios vs uniform LoRA (ist.enabled=false)\n")
        print(common.table(headers, body))
        print()
        lisa = [r for rk in range(2) for r in per_rank[rk] if r["name"] == LISA]
        for rk, r in enumerate(lisa):
            print(f"LISA-style rank {rk}: layers not trained in a step moved by up to {r['drift']:.3g} "
                  f"(requires_grad=False after initialize); optimizer keeps state for "
                  f"{r['layers_with_state']} tensors, {r['peak_live'] / base[rk]['peak_live']:.3f} of uniform")
        if lisa:
            print()

    print("## Ratios and targets (per rank, vs uniform LoRA in the same run)\n")
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
