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

A job on one rank is a :class:`Job` whose stages :func:`_run` calls in order: set up the data, set
up the model and backend, resume, open the monitor, evaluate before training, train, evaluate
after, save. The parts that follow from the recipe alone live in :mod:`ist_ds.jobs.assembly`, the
files the job writes in :mod:`ist_ds.jobs.outputs`, the backends in :mod:`ist_ds.jobs.adapters`.
"""

from __future__ import annotations

import logging
import os
import random
import time

import torch
from torch.utils.data import DistributedSampler

from ist_ds.core.errors import ISTCheckpointError, ISTConfigError
from ist_ds.jobs.adapters import JobBackend, backend_entry, build_backend
from ist_ds.jobs.assembly import build_recipe_model, full_mode, model_directory, tokenizer_source, train_data_source
from ist_ds.jobs.data import InstructionDataset, PadCollator, load_task, load_tokenizer
from ist_ds.jobs.dist_env import discover, release_shm_buffers
from ist_ds.jobs.outputs import append_loss_point, load_loss_history, log_summary, write_outputs
from ist_ds.jobs.recipe import Recipe
from ist_ds.observe.monitor import Progress, build_monitor, eval_forward_count, importance_updated
from ist_ds.runtime.collectives import Collectives, LocalCollectives, default_collectives
from ist_ds.runtime.scoring import default_forward

logger = logging.getLogger(__name__)


def run(recipe: Recipe, resume: bool = False, allow_fresh_start: bool = False) -> dict:
    """Run the job described by ``recipe``; returns the summary (on every rank).

    ``resume``: continue from the latest checkpoint in ``output_dir/checkpoints``; without one it is
    an error, unless ``allow_fresh_start`` (then the job starts from step 0).
    """
    from ist_ds.jobs.preflight import preflight
    from ist_ds.observe.console import setup_logging

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


def _init_distributed(recipe: Recipe) -> tuple[int, int]:
    """Join the job under whichever launcher started us (see ist_ds/jobs/dist_env.py and docs/launch.md)."""
    from ist_ds.jobs.dist_env import init_distributed

    entry = backend_entry(recipe.backend.name)
    env = discover()
    world = int(env["WORLD_SIZE"])
    if entry.single_process and world > 1:
        raise ISTConfigError(f"backend.name: {recipe.backend.name} runs one process, but the launcher started {world}")
    backend = None if torch.cuda.is_available() else "gloo"
    rank, world, _ = init_distributed(entry.framework, backend=backend, timeout_s=recipe.backend.dist_timeout_s)
    return rank, world


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch (the same on every rank) and Python's ``random`` (per rank).

    Checkpoints save each rank's Python ``random`` state; seeding it makes that state a function of
    the recipe, so a run and its resume use the same stream whatever the process started with.
    """
    torch.manual_seed(seed)
    random.seed(f"ist-ds:{seed}:rank{rank}")


def _run(recipe: Recipe, resume: bool, rank: int, world: int, allow_fresh_start: bool = False) -> dict:
    """The job on this rank, stage by stage (every rank runs every stage: most hold collectives)."""
    from ist_ds.observe.console import setup_logging

    setup_logging(rank, world)
    seed_rank(recipe.training.seed, rank)
    job = Job(recipe, rank, world)
    job.setup_data()
    job.setup_backend()
    start_step = job.resume(resume, allow_fresh_start)
    job.open_monitor(start_step)
    before = job.evaluate_before_training(start_step)
    losses = job.train(start_step)
    if job.stop_at < job.total_steps:
        return job.stopped_early()
    summary = job.summarize(losses, before)
    job.save(summary)
    return summary


class Job:
    """The state one rank's job builds up, stage by stage (see :func:`_run` for the order)."""

    def __init__(self, recipe: Recipe, rank: int, world: int) -> None:
        self.recipe = recipe
        self.rank = rank
        self.world = world
        self.on_cpu = not torch.cuda.is_available()
        self.ckpt_dir = os.path.join(recipe.output_dir, "checkpoints")
        self.comm: Collectives = LocalCollectives()
        self.monitor = None

    # ------------------------------------------------------------------ set up
    def setup_data(self) -> None:
        """Tokenizer, training and held-out data, and the batch arithmetic of one optimizer step."""
        recipe, t, d = self.recipe, self.recipe.training, self.recipe.data
        self.model_dir = model_directory(recipe)  # converts a GGUF file once (every rank waits for the first)
        self.tokenizer = load_tokenizer(tokenizer_source(recipe, self.model_dir))
        task = load_task(train_data_source(recipe), test_path=d.test, num_train=d.num_train, num_test=d.num_test,
                         seed=d.seed)
        self.train_ds = InstructionDataset(task.train, self.tokenizer, cutoff_len=d.cutoff_len,
                                           train_on_inputs=d.train_on_inputs)
        self.test_records = task.test[:d.max_eval_examples]
        self.test_ds = InstructionDataset(self.test_records, self.tokenizer, cutoff_len=d.cutoff_len,
                                          train_on_inputs=d.train_on_inputs) if self.test_records else None
        self.collate = PadCollator(self.tokenizer.pad_token_id, pad_to_multiple_of=8)

        micro, world = t.micro_batch_size, self.world
        if t.global_batch_size % (micro * world):
            raise ISTConfigError(
                f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size={micro} "
                f"x world size {world}; use a multiple of {micro * world}")
        self.micro = micro
        self.grad_acc = t.global_batch_size // (micro * world)
        self.sampler = DistributedSampler(self.train_ds, num_replicas=world, rank=self.rank, shuffle=True,
                                          seed=t.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // (micro * self.grad_acc)
        if self.steps_per_epoch == 0:
            raise ISTConfigError(f"the training data ({len(self.train_ds)} examples) is smaller than one global batch "
                                 f"({t.global_batch_size})")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, t.stop_after_steps) if t.stop_after_steps else self.total_steps

    def setup_backend(self) -> None:
        """The model with its adapters, inside the backend that trains it; the job's collectives."""
        recipe, t = self.recipe, self.recipe.training
        model = build_recipe_model(recipe, self.tokenizer, self.model_dir)
        logger.info("job: %s backend, %d rank(s), %d steps (%d per epoch), global batch %d = %d x %d x %d",
                    recipe.backend.name, self.world, self.total_steps, self.steps_per_epoch, t.global_batch_size,
                    self.micro, self.world, self.grad_acc)
        self.backend: JobBackend = build_backend(recipe, model, self.train_ds, self.collate, world_size=self.world,
                                                 total_steps=self.total_steps, on_cpu=self.on_cpu)
        self.comm = default_collectives() if self.world > 1 else LocalCollectives()

    def resume(self, resume: bool, allow_fresh_start: bool) -> int:
        """The step to start from: the latest checkpoint's when resuming, else 0."""
        if not resume:
            return 0
        start_step = self.backend.load_checkpoint(self.ckpt_dir)
        if start_step:
            logger.info("resumed from %s at step %d", self.ckpt_dir, start_step)
        elif allow_fresh_start:
            logger.info("no checkpoint in %s yet; starting from step 0 (--allow-fresh-start)", self.ckpt_dir)
        else:  # the check before the launch saw one: it went away since
            raise ISTCheckpointError(f"--resume: no checkpoint in {self.ckpt_dir}; nothing to resume")
        return start_step

    def open_monitor(self, start_step: int) -> None:
        """TensorBoard on rank 0 (docs/monitoring.md), starting with the IST state at ``start_step``."""
        self.monitor = build_monitor(self.recipe, self.backend, self.rank)
        self.monitor.log_ist(start_step, self.backend.ist)

    # ------------------------------------------------------------------ evaluate
    def evaluate_before_training(self, start_step: int) -> dict:
        """Held-out loss and accuracy of the untrained model (a fresh run with ``eval_at_start``), else {}."""
        if self.test_ds is None or not self.recipe.training.eval_at_start or start_step != 0:
            return {}
        before = self.evaluate()
        logger.info("before training: held-out loss %.4f, multiple-choice accuracy %.3f", before["loss"],
                    before["accuracy"])
        self.monitor.log(0, {"eval/loss": before["loss"], "eval/accuracy": before["accuracy"]})
        return before

    def evaluate(self) -> dict:
        """Held-out loss and multiple-choice accuracy (collectives: every rank calls this)."""
        from ist_ds.jobs.evaluation import choice_accuracy, evaluate_loss

        t, backend = self.recipe.training, self.backend
        bar = Progress(eval_forward_count(len(self.test_ds), len(self.test_records), self.micro, self.world), "eval",
                       "forward", enabled=t.progress and self.rank == 0, total_is_bound=True)
        forward = bar.wrap(default_forward)
        loss = evaluate_loss(backend.model, self.test_ds, self.collate, self.micro, backend.device, self.comm, forward)
        accuracy = choice_accuracy(backend.model, self.test_records, self.tokenizer, backend.device, self.comm,
                                   forward, cutoff_len=self.recipe.data.cutoff_len)
        bar.close()
        return {"loss": loss, "accuracy": accuracy}

    # ------------------------------------------------------------------ train
    def train(self, start_step: int) -> list[tuple[int, float]]:
        """Optimizer steps from ``start_step`` to :attr:`stop_at`; the (step, mean loss) log points of
        the whole run, those before a resume included."""
        t, backend = self.recipe.training, self.backend
        stream = _global_batches(self.train_ds, self.sampler, self.collate, self.micro, self.grad_acc,
                                 self.steps_per_epoch, start_step)
        bar = Progress(self.stop_at, "train", "step", enabled=t.progress and self.rank == 0, initial=start_step)
        losses = load_loss_history(self.recipe.output_dir, start_step, self.rank)
        window = _LossWindow()
        for step in range(start_step, self.stop_at):
            micro_batches = next(stream)
            selected = backend.ist.selected_layers if backend.ist is not None else None
            step_start = time.perf_counter()
            loss = backend.train_step(micro_batches)
            step_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
            window.add(loss, step_tokens)
            bar.step(loss, step_tokens * self.world, time.perf_counter() - step_start, selected,
                     backend.ist.num_layers if backend.ist is not None else None)
            done = step + 1
            log_point = done % t.log_every == 0 or done == self.total_steps
            if log_point:
                losses.append((done, self._log_training(done, window, selected)))
            if log_point or importance_updated(backend.ist):
                self.monitor.log_ist(done, backend.ist)
            if self.test_ds is not None and t.eval_every and done % t.eval_every == 0 and done < self.total_steps:
                self._log_held_out_loss(done)
            stopping = done == self.stop_at < self.total_steps  # a stop always leaves a checkpoint to resume from
            if stopping or (t.save_every and (done % t.save_every == 0 or done == self.stop_at)):
                backend.save_checkpoint(self.ckpt_dir, tag=f"step{done}")
        bar.close()
        return losses

    def _log_training(self, step: int, window: _LossWindow, selected: list[int] | None) -> float:
        """One log point: the loss averaged over ranks and the steps since the last one (a collective)."""
        mean = self.comm.all_reduce_sum(torch.tensor([sum(window.losses), len(window.losses), window.tokens],
                                                     dtype=torch.float64))
        elapsed = time.perf_counter() - window.started
        avg = float(mean[0] / mean[1])
        if self.rank == 0:
            append_loss_point(self.recipe.output_dir, step, avg)
        msg = (f"step {step}/{self.total_steps} loss {avg:.4f} lr {self.backend.lr():.2e} "
               f"tok/s {float(mean[2]) / elapsed:.0f}")
        if selected is not None:
            msg += f" layers {selected}"
        logger.info(msg)
        self.monitor.log(step, {"train/loss": avg, "train/lr": self.backend.lr(),
                                "train/tokens_per_second": float(mean[2]) / elapsed})
        window.reset()
        return avg

    def _log_held_out_loss(self, step: int) -> None:
        """The held-out loss during training (``training.eval_every``; a collective)."""
        from ist_ds.jobs.evaluation import evaluate_loss

        backend = self.backend
        eval_loss = evaluate_loss(backend.model, self.test_ds, self.collate, self.micro, backend.device, self.comm,
                                  default_forward)
        logger.info("step %d: held-out loss %.4f", step, eval_loss)
        self.monitor.log(step, {"eval/loss": eval_loss})

    def stopped_early(self) -> dict:
        """The end of a job stopped by ``training.stop_after_steps``: its checkpoint is the output."""
        self.monitor.close()
        logger.info("stopped after step %d of %d as asked (training.stop_after_steps); continue with --resume",
                    self.stop_at, self.total_steps)
        return {"steps": self.stop_at, "stopped_early": True}

    # ------------------------------------------------------------------ finish
    def summarize(self, losses: list[tuple[int, float]], before: dict) -> dict:
        """The summary of a finished run: losses, held-out results after training, sample answers and
        IST's final state. Evaluation is a collective: every rank calls this."""
        t, backend = self.recipe.training, self.backend
        summary = {"steps": self.total_steps, "world_size": self.world, "backend": self.recipe.backend.name,
                   "final_train_loss": losses[-1][1] if losses else None, "train_losses": losses}
        if before:
            summary["eval_loss_before"], summary["eval_accuracy_before"] = before["loss"], before["accuracy"]
        if self.test_ds is not None:
            after = self.evaluate()
            summary["eval_loss"], summary["eval_accuracy"] = after["loss"], after["accuracy"]
            self.monitor.log(self.total_steps, {"eval/loss": summary["eval_loss"],
                                                "eval/accuracy": summary["eval_accuracy"]})
        if self.test_records and t.sample_answers:
            from ist_ds.jobs.evaluation import greedy_answer

            summary["sample_answers"] = [
                {"instruction": r["instruction"], "input": r.get("input", ""), "expected": r["output"],
                 "answer": greedy_answer(backend.model, r, self.tokenizer, backend.device, default_forward)}
                for r in self.test_records[:t.sample_answers]]
        self.monitor.close()
        if backend.ist is not None:
            summary["scores"] = backend.ist.scores.tolist()
            summary["importance"] = (-backend.ist.scores).tolist()
            summary["selection_counts"] = list(backend.ist.selection_counts)
            summary["memory"] = backend.ist.memory_report()
        return summary

    def save(self, summary: dict) -> None:
        """The trained weights and the job's files (see :mod:`ist_ds.jobs.outputs`)."""
        # A collective on sharded backends (ZeRO-3 gathers, FSDP2 full tensors): every rank calls it.
        weights = self.backend.model_state() if full_mode(self.recipe) else self.backend.adapter_state()
        if self.rank == 0:
            write_outputs(self.recipe, self.backend, self.tokenizer, weights, summary)
            log_summary(summary)


class _LossWindow:
    """This rank's step losses and tokens since the last log point, and when that was."""

    def __init__(self) -> None:
        self.reset()

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def reset(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.started = time.perf_counter()


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
