"""Memory of IST vs uniform LoRA under DeepSpeed ZeRO-2, ZeRO-3 and PyTorch FSDP2, 2 CPU ranks.

Run from the repository root (about 8 minutes on 2 cores):

    .venv/bin/python bench/memory.py            # ZeRO-2, ZeRO-3 and FSDP2, 10 steps per row, fp32
    .venv/bin/python bench/memory.py --backends zero1 zero2 zero3 --precision bf16 --seq 32   # bf16 rows
    .venv/bin/python bench/memory.py --backends zero2 --steps 4   # a quick look

The script forks its own 2 ranks (gloo, loopback; see bench/common.py), so no launcher is needed.
Model: Llama, 8 blocks, hidden 256, LoRA r=32 on q,k,v,up,down; micro-batch 4 x 256 tokens per rank;
AdamW (torch), lr 2e-4, fp32; IST defaults (N_u = 2 of 8, T = 10, K = 3, scoring batch 16).

Per rank and per row it measures:

- optimizer-state bytes by location: ``live`` (held by the optimizer, i.e. on the accelerator on a
  GPU machine; here CPU), sampled right after every inner optimizer step so that ``drop`` shows the
  state it re-creates for the selected layers; ``host`` (offloaded by IST). IST rows read
  ``engine.ist.memory_report()``; every row also reads the optimizer's own ``state`` directly;
- fp32 masters held by the engine (ZeRO's flat master partitions as allocated at the end of the row;
  with ``offload`` and ``drop`` those of unselected layers are parked on the host: ``masters away``);
- trainable-gradient bytes: the gradients autograd produces for the trainable parameters in one step
  (full size, before ZeRO's or FSDP2's reduce-scatter), and the gradient shards held after
  ``backward`` on this rank (ZeRO-1/2 ``averaged_gradients`` and stage 2's contiguous buffer; ZeRO-3
  its flat gradient buffer plus any other tensor its ``averaged_gradients`` hold; FSDP2 the local
  shards of the ``grad`` DTensors); the largest over the steps;
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
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

MICRO = 4
TARGET_STATE = 0.27
TARGET_SAVED = 0.72
TARGET_GRAD_ZERO12 = 0.30

# Backends: DeepSpeed ZeRO stage 1, 2 or 3 (an int), or PyTorch FSDP2.
FSDP2 = "fsdp2"
BACKENDS = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp2": FSDP2}
ALL = (1, 2, 3, FSDP2)

# (row, ist block, extra zero_optimization keys, backends it runs on)
NO_MEL = {"memory_efficient_linear": False}
ROWS = [
    ("uniform LoRA (ist.enabled=false)", {"enabled": False}, {}, ALL),
    ("uniform LoRA (strategy=all)", {"strategy": "all"}, {}, ALL),
    ("IST keep", {"optimizer_state": "keep"}, {}, ALL),
    ("IST offload (host)", {"optimizer_state": "offload"}, {}, ALL),
    ("IST drop", {"optimizer_state": "drop"}, {}, ALL),
    ("RST keep", {"strategy": "rst"}, {}, ALL),
    ("RST drop", {"strategy": "rst", "optimizer_state": "drop"}, {}, ALL),
    # ZeRO-3 replaces torch.nn.functional.linear by default (memory_efficient_linear) by a function
    # that saves the input of every linear for backward, trainable or not; ist_ds swaps it for one
    # that saves the input only where the weight trains. These rows run torch's own linear instead.
    ("uniform LoRA, memory_efficient_linear=false", {"enabled": False}, NO_MEL, (3,)),
    ("IST drop, memory_efficient_linear=false", {"optimizer_state": "drop"}, NO_MEL, (3,)),
]
LISA = "LISA-style (requires_grad only)"
BASE = ROWS[0][0]
NO_MEL_BASE = "uniform LoRA, memory_efficient_linear=false"


def label(backend) -> str:
    return "FSDP2" if backend == FSDP2 else f"ZeRO-{backend}"


# ---------------------------------------------------------------------- measurements inside a rank
class SavedTensors:
    """Unique storages autograd packs for backward while the context is active.

    Storages are held until the context's owner drops it, so that an address freed during the
    forward (ZeRO-3 releases gathered parameters) cannot be reused and miscounted. A storage counts as
    a parameter's when the packed tensor is a parameter (or a view of one) or a ZeRO-3 parameter.
    """

    def __init__(self, params, forward_only: bool = False) -> None:
        # A forward that is never followed by backward must not hand autograd the tensor itself: a
        # saved output would then reference its own grad_fn, a cycle that never frees the activations.
        self.forward_only = forward_only
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params if p.numel()}
        self.act: dict[int, tuple] = {}
        self.par: dict[int, tuple] = {}

    def _pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if st.nbytes():
            is_param = (isinstance(t, torch.nn.Parameter) or hasattr(t, "ds_id") or ptr in self.param_ptrs
                        or isinstance(getattr(t, "_base", None), torch.nn.Parameter))
            (self.par if is_param else self.act)[ptr] = (st, st.nbytes())  # size when packed
        return t.detach() if self.forward_only else t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.activation_bytes = sum(n for _, n in self.act.values())
        self.param_bytes = sum(n for _, n in self.par.values())
        self.act, self.par = {}, {}  # release the storages


def zero_grad_bytes(engine) -> int:
    """Bytes of the gradient partitions ZeRO holds on this rank after backward (before step)."""
    from ist_ds.backends.zero_memory import zero_gradient_bytes

    return zero_gradient_bytes(engine.optimizer) + common.storage_bytes(
        p.grad for p in engine.module.parameters() if p.grad is not None)


def zero_master_bytes(engine) -> int:
    """Bytes of ZeRO's fp32 master partitions as allocated now (parked ones hold none)."""
    from ist_ds.compat import deepspeed as ds

    opt = engine.optimizer
    if ds.zero_kind(opt) == "zero3":
        return common.storage_bytes(ds.zero3_master(opt, s) for s in range(ds.zero3_num_sub_groups(opt)))
    return common.storage_bytes(ds.zero12_master(opt, i) for i in range(ds.zero12_num_groups(opt)))


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


def _reset_linear() -> None:
    """Undo ZeRO-3's process-wide replacement of F.linear, so that each row starts from stock torch."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    if hasattr(Init, "linear_bk"):
        torch.nn.functional.linear = Init.linear_bk


def _run(rank, world, stage, name, ist, zero_extra, steps, data, measure_saved, bf16=False):
    import deepspeed

    import ist_ds
    from ist_ds.model.layers import discover_layers, set_trainable
    from ist_ds.optim.state_store import live_state_bytes

    model = common.make_model()
    layer_map = discover_layers(model)  # before anything freezes parameters
    lisa = ist == LISA
    cfg = common.ds_config(stage, MICRO, None if lisa else ist, bf16=bf16)
    cfg["zero_optimization"].update(zero_extra)
    _reset_linear()
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

    saved_act, saved_par, grad_zero, max_drift, selections = [], [], [], 0.0, []
    for step in range(steps):
        if lisa:
            chosen = sorted(torch.randperm(layer_map.num_layers, generator=generator)[:2].tolist())
            set_trainable(layer_map, chosen)
        trained = ist_hook.selected_layers if ist_hook is not None else \
            (chosen if lisa else list(range(layer_map.num_layers)))
        selections.append(tuple(trained))
        before = lora_snapshot(layer_map, stage)
        batch = common.rank_batch(data, step, rank, world, MICRO)
        if measure_saved:
            with SavedTensors(list(engine.module.parameters())) as saved:
                loss = engine(**batch).loss
            saved_act.append(saved.activation_bytes)
            saved_par.append(saved.param_bytes)
        else:
            loss = engine(**batch).loss
        engine.backward(loss)
        grad_zero.append(zero_grad_bytes(engine))
        engine.step()
        after = lora_snapshot(layer_map, stage)
        max_drift = max(max_drift, drift(before, after, trained))

    end_live = live_state_bytes(inner.state)
    report = ist_hook.memory_report() if ist_hook is not None else None
    if report is not None:  # memory_report() reads the same optimizer state
        live = {k[len("live_"):]: v for k, v in report["optimizer_state_bytes"].items() if k.startswith("live_")}
        assert live == end_live, (live, end_live)
    if report is not None:
        trainable_bytes = report["trainable_param_bytes"]
    else:
        trainable_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                              for p in engine.module.parameters() if p.requires_grad)
    masters = (report or {}).get("master_bytes", {})
    out = {
        "name": name, "stage": stage, "init_s": init_s,
        "masters": zero_master_bytes(engine), "masters_away": masters.get("host", 0) + masters.get("disk", 0),
        "peak_live": peak["live"], "end_live": sum(end_live.values()),
        "offloaded_host": (report or {}).get("optimizer_state_bytes", {}).get("offloaded_host", 0),
        "offloaded_disk": (report or {}).get("optimizer_state_bytes", {}).get("offloaded_disk", 0),
        "report": report,
        "trainable_grad_bytes": trainable_bytes,
        "zero_grad_bytes": max(grad_zero),
        "saved_act": saved_act, "saved_par": saved_par, "selections": selections,
        "drift": max_drift, "loss": float(loss),
    }
    engine.destroy()
    return out


def _run_fsdp(rank, world, name, ist, steps, data, measure_saved):
    """The same measurements as :func:`_run` on FSDP2 (``ist_ds.backends.fsdp.setup``, torch AdamW)."""
    from torch.distributed.device_mesh import init_device_mesh

    from ist_ds.backends import fsdp
    from ist_ds.optim.state_store import live_state_bytes

    _reset_linear()
    model = common.make_model()
    t0 = time.perf_counter()
    run = fsdp.setup(model, ist, mesh=init_device_mesh("cpu", (world,)), lr=2e-4, scoring_data=data,
                     collate_fn=common.collate)
    init_s = time.perf_counter() - t0
    layer_map, optimizer = run.layer_map, run.optimizer

    peak = {"live": 0}
    gated_step = optimizer.step  # IST's gate (or the plain step); drop frees state after it returns

    def measured_step(*args, **kwargs):
        out = gated_step(*args, **kwargs)
        peak["live"] = max(peak["live"], sum(live_state_bytes(optimizer.state).values()))
        return out

    optimizer.step = measured_step

    def snapshot():  # a collective: every rank gathers every layer's PEFT parameters in the same order
        return [[p.full_tensor().detach().clone() for _, p in layer.params] for layer in layer_map.layers]

    saved_act, saved_par, grad_shards, max_drift, selections = [], [], [], 0.0, []
    for step in range(steps):
        trained = run.ist.selected_layers if run.ist is not None else list(range(layer_map.num_layers))
        selections.append(tuple(trained))
        before = snapshot()
        batch = common.rank_batch(data, step, rank, world, MICRO)
        if measure_saved:
            with SavedTensors([p.to_local() for p in run.model.parameters()]) as saved:
                loss = run.model(**batch).loss
            saved_act.append(saved.activation_bytes)
            saved_par.append(saved.param_bytes)
        else:
            loss = run.model(**batch).loss
        loss.backward()
        grad_shards.append(common.storage_bytes(p.grad.to_local() for p in run.model.parameters()
                                                if p.grad is not None))
        run.step()
        max_drift = max(max_drift, drift(before, snapshot(), trained))

    end_live = live_state_bytes(optimizer.state)
    report = run.ist.memory_report() if run.ist is not None else None
    if report is not None:
        trainable_bytes = report["trainable_param_bytes_unsharded"]
    else:
        trainable_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    return {
        "name": name, "stage": FSDP2, "init_s": init_s, "masters": 0, "masters_away": 0,
        "peak_live": peak["live"], "end_live": sum(end_live.values()),
        "offloaded_host": (report or {}).get("optimizer_state_bytes", {}).get("offloaded_host", 0),
        "offloaded_disk": (report or {}).get("optimizer_state_bytes", {}).get("offloaded_disk", 0),
        "report": report,
        "trainable_grad_bytes": trainable_bytes,
        "zero_grad_bytes": max(grad_shards),
        "saved_act": saved_act, "saved_par": saved_par, "selections": selections,
        "drift": max_drift, "loss": float(loss),
    }


def bare_saved_bytes(linear: str, data) -> dict:
    """Saved-for-backward activation bytes of one forward of the bare PEFT model (no engine) for every
    selection of N_u = 2 of the 8 layers and for all layers, keyed by the sorted tuple of trained layers.

    Which tensors autograd saves depends only on which parameters require grad and on the linear
    function in use, so this gives IST's expectation over all selections cheaply (ZeRO-3 does not allow
    forwards without backward). ``linear``: ``torch`` (stock), ``zero3`` (the linear ZeRO-3 installs by
    default, ``memory_efficient_linear``) or ``selective`` (ist_ds's replacement of it under IST, which
    saves a linear's input only when its weight trains). The engine's own figures for the selections
    seen in training are compared with these.
    """
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from ist_ds.backends.zero3_linear import selective_linear

    from ist_ds.model.layers import discover_layers, set_trainable

    model = common.make_model()
    layer_map = discover_layers(model)
    batch = common.rank_batch(data, 0, 0, 1, MICRO)
    original = torch.nn.functional.linear
    torch.nn.functional.linear = {"torch": original, "zero3": zero3_linear_wrap, "selective": selective_linear}[linear]
    out = {}
    try:
        n = layer_map.num_layers
        for sel in [tuple(range(n))] + list(itertools.combinations(range(n), 2)):
            set_trainable(layer_map, list(sel))
            with SavedTensors(list(model.parameters()), forward_only=True) as saved:
                loss = model(**batch).loss
            del loss
            out[sel] = saved.activation_bytes
    finally:
        torch.nn.functional.linear = original
    return out


def _rank_main(rank, world, stages, rows, steps, bf16=False, seq=common.SEQ):
    data = common.make_data(64, seq=seq)
    _reset_linear()
    if rank == 0:
        common.log("bare model: saved tensors for every selection, stock torch linear")
    # rank 0 enumerates with torch's linear, rank 1 with ZeRO-3's and IST's; no collectives involved
    bare = {} if bf16 else {k: bare_saved_bytes(k, data)
                            for k in (("torch",) if rank == 0 else ("zero3", "selective"))}
    results = [{"bare": bare}]
    for stage in stages:
        for name, ist, zero_extra, on_stages in rows:
            if stage in on_stages:
                if rank == 0:
                    common.log(f"{label(stage)}: {name}")
                if stage == FSDP2:
                    results.append(_run_fsdp(rank, world, name, ist, steps, data, measure_saved=True))
                else:
                    results.append(_run(rank, world, stage, name, ist, zero_extra, steps, data,
                                        measure_saved=ist != LISA and not bf16, bf16=bf16))
    return results


# ---------------------------------------------------------------------- report
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: DeepSpeed's bf16 block (fp32 masters); FSDP2 rows are not run")
    ap.add_argument("--seq", type=int, default=common.SEQ, help="tokens per sequence (bf16 matmuls are slow on a CPU)")
    args = ap.parse_args(argv)
    bf16 = args.precision == "bf16"
    args.stages = [BACKENDS[b] for b in args.backends if not (bf16 and BACKENDS[b] == FSDP2)]

    rows = ROWS + [(LISA, LISA, {}, (2,))]
    if bf16:  # the rows the memory targets are about
        rows = [r for r in rows if r[0] in (BASE, "IST keep", "IST offload (host)", "IST drop")]
    start = time.perf_counter()
    results = common.run_ranks(_rank_main, 2, args.stages, rows, args.steps, bf16, args.seq)
    bare = {**results[0][0]["bare"], **results[1][0]["bare"]}
    results = [res[1:] for res in results]
    wall = time.perf_counter() - start
    print(f"# bench/memory.py: 2 ranks (forked, gloo, CPU), {args.precision}, {args.steps} steps per row, "
          f"micro-batch {MICRO} x {args.seq} tokens per rank, wall {wall:.0f} s\n")

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    verdicts, lisa_lines = [], []
    for stage in args.stages:
        per_rank = [[r for r in res if r["stage"] == stage] for res in results]
        print(f"## {label(stage)}: bytes per rank\n")
        headers = ["row", "rank", "masters MiB", "masters away MiB", "optim live MiB (peak)",
                   "optim live MiB (end)", "offloaded host MiB",
                   "trainable grad MiB", "grad shards MiB", "saved act MiB", "saved param MiB",
                   "frozen drift"]
        body = []
        for rk in range(2):
            for r in per_rank[rk]:
                body.append([r["name"], rk, common.mib(r["masters"]), common.mib(r["masters_away"]),
                             common.mib(r["peak_live"]), common.mib(r["end_live"]),
                             common.mib(r["offloaded_host"]), common.mib(r["trainable_grad_bytes"]),
                             common.mib(r["zero_grad_bytes"]), common.mib(mean(r["saved_act"])),
                             common.mib(mean(r["saved_par"])), f"{r['drift']:.3g}"])
        print(common.table(headers, body))
        print()

        print(f"## {label(stage)}: ratios vs uniform LoRA (ist.enabled=false; rows with "
              "memory_efficient_linear=false vs the uniform row with the same setting)\n")
        headers = ["row", "rank", "masters", "optim live (peak)", "optim live + host", "trainable grad",
                   "grad shards", f"saved act ({args.steps} steps)", "saved act (all 28 selections)",
                   "engine vs bare model"]
        body = []
        for rk in range(2):
            by_name = {r["name"]: r for r in per_rank[rk]}
            for r in per_rank[rk]:
                no_mel = "memory_efficient_linear=false" in r["name"]
                b = by_name[NO_MEL_BASE if no_mel else BASE]
                b_act = mean(b["saved_act"])
                act = mean(r["saved_act"])
                # the bare model's figures with the linear this engine runs
                # (ist_ds swaps ZeRO-3's linear for its selective one; plain DeepSpeed rows keep ZeRO-3's)
                table_ = bare.get("torch" if stage != 3 or no_mel else "zero3" if r["name"] == BASE else "selective")
                n = len(table_) - 1 if table_ else 0
                expected = (sum(v for k, v in table_.items() if len(k) == 2) / n / table_[tuple(range(8))]
                            if table_ else float("nan"))
                dev = max((abs(a - table_[sel]) / table_[sel] for a, sel in zip(r["saved_act"], r["selections"])
                           if sel in table_), default=None) if table_ else None
                partial = r["name"].startswith(("IST", "RST"))
                body.append([r["name"], rk, f"{r['masters'] / b['masters']:.3f}" if b["masters"] else "-",
                             f"{r['peak_live'] / b['peak_live']:.3f}",
                             f"{(r['peak_live'] + r['offloaded_host']) / b['peak_live']:.3f}",
                             f"{r['trainable_grad_bytes'] / b['trainable_grad_bytes']:.3f}",
                             f"{r['zero_grad_bytes'] / b['zero_grad_bytes']:.3f}",
                             f"{act / b_act:.3f}" if r["saved_act"] else "-",
                             f"{expected:.3f}" if partial else "-",
                             "-" if dev is None else f"{100 * dev:.2f}%"])
                if r["name"] in ("IST drop", "IST offload (host)"):
                    ratio = r["peak_live"] / b["peak_live"]
                    verdicts.append((f"{label(stage)} rank {rk}, {r['name']}: live optimizer state / uniform = "
                                     f"{ratio:.3f} (target <= {TARGET_STATE})", ratio <= TARGET_STATE))
                if r["name"] in ("IST keep", "IST drop", "IST offload (host)"):
                    grad = r["zero_grad_bytes"] / b["zero_grad_bytes"]
                    verdicts.append((f"{label(stage)} rank {rk}, {r['name']}: gradient shards held / uniform = "
                                     f"{grad:.3f} (target <= 1.0)", grad <= 1.0))
                    if stage in (1, 2):
                        verdicts.append((f"{label(stage)} rank {rk}, {r['name']}: gradient shards held / uniform = "
                                         f"{grad:.3f} (target <= {TARGET_GRAD_ZERO12} on ZeRO-1/2)",
                                         grad <= TARGET_GRAD_ZERO12))
                if r["name"].startswith("IST drop") and r["saved_act"]:
                    verdicts.append((f"{label(stage)} rank {rk}, {r['name']}: saved-for-backward activations / "
                                     f"uniform = {expected:.3f} expected over all {n} selections, {act / b_act:.3f} "
                                     f"over the {args.steps} steps run (target <= {TARGET_SAVED})",
                                     expected <= TARGET_SAVED))
                if r["name"] == LISA:
                    lisa_lines.append(
                        f"{label(stage)} rank {rk}, {LISA}: PEFT parameters of layers frozen in a step moved by up "
                        f"to {r['drift']:.3g} in that step; live optimizer state / uniform = "
                        f"{r['peak_live'] / b['peak_live']:.3f} (every layer's state kept and stepped)")
        print(common.table(headers, body))
        print()
        gated = [r for rk in range(2) for r in per_rank[rk] if r["name"] != LISA]
        worst = max(r["drift"] for r in gated)
        verdicts.append((f"{label(stage)}: layers not selected in a step stay bit-identical, every IST/RST/uniform "
                         f"row, both ranks (max change {worst:.3g})", worst == 0.0))

    print("## Ratios and targets (per rank, vs uniform LoRA measured in the same run)\n")
    return common.print_verdicts(verdicts, lisa_lines)


if __name__ == "__main__":
    sys.exit(main())
