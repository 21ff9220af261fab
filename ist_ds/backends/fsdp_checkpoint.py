"""Checkpoints of an FSDP2 run (:class:`~ist_ds.backends.fsdp_run.FSDPIST`): DCP directories plus IST's files.

A checkpoint is a ``torch.distributed.checkpoint`` directory holding the sharded model and optimizer
state, plus one small ``ist_state.pt`` with the IST state (and the LR scheduler's, written by rank 0),
each rank's RNG state (``rng_rank<r>.pt``) and a checksum manifest verified before anything is
loaded (:mod:`ist_ds.runtime.checkpoint`); docs/fsdp.md describes the layout and resharding.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ist_ds.core.errors import ISTCheckpointError, ISTConfigError
from ist_ds.optim.gate import OptimizerGate
from ist_ds.runtime.checkpoint import (IST_STATE_FILE, atomic_torch_save, remove_stale_tmp, rng_file, rng_state,
                                       safe_load, set_rng_state, verify_checkpoint, write_manifest)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
MODEL_WEIGHTS = ("trainable", "full")


class SafeLoadPlanner(DefaultLoadPlanner):
    """A DCP load planner that refuses pickled objects other than plain data.

    DCP stores non-tensor values (optimizer hyper-parameters, parameter names) as pickles, and its
    default planner unpickles them unrestricted. This one first unpickles each with
    ``torch.load(weights_only=True)``, which admits only tensors, numbers, strings and containers of
    them, and raises :class:`ISTCheckpointError` otherwise; only an entry that passed is handed to
    the default planner.
    """

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        start = value.tell()
        try:
            torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ISTCheckpointError(
                f"refusing to load checkpoint entry {read_item.dest_index.fqn!r}: it is not plain data ({exc})"
            ) from None
        value.seek(start)
        super().load_bytes(read_item, value)


def save_checkpoint(run, checkpoint_dir: str | os.PathLike, model_weights: str = "trainable") -> None:
    """Write a DCP checkpoint of ``run``'s model, optimizer and IST state. Call on every rank.

    ``model_weights="trainable"`` (default) saves only the PEFT parameters (and other trainable
    ones): the frozen base weights must then come from the same pretrained model on resume.
    ``"full"`` saves every parameter. Offloaded optimizer state is put back into the optimizer
    for the save and released again afterwards; dropped state is absent, as in the running job.
    """
    if model_weights not in MODEL_WEIGHTS:
        raise ISTConfigError(f"model_weights must be one of {', '.join(MODEL_WEIGHTS)}, got {model_weights!r}")
    checkpoint_dir = os.fspath(checkpoint_dir)
    gate = _gate(run)
    if gate is not None:
        gate.store.restore_all(run.optimizer.state)
    try:
        # DCP initialises an empty optimizer state with a dummy step on every parameter that
        # requires grad; with none requiring grad that step does nothing.
        with _requires_grad(run.optimizer, False):
            model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
        if model_weights == "trainable":
            names = {n for n, _ in run.trainable_named_params()}
            missing = names - set(model_sd)
            if missing:
                raise RuntimeError(f"trainable parameters missing from the model state dict: {sorted(missing)[:4]}")
            model_sd = {k: v for k, v in model_sd.items() if k in names}
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir,
                 process_group=_group(run))
        # Each rank's RNG states (dropout): without them a resumed run draws other masks.
        atomic_torch_save(rng_state(), os.path.join(checkpoint_dir, rng_file(run.rank)))
        _barrier(run)
        if run.rank == 0:
            remove_stale_tmp(checkpoint_dir)  # left by an interrupted save; nobody writes now
            state = {
                "format": CHECKPOINT_FORMAT,
                "world_size": run.world_size,
                "model_weights": model_weights,
                "ist": run.controller.state_dict() if run.controller is not None else None,
                "lr_scheduler": run.lr_scheduler.state_dict() if run.lr_scheduler is not None else None,
            }
            atomic_torch_save(state, os.path.join(checkpoint_dir, IST_STATE_FILE))
        _barrier(run)
        write_manifest(checkpoint_dir, run.comm, run.config.verify_engine_files)
        _barrier(run)
    finally:
        if gate is not None:
            gate.select(run.controller.selected)
    logger.info("saved checkpoint %s (step %s, model weights: %s)", checkpoint_dir,
                run.controller.step if run.controller is not None else "?", model_weights)


def load_checkpoint(run, checkpoint_dir: str | os.PathLike) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``run``. Call on every rank.

    The world size may differ from the saving job's (DCP reshards the DTensors). The IST state
    (scores, step, selection, generator and scoring-stream position) is restored exactly, so the
    run continues as the saved one would have, given the same data order.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    state_path = os.path.join(checkpoint_dir, IST_STATE_FILE)
    if not os.path.isfile(state_path):
        raise ISTCheckpointError(f"{checkpoint_dir} is not an ist_ds FSDP checkpoint (no {IST_STATE_FILE})")
    # Every rank checks its share of the files; all raise the same error before anything is loaded.
    verify_checkpoint(checkpoint_dir, run.comm, run.config.verify_engine_files)
    state = safe_load(state_path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ISTCheckpointError(f"{state_path}: unsupported checkpoint format {state.get('format')!r}"
                                 if isinstance(state, dict) else f"{state_path}: not an IST state")
    if (state["ist"] is None) != (run.controller is None):
        raise ISTCheckpointError(
            f"{checkpoint_dir} was written with IST {'off' if state['ist'] is None else 'on'}, "
            f"but this run has IST {'off' if run.controller is None else 'on'}")
    if run.controller is not None:
        saved_layers = state["ist"].get("num_layers") if isinstance(state["ist"], dict) else None
        if saved_layers != run.controller.num_layers:
            raise ISTCheckpointError(f"{checkpoint_dir} was written for a model with {saved_layers} IST layers, "
                                     f"this model has {run.controller.num_layers}")
    saved = set(FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata)
    missing = sorted(n for n, _ in run.trainable_named_params() if f"model.{n}" not in saved)
    if missing:
        raise ISTCheckpointError(f"{checkpoint_dir} lacks trainable parameters of this model, e.g. {missing[:3]}; "
                                 "was it written for another model or PEFT config?")

    # From here on the optimizer is rebuilt from the checkpoint; a failure leaves the run unusable.
    gate = _gate(run)
    if gate is not None:
        gate.store.restore_all(run.optimizer.state)
    run.optimizer.zero_grad(set_to_none=True)
    run.optimizer.state.clear()
    # A template of the right shapes and shardings: DCP's dummy step (lr 0, zero gradients)
    # creates state for every parameter that requires grad and whose group the gate lets through.
    with _requires_grad(run.optimizer, True), _all_groups_open(gate):
        model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
        model_sd = {k: v for k, v in model_sd.items() if f"model.{k}" in saved}
        optim_sd["state"] = {fqn: entry for fqn, entry in optim_sd["state"].items()
                             if any(f"optim.state.{fqn}.{key}" in saved for key in entry)}
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir,
                 planner=SafeLoadPlanner(), process_group=_group(run))
        # strict=False: base weights (model_weights="trainable") and the optimizer state of layers
        # that had none at the save (dropped, or never trained) are legitimately absent.
        options = StateDictOptions(strict=False)
        set_model_state_dict(run.model, model_sd, options=options)
        set_optimizer_state_dict(run.model, run.optimizer, optim_sd, options=options)
    if run.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.controller is not None:
        run.controller.load_state_dict(state["ist"])  # re-applies requires_grad and releases state
    rng_path = os.path.join(checkpoint_dir, rng_file(run.rank))
    if os.path.isfile(rng_path):
        set_rng_state(safe_load(rng_path))
    elif state["world_size"] == run.world_size:
        raise ISTCheckpointError(f"{rng_path} is missing")
    else:
        logger.warning("checkpoint written by %d ranks: rank %d has no saved RNG state (dropout masks will "
                       "differ from an uninterrupted run)", state["world_size"], run.rank)
    logger.info("loaded checkpoint %s (saved by %d ranks, loaded by %d; IST step %s)", checkpoint_dir,
                state["world_size"], run.world_size,
                run.controller.step if run.controller is not None else "-")


def _gate(run) -> OptimizerGate | None:
    return run.controller.gate if run.controller is not None else None


def _group(run):
    return getattr(run.comm, "group", None)


def _barrier(run) -> None:
    if run.world_size > 1:
        dist.barrier(group=_group(run))


@contextlib.contextmanager
def _requires_grad(optimizer: torch.optim.Optimizer, flag: bool) -> Iterator[None]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, was in zip(params, before):
            p.requires_grad_(was)


@contextlib.contextmanager
def _all_groups_open(gate: OptimizerGate | None) -> Iterator[None]:
    if gate is None:
        yield
        return
    selected = gate.selected
    gate.selected = frozenset(gate.all_layers)
    try:
        yield
    finally:
        gate.selected = selected



__all__ = ["SafeLoadPlanner", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "MODEL_WEIGHTS"]
