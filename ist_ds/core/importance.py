"""The importance scores of IST and the two samplers that read them.

Pure tensor code: no torch.distributed, no model. Every random draw goes through an explicit
``torch.Generator``, so that ranks seeded alike draw alike.

Sign convention (the reference's): ``scores[i]`` HIGHER means layer ``i`` is LESS important.
``sigmoid(-scores)`` weighs layers for training, ``sigmoid(scores)`` for suppression.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ist_ds.core.config import ISTConfig
from ist_ds.core.errors import ISTCheckpointError

# Suppression sets are redrawn while they repeat an earlier one (as the reference does). With very
# skewed scores a distinct set can become astronomically unlikely; stop instead of spinning forever.
MAX_REDRAWS = 100_000


def sample_without_replacement(weights: torch.Tensor, n: int, generator: torch.Generator) -> list[int]:
    """Draw ``n`` distinct indices, each draw proportional to ``weights`` over those not yet drawn.

    This is ``torch.multinomial(weights, n, replacement=False)``, returned sorted.
    """
    drawn = torch.multinomial(weights, n, replacement=False, generator=generator)
    return sorted(int(i) for i in drawn)


def sample_uniform_layers(num_layers: int, n: int, generator: torch.Generator) -> list[int]:
    """The RST baseline: ``n`` distinct layers, uniformly."""
    return sample_without_replacement(torch.ones(num_layers), n, generator)


class ImportanceState:
    """Scores of ``num_layers`` layers and the IST rules that sample from and update them."""

    def __init__(self, num_layers: int, config: ISTConfig | None = None) -> None:
        self.config = config or ISTConfig()
        counts = self.config.resolve(num_layers)
        self.num_layers = num_layers
        self.num_train = counts.num_train
        self.num_suppress = counts.num_suppress
        self.num_sets = counts.num_sets
        self.scores = torch.full((num_layers,), float(self.config.initial_score), dtype=torch.float32)
        self.num_updates = 0

    # ------------------------------------------------------------------ probabilities
    def train_weights(self) -> torch.Tensor:
        """``sigmoid(-s)``: the weight of each layer for being trained (importance is ``-s``)."""
        return (-self.scores).sigmoid()

    def suppress_weights(self) -> torch.Tensor:
        """``sigmoid(s)``: the weight of each layer for being suppressed while scoring."""
        return self.scores.sigmoid()

    def train_probabilities(self) -> torch.Tensor:
        """Normalised ``sigmoid(-s)``: the chance of each layer to be the first one drawn."""
        w = self.train_weights()
        return w / w.sum()

    # ------------------------------------------------------------------ sampling
    def sample_train_layers(self, generator: torch.Generator) -> list[int]:
        """The ``N_u`` layers trained in the next optimizer step (sorted)."""
        return sample_without_replacement(self.train_weights(), self.num_train, generator)

    def sample_suppression_sets(self, generator: torch.Generator) -> list[list[int]]:
        """``K`` pairwise distinct sets of ``N_s`` layers, each drawn proportional to ``sigmoid(s)``."""
        weights = self.suppress_weights()
        sets: list[list[int]] = []
        redraws = 0
        while len(sets) < self.num_sets:
            candidate = sample_without_replacement(weights, self.num_suppress, generator)
            if candidate in sets:
                redraws += 1
                if redraws > MAX_REDRAWS:
                    raise RuntimeError(
                        f"could not draw {self.num_sets} distinct suppression sets in {MAX_REDRAWS} tries; "
                        f"the scores are too skewed: {self.scores.tolist()}"
                    )
                continue
            sets.append(candidate)
        return sets

    # ------------------------------------------------------------------ update
    def update(self, suppression_sets: Sequence[Sequence[int]], losses: Sequence[float]) -> None:
        """Apply the reference's reward/advantage rule.

        ``R_k = exp(-l_k)``, ``A_k = R_k - mean(R)``; with ``p = sigmoid(s)`` taken before the update,
        ``s[i] += A_k * p[i] * (1 - p[i]) * eta`` for every ``k`` and ``i`` in ``S_k``, applied in
        the order ``k = 1..K`` as the reference does.
        """
        if len(suppression_sets) != len(losses):
            raise ValueError(f"{len(suppression_sets)} suppression sets but {len(losses)} losses")
        if not losses:
            return
        rewards = [math.exp(-float(loss)) for loss in losses]
        mean = sum(rewards) / len(rewards)
        advantages = [r - mean for r in rewards]
        p = self.scores.sigmoid()
        eta = float(self.config.eta)
        for adv, layer_set in zip(advantages, suppression_sets):
            idx = torch.as_tensor(list(layer_set), dtype=torch.long)
            self.scores[idx] += adv * p[idx] * (1 - p[idx]) * eta
        self.num_updates += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"num_layers": self.num_layers, "scores": self.scores.clone(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_layers"]) != self.num_layers:
            raise ISTCheckpointError(
                f"the checkpoint holds importance scores for {int(state['num_layers'])} layers, "
                f"but this model has {self.num_layers}"
            )
        scores = torch.as_tensor(state["scores"], dtype=torch.float32)
        if scores.shape != (self.num_layers,):
            raise ISTCheckpointError(f"importance scores of shape {tuple(scores.shape)} do not fit {self.num_layers} layers")
        self.scores = scores.clone()
        self.num_updates = int(state["num_updates"])
