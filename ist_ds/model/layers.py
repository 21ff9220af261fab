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

Full mode (``target: full``, docs/full_mode.md) trains the blocks' own weights instead, found by
:func:`~ist_ds.model.full_layers.discover_full_layers`. :func:`discover_for` picks one of the two from
an :class:`~ist_ds.core.ISTConfig`; backends call it, not the two discoverers directly.
:func:`set_trainable` is the per-step switch. The map both discoverers return is
:class:`~ist_ds.model.layer_map.LayerMap`; the block-list search they share is in
:mod:`ist_ds.model.block_list`.
"""

from __future__ import annotations

import logging

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ist_ds.core.errors import ISTModelError
from ist_ds.model.block_list import BLOCK_CONTAINERS, block_prefix, heaviest_list, resolve_blocks
from ist_ds.model.full_layers import discover_full_layers
from ist_ds.model.layer_map import ISTLayer, LayerMap

logger = logging.getLogger(__name__)


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
    containers = {name for name, m in model.named_modules() if isinstance(m, BLOCK_CONTAINERS)}
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
    return heaviest_list(counts, "PEFT tuner layers")


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

    blocks_path, blocks = resolve_blocks(model, blocks_path, lambda: _find_blocks_path(model, tuner_names))

    layers: list[ISTLayer] = []
    in_blocks: set[int] = set()
    for index, block in enumerate(blocks):
        prefix = block_prefix(blocks_path, index)
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


def discover_for(model: torch.nn.Module, config) -> LayerMap:
    """The layer map an :class:`~ist_ds.core.ISTConfig` asks for: PEFT blocks or full blocks.

    The one call every backend makes: ``target: peft`` -> :func:`discover_layers`, ``target: full``
    -> :func:`~ist_ds.model.full_layers.discover_full_layers` with ``full_params``, ``train_outside`` and ``full_suppression``.
    """
    if getattr(config, "target", "peft") == "full":
        return discover_full_layers(model, config.blocks_path, config.full_params,
                                    config.train_outside or "never",
                                    keep_initial=config.full_suppression == "delta",
                                    suppression=config.full_suppression)
    return discover_layers(model, config.blocks_path)


def set_trainable(layer_map: LayerMap, selected: set[int] | list[int]) -> None:
    """Make exactly the ``selected`` layers' parameters trainable; leave ``outside_params`` alone.

    Runs every optimizer step, so it only walks the precomputed per-layer parameter lists.
    """
    chosen = set(selected)
    for i in chosen:
        layer_map.check_index(i)
    for i, params in enumerate(layer_map.parameter_lists()):
        flag = i in chosen
        for p in params:
            p.requires_grad = flag


__all__ = ["discover_layers", "discover_for", "set_trainable"]
