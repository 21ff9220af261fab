"""What a job leaves in ``output_dir``: the loss history kept across resumes, the trained weights
(``adapter/``, or ``model/`` in full mode), the tokenizer, ``ist_state.pt``, ``recipe.yaml`` and
``summary.json``; and the summary's closing log lines.

Everything here runs on rank 0 only, except :func:`load_loss_history`, which every rank calls (each
keeps its own copy of the history for the summary; rank 0 rewrites the file).
"""

from __future__ import annotations

import json
import logging
import math
import os

import yaml

from ist_ds.jobs.assembly import full_mode
from ist_ds.jobs.recipe import Recipe
from ist_ds.runtime.checkpoint import IST_STATE_FILE, atomic_torch_save, atomic_write_text

logger = logging.getLogger(__name__)

LOSS_HISTORY_FILE = "train_losses.jsonl"


def load_loss_history(output_dir: str, start_step: int, rank: int) -> list[tuple[int, float]]:
    """The (step, loss) log points up to ``start_step`` from ``train_losses.jsonl``; rank 0 truncates it there.

    Points after ``start_step`` (logged by a run that died after its last checkpoint) are dropped:
    the resumed run logs those steps again.
    """
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


def append_loss_point(output_dir: str, step: int, loss: float) -> None:
    """Add one log point to ``train_losses.jsonl`` (rank 0)."""
    with open(os.path.join(output_dir, LOSS_HISTORY_FILE), "a") as f:
        f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def write_outputs(recipe: Recipe, backend, tokenizer, weights: dict, summary: dict) -> None:
    """The job's outputs in ``recipe.output_dir`` (rank 0; ``weights`` from the backend's
    ``adapter_state()`` or, in full mode, ``model_state()``)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    out = recipe.output_dir
    if full_mode(recipe):
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


def log_summary(summary: dict) -> None:
    """The job's closing lines (rank 0): losses, held-out results, sample answers, the per-layer table."""
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
