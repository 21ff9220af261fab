"""Check a whole recipe before a job spends time on it: ``ist-ds check`` and the job's first step.

A job on many ranks loads the tokenizer, the data and the model's weights on every rank before it
meets the first wrong path, a PEFT target that matches nothing or a batch size the world size does
not divide; each mistake then costs a launch and surfaces one at a time. :func:`check_recipe` looks
at everything a job will use, without writing a file or loading a weight, and reports every
problem at once:

- paths: ``model.path`` (a local directory with ``config.json``), ``data.tokenizer``, ``data.train``
  / ``data.test`` (read and validated), ``output_dir`` (exists as a writable directory, or can be
  created), and with ``--resume`` a complete checkpoint in ``output_dir/checkpoints``;
- the model: its config, built on the meta device (no memory, no weights), with the PEFT method
  applied and the transformer blocks discovered as the backend will, and the ``ist`` counts resolved
  against the number of blocks (:mod:`ist_ds.jobs.preflight_model`);
- the batch arithmetic at a given world size (micro batch x ranks x accumulation, steps per epoch);
- the DeepSpeed config the job would pass to ``deepspeed.initialize`` (the user's file completed
  from the recipe), validated by DeepSpeed's own config class;
- options a backend cannot honour (the ``single`` backend writes and loads no checkpoints).

The job runner calls :func:`preflight` on every rank before it joins the process group, so a bad
recipe fails in seconds with one ``ist-ds: error:`` line instead of after the model is loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ist_ds.core.errors import ISTConfigError, ISTError
from ist_ds.jobs.preflight_model import check_model
from ist_ds.jobs.recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"


class RecipeCheckError(ISTConfigError):
    """A recipe failed :func:`check_recipe`; ``problems`` lists every finding, one sentence each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass
class CheckReport:
    """What :func:`check_recipe` found: ``facts`` (what was checked, for the user) and ``problems``."""

    facts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    total_steps: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def error(self, key: str, e: BaseException) -> None:
        """Record an exception raised while checking ``key``: an :class:`ISTError`'s own message (it names
        the key already), anything else prefixed with the key and the exception type; on one line."""
        text = " ".join(str(e).split())
        self.problems.append(text if isinstance(e, ISTError) else f"{key}: {type(e).__name__}: {text}")

    def missing(self, key: str, path: str, hint: str = "") -> None:
        """Record that the path ``key`` names does not exist (``hint``: what was expected there)."""
        self.problems.append(f"{key}: path does not exist: {path}" + (f" ({hint})" if hint else ""))


def checkpoint_dir(recipe: Recipe) -> str:
    """Where a job keeps its checkpoints (``output_dir/checkpoints``)."""
    return os.path.join(recipe.output_dir, CHECKPOINTS_SUBDIR)


def preflight(recipe: Recipe, world_size: int, *, resume: bool = False, allow_fresh_start: bool = False) -> CheckReport:
    """:func:`check_recipe`, raising :class:`RecipeCheckError` (one line, every problem) if anything is wrong."""
    report = check_recipe(recipe, world_size, resume=resume, allow_fresh_start=allow_fresh_start)
    if report.problems:
        raise RecipeCheckError(report.problems)
    return report


def check_recipe(recipe: Recipe, world_size: int = 1, *, resume: bool = False,
                 allow_fresh_start: bool = False) -> CheckReport:
    """Check everything ``recipe`` needs for a job on ``world_size`` ranks; never raises for a bad recipe."""
    report = CheckReport()
    if not isinstance(world_size, int) or world_size < 1:
        report.problems.append(f"world size must be a positive integer, got {world_size!r}")
        return report
    _check_backend_options(recipe, world_size, resume, report)
    _check_output_dir(recipe.output_dir, report)
    if resume:
        _check_resume(recipe, allow_fresh_start, report)
    tokenizer = _check_tokenizer(recipe, report)
    num_train = _check_data(recipe, report)
    batches_ok, total_steps = _check_batches(recipe, world_size, num_train, report)
    ist = recipe.ist
    if recipe.backend.name == "deepspeed" and batches_ok:  # its batch sizes derive from the arithmetic
        ist = _check_deepspeed(recipe, world_size, total_steps, report) or ist
    check_model(recipe, tokenizer, ist, report)
    report.total_steps = total_steps
    return report


# ------------------------------------------------------------------------------------------- options
def _check_backend_options(recipe: Recipe, world_size: int, resume: bool, report: CheckReport) -> None:
    t = recipe.training
    if recipe.backend.name != "single":
        return
    if world_size > 1:
        report.problems.append(f"backend.name: single runs one process, but the world size is {world_size}")
    asked = [name for name, on in (("training.save_every", t.save_every), ("training.stop_after_steps",
                                   t.stop_after_steps), ("--resume", resume)) if on]
    if asked:
        report.problems.append(f"backend.name: single writes and loads no checkpoints, so {', '.join(asked)} "
                               "cannot be honoured; use backend.name: deepspeed (also for one process) or fsdp")


# --------------------------------------------------------------------------------------------- paths
def _check_output_dir(path: str, report: CheckReport) -> None:
    """``path`` is a writable directory, or the nearest existing ancestor is one (so it can be created)."""
    target = os.path.abspath(path)
    nearest = target
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    exists = nearest == target
    subject = f"output_dir {path!r} exists and" if exists else f"output_dir {path!r} cannot be created: {nearest}"
    if not os.path.isdir(nearest):
        report.problems.append(f"{subject} is not a directory")
    elif not os.access(nearest, os.W_OK | os.X_OK):
        report.problems.append(f"{subject} is not writable")
    else:
        report.facts.append(f"output_dir: {path} ({'exists, writable' if exists else 'will be created'})")


def _check_resume(recipe: Recipe, allow_fresh_start: bool, report: CheckReport) -> None:
    from ist_ds.runtime.checkpoint import read_latest

    directory = checkpoint_dir(recipe)
    try:
        tag = read_latest(directory) if os.path.isdir(directory) else None
    except ISTError as e:
        report.error("--resume", e)
        return
    if tag is not None:
        report.facts.append(f"resume: from {os.path.join(directory, tag)}")
    elif allow_fresh_start:
        report.facts.append(f"resume: no checkpoint in {directory} yet; starting from step 0 (--allow-fresh-start)")
    else:
        report.problems.append(f"--resume: no checkpoint in {directory} (no 'latest' file); nothing to resume. "
                               "Drop --resume to start from scratch, or add --allow-fresh-start to resume when a "
                               "checkpoint exists and start from scratch otherwise")


def _check_tokenizer(recipe: Recipe, report: CheckReport) -> Any:
    from ist_ds.jobs.data import load_tokenizer

    name = recipe.data.tokenizer
    if name is not None and name != "byte" and not os.path.exists(name):
        # A local directory is meant (nothing is downloaded); say so instead of a hub "repo id" error.
        report.missing("data.tokenizer", name, "a local tokenizer directory, or 'byte'")
        return None
    try:
        tokenizer = load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - every failure to load is a finding of the check
        report.error("data.tokenizer", e)
        return None
    source = name if name is not None else _default_tokenizer(recipe)
    if name is None and source != "byte":  # the model's own: loaded by the job, not checked here
        report.facts.append(f"tokenizer: {source}")
    else:
        report.facts.append(f"tokenizer: {source} ({len(tokenizer)} tokens)")
    return tokenizer


def _default_tokenizer(recipe: Recipe) -> str:
    """What a job uses without ``data.tokenizer``: a pretrained model's own tokenizer, else the byte one
    (as :func:`ist_ds.jobs.assembly.tokenizer_source` decides once the model is at hand)."""
    m = recipe.model
    if m.gguf_file:
        return "the GGUF file's own (converted with the model)"
    if m.path and os.path.isdir(m.path):
        from ist_ds.jobs.pretrained import has_tokenizer

        if has_tokenizer(m.path):
            return f"the model's own ({m.path})"
    return "byte"


def _check_data(recipe: Recipe, report: CheckReport) -> int | None:
    """Read and validate the training (and test) data; returns the number of training records."""
    from ist_ds.jobs.data import EMBEDDED_TASK_NAME, load_task

    d = recipe.data
    bad = False
    for key, path in (("data.train", d.train), ("data.test", d.test)):
        if path is not None and path != EMBEDDED_TASK_NAME and not os.path.exists(path):
            report.missing(key, path)
            bad = True
    if bad:
        return None
    try:
        task = load_task(d.train, test_path=d.test, num_train=d.num_train, num_test=d.num_test, seed=d.seed)
    except Exception as e:  # noqa: BLE001
        report.error("data.train", e)
        return None
    report.facts.append(f"data: {task.name}, {len(task.train)} training records, {len(task.test)} test records")
    return len(task.train)


# -------------------------------------------------------------------------------------------- batches
def _check_batches(recipe: Recipe, world: int, num_train: int | None,
                   report: CheckReport) -> tuple[bool, int | None]:
    """The job's batch arithmetic (as ist_ds.jobs.runner does it); returns (sound, total steps if known)."""
    t = recipe.training
    micro = t.micro_batch_size
    if t.global_batch_size % (micro * world):
        report.problems.append(
            f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size={micro} x "
            f"world size {world}; use a multiple of {micro * world}")
        return False, None
    grad_acc = t.global_batch_size // (micro * world)
    line = (f"batch: global {t.global_batch_size} = micro {micro} x {world} rank(s) x {grad_acc} "
            f"accumulation step(s)")
    if num_train is None:
        report.facts.append(line)
        return True, t.max_steps or None
    steps_per_epoch = (num_train // world) // (micro * grad_acc)  # DistributedSampler(drop_last=True)
    if steps_per_epoch == 0:
        report.problems.append(f"the training data ({num_train} examples) is smaller than one global batch "
                               f"({t.global_batch_size}) at world size {world}")
        return False, None
    total = t.max_steps or t.epochs * steps_per_epoch
    report.facts.append(f"{line}; {steps_per_epoch} steps per epoch, {total} steps in all")
    return True, total


# ------------------------------------------------------------------------------------------ DeepSpeed
def _check_deepspeed(recipe: Recipe, world: int, total_steps: int | None, report: CheckReport):
    """Build and validate the job's DeepSpeed config; returns the IST config it carries (or None)."""
    try:
        from ist_ds.backends.deepspeed import split_ist_block
        from ist_ds.compat.deepspeed import validated_config
        from ist_ds.jobs.adapters import deepspeed_config

        config = deepspeed_config(recipe, world, total_steps or 1, not torch.cuda.is_available())
        ist, rest = split_ist_block(config)
        # DeepSpeed checks train_batch_size against the process group's world size, which does not
        # exist yet: validate the world-size-1 view (the recipe's own arithmetic checked world above).
        rest = dict(rest, train_batch_size=rest["train_micro_batch_size_per_gpu"] * rest["gradient_accumulation_steps"])
        validated_config(rest)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises ValueError, AssertionError, pydantic errors
        report.error("DeepSpeed config", e)
        return None
    stage = config["zero_optimization"].get("stage", 0)
    source = recipe.backend.deepspeed_config if isinstance(recipe.backend.deepspeed_config, str) else "the recipe"
    report.facts.append(f"DeepSpeed config: ZeRO stage {stage}, from {source}; valid")
    return ist


__all__ = ["CheckReport", "RecipeCheckError", "check_recipe", "checkpoint_dir", "preflight"]
