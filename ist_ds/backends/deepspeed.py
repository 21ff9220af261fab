"""IST on DeepSpeed: ``ist_ds.initialize`` is ``deepspeed.initialize`` plus an ``ist`` config block.

What it does around ``deepspeed.initialize``:

1. reads the ``ist`` block out of the DeepSpeed config and validates it against the model's layer
   count before anything starts (DeepSpeed never sees the block);
2. regroups the optimizer's parameters into one param group per transformer layer, tagged with the
   layer index (DeepSpeed keeps extra keys in group dicts), keeping the caller's group options;
3. after DeepSpeed built its engine, wraps the *basic* optimizer (``engine.basic_optimizer``: the
   torch or DeepSpeed optimizer that ZeRO, the bf16 optimizer or plain stage 0 call) with an
   :class:`~ist_ds.optim.gate.OptimizerGate`, so unselected layers' groups are not stepped;
4. wraps ``engine.step`` so that after each real optimizer step (``engine.global_steps`` moved;
   micro-steps of gradient accumulation do nothing) the controller runs the importance update,
   draws the next selection, sets ``requires_grad`` for it and moves optimizer state;
   A step DeepSpeed skips (fp16 overflow: ``engine.skipped_steps`` moved) does not count for IST;
5. wraps ``save_checkpoint`` / ``load_checkpoint``: offloaded optimizer state is put back into the
   optimizer for the save, the IST state and per-rank RNG states are written beside DeepSpeed's
   files, a checksum manifest of every file and then ``latest`` are published last and atomically;
   a load first verifies the manifest on every rank together, refuses another world size, and reads
   every file as plain data (see :mod:`ist_ds.runtime.checkpoint`).

Setups IST cannot run correctly (partial or NVMe offload, pipeline parallelism) are refused at
``initialize`` (:mod:`ist_ds.backends.deepspeed_support`).

The caller's loop (``loss = engine(**batch).loss; engine.backward(loss); engine.step()``) is
unchanged. See docs/deepspeed.md for the DeepSpeed internals this relies on.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import os
from typing import Any, Callable

import torch

from ist_ds.backends import zero3_linear
from ist_ds.backends.deepspeed_support import refuse_unsupported
from ist_ds.backends.zero_memory import ZeroMemory, install_zero_memory
from ist_ds.runtime.checkpoint import (IST_STATE_FILE, atomic_torch_save, check_world_size, publish_latest, read_latest,
                                remove_stale_tmp, rng_file, rng_state, safe_load, set_rng_state, verify_checkpoint,
                                write_manifest)
from ist_ds.runtime.collectives import default_collectives
from ist_ds.compat import deepspeed as ds_compat
from ist_ds.runtime.controller import ISTController, ISTView
from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTCheckpointError, ISTConfigError
from ist_ds.model.layers import LayerMap, discover_for, set_trainable
from ist_ds.optim.gate import LAYER_KEY
from ist_ds.model.param_groups import layer_param_groups
from ist_ds.runtime.build import build_controller

logger = logging.getLogger(__name__)


def read_ds_config(config: str | dict | None) -> dict:
    """A DeepSpeed config as a fresh dict, from a dict or a JSON file path."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                return json.load(f)
        except FileNotFoundError:
            raise ISTConfigError(f"DeepSpeed config file not found: {config}") from None
        except json.JSONDecodeError as e:
            raise ISTConfigError(f"DeepSpeed config {config} is not valid JSON: {e}") from None
    raise ISTConfigError(f"the DeepSpeed config must be a dict or a JSON path, got {type(config).__name__}")


def split_ist_block(ds_config: dict) -> tuple[ISTConfig, dict]:
    """Validate and remove the ``ist`` block; returns (IST config, DeepSpeed config without it)."""
    ds_config = dict(ds_config)
    block = ds_config.pop("ist", None)
    return ISTConfig.from_dict(block), ds_config


class DeepSpeedIST(ISTView):
    """The IST state of a DeepSpeed engine, exposed as ``engine.ist``."""

    def __init__(self, engine, controller: ISTController) -> None:
        super().__init__(controller)
        self.engine = engine
        self.skipped_steps = 0  # optimizer steps DeepSpeed skipped (overflow) that IST did not count

    @property
    def zero_memory(self) -> ZeroMemory | None:
        """The ZeRO adapter that parks masters and elides gradient partitions (None on stage 0)."""
        return next((m for m in self.controller.gate.memories if isinstance(m, ZeroMemory)), None)

    # ------------------------------------------------------------------ checkpoints
    @contextlib.contextmanager
    def _all_trainable(self):
        """Every PEFT parameter requires grad, as when DeepSpeed built its buffers.

        DeepSpeed records (and on load looks up) parameter names and shapes only for parameters that
        require grad, so a save or load in the middle of IST must see all of them trainable.
        """
        set_trainable(self.layer_map, range(self.layer_map.num_layers))
        try:
            yield
        finally:
            set_trainable(self.layer_map, self.controller.selected)

    def save_checkpoint(self, save, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        """DeepSpeed's save, then per-rank RNG, then (rank 0) the IST state and ``latest``, published last."""
        import torch.distributed as dist

        engine, gate = self.engine, self.controller.gate
        tag = str(tag) if tag is not None else f"global_step{ds_compat.global_steps(engine)}"
        gate.restore_all()  # DeepSpeed saves what the optimizer holds: moments and masters back in place
        with self._all_trainable():
            out = save(save_dir, tag=tag, client_state=dict(client_state or {}), save_latest=False, **kwargs)
        gate.select(self.controller.selected)
        tag_dir = os.path.join(save_dir, tag)
        rank = dist.get_rank() if dist.is_initialized() else 0
        atomic_torch_save(rng_state(), os.path.join(tag_dir, rng_file(rank)))
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            remove_stale_tmp(save_dir)  # left by an earlier, interrupted save; nobody writes now
            state = self.controller.state_dict()
            state["world_size"] = ds_compat.data_parallel_world_size(engine)  # ZeRO files load only at this world size
            atomic_torch_save(state, os.path.join(tag_dir, IST_STATE_FILE))
        if dist.is_initialized():
            dist.barrier()
        write_manifest(tag_dir, self.controller.comm, self.config.verify_engine_files)  # before 'latest'
        if rank == 0 and save_latest:
            publish_latest(save_dir, tag)
        if dist.is_initialized():
            dist.barrier()
        return out

    def load_checkpoint(self, load, load_dir, tag=None, **kwargs):
        """Load a checkpoint written by :meth:`save_checkpoint`: safely, and only if it fits this run.

        Returns DeepSpeed's ``(load_path, client_state)``; ``(None, None)`` when there is no checkpoint.
        The IST state is checked against this model before DeepSpeed touches the engine.
        """
        import torch.distributed as dist

        if tag is None:
            tag = read_latest(load_dir)
            if tag is None:
                logger.warning("no checkpoint in %s ('latest' is missing)", load_dir)
                return None, None
        tag_dir = os.path.join(load_dir, str(tag))
        # Every rank checks its share of the files; all raise the same error before anything is loaded.
        verify_checkpoint(tag_dir, self.controller.comm, self.config.verify_engine_files)
        ist_state = safe_load(os.path.join(tag_dir, IST_STATE_FILE))
        check_world_size(tag_dir, ist_state.get("world_size"), ds_compat.data_parallel_world_size(self.engine))
        # DeepSpeed loads into the optimizer's tensors in place: every master and moment must be there.
        self.controller.gate.restore_all()
        if int(ist_state.get("num_layers", -1)) != self.controller.num_layers:
            raise ISTCheckpointError(f"{tag_dir} was written for a model with {ist_state.get('num_layers')} IST "
                                     f"layers; this model has {self.controller.num_layers}")
        try:
            with self._all_trainable():
                load_path, client_state = load(load_dir, tag=tag, **kwargs)
        except ISTCheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, AssertionError, EOFError, OSError) as e:
            raise ISTCheckpointError(f"{tag_dir} does not fit this model or is damaged: {type(e).__name__}: "
                                     f"{str(e)[:500]}") from e
        if load_path is None:
            raise ISTCheckpointError(f"DeepSpeed found no checkpoint files in {tag_dir}")
        self.controller.load_state_dict(ist_state)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_path = os.path.join(tag_dir, rng_file(rank))
        if os.path.isfile(rng_path):
            set_rng_state(safe_load(rng_path))
        return load_path, client_state

    # ------------------------------------------------------------------ engine wrappers
    def _install(self) -> None:
        engine = self.engine
        step, save, load = engine.step, engine.save_checkpoint, engine.load_checkpoint

        @functools.wraps(step)
        def ist_step(*args, **kwargs):
            before, skipped = ds_compat.global_steps(engine), ds_compat.skipped_steps(engine)
            out = step(*args, **kwargs)
            if ds_compat.global_steps(engine) != before:
                if ds_compat.skipped_steps(engine) != skipped:
                    # fp16 loss scaling found inf/nan gradients and DeepSpeed skipped the update: nothing
                    # trained, so IST neither counts the step nor moves on (same selection, same schedule).
                    self.skipped_steps += 1
                    logger.info("optimizer step %d skipped by DeepSpeed (gradient overflow); IST keeps step %d "
                                "and layers %s", before, self.controller.step, self.controller.selected)
                else:
                    self.controller.after_optimizer_step()
            return out

        @functools.wraps(save)
        def ist_save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
            return self.save_checkpoint(save, save_dir, tag, client_state, save_latest, **kwargs)

        @functools.wraps(load)
        def ist_load_checkpoint(load_dir, tag=None, **kwargs):
            return self.load_checkpoint(load, load_dir, tag, **kwargs)

        # DeepSpeed reads its own files with weights_only=False; read them as plain data instead.
        ds_compat.set_checkpoint_loader(engine, safe_load)
        engine.step = ist_step
        engine.save_checkpoint = ist_save_checkpoint
        engine.load_checkpoint = ist_load_checkpoint


def _regroup_optimizer(optimizer, layer_map: LayerMap):
    """Rebuild a client optimizer with one param group per layer (same class, same defaults)."""
    if optimizer.state:
        raise ISTConfigError("pass ist_ds.initialize an optimizer that has not stepped yet "
                             "(its state cannot be carried into the per-layer param groups)")
    groups = layer_param_groups(layer_map, optimizer.param_groups)
    logger.info("rebuilding %s with %d per-layer param groups", type(optimizer).__name__, len(groups))
    # Each group carries the caller's options; the constructor gets the defaults it accepts.
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, distributed_port: int | None = None, mpu=None,
               dist_init_required: bool | None = None, collate_fn: Callable | None = None,
               config: str | dict | None = None, mesh_param=None, config_params: str | dict | None = None,
               *, scoring_data=None, scoring_collate_fn: Callable | None = None):
    """``deepspeed.initialize`` with IST; same arguments, same returned tuple.

    The IST settings come from the ``ist`` block of the DeepSpeed config. ``scoring_data`` (a map-style
    dataset) feeds the importance update, by default ``training_data``; ``scoring_collate_fn`` by
    default ``collate_fn``. The returned engine carries :class:`DeepSpeedIST` as ``engine.ist``.
    """
    import deepspeed

    from_args = config is None and config_params is None and getattr(args, "deepspeed_config", None)
    raw = from_args or (config if config is not None else config_params)
    ist_config, ds_config = split_ist_block(read_ds_config(raw))
    if from_args:  # DeepSpeed refuses a config both in args and as an argument
        args = copy.copy(args)
        args.deepspeed_config = None

    ds_kwargs = dict(args=args, model=model, lr_scheduler=lr_scheduler, mpu=mpu,
                     dist_init_required=dist_init_required, collate_fn=collate_fn,
                     training_data=training_data, config=ds_config, mesh_param=mesh_param)
    if distributed_port is not None:
        ds_kwargs["distributed_port"] = distributed_port
    if not ist_config.enabled:
        return deepspeed.initialize(optimizer=optimizer, model_parameters=model_parameters, **ds_kwargs)

    if model is None:
        raise ISTConfigError("ist_ds.initialize needs the model")
    refuse_unsupported(ds_config, model, mpu)
    layer_map = discover_for(model, ist_config)
    ist_config.resolve(layer_map.num_layers)
    scoring_dataset = scoring_data if scoring_data is not None else training_data
    if ist_config.strategy == "ist" and scoring_dataset is None:
        raise ISTConfigError("strategy 'ist' needs scoring data: pass scoring_data= (or training_data=)")
    if optimizer is None and "optimizer" not in ds_config:
        raise ISTConfigError("IST needs an optimizer: pass optimizer= or name one in the DeepSpeed config")

    groups = layer_param_groups(layer_map, model_parameters)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = _regroup_optimizer(optimizer, layer_map)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        optimizer=optimizer, model_parameters=groups, **ds_kwargs)

    inner = ds_compat.basic_optimizer(engine)
    if inner is None or not any(LAYER_KEY in g for g in inner.param_groups):
        raise RuntimeError("DeepSpeed did not keep IST's per-layer param groups; this DeepSpeed version "
                           f"({deepspeed.__version__}) is not supported")
    collectives = default_collectives()
    controller = build_controller(
        engine.module, ist_config, inner, layer_map, scoring_dataset,
        scoring_collate_fn or collate_fn, engine.device, collectives, rank=collectives.rank)
    install_zero_memory(engine, controller, ist_config, collectives.rank)
    if engine.zero_optimization_stage() == 3:
        zero3_linear.install()  # frozen linears stop saving their inputs for backward
    hook = DeepSpeedIST(engine, controller)
    hook._install()
    engine.ist = hook
    controller.start()
    logger.info("IST on DeepSpeed (ZeRO stage %d): %d layers, %d trained per step, strategy %s, optimizer state %s",
                engine.zero_optimization_stage(), layer_map.num_layers, controller.importance.num_train,
                ist_config.strategy, ist_config.optimizer_state)
    return engine, ds_optimizer, dataloader, scheduler
