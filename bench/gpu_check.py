"""One-GPU check: peak memory and step time of uniform LoRA vs IST on a ~1B Llama (bf16, random init).

Usage, from the repository root:

    python bench/gpu_check.py                       # on a CUDA machine; JSON to $OUT/gpu_check.json
    python bench/gpu_check.py --out results.json    # JSON to a path of your choice
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json   # tiny model, runs on CPU too

Single process, ``ist_ds.backends.single.SingleProcessTrainer`` (torch AdamW over one param group per layer,
IST's optimizer gate and state store). For each variant a fresh model is built directly on the GPU:
Llama, 22 blocks, hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000 (~1.1B
parameters, the TinyLlama shape), bf16 weights; LoRA r=32, alpha=64 on q,k,v,up,down (adapter weights
in fp32, peft's default for a bf16 base). Batch 16 x 256 tokens (the paper's batch and cutoff), IST at
the reference defaults (N_u = 25% = 5 of 22, T = 10, K = 3, scoring batch 16).

Variants: uniform LoRA (``ist.enabled: false``), IST keep, IST offload (host), IST drop. Per variant:
``torch.cuda.max_memory_allocated`` over the measured steps (reset after the warm-up), the live
optimizer-state bytes on the GPU and offloaded on the host, the median step time without an
importance update, the mean importance-update time and the amortised step (median + update / T).
Ratios against uniform LoRA are printed last and written to the JSON. A time budget (``--budget-s``,
default 240 s) cuts the measured steps short so that the whole check stays under 5 minutes.

Without CUDA (and without ``--tiny``) it prints why it cannot run, writes a JSON saying so, and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FULL = dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=176, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)

VARIANTS = {
    "uniform": {"enabled": False},
    "ist_keep": {"optimizer_state": "keep"},
    "ist_offload": {"optimizer_state": "offload", "offload_target": "host"},
    "ist_drop": {"optimizer_state": "drop"},
}


def _default_out() -> str:
    out = os.environ.get("OUT")
    return os.path.join(out, "gpu_check.json") if out else "gpu_check.json"


def _write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(model_cfg: dict, device, dtype, seed: int = 0):
    import torch

    from ist_ds.jobs.models import apply_peft, build_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model("llama", seed=seed, **model_cfg)
    finally:
        torch.set_default_dtype(previous)
    return apply_peft(model, "lora", r=32, alpha=64, dropout=0.0).to(device)


def _data(n: int, seq: int, vocab: int, seed: int = 1) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return rows


def _collate(rows):
    import torch

    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _run_variant(name, ist_block, model_cfg, device, dtype, data, batch, steps, warmup, deadline):
    import torch

    from ist_ds.optim.state_store import live_state_bytes
    from ist_ds.backends.single import SingleProcessTrainer

    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    model = _build(model_cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainer = SingleProcessTrainer(model, ist_block, data, _collate, lr=2e-4, device=device)
    ctrl = trainer.ist
    inner = trainer.optimizer
    peak = {"state": 0}
    gated_step = inner.step  # IST's gated step (plain AdamW.step for uniform LoRA)

    def sampled_step(*a, **kw):
        out = gated_step(*a, **kw)  # the state of this step's layers exists right after the step
        peak["state"] = max(peak["state"], sum(live_state_bytes(inner.state).values()))
        return out

    inner.step = sampled_step

    def step(i):
        rows = data[(i * batch) % (len(data) - batch + 1):][:batch]
        before = ctrl.importance.num_updates if ctrl is not None and ctrl.scorer is not None else 0
        _sync(device)
        t0 = time.perf_counter()
        loss = trainer.train_step(_collate(rows))
        _sync(device)
        dt = time.perf_counter() - t0
        updated = ctrl is not None and ctrl.scorer is not None and ctrl.importance.num_updates != before
        return dt, loss, (ctrl.last_update_seconds if updated else None)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    plain, update_s, losses = [], [], []
    peak["state"] = 0

    for i in range(warmup, warmup + steps):
        dt, loss, upd = step(i)
        losses.append(loss)
        (update_s.append(upd) if upd is not None else plain.append(dt))
        if time.perf_counter() > deadline and len(plain) >= 3:
            break
    T = trainer.config.update_interval
    med = statistics.median(plain)
    upd_mean = sum(update_s) / len(update_s) if update_s else None
    report = ctrl.memory_report() if ctrl is not None else {}
    out = {
        "memory_allocated_before_build": allocated_before,
        "params": n_params, "trainable_params": n_train, "weight_bytes": weight_bytes,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "memory_allocated_after_warmup": base_alloc if device.type == "cuda" else None,
        "optimizer_state_live_bytes_end": sum(live_state_bytes(inner.state).values()),
        "optimizer_state_live_bytes_peak_sampled": peak["state"],
        "optimizer_state_report": report.get("optimizer_state_bytes"),
        "measured_steps": len(plain) + len(update_s),
        "median_step_s": med,
        "importance_updates": len(update_s),
        "mean_update_s": upd_mean,
        "amortised_step_s": med + (upd_mean / T if upd_mean is not None and ctrl.scorer is not None else 0.0),
        "update_interval": T,
        "last_loss": losses[-1] if losses else None,
    }
    print(f"{name:12s} peak {_gib(out['max_memory_allocated'])} GiB, optimizer state {out['optimizer_state_live_bytes_peak_sampled'] / 2**20:.1f} MiB, "
          f"median step {med:.4f} s, update {upd_mean if upd_mean is None else round(upd_mean, 4)} s, "
          f"{out['measured_steps']} steps", flush=True)
    inner.step = gated_step  # break the closure cycle so the model can be freed
    return out


def _gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few steps; runs on CPU when there is no GPU")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 30; --tiny 12)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=None, help="tokens per example (default 256; --tiny 32)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget for the measured steps")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    out_path = args.out or _default_out()
    start = time.perf_counter()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        msg = ("CUDA is not available on this machine (torch %s, %s): bench/gpu_check.py measures GPU memory "
               "and needs one GPU. Use --tiny to exercise the code path on CPU." % (torch.__version__, platform.node()))
        print(msg)
        _write(out_path, {"status": "skipped", "reason": msg})
        return 0
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16
    model_cfg = TINY if args.tiny else FULL
    steps = args.steps or (12 if args.tiny else 30)
    seq = args.seq or (32 if args.tiny else 256)
    data = _data(max(64, 4 * args.batch), seq, model_cfg["vocab_size"])
    torch.manual_seed(0)
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{'tiny' if args.tiny else '~1B'} Llama {model_cfg}, batch {args.batch} x {seq}", flush=True)

    deadline_total = start + args.budget_s
    results = {}
    for k, name in enumerate(args.variants):
        # share what is left of the budget among the variants still to run
        left = deadline_total - time.perf_counter()
        deadline = time.perf_counter() + max(10.0, left / (len(args.variants) - k))
        results[name] = _run_variant(name, VARIANTS[name], model_cfg, device, dtype, data, args.batch,
                                     steps, args.warmup, deadline)
        gc.collect()  # the variant's model, optimizer and activations go before the next one is built
        if cuda:
            torch.cuda.empty_cache()

    ratios = {}
    if "uniform" in results:
        u = results["uniform"]
        for name, r in results.items():
            if name == "uniform":
                continue
            ratios[name] = {
                "max_memory_allocated": (r["max_memory_allocated"] / u["max_memory_allocated"]
                                         if cuda else None),
                "max_memory_above_weights": ((r["max_memory_allocated"] - r["weight_bytes"])
                                             / (u["max_memory_allocated"] - u["weight_bytes"]) if cuda else None),
                "optimizer_state_live": (r["optimizer_state_live_bytes_peak_sampled"]
                                         / u["optimizer_state_live_bytes_peak_sampled"]),
                "median_step": r["median_step_s"] / u["median_step_s"],
                "amortised_step": r["amortised_step_s"] / u["amortised_step_s"],
            }
    payload = {
        "status": "ok", "tiny": args.tiny, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "model": model_cfg, "lora": {"r": 32, "alpha": 64,
        "targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}, "dtype": str(dtype),
        "batch": args.batch, "seq": seq, "results": results, "ratios_vs_uniform": ratios,
        "wall_s": time.perf_counter() - start,
    }
    _write(out_path, payload)
    print("\nratios vs uniform LoRA (same run):")
    for name, r in ratios.items():
        mem = "n/a (no CUDA)" if r["max_memory_allocated"] is None else \
            f"{r['max_memory_allocated']:.3f} (above weights {r['max_memory_above_weights']:.3f})"
        print(f"  {name:12s} max_memory_allocated {mem}, optimizer state {r['optimizer_state_live']:.3f}, "
              f"median step {r['median_step']:.3f}, amortised step {r['amortised_step']:.3f}")
    print(f"total {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
