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

Full mode (``target: full``, docs/full_mode.md) trains the blocks' own weights instead:
:func:`discover_full_layers` finds the block list of a plain model (no PEFT needed) and *sets*
``requires_grad`` to what IST trains (the blocks' parameters, or the ``full_params`` subset; the
parameters outside the blocks per ``train_outside``). :func:`discover_for` picks one of the two from
an :class:`~ist_ds.core.ISTConfig`; backends call it, not the two discoverers directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ist_ds.core.errors import ISTConfigError, ISTModelError

logger = logging.getLogger(__name__)

_BLOCK_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential)


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


# ---------------------------------------------------------------------------------------- full mode
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
                  if isinstance(m, _BLOCK_CONTAINERS) and len(m) > 0}
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
    best = max(candidates.values())
    top = sorted((n for n, c in candidates.items() if c == best), key=lambda n: (n.count("."), n))
    outermost = [n for n in top if not any(o != n and (o == "" or n.startswith(o + ".")) for o in top)]
    if len(outermost) > 1:
        raise ISTModelError(
            f"cannot tell which module list holds the transformer blocks: {', '.join(outermost)} hold "
            f"{best} parameter elements each; pass blocks_path= one of them"
        )
    return outermost[0]


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
    one of them. Unlike :func:`discover_layers` this *sets* ``requires_grad``: on for the blocks' IST
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
    if blocks_path is None:
        blocks_path = _find_full_blocks_path(model)
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

    if keep_initial and any(_is_dtensor(p) for p in blocks.parameters()):
        raise ISTConfigError("full_suppression: delta is not supported on FSDP2-sharded (DTensor) blocks; "
                             "use full_suppression: residual")
    owner: dict[int, int] = {}
    per_block: list[tuple[str, torch.nn.Module, list, list]] = []
    used = set()
    for index, block in enumerate(blocks):
        prefix = f"{blocks_path}.{index}." if blocks_path else f"{index}."
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
    outside, outside_frozen, outside_used, outside_names = [], [], set(), []
    for name, p in model.named_parameters():
        if id(p) in owner:
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


def discover_for(model: torch.nn.Module, config) -> LayerMap:
    """The layer map an :class:`~ist_ds.core.ISTConfig` asks for: PEFT blocks or full blocks.

    The one call every backend makes: ``target: peft`` -> :func:`discover_layers`, ``target: full``
    -> :func:`discover_full_layers` with ``full_params``, ``train_outside`` and ``full_suppression``.
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
    n = layer_map.num_layers
    for i in chosen:
        _check_index(i, n)
    for i, params in enumerate(layer_map._param_lists):
        flag = i in chosen
        for p in params:
            p.requires_grad = flag


__all__ = ["ISTLayer", "LayerMap", "discover_layers", "discover_full_layers", "discover_for", "set_trainable"]
