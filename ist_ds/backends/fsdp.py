"""IST on PyTorch FSDP2: :func:`setup` shards a PEFT model with ``fully_shard`` and wires IST around it.

What :func:`setup` does, in order:

1. validates the ``ist`` block (the same schema and errors as the DeepSpeed backend's) against the
   model's transformer blocks, found with :func:`~ist_ds.model.layers.discover_for` (PEFT or full mode);
2. optionally applies activation checkpointing to every block (torch's composable ``checkpoint``,
   which keeps parameter names unchanged; :mod:`ist_ds.compat.torch`);
3. calls ``fully_shard`` on every transformer block, then on the root, over a 1-D device mesh
   (``mixed_precision`` is FSDP2's :class:`~torch.distributed.fsdp.MixedPrecisionPolicy`);
4. discovers the layers again: ``fully_shard`` replaces every parameter by a DTensor parameter, and
   the optimizer, the optimizer gate and ``requires_grad`` switching must all see the new objects;
5. runs FSDP2's lazy initialisation while every PEFT parameter is still trainable. FSDP2 fixes the
   gradient and reduce dtypes of a block at that moment from the parameters that require grad; a
   block frozen then would later reduce its gradients in the parameter dtype (bf16 under mixed
   precision) and fail when IST selects it;
6. builds the optimizer (torch AdamW by default) with one param group per layer, wraps it with the
   :class:`~ist_ds.optim.gate.OptimizerGate` through :func:`~ist_ds.runtime.build.build_controller`,
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

The run is an :class:`~ist_ds.backends.fsdp_run.FSDPIST`. Its checkpoints
(:meth:`FSDPIST.save_checkpoint` / :meth:`FSDPIST.load_checkpoint`, :mod:`ist_ds.backends.fsdp_checkpoint`) are
``torch.distributed.checkpoint`` directories holding the sharded model and optimizer state plus one
small ``ist_state.pt`` with the IST state (and the LR scheduler's, written by rank 0), each rank's RNG
state (``rng_rank<r>.pt``) and a checksum manifest verified before anything is loaded
(:mod:`ist_ds.runtime.checkpoint`); docs/fsdp.md describes the layout and resharding.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from ist_ds.backends.fsdp_checkpoint import SafeLoadPlanner
from ist_ds.backends.fsdp_run import FSDPIST, FSDPISTView
from ist_ds.compat import torch as torch_compat
from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTConfigError, ISTModelError
from ist_ds.model.layers import LayerMap, discover_for
from ist_ds.model.param_groups import layer_param_groups
from ist_ds.model.param_groups import LAYER_KEY
from ist_ds.runtime.build import build_controller
from ist_ds.runtime.checkpoint import IST_STATE_FILE
from ist_ds.runtime.collectives import LocalCollectives, TorchCollectives

logger = logging.getLogger(__name__)


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
        _disable_kv_cache(model)
        for layer in layer_map.layers:
            torch_compat.checkpoint_activations(layer.module)
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
    if not torch_compat.fsdp_lazy_init(model):  # a torch without this (private) entry point
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
