"""The IST loop, independent of the backend that runs the model.

The controller owns the state IST adds to training (scores, the selection generator, the step
counter, the current selection, per-layer selection counts, the scoring stream's position) and does
the work that happens between two optimizer steps:

1. every ``update_interval`` steps (not at step 0) the importance update, through a scorer;
2. draw the layers of the next step and make them, and only them, require grad;
3. tell the optimizer gate, which moves optimizer state and hides unselected groups from the step;
4. check, with one tiny all-reduce, that every rank holds the same state.

Backends (single process, DeepSpeed, FSDP2) build the pieces and call :meth:`start` once and
:meth:`after_optimizer_step` after every real optimizer step.

The controller reaches its two collaborators only through protocols: a :class:`Scorer` (defined
here, its only consumer; :class:`~ist_ds.runtime.scoring.ImportanceScorer` is the implementation)
and a :class:`~ist_ds.runtime.collectives.Collectives`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol, Sequence, runtime_checkable

import torch

from ist_ds.compat.deepspeed import zero3_numel
from ist_ds.runtime.collectives import Collectives, LocalCollectives, fingerprint
from ist_ds.core import ISTConfig, ImportanceState, sample_uniform_layers
from ist_ds.core.errors import ISTCheckpointError
from ist_ds.model.layer_map import LayerMap
from ist_ds.model.layers import set_trainable
from ist_ds.optim.gate import OptimizerGate

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@runtime_checkable
class Scorer(Protocol):
    """What the controller needs from the importance update's forward passes.

    Every ``update_interval`` steps the controller draws K suppression sets and asks for one loss
    per set; the rewards and scores follow from those losses alone, so how they are computed (data,
    sharding over ranks, micro-batches, the model's forward) stays behind this seam.
    """

    def losses(self, suppression_sets: Sequence[Sequence[int]]) -> list[float]:
        """The scoring loss with each set's layers suppressed, in order.

        It must return the same list on every rank (the controller's agreement check hashes the
        scores built from it), and every rank must call it together: under ZeRO-3 and FSDP2 the
        forwards inside are collectives.
        """
        ...

    def state_dict(self) -> dict:
        """Where the scorer is in its data (the scoring stream's epoch and position), saved in the
        IST state so that a resumed run scores the same batches the uninterrupted run would have."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` written by an earlier run."""
        ...


class ISTController:
    """Selection, importance updates and agreement for one training run."""

    def __init__(self, config: ISTConfig, layer_map: LayerMap, gate: OptimizerGate | None = None,
                 scorer: Scorer | None = None, collectives: Collectives | None = None) -> None:
        self.config = config
        self.layer_map = layer_map
        self.gate = gate
        self.scorer = scorer
        self.comm: Collectives = collectives or LocalCollectives()
        self.num_layers = layer_map.num_layers
        self.importance = ImportanceState(self.num_layers, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.selected: list[int] = []
        self.selection_counts = [0] * self.num_layers  # optimizer steps each layer was trained in
        self.last_update_seconds = 0.0
        self.last_suppression_sets: list[list[int]] = []
        self.last_losses: list[float] = []
        self._setup_checked = False
        if config.strategy == "ist" and scorer is None:
            raise ValueError("strategy 'ist' needs a scorer (scoring data) for the importance update")

    # ------------------------------------------------------------------ public view
    @property
    def scores(self) -> torch.Tensor:
        """Importance scores, reference sign: higher means less important."""
        return self.importance.scores

    @property
    def selected_layers(self) -> list[int]:
        return list(self.selected)

    # ------------------------------------------------------------------ the loop
    def start(self) -> list[int]:
        """Select the layers of the first (or, after a resume, the current) step."""
        self.check_setup()
        if not self.selected:
            self._select()
        else:
            self._apply(self.selected)
        self._check()
        return self.selected

    def after_optimizer_step(self) -> list[int]:
        """Advance past one optimizer step; returns the layers of the next one."""
        for i in self.selected:
            self.selection_counts[i] += 1
        self.step += 1
        if (self.config.strategy == "ist" and self.step % self.config.update_interval == 0):
            self.update_importance()
        self._select()
        self._check()
        return self.selected

    def update_importance(self) -> None:
        start = time.perf_counter()
        sets = self.importance.sample_suppression_sets(self.generator)
        losses = self.scorer.losses(sets)
        self.importance.update(sets, losses)
        self.last_suppression_sets, self.last_losses = sets, losses
        self.last_update_seconds = time.perf_counter() - start
        logger.debug("step %d: importance update, losses %s, scores %s", self.step, losses, self.scores.tolist())

    def _select(self) -> None:
        strategy = self.config.strategy
        if strategy == "ist":
            selected = self.importance.sample_train_layers(self.generator)
        elif strategy == "rst":
            selected = sample_uniform_layers(self.num_layers, self.importance.num_train, self.generator)
        else:
            selected = list(range(self.num_layers))
        self._apply(selected)

    def _apply(self, selected: list[int]) -> None:
        self.selected = list(selected)
        set_trainable(self.layer_map, self.selected)
        if self.gate is not None:
            self.gate.select(self.selected)

    def _check(self) -> None:
        interval = self.config.agreement_check_interval
        if interval and self.step % interval == 0:
            self.comm.check_agreement(self.fingerprint(),
                                      f"step {self.step}, selected {self.selected}, scores {self.scores.tolist()}")

    def setup_parts(self) -> dict:
        """What every rank must agree on before the first collective of IST: the whole ``ist``
        config, the layer map (names and shapes of every IST parameter) and the world size."""
        parts = {f"ist.{k}": v for k, v in self.config.to_dict().items()}
        parts["layer map"] = [(layer.index, name, list(getattr(p, "ds_shape", p.shape)))
                              for layer in self.layer_map.layers for name, p in layer.params]
        parts["parameters outside the blocks"] = [(name, list(getattr(p, "ds_shape", p.shape)))
                                                  for name, p in self.layer_map.outside_params]
        parts["world size"] = self.comm.world_size
        return parts

    def check_setup(self) -> None:
        """Once per run, before IST's first collective: every rank holds the same config, layers and
        world size, or every rank raises :class:`ISTAgreementError` naming what differs."""
        if not self._setup_checked:
            self.comm.check_same(self.setup_parts(), "IST setup")
            self._setup_checked = True

    def fingerprint(self) -> int:
        return fingerprint(self.step, self.selected, self.scores, self.generator.get_state())

    # ------------------------------------------------------------------ reporting
    def memory_report(self) -> dict:
        """Per-rank bytes: optimizer state by location, and parameters that train (with gradients) now."""
        trainable = self.layer_map.parameters_of(self.selected) + [p for _, p in self.layer_map.outside_params]
        param_bytes = sum(zero3_numel(p) * p.element_size() for p in trainable)
        report = {"trainable_param_bytes": param_bytes, "selected_layers": list(self.selected)}
        if self.gate is not None:
            report["optimizer_state_bytes"] = self.gate.state_bytes()
            masters = self.gate.master_bytes()
            if masters is not None:
                report["master_bytes"] = masters
        return report

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "num_layers": self.num_layers,
            "config": self.config.to_dict(),
            "step": self.step,
            "importance": self.importance.state_dict(),
            "generator": self.generator.get_state(),
            "selected": list(self.selected),
            "selection_counts": list(self.selection_counts),
            "scoring": self.scorer.state_dict() if self.scorer is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved IST state and re-apply its selection (requires_grad and optimizer state)."""
        self.check_setup()
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ISTCheckpointError(f"unsupported IST state version {state.get('version')!r}")
        if int(state["num_layers"]) != self.num_layers:
            raise ISTCheckpointError(
                f"the checkpoint was written for a model with {state['num_layers']} IST layers, "
                f"this model has {self.num_layers}"
            )
        self.importance.load_state_dict(state["importance"])
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        self.step = int(state["step"])
        self.selection_counts = [int(c) for c in state["selection_counts"]]
        if self.scorer is not None and state.get("scoring") is not None:
            self.scorer.load_state_dict(state["scoring"])
        self._apply([int(i) for i in state["selected"]])
        self._check()


class ISTView:
    """The user-facing view of a run's IST state (``engine.ist`` under DeepSpeed, ``FSDPIST.ist``)."""

    def __init__(self, controller: ISTController) -> None:
        self.controller = controller
        self.config = controller.config
        self.layer_map = controller.layer_map

    @property
    def selected_layers(self) -> list[int]:
        """Sorted layers whose PEFT parameters train in the current optimizer step."""
        return self.controller.selected_layers

    @property
    def scores(self) -> torch.Tensor:
        """Importance scores (reference sign: higher means less important)."""
        return self.controller.scores

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.controller.step

    @property
    def selection_counts(self) -> list[int]:
        """How many optimizer steps each layer has been trained in."""
        return list(self.controller.selection_counts)

    def memory_report(self) -> dict:
        """Per-rank bytes: optimizer state by location and the trainable parameters of this step."""
        return self.controller.memory_report()

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)
