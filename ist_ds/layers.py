"""Find the transformer blocks of a PEFT model and switch their adapter parameters on and off.

IST trains and suppresses PEFT modules *per transformer block*. This module finds the blocks with
peft's own types: every adapter-carrying module of every peft tuner is an instance of
:class:`peft.tuners.tuners_utils.BaseTunerLayer`, so the blocks are the children of the
``torch.nn.ModuleList`` (or ``Sequential``) that holds the most of them. No table of class or
attribute names is needed, which keeps discovery working for new architectures and new peft methods.

:func:`discover_layers` must run while ``requires_grad`` still reflects what the user wants trained
(i.e. right after ``get_peft_model``, before IST or a backend freezes anything): a block's parameters
are the ones that are trainable at that moment. Trainable parameters outside the blocks (a trainable
``lm_head``, ``modules_to_save`` copies, ...) are reported as ``outside_params`` and are always trained.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ist_ds.errors import ISTConfigError, ISTModelError

logger = logging.getLogger(__name__)

_BLOCK_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential)


@dataclass(eq=False)
class ISTLayer:
    """One transformer block and the PEFT parameters IST trains or freezes together."""

    index: int
    module: torch.nn.Module
    #: Trainable parameters in the block, names qualified from the model root, in module order.
    params: list[tuple[str, torch.nn.Parameter]]
    #: The PEFT tuner layers (adapter-carrying modules) inside the block, in module order.
    tuner_modules: list[BaseTunerLayer]


@dataclass(eq=False)
class LayerMap:
    """The blocks of a model, in order, plus the trainable parameters that live outside them."""

    layers: list[ISTLayer]
    #: Dotted path of the block ``ModuleList`` from the model root (``model.get_submodule`` resolves it).
    blocks_path: str
    #: Trainable parameters in no block (trainable ``lm_head``, ``modules_to_save``): always trained.
    outside_params: list[tuple[str, torch.nn.Parameter]]
    # Per-layer bare parameter lists, precomputed so set_trainable does no name handling per step.
    _param_lists: list[list[torch.nn.Parameter]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._param_lists = [[p for _, p in layer.params] for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def parameters_of(self, indices: Iterable[int]) -> list[torch.nn.Parameter]:
        """The parameters of the given layers, layer by layer in the order of ``indices``."""
        out: list[torch.nn.Parameter] = []
        for i in indices:
            out.extend(self._param_lists[_check_index(i, self.num_layers)])
        return out


def _check_index(i: int, n: int) -> int:
    if not 0 <= i < n:
        raise ISTConfigError(f"layer index {i!r} out of range for a model with {n} transformer blocks")
    return i


def _ancestors(name: str) -> list[str]:
    """Dotted prefixes of a module name, longest first: ``a.b.c`` -> ``a.b``, ``a``, ``""``."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts) - 1, -1, -1)]


def _find_blocks_path(model: torch.nn.Module, tuner_names: list[str]) -> str:
    """Path of the ModuleList/Sequential whose children hold the most tuner layers.

    A tuner counts for every block container on its path, so an outer list (``layers``) never counts
    fewer than a list nested inside one block (MoE ``experts``); on a tie the outermost wins, since
    IST selects whole transformer blocks. A tie between lists that are not nested in each other is
    ambiguous (e.g. an encoder and a decoder stack) and needs an explicit ``blocks_path``.
    """
    containers = {name for name, m in model.named_modules() if isinstance(m, _BLOCK_CONTAINERS)}
    counts: dict[str, int] = {}
    for tname in tuner_names:
        for anc in _ancestors(tname):
            if anc in containers:
                counts[anc] = counts.get(anc, 0) + 1
    if not counts:
        raise ISTModelError(
            "the PEFT adapters are not inside any torch.nn.ModuleList of transformer blocks; "
            "pass blocks_path='<dotted path of the block list>' to name it"
        )
    best = max(counts.values())
    top = sorted((n for n, c in counts.items() if c == best), key=lambda n: (n.count("."), n))
    outermost = [n for n in top if not any(o != n and (o == "" or n.startswith(o + ".")) for o in top)]
    if len(outermost) > 1:
        raise ISTModelError(
            f"cannot tell which module list holds the transformer blocks: {', '.join(outermost)} hold "
            f"{best} PEFT tuner layers each; pass blocks_path= one of them"
        )
    return outermost[0]


def discover_layers(model: torch.nn.Module, blocks_path: str | None = None) -> LayerMap:
    """Map ``model``'s transformer blocks to their PEFT modules and trainable parameters.

    Works for a ``peft.PeftModel`` and for a plain model with adapters injected by
    ``peft.inject_adapter_in_model``. ``blocks_path`` overrides the automatic choice of block list
    (e.g. ``"base_model.model.model.layers"``); it is resolved with ``model.get_submodule`` and must
    name a ``ModuleList`` or ``Sequential``. Call it before anything changes ``requires_grad``.

    Raises ``ISTModelError`` when the model has no PEFT adapters, when the block list is ambiguous,
    or when a block has no trainable parameter; ``ISTConfigError`` for a bad ``blocks_path``.
    """
    tuner_names = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not tuner_names:
        raise ISTModelError(
            "model has no PEFT adapters (no peft BaseTunerLayer module found); wrap it with "
            "peft.get_peft_model(model, config) or inject adapters with peft.inject_adapter_in_model first"
        )

    if blocks_path is None:
        blocks_path = _find_blocks_path(model, tuner_names)
        logger.debug("discovered transformer blocks at %r", blocks_path)
    try:
        blocks = model.get_submodule(blocks_path)
    except AttributeError as exc:
        raise ISTConfigError(f"blocks_path {blocks_path!r} does not exist in the model: {exc}") from exc
    if not isinstance(blocks, _BLOCK_CONTAINERS):
        raise ISTConfigError(
            f"blocks_path {blocks_path!r} names a {type(blocks).__name__}, not a torch.nn.ModuleList or "
            "torch.nn.Sequential of transformer blocks"
        )
    if len(blocks) == 0:
        raise ISTConfigError(f"blocks_path {blocks_path!r} names an empty module list")

    layers: list[ISTLayer] = []
    in_blocks: set[int] = set()
    for index, block in enumerate(blocks):
        prefix = f"{blocks_path}.{index}." if blocks_path else f"{index}."
        params = [(prefix + n, p) for n, p in block.named_parameters() if p.requires_grad]
        if not params:
            raise ISTModelError(
                f"transformer block {index} ({prefix[:-1]}) has no trainable parameters; IST needs PEFT "
                "parameters in every block (was requires_grad changed before discover_layers?)"
            )
        tuners = [m for m in block.modules() if isinstance(m, BaseTunerLayer)]
        in_blocks.update(id(p) for _, p in params)
        layers.append(ISTLayer(index=index, module=block, params=params, tuner_modules=tuners))

    outside = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_blocks]
    n_tuners_inside = sum(len(layer.tuner_modules) for layer in layers)
    if n_tuners_inside < len(tuner_names):
        logger.warning(
            "%d of %d PEFT tuner layers are outside %r; their trainable parameters are always trained",
            len(tuner_names) - n_tuners_inside, len(tuner_names), blocks_path,
        )
    if outside:
        logger.info("%d trainable parameters outside the blocks are always trained: %s",
                    len(outside), ", ".join(n for n, _ in outside[:8]) + (" ..." if len(outside) > 8 else ""))
    return LayerMap(layers=layers, blocks_path=blocks_path, outside_params=outside)


def set_trainable(layer_map: LayerMap, selected: set[int] | list[int]) -> None:
    """Make exactly the ``selected`` layers' parameters trainable; leave ``outside_params`` alone.

    Runs every optimizer step, so it only walks the precomputed per-layer parameter lists.
    """
    chosen = set(selected)
    n = layer_map.num_layers
    for i in chosen:
        _check_index(i, n)
    for i, params in enumerate(layer_map._param_lists):
        flag = i in chosen
        for p in params:
            p.requires_grad = flag


__all__ = ["ISTLayer", "LayerMap", "discover_layers", "set_trainable"]
