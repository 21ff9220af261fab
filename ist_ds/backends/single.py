"""A single-process IST trainer in plain PyTorch: the reference semantics, and the baseline.

Every distributed backend must reproduce what this loop does on the same global batches: per
optimizer step only the selected layers' PEFT parameters get gradients and change; unselected ones
stay bit-identical, with their optimizer state kept, offloaded or dropped; every ``update_interval``
steps the importance update runs on a scoring batch. ``strategy: rst`` gives the RST baseline and
``enabled: false`` plain uniform PEFT, through the same loop.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import torch

from ist_ds.runtime.build import build_controller
from ist_ds.runtime.controller import ISTController
from ist_ds.core import ISTConfig
from ist_ds.model.layers import discover_for
from ist_ds.model.param_groups import layer_param_groups

logger = logging.getLogger(__name__)


class SingleProcessTrainer:
    """Plain PyTorch + torch AdamW + IST, one process."""

    def __init__(self, model: torch.nn.Module, config: ISTConfig | dict | None, train_dataset=None,
                 collate_fn: Callable | None = None, *, lr: float = 2e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float | None = None, scoring_dataset=None,
                 device: torch.device | str = "cpu") -> None:
        self.config = config if isinstance(config, ISTConfig) else ISTConfig.from_dict(config)
        self.model = model.to(device)
        self.device = torch.device(device)
        self.max_grad_norm = max_grad_norm
        self.layer_map = discover_for(model, self.config)
        self.layer_map_counts = self.config.resolve(self.layer_map.num_layers)
        groups = layer_param_groups(self.layer_map)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.ist: ISTController | None = None
        if self.config.enabled:
            self.ist = build_controller(model, self.config, self.optimizer, self.layer_map,
                                        scoring_dataset if scoring_dataset is not None else train_dataset,
                                        collate_fn, self.device)
            self.ist.start()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batch: dict | Sequence[dict]) -> float:
        """One optimizer step over one batch, or over a list of micro-batches (gradient accumulation)."""
        micro = [batch] if isinstance(batch, dict) else list(batch)
        self.model.train()
        total = 0.0
        for mb in micro:
            loss = self.model(**self._to_device(mb)).loss / len(micro)
            loss.backward()
            total += float(loss.detach())
        if self.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ist is not None:
            self.ist.after_optimizer_step()
        return total

    def train(self, batches: Iterable, num_steps: int, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        losses = []
        it = iter(batches)
        for step in range(num_steps):
            losses.append(self.train_step(next(it)))
            if on_step is not None:
                on_step(step, losses[-1])
        return losses
