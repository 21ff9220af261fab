"""The record of a model's transformer blocks that everything above the model layer works from.

Discovery (:mod:`ist_ds.model.layers`, :mod:`ist_ds.model.full_layers`) builds one :class:`LayerMap`
per model; the controller, the scorer, the suppression hooks, the optimizer parameter groups and the
backends only read it. It lives in its own module so that the two discoverers and their readers can
all import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ist_ds.core.errors import ISTConfigError


@dataclass(eq=False)
class ISTLayer:
    """One transformer block and the PEFT parameters IST trains or freezes together."""

    index: int
    module: torch.nn.Module
    #: Trainable parameters in the block, names qualified from the model root, in module order.
    params: list[tuple[str, torch.nn.Parameter]]
    #: The PEFT tuner layers (adapter-carrying modules) inside the block, in module order (full mode: empty).
    tuner_modules: list[BaseTunerLayer]
    #: Full mode with ``full_suppression: delta``: host copies of ``params`` as discovery found them
    #: (the pretrained weights ``W0``), one per parameter, in the order of ``params``.
    initial_weights: list[torch.Tensor] | None = None


@dataclass(eq=False)
class LayerMap:
    """The blocks of a model, in order, plus the trainable parameters that live outside them."""

    layers: list[ISTLayer]
    #: Dotted path of the block ``ModuleList`` from the model root (``model.get_submodule`` resolves it).
    blocks_path: str
    #: Trainable parameters in no block (trainable ``lm_head``, ``modules_to_save``): always trained.
    outside_params: list[tuple[str, torch.nn.Parameter]]
    #: ``"peft"``: the layers' params are PEFT parameters; ``"full"``: the blocks' own weights.
    target: str = "peft"
    #: Full mode: how ist_ds.model.suppression damps a block while scoring (``residual`` or ``delta``).
    full_suppression: str = "residual"
    # Per-layer bare parameter lists, precomputed so set_trainable does no name handling per step.
    _param_lists: list[list[torch.nn.Parameter]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._param_lists = [[p for _, p in layer.params] for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_index(self, i: int) -> int:
        """``i`` if it names a layer of this map, else :class:`ISTConfigError`."""
        if not 0 <= i < self.num_layers:
            raise ISTConfigError(f"layer index {i!r} out of range for a model with {self.num_layers} transformer blocks")
        return i

    def parameter_lists(self) -> list[list[torch.nn.Parameter]]:
        """Per layer, in layer order, its bare parameters (no names). Precomputed once: cheap to call
        every step; the lists are the map's own, so read them and do not change them."""
        return self._param_lists

    def parameters_of(self, indices: Iterable[int]) -> list[torch.nn.Parameter]:
        """The parameters of the given layers, layer by layer in the order of ``indices``."""
        out: list[torch.nn.Parameter] = []
        for i in indices:
            out.extend(self._param_lists[self.check_index(i)])
        return out


__all__ = ["ISTLayer", "LayerMap"]
