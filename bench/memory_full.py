"""Memory of full-layer IST (``target: full``) vs full fine-tuning of the blocks, ZeRO-2, ZeRO-3, FSDP2.

Run from the repository root (about 8 minutes on 2 CPU cores):

    .venv/bin/python bench/memory_full.py --precision fp32   # ZeRO-2, ZeRO-3 and FSDP2, every row
    .venv/bin/python bench/memory_full.py --precision bf16 --rows targets --seq 32   # bf16 (slow on a CPU)
    .venv/bin/python bench/memory_full.py --backends zero2 --precision bf16 --steps 3   # a quick look

The script forks its own 2 ranks (gloo, loopback; bench/common.py), so no launcher is needed.
Model: the Llama of bench/memory.py (8 blocks, hidden 256, intermediate 688, byte vocabulary) with
no PEFT: the blocks' own weights train, embeddings, final norm and LM head are frozen in every row
(``train_outside: never``). Micro-batch 4 x 256 tokens per rank, torch AdamW, lr 2e-4, fp32 and bf16
(DeepSpeed's ``bf16`` block; FSDP2 rows run fp32), IST defaults (N_u = 2 of 8 blocks, T = 10, K = 3,
scoring batch 16).

Rows: full fine-tuning of the blocks with IST disabled (plain DeepSpeed / plain FSDP2 AdamW; the
baseline of every ratio) and through IST's machinery (``strategy: all``); IST ``keep``, ``offload``
(host, disk) and ``drop``; and on ZeRO a LISA-style row: a plain DeepSpeed engine over every block's
weights, 2 random blocks per step switched on by toggling ``requires_grad`` only, as LISA does.

Per rank and row it measures:

- optimizer state (Adam moments and step): ``live``, held by the optimizer (on a GPU machine: on the
  accelerator; here the CPU), sampled right after every inner optimizer step so that ``drop`` shows
  the state it re-creates for the selected blocks, and at the end; ``host`` / ``disk``, held by IST's
  store after offloading;
- fp32 masters held by the engine: the bytes of ZeRO's flat fp32 master partitions as allocated
  at the end (IST's ``offload`` and ``drop`` park those of unselected blocks on the host or disk:
  ``masters away``); FSDP2 steps the fp32 sharded parameters themselves, which every forward
  gathers, so there they are the weights and stay;
- gradient partitions held between backward and step (ZeRO: ``averaged_gradients``, stage 2's
  contiguous buffer, ZeRO-3's flat buffer; FSDP2: the local shards of the ``grad`` DTensors), the
  largest over the steps;
- engine total: masters + moments (peak) + gradient partitions, the bytes that decide whether a
  model fits on the accelerator besides its bit16 weights and activations;
- bytes handed to collectives per step (forward, backward, step and IST's moves; the median);
- step time (median over the steps, moves included);
- drift: the largest absolute change, across a step, of a weight of a block not trained in that step
  (must be 0 for every IST row; LISA's is not).

Ratios against full fine-tuning (IST disabled, same precision) come last, with PASS/FAIL for the
targets: live optimizer state with ``drop`` / ``offload`` <= 0.27 (N_u / L = 0.25); on ZeRO, the
engine total (masters + moments + gradients) with ``drop`` / ``offload`` <= 0.30; step time of
``offload`` (host) <= 1.10 of ``keep``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from ist_ds.observe.monitor import PeakStateProbe  # noqa: E402

MICRO = 4
N_TRAIN = 2
TARGET_STATE = 0.27
TARGET_ENGINE = 0.30
TARGET_OFFLOAD_TIME = 1.10
BACKENDS = ("zero2", "zero3", "fsdp")
PRECISIONS = ("fp32", "bf16")

BASE = "full FT (IST disabled)"
LISA = "LISA-style (requires_grad only)"
# (row, ist block or None for the baseline/LISA, backends it runs on)
ROWS = [
    (BASE, None, BACKENDS),
    ("full FT (strategy=all)", {"strategy": "all"}, BACKENDS),
    ("IST keep", {"optimizer_state": "keep"}, BACKENDS),
    ("IST offload (host)", {"optimizer_state": "offload"}, BACKENDS),
    ("IST offload (disk)", {"optimizer_state": "offload", "offload_target": "disk"}, BACKENDS),
    ("IST drop", {"optimizer_state": "drop"}, BACKENDS),
    (LISA, None, ("zero2", "zero3")),
]


# ---------------------------------------------------------------------- measurements inside a rank
def make_full_model():
    """The benchmark Llama without PEFT; its block list and the frozen outside parameters.

    ``discover_full_layers`` sets ``requires_grad`` as full mode does (blocks on, the rest off), so the
    baseline and LISA rows train exactly the parameters the IST rows train.
    """
    from ist_ds.model.full_layers import discover_full_layers
    from ist_ds.jobs.models import build_model

    model = build_model("llama", seed=0, **common.MODEL)
    return model, discover_full_layers(model)


def ist_block(extra: dict, offload_dir: str) -> dict:
    block = {"target": "full", "train_layers": N_TRAIN, **extra}
    if block.get("offload_target") == "disk":
        block["offload_dir"] = offload_dir
    return block


def _reset_linear() -> None:
    """Undo ZeRO-3's process-wide replacement of F.linear, so that each row starts from stock torch."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    if hasattr(Init, "linear_bk"):
        torch.nn.functional.linear = Init.linear_bk


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [t for g in optimizer.param_groups for t in g["params"]]


def _zero_masters(engine) -> list[torch.Tensor]:
    """ZeRO's fp32 master partitions on this rank (ZeRO-3 hands them to the optimizer only inside its step)."""
    from ist_ds.compat import deepspeed as ds

    opt = engine.optimizer
    if ds.zero_kind(opt) == "zero3":
        return [ds.zero3_master(opt, s) for s in range(ds.zero3_num_sub_groups(opt))]
    return [ds.zero12_master(opt, i) for i in range(ds.zero12_num_groups(opt))]


def _local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors``: distinct storages, the local shard of a DTensor."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return common.storage_bytes(local)


def block_snapshot(layer_map, gather) -> list[list[torch.Tensor]]:
    params = [[p for _, p in layer.params] for layer in layer_map.layers]
    with gather([p for ps in params for p in ps]):
        return [[(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in ps] for ps in params]


def drift(before, after, trained) -> float:
    out = 0.0
    for i, (b, a) in enumerate(zip(before, after)):
        if i not in trained:
            out = max(out, max(float((x - y).abs().max()) for x, y in zip(b, a)))
    return out


def _run_deepspeed(rank, world, stage, name, extra, steps, data, offload_dir, bf16, comm):
    import contextlib

    import deepspeed

    import ist_ds
    from ist_ds.backends.zero_memory import zero_gradient_bytes
    from ist_ds.model.layers import set_trainable
    from ist_ds.optim.state_store import live_state_bytes

    _reset_linear()
    model, layer_map = make_full_model()
    lisa = name == LISA
    cfg = common.ds_config(stage, MICRO, None if extra is None else ist_block(extra, offload_dir), bf16=bf16)
    params = common.trainable(model)
    if extra is None:  # baseline and LISA: a plain DeepSpeed engine over the blocks' weights
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=cfg)
    else:
        engine, *_ = ist_ds.initialize(model=model, model_parameters=params, config=cfg, scoring_data=data,
                                       scoring_collate_fn=common.collate)
        layer_map = engine.ist.layer_map
    ist = getattr(engine, "ist", None)
    inner = engine.basic_optimizer
    peak = PeakStateProbe(inner)
    gather = (lambda ps: deepspeed.zero.GatheredParameters(ps)) if stage == 3 else (lambda ps: contextlib.nullcontext())
    generator = torch.Generator().manual_seed(1234)
    max_drift, loss, grads, seconds, comm_bytes = 0.0, None, [], [], []
    for step in range(steps):
        if lisa:
            chosen = sorted(torch.randperm(layer_map.num_layers, generator=generator)[:N_TRAIN].tolist())
            set_trainable(layer_map, chosen)
        trained = ist.selected_layers if ist is not None else (chosen if lisa else range(layer_map.num_layers))
        before = block_snapshot(layer_map, gather)
        batch = common.rank_batch(data, step, rank, world, MICRO)
        comm.bytes, comm.active = 0, True
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        grads.append(zero_gradient_bytes(engine.optimizer))
        engine.step()
        seconds.append(time.perf_counter() - t0)
        comm.active = False
        comm_bytes.append(comm.bytes)
        max_drift = max(max_drift, drift(before, block_snapshot(layer_map, gather), list(trained)))
    report = ist.memory_report() if ist is not None else {}
    state = report.get("optimizer_state_bytes", {})
    masters = report.get("master_bytes", {})
    out = {
        "name": name, "backend": f"zero{stage}", "precision": "bf16" if bf16 else "fp32", "peak_live": peak.peak,
        "end_live": sum(live_state_bytes(inner.state).values()),
        "offloaded_host": state.get("offloaded_host", 0), "offloaded_disk": state.get("offloaded_disk", 0),
        "masters_live": common.storage_bytes(_zero_masters(engine)),
        "masters_away": masters.get("host", 0) + masters.get("disk", 0),
        "grads": max(grads), "comm": common.median(comm_bytes[1:] or comm_bytes),
        "step_s": common.median(seconds[1:] or seconds),
        "drift": max_drift, "loss": float(loss),
    }
    engine.destroy()
    return out


def _run_fsdp(rank, world, name, extra, steps, data, offload_dir, comm):
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh

    from ist_ds.backends.fsdp import setup
    from ist_ds.optim.state_store import live_state_bytes

    _reset_linear()
    model, _ = make_full_model()
    block = ist_block(extra, offload_dir) if extra is not None else {"enabled": False, "target": "full"}
    run = setup(model, block, mesh=init_device_mesh("cpu", (world,)), scoring_data=data,
                collate_fn=common.collate, lr=2e-4)
    peak = PeakStateProbe(run.optimizer)
    layer_map = run.layer_map
    max_drift, loss, grads, seconds, comm_bytes = 0.0, None, [], [], []
    for step in range(steps):
        trained = run.ist.selected_layers if run.ist is not None else range(layer_map.num_layers)
        before = block_snapshot(layer_map, lambda ps: contextlib.nullcontext())  # this rank's shards
        batch = common.rank_batch(data, step, rank, world, MICRO)
        comm.bytes, comm.active = 0, True
        t0 = time.perf_counter()
        loss = run.model(**batch).loss
        loss.backward()
        grads.append(common.storage_bytes(p.grad.to_local() for p in run.model.parameters() if p.grad is not None))
        run.step()
        seconds.append(time.perf_counter() - t0)
        comm.active = False
        comm_bytes.append(comm.bytes)
        after = block_snapshot(layer_map, lambda ps: contextlib.nullcontext())
        max_drift = max(max_drift, drift(before, after, list(trained)))
    report = run.memory_report()["optimizer_state_bytes"]
    return {
        "name": name, "backend": "fsdp", "precision": "fp32", "peak_live": peak.peak,
        "end_live": sum(live_state_bytes(run.optimizer.state).values()),
        "offloaded_host": report.get("offloaded_host", 0), "offloaded_disk": report.get("offloaded_disk", 0),
        # FSDP2 steps the fp32 sharded parameters themselves (the forward all-gathers them)
        "masters_live": _local_bytes(_optimizer_tensors(run.optimizer)), "masters_away": 0,
        "grads": max(grads), "comm": common.median(comm_bytes[1:] or comm_bytes),
        "step_s": common.median(seconds[1:] or seconds),
        "drift": max_drift, "loss": float(loss),
    }


def _rank_main(rank, world, backends, precisions, steps, offload_root, seq, rows):
    import torch.distributed as dist

    comm = common.CommCounter()  # before the process group: DeepSpeed caches collective functions
    if not dist.is_initialized():  # one gloo group for every row; DeepSpeed joins the existing one
        dist.init_process_group("gloo")
    data = common.make_data(64, seq=seq)
    results = []
    for backend in backends:
        for precision in precisions:
            if backend == "fsdp" and precision != "fp32":
                continue
            for name, extra, on in ROWS:
                if backend not in on or (rows and name not in rows):
                    continue
                if rank == 0:
                    common.log(f"{backend} {precision}: {name}")
                offload_dir = os.path.join(offload_root, f"{backend}-{len(results)}")
                t0 = time.perf_counter()
                if backend == "fsdp":
                    r = _run_fsdp(rank, world, name, extra, steps, data, offload_dir, comm)
                else:
                    r = _run_deepspeed(rank, world, int(backend[-1]), name, extra, steps, data, offload_dir,
                                       precision == "bf16", comm)
                r["seconds"] = time.perf_counter() - t0
                results.append(r)
    return results


# ---------------------------------------------------------------------- report
def main(argv=None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=common.SEQ, help="tokens per sequence (bf16 matmuls are slow on a CPU)")
    ap.add_argument("--rows", choices=("all", "targets"), default="all",
                    help="targets: only full FT, IST keep, offload (host) and drop")
    args = ap.parse_args(argv)
    rows = [BASE, "IST keep", "IST offload (host)", "IST drop"] if args.rows == "targets" else []

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ist_bench_offload_") as offload_root:
        results = common.run_ranks(_rank_main, 2, args.backends, args.precision, args.steps, offload_root,
                                   args.seq, rows)
    wall = time.perf_counter() - start
    n_params = sum(p.numel() for layer in make_full_model()[1].layers for _, p in layer.params)
    print(f"# bench/memory_full.py: full-layer IST, 2 ranks (forked, gloo, CPU), {args.steps} steps per row, "
          f"micro-batch {MICRO} x {args.seq} tokens per rank, wall {wall:.0f} s")
    print(f"# model: Llama, 8 blocks, hidden {common.MODEL['hidden_size']}, intermediate "
          f"{common.MODEL['intermediate_size']}, no PEFT; {n_params} parameters in the blocks (all trained), "
          f"embeddings / final norm / LM head frozen; N_u = {N_TRAIN} of 8 blocks per step; torch AdamW\n")

    verdicts, infos = [], []
    labels = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP2"}

    def engine_total(r):
        return r["masters_live"] + r["peak_live"] + r["grads"]

    for backend in args.backends:
        for precision in args.precision:
            per_rank = [[r for r in res if r["backend"] == backend and r["precision"] == precision] for res in results]
            if not per_rank[0]:
                continue
            label = f"{labels[backend]} {precision}"
            print(f"## {label}: bytes per rank\n")
            headers = ["row", "rank", "masters MiB", "masters away MiB", "moments MiB (peak)", "moments host MiB",
                       "moments disk MiB", "grad partitions MiB", "engine total MiB", "comm MiB/step",
                       "s/step", "frozen drift"]
            body = [[r["name"], rk, common.mib(r["masters_live"]), common.mib(r["masters_away"]),
                     common.mib(r["peak_live"]), common.mib(r["offloaded_host"]), common.mib(r["offloaded_disk"]),
                     common.mib(r["grads"]), common.mib(engine_total(r)), common.mib(r["comm"]),
                     f"{r['step_s']:.3f}", f"{r['drift']:.3g}"]
                    for rk in range(2) for r in per_rank[rk]]
            print(common.table(headers, body))
            print()

            print(f"## {label}: ratios vs {BASE}\n")
            headers = ["row", "rank", "masters", "moments (peak)", "grad partitions", "engine total",
                       "comm/step", "s/step"]
            body = []
            for rk in range(2):
                base = next(r for r in per_rank[rk] if r["name"] == BASE)
                keep = next(r for r in per_rank[rk] if r["name"] == "IST keep")
                for r in per_rank[rk]:
                    live = r["peak_live"] / base["peak_live"]
                    total = engine_total(r) / engine_total(base)
                    body.append([r["name"], rk, f"{r['masters_live'] / base['masters_live']:.3f}", f"{live:.3f}",
                                 f"{r['grads'] / base['grads']:.3f}", f"{total:.3f}",
                                 f"{r['comm'] / base['comm']:.3f}" if base["comm"] else "-",
                                 f"{r['step_s'] / base['step_s']:.3f}"])
                    if r["name"].startswith(("IST offload", "IST drop")):
                        verdicts.append((f"{label} rank {rk}, {r['name']}: live optimizer state / full FT = {live:.3f} "
                                         f"(target <= {TARGET_STATE})", live <= TARGET_STATE))
                        if backend != "fsdp":
                            verdicts.append((f"{label} rank {rk}, {r['name']}: masters + moments + gradient "
                                             f"partitions held by the engine / full FT = {total:.3f} "
                                             f"(target <= {TARGET_ENGINE})", total <= TARGET_ENGINE))
                    if r["name"] == "IST offload (host)":
                        ratio = r["step_s"] / keep["step_s"]
                        verdicts.append((f"{label} rank {rk}: step time IST offload (host) / IST keep = {ratio:.3f}, "
                                         f"moves included (target <= {TARGET_OFFLOAD_TIME})",
                                         ratio <= TARGET_OFFLOAD_TIME))
                    if r["name"] == LISA:
                        infos.append(f"{label} rank {rk}, {LISA}: weights of blocks frozen in a step moved by up to "
                                     f"{r['drift']:.3g} in that step; engine total / full FT = {total:.3f} "
                                     f"(every block's state kept and stepped)")
            print(common.table(headers, body))
            print()
            if backend == "fsdp":
                infos.append(f"{label}: FSDP2 keeps no separate fp32 master: the fp32 sharded parameter is the "
                             f"weight every forward all-gathers, so an unselected block holds its fp32 shard, "
                             f"no gradient and (offload/drop) no moments")
            gated = [r for rk in range(2) for r in per_rank[rk] if r["name"] != LISA]
            worst = max(r["drift"] for r in gated)
            verdicts.append((f"{label}: blocks not selected in a step stay bit-identical, every IST and full-FT "
                             f"row, both ranks (max change {worst:.3g})", worst == 0.0))

    print("## Ratios and targets (per rank, vs full fine-tuning of the blocks measured in the same run)\n")
    return common.print_verdicts(verdicts, infos)


if __name__ == "__main__":
    sys.exit(main())
