"""The wiring every backend shares: an optimizer in, a ready :class:`ISTController` out.

Each backend (the single-process trainer, DeepSpeed, FSDP2, the Trainer integration) builds its own
optimizer with one param group per layer and then needs the same parts around it: a state store for
the ``optimizer_state`` mode, the gate that wraps the optimizer's step, and, for ``strategy: ist``,
a scorer over its scoring stream. Building them here, apart from :mod:`ist_ds.runtime.controller`,
keeps the controller free of the concrete scorer: it depends only on the
:class:`~ist_ds.runtime.controller.Scorer` protocol.
"""

from __future__ import annotations

from typing import Callable

import torch

from ist_ds.core import ISTConfig
from ist_ds.optim.gate import OptimizerGate
from ist_ds.optim.state_store import OptimizerStateStore
from ist_ds.runtime.collectives import Collectives
from ist_ds.runtime.controller import ISTController
from ist_ds.runtime.scoring import ImportanceScorer, ScoringStream


def build_controller(model: torch.nn.Module, config: ISTConfig, optimizer: torch.optim.Optimizer, layer_map,
                     scoring_dataset, collate_fn: Callable | None, device, collectives: Collectives | None = None,
                     forward=None, rank: int = 0) -> ISTController:
    """Wire the gate, the state store and the scorer around ``optimizer`` (the one the backend steps)."""
    store = OptimizerStateStore(config.optimizer_state, config.offload_target, config.offload_dir, rank=rank)
    gate = OptimizerGate(optimizer, store)
    scorer = None
    if config.strategy == "ist":
        if scoring_dataset is None:
            raise ValueError("strategy 'ist' needs scoring data (by default the training data)")
        stream = ScoringStream(len(scoring_dataset), config.scoring_batch_size, seed=config.seed)
        kwargs = {"forward": forward} if forward is not None else {}
        scorer = ImportanceScorer(model, layer_map, scoring_dataset, collate_fn, stream,
                                  config.suppression_scale, collectives, device,
                                  config.scoring_micro_batch_size, **kwargs)
    return ISTController(config, layer_map, gate, scorer, collectives)
