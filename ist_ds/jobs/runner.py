"""A whole fine-tuning job from a recipe: data, model, PEFT, backend, the loop, evaluation, outputs.

This is what ``ist-ds train`` and ``launch/train.py`` run, under any launcher (``deepspeed``,
``torchrun``, ``mpirun``, ``srun``, or plain ``python`` for one process). Outputs in ``output_dir``:
``adapter/`` (loadable by plain ``peft``), ``ist_state.pt``, ``summary.json``, ``recipe.yaml``,
``tokenizer`` files, ``train_losses.jsonl`` (the loss at each log point, kept across resumes),
``checkpoints/`` when ``save_every`` or ``stop_after_steps`` is set.

Before anything is loaded, every rank checks the whole recipe (ist_ds/jobs/preflight.py: paths, the model
on the meta device, PEFT targets, batch arithmetic, the DeepSpeed config, a checkpoint to resume), so
a mistake costs seconds, not a model load on every rank. ``resume=True`` needs a checkpoint (unless
``allow_fresh_start``); a stop (``training.stop_after_steps``) always leaves one.

With ``ist.target: full`` (and ``peft.method: none``) the model is not wrapped with PEFT: IST trains
the blocks' own weights, and the job writes ``model/`` (``config.json`` and ``model.safetensors``,
loadable by ``transformers.AutoModelForCausalLM.from_pretrained``) instead of ``adapter/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time

import torch
import yaml
from torch.utils.data import DistributedSampler

from ist_ds.runtime.checkpoint import IST_STATE_FILE, atomic_torch_save
from ist_ds.runtime.collectives import LocalCollectives, default_collectives
from ist_ds.jobs.data import InstructionDataset, PadCollator, load_task, load_tokenizer
from ist_ds.jobs.dist_env import discover, release_shm_buffers
from ist_ds.core.errors import ISTCheckpointError, ISTConfigError
from ist_ds.observe.monitor import Progress, build_monitor, eval_forward_count, importance_updated
from ist_ds.jobs.recipe import Recipe
from ist_ds.runtime.scoring import default_forward

logger = logging.getLogger(__name__)


def _init_distributed(recipe: Recipe) -> tuple[int, int]:
    """Join the job under whichever launcher started us (see ist_ds/jobs/dist_env.py and docs/launch.md)."""
    from ist_ds.jobs.dist_env import init_distributed

    env = discover()
    world = int(env["WORLD_SIZE"])
    if recipe.backend.name == "single" and world > 1:
        raise ISTConfigError(f"backend.name: single runs one process, but the launcher started {world}")
    framework = "deepspeed" if recipe.backend.name == "deepspeed" else "torch"
    backend = None if torch.cuda.is_available() else "gloo"
    rank, world, _ = init_distributed(framework, backend=backend, timeout_s=recipe.backend.dist_timeout_s)
    return rank, world


def model_directory(recipe: Recipe) -> str | None:
    """The local Hugging Face directory of a pretrained model (a GGUF file converted once), None when
    the recipe builds one from scratch (see ist_ds/jobs/pretrained.py)."""
    m = recipe.model
    if m.path is None and m.gguf_file is None:
        return None
    from ist_ds.jobs.pretrained import model_directory as resolve

    return resolve(m.path, m.gguf_file, m.cache_dir)


def tokenizer_source(recipe: Recipe, model_dir: str | None) -> str | None:
    """``data.tokenizer``, or by default the pretrained model's own tokenizer (else the byte tokenizer)."""
    if recipe.data.tokenizer is not None or model_dir is None:
        return recipe.data.tokenizer
    from ist_ds.jobs.pretrained import has_tokenizer

    return model_dir if has_tokenizer(model_dir) else None


def train_data_source(recipe: Recipe) -> str:
    """``data.train``, or ``data.fallback`` when ``data.train`` names a path that does not exist."""
    d = recipe.data
    if d.fallback is not None and d.train != "embedded" and not os.path.exists(d.train):
        logger.warning("data.train %s does not exist; using data.fallback %s", d.train, d.fallback)
        return d.fallback
    return d.train


def build_recipe_model(recipe: Recipe, tokenizer, model_dir: str | None = None):
    """The recipe's model with its PEFT adapters (none with ``ist.target: full``)."""
    from ist_ds.jobs.models import apply_peft, build_model

    m, p = recipe.model, recipe.peft
    # FSDP2 keeps fp32 parameters and computes in bf16 through its MixedPrecisionPolicy.
    dtype = torch.bfloat16 if m.dtype == "bfloat16" and recipe.backend.name != "fsdp" else torch.float32
    if model_dir is None and (m.path or m.gguf_file):
        model_dir = model_directory(recipe)
    if model_dir is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        if getattr(tokenizer, "pad_token_id", None) is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        overrides = dict(m.config)
        overrides.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # the tokenizer's special ids
            if getattr(tokenizer, key, None) is not None:
                overrides.setdefault(key, getattr(tokenizer, key))
        model = build_model(m.arch, seed=m.seed, **overrides).to(dtype)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if _full_mode(recipe):  # the backend's discovery sets requires_grad on the blocks (ist.full_params)
        logger.info("ist.target: full: training the transformer blocks' own weights, no PEFT adapters")
        return model
    extra = {"modules_to_save": list(p.modules_to_save)} if p.modules_to_save else {}
    return apply_peft(model, p.method, r=p.r, alpha=p.alpha, dropout=p.dropout,
                      target_modules=list(p.target_modules) if p.target_modules else None, **extra)


def _full_mode(recipe: Recipe) -> bool:
    """Whether the job trains the blocks' own weights (``ist.target: full``) instead of PEFT adapters."""
    return recipe.ist.target == "full"


LOSS_HISTORY_FILE = "train_losses.jsonl"


def run(recipe: Recipe, resume: bool = False, allow_fresh_start: bool = False) -> dict:
    """Run the job described by ``recipe``; returns the summary (on every rank).

    ``resume``: continue from the latest checkpoint in ``output_dir/checkpoints``; without one it is
    an error, unless ``allow_fresh_start`` (then the job starts from step 0).
    """
    from ist_ds.observe.console import setup_logging
    from ist_ds.jobs.preflight import preflight

    env = discover()
    setup_logging(int(env["RANK"]), int(env["WORLD_SIZE"]))
    started = time.perf_counter()
    checked = preflight(recipe, int(env["WORLD_SIZE"]), resume=resume, allow_fresh_start=allow_fresh_start)
    logger.info("recipe checked in %.1f s: %s", time.perf_counter() - started, "; ".join(checked.facts))
    if int(env["RANK"]) == 0:
        try:
            os.makedirs(recipe.output_dir, exist_ok=True)
        except OSError as e:
            raise ISTConfigError(f"output_dir {recipe.output_dir!r} cannot be created: {e}") from None
    rank, world = _init_distributed(recipe)
    try:
        return _run(recipe, resume, rank, world, allow_fresh_start)
    finally:
        release_shm_buffers()


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch (the same on every rank) and Python's ``random`` (per rank).

    Checkpoints save each rank's Python ``random`` state; seeding it makes that state a function of
    the recipe, so a run and its resume use the same stream whatever the process started with.
    """
    torch.manual_seed(seed)
    random.seed(f"ist-ds:{seed}:rank{rank}")


def _run(recipe: Recipe, resume: bool, rank: int, world: int, allow_fresh_start: bool = False) -> dict:
    from ist_ds.observe.console import setup_logging

    setup_logging(rank, world)
    t = recipe.training
    seed_rank(t.seed, rank)
    on_cpu = not torch.cuda.is_available()

    model_dir = model_directory(recipe)  # converts a GGUF file once (every rank waits for the first)
    tokenizer = load_tokenizer(tokenizer_source(recipe, model_dir))
    task = load_task(train_data_source(recipe), test_path=recipe.data.test, num_train=recipe.data.num_train,
                     num_test=recipe.data.num_test, seed=recipe.data.seed)
    train_ds = InstructionDataset(task.train, tokenizer, cutoff_len=recipe.data.cutoff_len,
                                  train_on_inputs=recipe.data.train_on_inputs)
    test_records = task.test[:recipe.data.max_eval_examples]
    test_ds = InstructionDataset(test_records, tokenizer, cutoff_len=recipe.data.cutoff_len,
                                 train_on_inputs=recipe.data.train_on_inputs) if test_records else None
    collate = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)

    micro = t.micro_batch_size
    if t.global_batch_size % (micro * world):
        raise ISTConfigError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size={micro} "
            f"x world size {world}; use a multiple of {micro * world}")
    grad_acc = t.global_batch_size // (micro * world)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed, drop_last=True)
    steps_per_epoch = len(sampler) // (micro * grad_acc)
    if steps_per_epoch == 0:
        raise ISTConfigError(f"the training data ({len(train_ds)} examples) is smaller than one global batch "
                             f"({t.global_batch_size})")
    total_steps = t.max_steps or t.epochs * steps_per_epoch

    model = build_recipe_model(recipe, tokenizer, model_dir)
    logger.info("job: %s backend, %d rank(s), %d steps (%d per epoch), global batch %d = %d x %d x %d",
                recipe.backend.name, world, total_steps, steps_per_epoch, t.global_batch_size, micro, world, grad_acc)
    if recipe.backend.name == "deepspeed":
        from ist_ds.jobs.adapters import DeepSpeedRun

        backend = DeepSpeedRun(recipe, model, train_ds, collate, world, total_steps, on_cpu)
    elif recipe.backend.name == "fsdp":
        from ist_ds.jobs.adapters import FSDPRun

        backend = FSDPRun(recipe, model, train_ds, collate, total_steps)
    else:
        from ist_ds.jobs.adapters import SingleRun

        backend = SingleRun(recipe, model, train_ds, collate, "cuda" if not on_cpu else "cpu", total_steps)
    comm = default_collectives() if world > 1 else LocalCollectives()
    ckpt_dir = os.path.join(recipe.output_dir, "checkpoints")
    start_step = 0
    if resume:
        start_step = backend.load_checkpoint(ckpt_dir)
        if start_step:
            logger.info("resumed from %s at step %d", ckpt_dir, start_step)
        elif allow_fresh_start:
            logger.info("no checkpoint in %s yet; starting from step 0 (--allow-fresh-start)", ckpt_dir)
        else:  # the check before the launch saw one: it went away since
            raise ISTCheckpointError(f"--resume: no checkpoint in {ckpt_dir}; nothing to resume")
    stop_at = min(total_steps, t.stop_after_steps) if t.stop_after_steps else total_steps
    stream = _global_batches(train_ds, sampler, collate, micro, grad_acc, steps_per_epoch, start_step)
    monitor = build_monitor(recipe, backend, rank)  # TensorBoard on rank 0 (docs/monitoring.md)
    monitor.log_ist(start_step, backend.ist)
    before = {}
    if test_ds is not None and t.eval_at_start and start_step == 0:
        before = _evaluate(backend, test_ds, test_records, tokenizer, collate, comm, recipe, world, rank)
        logger.info("before training: held-out loss %.4f, multiple-choice accuracy %.3f", before["loss"],
                    before["accuracy"])
        monitor.log(0, {"eval/loss": before["loss"], "eval/accuracy": before["accuracy"]})
    bar = Progress(stop_at, "train", "step", enabled=t.progress and rank == 0, initial=start_step)
    losses = _loss_history(recipe.output_dir, start_step, rank)  # the steps before a resume, too
    window, tokens, t0 = [], 0, time.perf_counter()
    for step in range(start_step, stop_at):
        micro_batches = next(stream)
        selected = backend.ist.selected_layers if backend.ist is not None else None
        step_start = time.perf_counter()
        loss = backend.train_step(micro_batches)
        window.append(loss)
        step_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        tokens += step_tokens
        bar.step(loss, step_tokens * world, time.perf_counter() - step_start, selected,
                 backend.ist.num_layers if backend.ist is not None else None)
        log_point = (step + 1) % t.log_every == 0 or step + 1 == total_steps
        if log_point:
            mean = comm.all_reduce_sum(torch.tensor([sum(window), len(window), tokens], dtype=torch.float64))
            elapsed = time.perf_counter() - t0
            avg = float(mean[0] / mean[1])
            losses.append((step + 1, avg))
            if rank == 0:
                with open(os.path.join(recipe.output_dir, LOSS_HISTORY_FILE), "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": avg}) + "\n")
            msg = f"step {step + 1}/{total_steps} loss {avg:.4f} lr {backend.lr():.2e} tok/s {float(mean[2]) / elapsed:.0f}"
            if selected is not None:
                msg += f" layers {selected}"
            logger.info(msg)
            monitor.log(step + 1, {"train/loss": avg, "train/lr": backend.lr(),
                                   "train/tokens_per_second": float(mean[2]) / elapsed})
            window, tokens, t0 = [], 0, time.perf_counter()
        if log_point or importance_updated(backend.ist):
            monitor.log_ist(step + 1, backend.ist)
        if test_ds is not None and t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < total_steps:
            from ist_ds.jobs.evaluation import evaluate_loss

            eval_loss = evaluate_loss(backend.model, test_ds, collate, micro, backend.device, comm, default_forward)
            logger.info("step %d: held-out loss %.4f", step + 1, eval_loss)
            monitor.log(step + 1, {"eval/loss": eval_loss})
        stopping = step + 1 == stop_at < total_steps  # a stop always leaves a checkpoint to resume from
        if stopping or (t.save_every and ((step + 1) % t.save_every == 0 or step + 1 == stop_at)):
            backend.save_checkpoint(ckpt_dir, tag=f"step{step + 1}")
    bar.close()
    if stop_at < total_steps:
        monitor.close()
        logger.info("stopped after step %d of %d as asked (training.stop_after_steps); continue with --resume",
                    stop_at, total_steps)
        return {"steps": stop_at, "stopped_early": True}

    summary = {"steps": total_steps, "world_size": world, "backend": recipe.backend.name,
               "final_train_loss": losses[-1][1] if losses else None, "train_losses": losses}
    if before:
        summary["eval_loss_before"], summary["eval_accuracy_before"] = before["loss"], before["accuracy"]
    if test_ds is not None:
        after = _evaluate(backend, test_ds, test_records, tokenizer, collate, comm, recipe, world, rank)
        summary["eval_loss"], summary["eval_accuracy"] = after["loss"], after["accuracy"]
        monitor.log(total_steps, {"eval/loss": summary["eval_loss"], "eval/accuracy": summary["eval_accuracy"]})
    if test_records and t.sample_answers:
        from ist_ds.jobs.evaluation import greedy_answer

        summary["sample_answers"] = [
            {"instruction": r["instruction"], "input": r.get("input", ""), "expected": r["output"],
             "answer": greedy_answer(backend.model, r, tokenizer, backend.device, default_forward)}
            for r in test_records[:t.sample_answers]]
    monitor.close()
    if backend.ist is not None:
        summary["scores"] = backend.ist.scores.tolist()
        summary["importance"] = (-backend.ist.scores).tolist()
        summary["selection_counts"] = list(backend.ist.selection_counts)
        summary["memory"] = backend.ist.memory_report()
    # A collective on sharded backends (ZeRO-3 gathers, FSDP2 full tensors): every rank calls it.
    weights = backend.model_state() if _full_mode(recipe) else backend.adapter_state()
    if rank == 0:
        _write_outputs(recipe, backend, tokenizer, weights, summary)
        _log_summary(summary)
    return summary


def _evaluate(backend, test_ds, test_records, tokenizer, collate, comm, recipe: Recipe, world: int, rank: int) -> dict:
    """Held-out loss and multiple-choice accuracy (collectives: every rank calls this)."""
    from ist_ds.jobs.evaluation import choice_accuracy, evaluate_loss

    micro, t = recipe.training.micro_batch_size, recipe.training
    bar = Progress(eval_forward_count(len(test_ds), len(test_records), micro, world), "eval", "forward",
                   enabled=t.progress and rank == 0, total_is_bound=True)
    forward = bar.wrap(default_forward)
    loss = evaluate_loss(backend.model, test_ds, collate, micro, backend.device, comm, forward)
    accuracy = choice_accuracy(backend.model, test_records, tokenizer, backend.device, comm, forward,
                               cutoff_len=recipe.data.cutoff_len)
    bar.close()
    return {"loss": loss, "accuracy": accuracy}


def _global_batches(dataset, sampler, collate, micro: int, grad_acc: int, steps_per_epoch: int, start_step: int):
    """This rank's micro-batches of each optimizer step, from ``start_step`` on.

    The order is a pure function of (seed, epoch, step), so a resumed run sees exactly the batches the
    uninterrupted run would have seen, without reading the skipped ones.
    """
    per_step = micro * grad_acc
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        indices = list(iter(sampler))
        for s in range(offset, steps_per_epoch):
            chunk = indices[s * per_step:(s + 1) * per_step]
            yield [collate([dataset[i] for i in chunk[m * micro:(m + 1) * micro]]) for m in range(grad_acc)]
        step = (epoch + 1) * steps_per_epoch


def _loss_history(output_dir: str, start_step: int, rank: int) -> list[tuple[int, float]]:
    """The (step, loss) log points up to ``start_step`` from ``train_losses.jsonl``; rank 0 truncates it there.

    Points after ``start_step`` (logged by a run that died after its last checkpoint) are dropped:
    the resumed run logs those steps again.
    """
    from ist_ds.runtime.checkpoint import atomic_write_text

    path = os.path.join(output_dir, LOSS_HISTORY_FILE)
    kept: list[tuple[int, float]] = []
    if start_step and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    point = json.loads(line)
                    step, loss = int(point["step"]), float(point["loss"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
                if step <= start_step:
                    kept.append((step, loss))
    if start_step and not kept and rank == 0:
        logger.warning("no loss history before step %d in %s; summary.json lists the losses from there on",
                       start_step, path)
    if rank == 0:
        atomic_write_text(path, "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in kept))
    return kept


def _write_outputs(recipe: Recipe, backend, tokenizer, weights: dict, summary: dict) -> None:
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    out = recipe.output_dir
    if _full_mode(recipe):
        # The whole model: every block trained some steps, and a loadable checkpoint needs the rest too.
        model_dir = os.path.join(out, "model")
        os.makedirs(model_dir, exist_ok=True)
        backend.model.config.save_pretrained(model_dir)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(model_dir, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        os.makedirs(os.path.join(out, "adapter"), exist_ok=True)
        backend.model.peft_config["default"].save_pretrained(os.path.join(out, "adapter"))
        save_file({k: v.contiguous() for k, v in weights.items()},
                  os.path.join(out, "adapter", SAFETENSORS_WEIGHTS_NAME))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    if backend.ist is not None:
        atomic_torch_save(backend.ist.state_dict(), os.path.join(out, IST_STATE_FILE))
    with open(os.path.join(out, "recipe.yaml"), "w") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _log_summary(summary: dict) -> None:
    logger.info("done: %d steps on %d rank(s), final train loss %.4f", summary["steps"], summary["world_size"],
                summary["final_train_loss"] or math.nan)
    if "eval_loss_before" in summary:
        logger.info("held-out loss %.4f -> %.4f, multiple-choice accuracy %.3f -> %.3f (before -> after training)",
                    summary["eval_loss_before"], summary["eval_loss"], summary["eval_accuracy_before"],
                    summary["eval_accuracy"])
    elif "eval_loss" in summary:
        logger.info("held-out loss %.4f, multiple-choice accuracy %.3f", summary["eval_loss"], summary["eval_accuracy"])
    for sample in summary.get("sample_answers", []):
        logger.info("held-out prompt: %s%s", sample["instruction"], f" | {sample['input']}" if sample["input"] else "")
        logger.info("  expected: %s", sample["expected"])
        logger.info("  answer:   %s", sample["answer"])
    if "scores" in summary:
        counts, importance = summary["selection_counts"], summary["importance"]
        total = sum(counts) or 1
        logger.info("layer  importance (-score)  trained in steps")
        for i, (imp, c) in enumerate(zip(importance, counts)):
            logger.info("%5d  %19.4f  %5d  %s", i, imp, c, "#" * round(40 * c / total))
