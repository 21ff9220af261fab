"""Full-layer IST (``target: full``, docs/full_mode.md): the blocks' own weights are what IST trains.

:func:`discover_full_layers` finds the block list of a plain model (no PEFT needed) by where most of
the parameters are, and, unlike PEFT discovery, *sets* ``requires_grad`` to what IST trains: the
blocks' parameters (or the ``full_params`` subset), and the parameters outside the blocks per
``train_outside``. It also keeps the pretrained weights on the host when the blocks are suppressed by
``delta``, and counts ZeRO-3 partitioned parameters at their full size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ist_ds.core.errors import ISTConfigError, ISTModelError
from ist_ds.model.block_list import BLOCK_CONTAINERS, block_prefix, heaviest_list, resolve_blocks
from ist_ds.model.layer_map import ISTLayer, LayerMap

logger = logging.getLogger(__name__)


def _numel(p: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it."""
    from ist_ds.compat.deepspeed import zero3_numel

    return zero3_numel(p)


def _find_full_blocks_path(model: torch.nn.Module) -> str:
    """Path of the ModuleList/Sequential of transformer blocks in a plain model: the one with the most
    parameter elements.

    A container whose *direct child* is another container holding more than half of its parameters is
    a wrapper around the real list (``Sequential(embedding, ModuleList(blocks), head)``) and does not
    count. A list nested inside one block (MoE ``experts``) is never a direct child of the block list,
    so it cannot displace it. On a tie the outermost list wins; a tie between lists not nested in each
    other (an encoder and a decoder of equal size) is ambiguous and needs ``blocks_path``.
    """
    containers = {name: m for name, m in model.named_modules()
                  if isinstance(m, BLOCK_CONTAINERS) and len(m) > 0}
    sizes = {name: sum(_numel(p) for p in m.parameters()) for name, m in containers.items()}
    candidates = {}
    for name, m in containers.items():
        children = [f"{name}.{k}" if name else k for k, _ in m.named_children()]
        if any(c in sizes and 2 * sizes[c] > sizes[name] for c in children):
            continue
        if sizes[name] > 0:
            candidates[name] = sizes[name]
    if not candidates:
        raise ISTModelError(
            "found no torch.nn.ModuleList (or Sequential) of transformer blocks with parameters in the "
            "model; pass blocks_path='<dotted path of the block list>' to name it"
        )
    return heaviest_list(candidates, "parameter elements")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(t, DTensor)


def _host_copy(p: torch.nn.Parameter) -> torch.Tensor:
    """A host (CPU) copy of a parameter's full value; gathers a ZeRO-3 partitioned one (a collective)."""
    from ist_ds.compat.deepspeed import is_zero3_param

    if is_zero3_param(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().to("cpu", copy=True)
    return p.detach().to("cpu", copy=True)



def discover_full_layers(model: torch.nn.Module, blocks_path: str | None = None,
                         full_params: Iterable[str] | None = None,
                         train_outside: str | Iterable[str] = "never",
                         keep_initial: bool = False, suppression: str = "residual") -> LayerMap:
    """Map ``model``'s transformer blocks to their own weights, for full-layer IST (``target: full``).

    Works on a plain model (a Hugging Face ``PreTrainedModel`` or any module with a list of blocks; no
    PEFT needed). The block list is ``blocks_path`` when given, else the ``ModuleList``/``Sequential``
    holding the most parameters (``model.layers`` of Llama-style models, ``transformer.h`` of GPT-2).

    A block's IST parameters are all its parameters, or, with ``full_params`` (substrings of the
    parameter names relative to the block, e.g. ``["self_attn", "mlp"]``), those whose name contains
    one of them. Unlike :func:`~ist_ds.model.layers.discover_layers` this *sets* ``requires_grad``: on for the blocks' IST
    parameters, off for the other parameters of the blocks. Outside the blocks (embeddings, final norm,
    LM head, ...), ``train_outside`` decides: ``never`` turns ``requires_grad`` off everywhere (they never
    train and get no optimizer state), ``always`` turns it on everywhere (they train at every step),
    a list of name substrings (e.g. ``["lm_head"]``) turns it on for the matching parameters only.
    What the model's ``requires_grad`` was before does not matter, so calling it again on the same
    model gives the same map.

    ``keep_initial`` keeps a host copy of every block IST parameter as found (``W0``) for
    ``full_suppression: delta``; ``suppression`` is recorded in the map for ist_ds.model.suppression.

    Raises ``ISTConfigError`` for a bad ``blocks_path``, or a ``full_params`` / ``train_outside`` entry
    that matches no parameter; ``ISTModelError`` when no block list is found, a block has no parameter
    to train, or a parameter is shared by two blocks (it could not be frozen in one and trained in the
    other). Nothing is changed when it raises (except for a ZeRO-3 gather with ``keep_initial``).
    """
    if isinstance(train_outside, (list, tuple)):
        outside_patterns = tuple(train_outside)
        if not outside_patterns or not all(isinstance(x, str) and x for x in outside_patterns):
            raise ISTConfigError(f"train_outside must be 'always', 'never' or a non-empty list of parameter-name "
                                 f"substrings, got {train_outside!r}")
    elif train_outside in ("always", "never"):
        outside_patterns = None
    else:
        raise ISTConfigError(f"train_outside must be 'always', 'never' or a list of parameter-name substrings, "
                             f"got {train_outside!r}")
    if isinstance(full_params, str):
        raise ISTConfigError(f"full_params must be a list of name substrings, not one string: use [{full_params!r}]")
    patterns = None if full_params is None else tuple(full_params)
    if patterns is not None and (not patterns or not all(isinstance(x, str) and x for x in patterns)):
        raise ISTConfigError(f"full_params must be a non-empty list of non-empty strings, got {full_params!r}")
    blocks_path, blocks = resolve_blocks(model, blocks_path, lambda: _find_full_blocks_path(model))

    if keep_initial and any(_is_dtensor(p) for p in blocks.parameters()):
        raise ISTConfigError("full_suppression: delta is not supported on FSDP2-sharded (DTensor) blocks; "
                             "use full_suppression: residual")
    owner: dict[int, int] = {}
    per_block: list[tuple[str, torch.nn.Module, list, list]] = []
    used = set()
    for index, block in enumerate(blocks):
        prefix = block_prefix(blocks_path, index)
        chosen, frozen = [], []
        for name, p in block.named_parameters():
            if id(p) in owner and owner[id(p)] != index:
                raise ISTModelError(
                    f"parameter {prefix}{name} is shared with transformer block {owner[id(p)]}; full-layer "
                    "IST trains and freezes blocks independently and cannot use weights shared across blocks"
                )
            owner[id(p)] = index
            hits = [x for x in patterns if x in name] if patterns is not None else [None]
            used.update(hits)
            (chosen if hits else frozen).append((prefix + name, p))
        if not chosen:
            raise ISTModelError(
                f"transformer block {index} ({prefix[:-1]}) has no parameter matching full_params="
                f"{list(patterns) if patterns else patterns!r}; every block needs at least one parameter to train"
            )
        per_block.append((prefix, block, chosen, frozen))
    if patterns is not None:
        unused = [x for x in patterns if x not in used]
        if unused:
            example = ", ".join(n[len(per_block[0][0]):] for n, _ in (per_block[0][2] + per_block[0][3])[:6])
            raise ISTConfigError(
                f"full_params: no parameter of the transformer blocks has a name containing "
                f"{' or '.join(map(repr, unused))} (names are relative to a block, e.g. {example})"
            )

    # Decide everything before changing anything: a bad entry leaves the model as it was.
    outside, outside_frozen = _split_outside(model, set(owner), train_outside, outside_patterns)

    layers: list[ISTLayer] = []
    for index, (prefix, block, chosen, frozen) in enumerate(per_block):
        for _, p in chosen:
            p.requires_grad_(True)
        for _, p in frozen:
            p.requires_grad_(False)
        initial = [_host_copy(p) for _, p in chosen] if keep_initial else None
        layers.append(ISTLayer(index=index, module=block, params=chosen, tuner_modules=[],
                               initial_weights=initial))
    for _, p in outside:
        p.requires_grad_(True)
    for _, p in outside_frozen:
        p.requires_grad_(False)
    if any(isinstance(m, BaseTunerLayer) for m in blocks.modules()):
        logger.warning("the blocks carry PEFT adapters; target: full trains the blocks' own parameters "
                       "(base weights and adapter parameters alike; use target: peft to train the adapters only)")
    n_trained = sum(_numel(p) for layer in layers for _, p in layer.params)
    n_outside = sum(_numel(p) for _, p in outside)
    logger.info("full-layer IST: %d blocks at %r, %d parameters in the blocks' trained set (%s), "
                "%d outside the blocks trained every step",
                len(layers), blocks_path, n_trained,
                "all" if patterns is None else "matching " + ", ".join(patterns), n_outside)
    return LayerMap(layers=layers, blocks_path=blocks_path, outside_params=outside, target="full",
                    full_suppression=suppression)


def _split_outside(model: torch.nn.Module, in_blocks: set[int], train_outside,
                   outside_patterns: tuple[str, ...] | None) -> tuple[list, list]:
    """The parameters outside the blocks (ids not in ``in_blocks``), split into (trained, frozen) per
    ``train_outside``; a pattern that matches none of them is an :class:`ISTConfigError`."""
    outside, outside_frozen, outside_used, outside_names = [], [], set(), []
    for name, p in model.named_parameters():
        if id(p) in in_blocks:
            continue
        outside_names.append(name)
        if outside_patterns is not None:
            hits = [x for x in outside_patterns if x in name]
            outside_used.update(hits)
            train = bool(hits)
        else:
            train = train_outside == "always"
        (outside if train else outside_frozen).append((name, p))
    if outside_patterns is not None:
        unused = [x for x in outside_patterns if x not in outside_used]
        if unused:
            listed = ", ".join(outside_names[:8]) + (" ..." if len(outside_names) > 8 else "")
            raise ISTConfigError(
                f"train_outside: no parameter outside the transformer blocks has a name containing "
                f"{' or '.join(map(repr, unused))} (those parameters are: {listed or 'none'})"
            )
    return outside, outside_frozen


__all__ = ["discover_full_layers"]
