"""Locate the module list that holds a model's transformer blocks.

Both discoverers (PEFT blocks in :mod:`ist_ds.model.layers`, full blocks in
:mod:`ist_ds.model.full_layers`) look for a ``torch.nn.ModuleList`` or ``Sequential`` of blocks.
They differ only in what they weigh the candidate lists by (PEFT tuner layers, or parameter
elements); the rest is shared here: choosing the heaviest list with the outermost-wins tie rule, and
resolving and checking a ``blocks_path``, given or found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ist_ds.core.errors import ISTConfigError, ISTModelError

logger = logging.getLogger(__name__)

BLOCK_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential)


def heaviest_list(weights: dict[str, int], unit: str) -> str:
    """The path in ``weights`` (module-list path -> weight) with the largest weight.

    On a tie the outermost list wins, since IST selects whole transformer blocks and a list nested
    inside another one is part of a block. A tie between lists that are not nested in each other is
    ambiguous (e.g. an encoder and a decoder stack) and raises :class:`ISTModelError`; ``unit`` names
    what was weighed, for that message. ``weights`` must not be empty.
    """
    best = max(weights.values())
    top = sorted((n for n, c in weights.items() if c == best), key=lambda n: (n.count("."), n))
    outermost = [n for n in top if not any(o != n and (o == "" or n.startswith(o + ".")) for o in top)]
    if len(outermost) > 1:
        raise ISTModelError(
            f"cannot tell which module list holds the transformer blocks: {', '.join(outermost)} hold "
            f"{best} {unit} each; pass blocks_path= one of them"
        )
    return outermost[0]


def resolve_blocks(model: torch.nn.Module, blocks_path: str | None,
                   find: Callable[[], str]) -> tuple[str, torch.nn.Module]:
    """``(blocks_path, block list)``: ``blocks_path`` when given, else the path ``find()`` returns.

    Raises :class:`ISTConfigError` when the path does not exist in ``model``, names something that is
    not a ``ModuleList``/``Sequential``, or names an empty one.
    """
    if blocks_path is None:
        blocks_path = find()
        logger.debug("discovered transformer blocks at %r", blocks_path)
    try:
        blocks = model.get_submodule(blocks_path)
    except AttributeError as exc:
        raise ISTConfigError(f"blocks_path {blocks_path!r} does not exist in the model: {exc}") from exc
    if not isinstance(blocks, BLOCK_CONTAINERS):
        raise ISTConfigError(
            f"blocks_path {blocks_path!r} names a {type(blocks).__name__}, not a torch.nn.ModuleList or "
            "torch.nn.Sequential of transformer blocks"
        )
    if len(blocks) == 0:
        raise ISTConfigError(f"blocks_path {blocks_path!r} names an empty module list")
    return blocks_path, blocks


def block_prefix(blocks_path: str, index: int) -> str:
    """Name prefix of block ``index``'s parameters from the model root (``"model.layers.3."``)."""
    return f"{blocks_path}.{index}." if blocks_path else f"{index}."


__all__ = ["BLOCK_CONTAINERS", "block_prefix", "heaviest_list", "resolve_blocks"]
