"""The FSDP2 run :func:`~ist_ds.backends.fsdp.setup` returns: the sharded model, its optimizer, IST.

:class:`FSDPIST` steps the optimizer (clipping, LR scheduler, then the IST controller), reports
memory and saves / loads checkpoints (:mod:`ist_ds.backends.fsdp_checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ist_ds.backends import fsdp_checkpoint
from ist_ds.core import ISTConfig
from ist_ds.model.layers import LayerMap
from ist_ds.optim.state_store import live_state_bytes
from ist_ds.runtime.controller import ISTController, ISTView


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


class FSDPIST:
    """A PEFT model sharded with FSDP2, its optimizer, and IST around them. Built by :func:`~ist_ds.backends.fsdp.setup`.

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
        for name, p in self.trainable_named_params():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu().clone()
        return out

    def trainable_named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of every IST layer's PEFT parameters, then those outside the blocks."""
        return [np for layer in self.layer_map.layers for np in layer.params] + list(self.layer_map.outside_params)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint_dir: str | os.PathLike, *, model_weights: str = "trainable") -> None:
        """Write a DCP checkpoint of the model, the optimizer and the IST state. Call on every rank.

        ``model_weights="trainable"`` (default) saves only the PEFT parameters (and other trainable
        ones): the frozen base weights must then come from the same pretrained model on resume.
        ``"full"`` saves every parameter. Offloaded optimizer state is put back into the optimizer
        for the save and released again afterwards; dropped state is absent, as in the running job.
        """
        fsdp_checkpoint.save_checkpoint(self, checkpoint_dir, model_weights)

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`. Call on every rank.

        The world size may differ from the saving job's (DCP reshards the DTensors). The IST state
        (scores, step, selection, generator and scoring-stream position) is restored exactly, so the
        run continues as the saved one would have, given the same data order.
        """
        fsdp_checkpoint.load_checkpoint(self, checkpoint_dir)


__all__ = ["FSDPIST", "FSDPISTView"]
