#!/usr/bin/env python
"""Fine-tune a tiny Llama with LoRA + IST on PyTorch FSDP2, on the embedded task (no downloads).

    torchrun --nproc_per_node 2 launch/fsdp_train.py --steps 30
    torchrun --nproc_per_node 2 launch/fsdp_train.py --config configs/fsdp_ist.yaml --bf16 --save-dir runs/fsdp
    torchrun --nproc_per_node 2 launch/fsdp_train.py --resume runs/fsdp/step-30 --steps 60

Every rank trains on its own shard of each global batch (``DistributedSampler``); rank 0 logs the
loss, the selected layers and the importance scores, and ends with a summary of how often each layer
was selected. With ``--save-dir`` a DCP checkpoint is written at the end (and every ``--save-every``
steps); ``--resume`` continues from one, also with a different number of ranks. See docs/fsdp.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
import yaml

logger = logging.getLogger("fsdp_train")

SCHEMA = {
    "model": {"arch": str, "seed": int, "config": dict},
    "peft": {"method": str, "r": int, "alpha": int, "dropout": float},
    "data": {"train": str, "num_train": int, "cutoff_len": int},
    "training": {"steps": int, "micro_batch_size": int, "grad_accum": int, "lr": float, "weight_decay": float,
                 "max_grad_norm": (float, type(None)), "log_every": int, "seed": int},
    "fsdp": {"mixed_precision": (str, type(None)), "activation_checkpointing": bool, "reshard_after_forward": bool},
    "ist": None,  # validated by ISTConfig.from_dict
}
DEFAULTS = {
    "model": {"arch": "llama", "seed": 0, "config": {"num_hidden_layers": 8, "hidden_size": 64,
                                                     "intermediate_size": 128, "num_attention_heads": 4,
                                                     "num_key_value_heads": 2}},
    "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "data": {"train": "embedded", "num_train": 2000, "cutoff_len": 256},
    "training": {"steps": 120, "micro_batch_size": 4, "grad_accum": 1, "lr": 3e-3, "weight_decay": 0.0,
                 "max_grad_norm": 1.0, "log_every": 10, "seed": 42},
    "fsdp": {"mixed_precision": None, "activation_checkpointing": False, "reshard_after_forward": True},
    "ist": {"optimizer_state": "drop"},
}


def load_config(path: str | None) -> dict:
    """The defaults, overridden by the YAML file at ``path``; unknown keys and wrong types are errors."""
    from ist_ds.errors import ISTConfigError

    cfg = {k: dict(v) for k, v in DEFAULTS.items()}
    if path is None:
        return cfg
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ISTConfigError(f"{path}: unknown section {section!r}; allowed: {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ISTConfigError(f"{path}: section {section!r} must be a mapping")
        if section == "ist":
            cfg["ist"] = dict(values)
            continue
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ISTConfigError(f"{path}: unknown key {section}.{key}; allowed: {', '.join(SCHEMA[section])}")
            expected = SCHEMA[section][key]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ISTConfigError(f"{path}: {section}.{key} has the wrong type: {value!r}")
            cfg[section][key] = value
    if cfg["fsdp"]["mixed_precision"] not in (None, "bf16"):
        raise ISTConfigError(f"{path}: fsdp.mixed_precision must be null or bf16")
    return cfg


def init_distributed() -> tuple[int, int]:
    """Join the job torchrun started (or run alone as rank 0 of 1)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "fsdp_ist.yaml"))
    parser.add_argument("--steps", type=int, help="total optimizer steps (overrides training.steps)")
    parser.add_argument("--bf16", action="store_true", help="fsdp.mixed_precision: bf16")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--optimizer-state", choices=("keep", "offload", "drop"), help="overrides ist.optimizer_state")
    parser.add_argument("--save-dir", help="write DCP checkpoints under this directory")
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    parser.add_argument("--resume", help="a checkpoint directory written by --save-dir")
    args = parser.parse_args(argv)

    rank, world = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.utils.data import DataLoader, DistributedSampler

    from ist_ds.backends.fsdp import setup
    from ist_ds.data import ByteTokenizer, InstructionDataset, PadCollator, load_task
    from ist_ds.models import apply_peft, build_model

    cfg = load_config(args.config)
    if args.steps is not None:
        cfg["training"]["steps"] = args.steps
    if args.bf16:
        cfg["fsdp"]["mixed_precision"] = "bf16"
    if args.activation_checkpointing:
        cfg["fsdp"]["activation_checkpointing"] = True
    if args.optimizer_state:
        cfg["ist"]["optimizer_state"] = args.optimizer_state
    t, f = cfg["training"], cfg["fsdp"]

    tokenizer = ByteTokenizer()
    task = load_task(cfg["data"]["train"], num_train=cfg["data"]["num_train"])
    dataset = InstructionDataset(task.train, tokenizer, cutoff_len=cfg["data"]["cutoff_len"])
    collate = PadCollator(tokenizer.pad_token_id)
    model = build_model(cfg["model"]["arch"], seed=cfg["model"]["seed"], **cfg["model"]["config"])
    model = apply_peft(model, cfg["peft"]["method"], r=cfg["peft"]["r"], alpha=cfg["peft"]["alpha"],
                       dropout=cfg["peft"]["dropout"])

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if f["mixed_precision"] == "bf16" else None
    run = setup(model, cfg["ist"], lr=t["lr"], weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"],
                mixed_precision=mp, activation_checkpointing=f["activation_checkpointing"],
                reshard_after_forward=f["reshard_after_forward"], scoring_data=dataset, collate_fn=collate)
    if args.resume:
        run.load_checkpoint(args.resume)
    ist = run.ist
    start = ist.step if ist is not None else 0
    logger.info("%d ranks, %d examples, %d layers, steps %d..%d, global batch %d, mixed precision %s",
                world, len(dataset), run.layer_map.num_layers, start, t["steps"],
                t["micro_batch_size"] * t["grad_accum"] * world, f["mixed_precision"] or "off")

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=t["seed"])
    loader = DataLoader(dataset, batch_size=t["micro_batch_size"], sampler=sampler, collate_fn=collate, drop_last=True)
    per_epoch = len(loader) // t["grad_accum"]  # optimizer steps per epoch

    def step_batches(first_step: int):
        """The micro-batches of each optimizer step from ``first_step`` on (a resumed run skips ahead)."""
        epoch, position = divmod(first_step, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(position * t["grad_accum"]):
                next(batches)
            for _ in range(position, per_epoch):
                yield [next(batches) for _ in range(t["grad_accum"])]
            epoch, position = epoch + 1, 0

    run.model.train()
    began, window = time.perf_counter(), []
    for step, micro_batches in zip(range(start, t["steps"]), step_batches(start)):
        selected = ist.selected_layers if ist is not None else None
        loss_sum = 0.0
        for batch in micro_batches:
            loss = run.model(**run.to_device(batch)).loss / t["grad_accum"]
            loss.backward()
            loss_sum += float(loss.detach())
        run.step()
        mean = torch.tensor([loss_sum])
        dist.all_reduce(mean)
        window.append(float(mean) / world)
        done = step + 1
        if done % t["log_every"] == 0 or done == t["steps"]:
            scores = " ".join(f"{s:+.4f}" for s in ist.scores.tolist()) if ist is not None else "-"
            logger.info("step %4d  loss %.4f  trained layers %s  scores [%s]  %.2f s/step", done,
                        sum(window) / len(window), selected, scores, (time.perf_counter() - began) / len(window))
            began, window = time.perf_counter(), []
        if args.save_dir and (done == t["steps"] or (args.save_every and done % args.save_every == 0)):
            run.save_checkpoint(os.path.join(args.save_dir, f"step-{done}"))

    if ist is not None:
        report = run.memory_report()["optimizer_state_bytes"]
        logger.info("summary after %d steps (strategy %s, optimizer state %s):", ist.step, run.config.strategy,
                    run.config.optimizer_state)
        logger.info("  layer  trained in  score (higher = less important)")
        for i, (count, score) in enumerate(zip(ist.selection_counts, ist.scores.tolist())):
            logger.info("  %5d  %4d steps  %+.5f", i, count, score)
        live = sum(v for k, v in report.items() if k.startswith("live_"))
        logger.info("  optimizer state on rank 0: %d B live, %d B offloaded to host, %d B to disk", live,
                    report.get("offloaded_host", 0), report.get("offloaded_disk", 0))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
