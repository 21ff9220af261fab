"""IST on PyTorch FSDP2: :func:`setup` shards a PEFT model with ``fully_shard`` and wires IST around it.

What :func:`setup` does, in order:

1. validates the ``ist`` block (the same schema and errors as the DeepSpeed backend's) against the
   model's transformer blocks, found with :func:`~ist_ds.model.layers.discover_for` (PEFT or full mode);
2. optionally applies activation checkpointing to every block (``torch.distributed._composable
   .checkpoint``, which keeps parameter names unchanged);
3. calls ``fully_shard`` on every transformer block, then on the root, over a 1-D device mesh
   (``mixed_precision`` is FSDP2's :class:`~torch.distributed.fsdp.MixedPrecisionPolicy`);
4. discovers the layers again: ``fully_shard`` replaces every parameter by a DTensor parameter, and
   the optimizer, the optimizer gate and ``requires_grad`` switching must all see the new objects;
5. runs FSDP2's lazy initialisation while every PEFT parameter is still trainable. FSDP2 fixes the
   gradient and reduce dtypes of a block at that moment from the parameters that require grad; a
   block frozen then would later reduce its gradients in the parameter dtype (bf16 under mixed
   precision) and fail when IST selects it;
6. builds the optimizer (torch AdamW by default) with one param group per layer, wraps it with the
   :class:`~ist_ds.optim.gate.OptimizerGate` through :func:`~ist_ds.backends.single.build_controller`,
   and draws the first selection.

Freezing under FSDP2 is exact: a parameter with ``requires_grad=False`` gets no unsharded gradient,
so FSDP2 reduce-scatters nothing for it and its sharded ``grad`` stays ``None``; torch AdamW skips
it, and the gate additionally hides the groups of unselected layers, so neither weight decay nor
Adam's moments touch them. FSDP2 copies ``requires_grad`` from the sharded to the unsharded parameter
at every all-gather, so switching it between steps takes effect at the next forward.

The caller's loop is ordinary FSDP2 code plus one call::

    run = setup(model, ist_block, scoring_data=train_ds, collate_fn=collate)
    for batch in loader:
        run.model(**batch).loss.backward()
        run.step()      # clip, optimizer step, zero_grad, then IST picks the next step's layers

Checkpoints (:meth:`FSDPIST.save_checkpoint` / :meth:`FSDPIST.load_checkpoint`) are
``torch.distributed.checkpoint`` directories holding the sharded model and optimizer state plus one
small ``ist_state.pt`` with the IST state (and the LR scheduler's, written by rank 0), each rank's RNG
state (``rng_rank<r>.pt``) and a checksum manifest verified before anything is loaded
(:mod:`ist_ds.runtime.checkpoint`); docs/fsdp.md describes the layout and resharding.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
from typing import Any, Callable, Iterator, Mapping

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
from torch.distributed.fsdp import FSDPModule, fully_shard

from ist_ds.runtime.checkpoint import (IST_STATE_FILE, atomic_torch_save, remove_stale_tmp, rng_file, rng_state, safe_load,
                                set_rng_state, verify_checkpoint, write_manifest)
from ist_ds.runtime.collectives import LocalCollectives, TorchCollectives
from ist_ds.runtime.controller import ISTController, ISTView
from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTCheckpointError, ISTConfigError, ISTModelError
from ist_ds.model.layers import LayerMap, discover_for
from ist_ds.optim.gate import LAYER_KEY, OptimizerGate
from ist_ds.optim.state_store import live_state_bytes
from ist_ds.model.param_groups import layer_param_groups
from ist_ds.runtime.build import build_controller

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
MODEL_WEIGHTS = ("trainable", "full")


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class FSDPISTView(ISTView):
    """The IST state of an FSDP2 run, exposed as ``FSDPIST.ist``."""

    def memory_report(self) -> dict:
        """Bytes on this rank: optimizer state by location, and the parameters that train now.

        ``optimizer_state_bytes`` counts the local shards of the optimizer's DTensor state
        (``live_cpu``/``live_cuda``) and what the state store holds (``offloaded_host``,
        ``offloaded_disk``). ``trainable_param_bytes`` is this rank's shard of the parameters that
        train in the current step (selected layers plus parameters outside the blocks);
        ``trainable_param_bytes_unsharded`` is their full size.
        """
        report = self.controller.memory_report()
        params = self.layer_map.parameters_of(self.controller.selected) + [p for _, p in self.layer_map.outside_params]
        report["trainable_param_bytes_unsharded"] = sum(p.numel() * p.element_size() for p in params)
        report["trainable_param_bytes"] = sum(_local_bytes(p) for p in params)
        return report


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


class FSDPIST:
    """A PEFT model sharded with FSDP2, its optimizer, and IST around them. Built by :func:`setup`.

    Attributes: ``model`` (the sharded model; run forwards and ``backward`` on it), ``optimizer``
    (per-layer param groups, gated), ``ist`` (an :class:`FSDPISTView`, or ``None`` when the ``ist``
    block is disabled), ``lr_scheduler`` (or ``None``), ``mesh``, ``device``, ``layer_map``,
    ``config``, ``rank``, ``world_size``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: ISTConfig,
                 layer_map: LayerMap, controller: ISTController | None, mesh, device: torch.device,
                 collectives, max_grad_norm: float | None, lr_scheduler=None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.layer_map = layer_map
        self.controller = controller
        self.ist = FSDPISTView(controller) if controller is not None else None
        self.mesh = mesh
        self.device = device
        self.comm = collectives
        self.rank = collectives.rank
        self.world_size = collectives.world_size
        self.max_grad_norm = max_grad_norm
        self.lr_scheduler = lr_scheduler
        self.last_grad_norm: float | None = None

    # ------------------------------------------------------------------ training
    def step(self) -> float | None:
        """One optimizer step: clip (if ``max_grad_norm``), step, LR scheduler step, ``zero_grad``, IST.

        Call it on every rank after the backward pass(es) of one global batch. Returns the total
        gradient norm before clipping when clipping is on, else ``None``.
        """
        norm = None
        if self.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            total = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.controller is not None:
            self.controller.after_optimizer_step()
        self.last_grad_norm = norm
        return norm

    def to_device(self, batch: Mapping[str, Any]) -> dict:
        """``batch`` with its tensors moved to this rank's device."""
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def memory_report(self) -> dict:
        """See :meth:`FSDPISTView.memory_report`; without IST, the optimizer's live state bytes only."""
        if self.ist is not None:
            return self.ist.memory_report()
        return {"optimizer_state_bytes": {f"live_{k}": v for k, v in live_state_bytes(self.optimizer.state).items()}}

    def full_trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable (PEFT) parameter gathered to a full CPU tensor, keyed by its name.

        A collective: call it on every rank. Base weights are not gathered.
        """
        out = {}
        for name, p in self._trainable_named_params():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu().clone()
        return out

    def _trainable_named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [np for layer in self.layer_map.layers for np in layer.params] + list(self.layer_map.outside_params)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint_dir: str | os.PathLike, *, model_weights: str = "trainable") -> None:
        """Write a DCP checkpoint of the model, the optimizer and the IST state. Call on every rank.

        ``model_weights="trainable"`` (default) saves only the PEFT parameters (and other trainable
        ones): the frozen base weights must then come from the same pretrained model on resume.
        ``"full"`` saves every parameter. Offloaded optimizer state is put back into the optimizer
        for the save and released again afterwards; dropped state is absent, as in the running job.
        """
        if model_weights not in MODEL_WEIGHTS:
            raise ISTConfigError(f"model_weights must be one of {', '.join(MODEL_WEIGHTS)}, got {model_weights!r}")
        checkpoint_dir = os.fspath(checkpoint_dir)
        gate = self._gate()
        if gate is not None:
            gate.store.restore_all(self.optimizer.state)
        try:
            # DCP initialises an empty optimizer state with a dummy step on every parameter that
            # requires grad; with none requiring grad that step does nothing.
            with _requires_grad(self.optimizer, False):
                model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            if model_weights == "trainable":
                names = {n for n, _ in self._trainable_named_params()}
                missing = names - set(model_sd)
                if missing:
                    raise RuntimeError(f"trainable parameters missing from the model state dict: {sorted(missing)[:4]}")
                model_sd = {k: v for k, v in model_sd.items() if k in names}
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir,
                     process_group=self._group())
            # Each rank's RNG states (dropout): without them a resumed run draws other masks.
            atomic_torch_save(rng_state(), os.path.join(checkpoint_dir, rng_file(self.rank)))
            self._barrier()
            if self.rank == 0:
                remove_stale_tmp(checkpoint_dir)  # left by an interrupted save; nobody writes now
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "world_size": self.world_size,
                    "model_weights": model_weights,
                    "ist": self.controller.state_dict() if self.controller is not None else None,
                    "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                }
                atomic_torch_save(state, os.path.join(checkpoint_dir, IST_STATE_FILE))
            self._barrier()
            write_manifest(checkpoint_dir, self.comm, self.config.verify_engine_files)
            self._barrier()
        finally:
            if gate is not None:
                gate.select(self.controller.selected)
        logger.info("saved checkpoint %s (step %s, model weights: %s)", checkpoint_dir,
                    self.controller.step if self.controller is not None else "?", model_weights)

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`. Call on every rank.

        The world size may differ from the saving job's (DCP reshards the DTensors). The IST state
        (scores, step, selection, generator and scoring-stream position) is restored exactly, so the
        run continues as the saved one would have, given the same data order.
        """
        checkpoint_dir = os.fspath(checkpoint_dir)
        state_path = os.path.join(checkpoint_dir, IST_STATE_FILE)
        if not os.path.isfile(state_path):
            raise ISTCheckpointError(f"{checkpoint_dir} is not an ist_ds FSDP checkpoint (no {IST_STATE_FILE})")
        # Every rank checks its share of the files; all raise the same error before anything is loaded.
        verify_checkpoint(checkpoint_dir, self.comm, self.config.verify_engine_files)
        state = safe_load(state_path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ISTCheckpointError(f"{state_path}: unsupported checkpoint format {state.get('format')!r}"
                                     if isinstance(state, dict) else f"{state_path}: not an IST state")
        if (state["ist"] is None) != (self.controller is None):
            raise ISTCheckpointError(
                f"{checkpoint_dir} was written with IST {'off' if state['ist'] is None else 'on'}, "
                f"but this run has IST {'off' if self.controller is None else 'on'}")
        if self.controller is not None:
            saved_layers = state["ist"].get("num_layers") if isinstance(state["ist"], dict) else None
            if saved_layers != self.controller.num_layers:
                raise ISTCheckpointError(f"{checkpoint_dir} was written for a model with {saved_layers} IST layers, "
                                         f"this model has {self.controller.num_layers}")
        saved = set(FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata)
        missing = sorted(n for n, _ in self._trainable_named_params() if f"model.{n}" not in saved)
        if missing:
            raise ISTCheckpointError(f"{checkpoint_dir} lacks trainable parameters of this model, e.g. {missing[:3]}; "
                                     "was it written for another model or PEFT config?")

        # From here on the optimizer is rebuilt from the checkpoint; a failure leaves the run unusable.
        gate = self._gate()
        if gate is not None:
            gate.store.restore_all(self.optimizer.state)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        # A template of the right shapes and shardings: DCP's dummy step (lr 0, zero gradients)
        # creates state for every parameter that requires grad and whose group the gate lets through.
        with _requires_grad(self.optimizer, True), _all_groups_open(gate):
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            model_sd = {k: v for k, v in model_sd.items() if f"model.{k}" in saved}
            optim_sd["state"] = {fqn: entry for fqn, entry in optim_sd["state"].items()
                                 if any(f"optim.state.{fqn}.{key}" in saved for key in entry)}
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir,
                     planner=SafeLoadPlanner(), process_group=self._group())
            # strict=False: base weights (model_weights="trainable") and the optimizer state of layers
            # that had none at the save (dropped, or never trained) are legitimately absent.
            options = StateDictOptions(strict=False)
            set_model_state_dict(self.model, model_sd, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, optim_sd, options=options)
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.controller is not None:
            self.controller.load_state_dict(state["ist"])  # re-applies requires_grad and releases state
        rng_path = os.path.join(checkpoint_dir, rng_file(self.rank))
        if os.path.isfile(rng_path):
            set_rng_state(safe_load(rng_path))
        elif state["world_size"] == self.world_size:
            raise ISTCheckpointError(f"{rng_path} is missing")
        else:
            logger.warning("checkpoint written by %d ranks: rank %d has no saved RNG state (dropout masks will "
                           "differ from an uninterrupted run)", state["world_size"], self.rank)
        logger.info("loaded checkpoint %s (saved by %d ranks, loaded by %d; IST step %s)", checkpoint_dir,
                    state["world_size"], self.world_size,
                    self.controller.step if self.controller is not None else "-")

    # ------------------------------------------------------------------ helpers
    def _gate(self) -> OptimizerGate | None:
        return self.controller.gate if self.controller is not None else None

    def _group(self):
        return getattr(self.comm, "group", None)

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._group())


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


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and "MASTER_ADDR" not in os.environ:  # one process, no launcher: a private group
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
    if device_type == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return init_device_mesh(device_type, (world,))


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def _collectives(mesh):
    if mesh.size() == 1:
        return LocalCollectives()
    if mesh.ndim == 1:
        return TorchCollectives(mesh.get_group())
    if mesh.size() == dist.get_world_size():  # e.g. HSDP (replicate, shard): every rank is data-parallel
        return TorchCollectives()
    raise ISTConfigError("IST on FSDP2 needs a 1-D device mesh, or a mesh that spans every rank "
                         f"(got a {mesh.ndim}-D mesh of {mesh.size()} of {dist.get_world_size()} ranks)")


def _shard(model: torch.nn.Module, layer_map: LayerMap, mesh, mixed_precision, activation_checkpointing: bool,
           reshard_after_forward: bool, fsdp_kwargs: dict) -> None:
    kwargs = dict(fsdp_kwargs)
    kwargs["mesh"] = mesh
    kwargs.setdefault("reshard_after_forward", reshard_after_forward)
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision
    if activation_checkpointing and _hf_checkpointing_on(model):
        # Hugging Face's gradient checkpointing already recomputes every block; a second wrapper
        # would recompute each block twice in the backward pass.
        logger.info("activation checkpointing: the model's own (Hugging Face) gradient checkpointing is on; "
                    "not adding a second wrapper per block")
        activation_checkpointing = False
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        _disable_kv_cache(model)
        for layer in layer_map.layers:
            checkpoint(layer.module)
    for layer in layer_map.layers:
        fully_shard(layer.module, **kwargs)
    fully_shard(model, **kwargs)


def _hf_checkpointing_on(model: torch.nn.Module) -> bool:
    """True when a Hugging Face model (or a PEFT model around one) has gradient checkpointing enabled."""
    return any(getattr(m, "is_gradient_checkpointing", False) is True or getattr(m, "gradient_checkpointing", False) is True
               for m in model.modules())


def _disable_kv_cache(model: torch.nn.Module) -> None:
    """Turn off Hugging Face's KV cache: a recomputed block would append its keys to it a second time."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False
            logger.info("activation checkpointing: set %s.config.use_cache = False", type(module).__name__)


def _lazy_init(model: torch.nn.Module) -> None:
    """Run FSDP2's lazy initialisation now (it otherwise runs at the first forward)."""
    try:
        state = model._get_fsdp_state()
        state._lazy_init()
    except AttributeError:  # a torch without this (private) entry point
        logger.warning("could not run FSDP2's lazy initialisation early; with a MixedPrecisionPolicy, "
                       "layers IST freezes before the first forward may reduce gradients in the wrong dtype")


def setup(model: torch.nn.Module, ist_config: ISTConfig | Mapping[str, Any] | None, *, mesh=None,
          optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
          lr: float = 2e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, max_grad_norm: float | None = None, mixed_precision=None,
          activation_checkpointing: bool = False, reshard_after_forward: bool = True,
          fsdp_kwargs: Mapping[str, Any] | None = None, scoring_data=None,
          collate_fn: Callable | None = None, scoring_forward: Callable | None = None,
          lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None) -> FSDPIST:
    """Shard a PEFT model with FSDP2 and set up IST; returns an :class:`FSDPIST`.

    Args:
        model: a PEFT model (``peft.get_peft_model`` or injected adapters), not yet sharded, with
            ``requires_grad`` as it comes from PEFT. A model that is already an FSDP2 module is
            used as it is (then ``mixed_precision``/``activation_checkpointing`` must be left unset);
            shard its transformer blocks separately for IST to save communication.
        ist_config: the ``ist`` block (a mapping or :class:`~ist_ds.core.ISTConfig`); the same
            schema, defaults and validation as the DeepSpeed backend's. ``None`` or
            ``enabled: false`` gives plain FSDP2 with the same optimizer and checkpoints.
        mesh: a 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` (default: every rank, on
            CUDA when available, else CPU; the default process group is created from the launcher's
            environment if needed).
        optimizer_factory: ``factory(param_groups) -> optimizer``; the groups are one per layer,
            tagged ``ist_layer``. Default: ``torch.optim.AdamW`` with ``lr``, ``betas``, ``eps``,
            ``weight_decay`` (used by the default optimizer only).
        max_grad_norm: clip the total gradient norm in :meth:`FSDPIST.step` (``None``: no clipping).
        mixed_precision: an FSDP2 ``MixedPrecisionPolicy``, e.g. ``MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``.
        activation_checkpointing: recompute each transformer block in the backward pass.
        reshard_after_forward, fsdp_kwargs: passed to every ``fully_shard`` call.
        scoring_data: map-style dataset of examples for the importance update (required for
            ``strategy: ist``; usually the training set); ``collate_fn`` turns a list of them into a
            batch with ``labels``. ``scoring_forward(model, batch) -> logits`` overrides the forward.
        lr_scheduler_factory: ``factory(optimizer) -> scheduler``, stepped by :meth:`FSDPIST.step`
            and saved in checkpoints.

    Raises :class:`~ist_ds.core.errors.ISTConfigError` for a bad ``ist`` block or arguments and
    :class:`~ist_ds.core.errors.ISTModelError` for a model without PEFT adapters, before any sharding.
    """
    config = ist_config if isinstance(ist_config, ISTConfig) else ISTConfig.from_dict(ist_config)
    if config.target == "full" and config.full_suppression == "delta":
        # Discovery refuses delta only once the blocks are DTensors; refuse it here, before sharding,
        # so that a bad block leaves the caller's model as it was.
        raise ISTConfigError("full_suppression: delta is not supported on FSDP2 (it writes W0 + lambda (W - W0) "
                             "into sharded weights); use full_suppression: residual")
    before = discover_for(model, config)
    if config.enabled:
        config.resolve(before.num_layers)
        if config.strategy == "ist" and scoring_data is None:
            raise ISTConfigError("strategy 'ist' needs scoring data: pass scoring_data= (usually the training set)")
    fsdp_kwargs = dict(fsdp_kwargs or {})
    if "mesh" in fsdp_kwargs or "mp_policy" in fsdp_kwargs:
        raise ISTConfigError("pass the mesh and the mixed-precision policy as mesh= and mixed_precision=, "
                             "not in fsdp_kwargs")

    if mesh is None:
        mesh = _default_mesh()
    if isinstance(model, FSDPModule):
        if mixed_precision is not None or activation_checkpointing or fsdp_kwargs:
            raise ISTConfigError("the model is already sharded with fully_shard; apply mixed precision, "
                                 "activation checkpointing and FSDP options where you sharded it")
        logger.info("model is already an FSDP2 module; using its sharding as it is")
    else:
        _shard(model, before, mesh, mixed_precision, activation_checkpointing, reshard_after_forward, fsdp_kwargs)

    layer_map = discover_for(model, config.replace(blocks_path=before.blocks_path))
    if [n for layer in layer_map.layers for n, _ in layer.params] != \
            [n for layer in before.layers for n, _ in layer.params]:
        raise ISTModelError("the trainable parameters changed names or order under fully_shard; "
                            "IST cannot map its layers onto the sharded model")
    _lazy_init(model)

    groups = layer_param_groups(layer_map)
    if optimizer_factory is None:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        optimizer = optimizer_factory(groups)
    if not any(LAYER_KEY in g for g in optimizer.param_groups):
        raise ISTConfigError("optimizer_factory must build the optimizer from the param groups it is given "
                             f"(one per layer, tagged {LAYER_KEY!r})")
    lr_scheduler = lr_scheduler_factory(optimizer) if lr_scheduler_factory is not None else None

    device = _mesh_device(mesh)
    collectives = _collectives(mesh)
    controller = None
    if config.enabled:
        controller = build_controller(model, config, optimizer, layer_map, scoring_data, collate_fn, device,
                                      collectives, forward=scoring_forward, rank=collectives.rank)
        controller.start()
        logger.info("IST on FSDP2 (%d ranks): %d layers, %d trained per step, strategy %s, optimizer state %s",
                    collectives.world_size, layer_map.num_layers, controller.importance.num_train,
                    config.strategy, config.optimizer_state)
    return FSDPIST(model, optimizer, config, layer_map, controller, mesh, device, collectives, max_grad_norm,
                   lr_scheduler)


__all__ = ["setup", "FSDPIST", "FSDPISTView", "SafeLoadPlanner", "IST_STATE_FILE"]
