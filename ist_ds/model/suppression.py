"""Response suppression: damp the PEFT output of chosen transformer blocks while IST scores layers.

IST's importance update (IST_SPEC.md, "Importance-updating loop") multiplies the output scale of every
PEFT module in a suppression set by ``lambda`` (``scale`` here), evaluates the loss, and restores every
scale exactly. :func:`suppress` is that step as a context manager. The rules, per tuner layer of the
named blocks:

1. **Layers with a per-adapter ``scaling`` dict whose forward multiplies the adapter output by it**:
   peft's ``LoraLayer`` (LoRA, DoRA, AdaLoRA and other LoRA variants) and ``LycorisLayer`` (LoHa,
   LoKr). For every *active* adapter, ``scaling[name]`` (a float, ``alpha / r``) is replaced by
   ``scaling[name] * scale``; on exit the saved original objects are re-assigned, so the restore is
   bit-exact (no division). Checked against peft 0.21.2, where every forward reads
   ``self.scaling[adapter]`` at call time:

   - LoRA: ``result + lora_B(lora_A(dropout(x))) * scaling``, so the delta is scaled exactly.
   - DoRA: ``DoraLinearVariant.forward`` passes ``scaling`` to ``DoraLinearLayer.forward``, which
     makes the layer output ``(m / ||W + scaling*BA||) * (Wx + scaling*BAx) + bias``. Damping ``scaling``
     damps the low-rank *direction* update; the learned magnitude ``m`` still rescales the output, so
     ``scale=0`` gives the base layer only while ``m`` equals ``||W||`` (its value at initialisation).
     This is what the reference does (it multiplies ``scaling`` for DoRA too).
   - LoHa / LoKr: ``get_delta_weight`` builds ``scaling * (w1a w1b) ⊙ (w2a w2b)`` (LoHa, via
     ``HadaWeight``'s ``scale``) or ``scaling * kron(w1, w2)`` (LoKr, ``make_kron``), and the forward
     adds ``x @ delta_weight.T``, so the delta is scaled exactly.

   Other tuners that also keep a ``scaling`` dict (OFT, BOFT, ...) do not use it as a linear output
   scale, so they are deliberately *not* in this group.

2. **Every other tuner layer** (IA3 and anything else): the adapter's effect is interpolated toward
   identity with a forward hook returning ``base + scale * (out - base)``, where ``out`` is the tuner
   layer's normal output and ``base = module.base_layer(*args, **kwargs)`` is the output with this
   adapter disabled (exactly what the tuner's own forward computes when adapters are disabled). For
   IA3 on a linear base layer this equals moving the IA3 vector ``l`` toward one, ``1 + scale*(l-1)``:
   output scaling gives ``base * (1 + scale*(l-1))``, and for a feedforward module
   ``W(x*l) + b - (Wx + b) = W(x*(l-1))`` so the result is ``W(x*(1 + scale*(l-1))) + b``. The cost is
   one extra base-layer forward per such module while suppressed (under ZeRO-3 that base layer's
   parameters are gathered once more). ``scale == 0`` returns ``base`` itself. Hooks are removed on exit.

Nothing here writes parameter data: parameters may be partitioned by ZeRO-3 or sharded by FSDP, and
scoring must leave the model bit-identical (the opt-in full-mode ``delta`` rule below is the one
exception). ``scale == 1`` is a no-op. Merged adapters cannot be damped (their delta is inside the
base weight) and raise ``ISTModelError``.

Full mode (``target: full``, docs/full_mode.md): a block has no adapter to damp, so one of two rules
applies to every block of the suppression set, chosen by the layer map (``full_suppression``):

3. **``residual``** (default): a forward hook on the block turns ``h + f(h)`` into ``h + scale * f(h)``,
   i.e. returns ``h_in + scale * (h_out - h_in)``, ``h_in`` being the block's hidden-state input (first
   positional argument or ``hidden_states=``) and ``h_out`` its output (a tensor, or the first element
   of a tuple, as Hugging Face decoder layers return). No parameter is read or written and nothing is
   allocated beyond the one output tensor; ``scale == 0`` skips the block. Hooks are removed on exit.
   It damps the block's whole contribution (pretrained function plus fine-tuning), so the score
   measures how much the model relies on the block, not only on what fine-tuning changed in it.
4. **``delta``**: the block's trained weights are set to ``W0 + scale * (W - W0)`` for the scoring
   forwards (``W0``: host copies taken at discovery) and set back to the saved ``W`` bit-exactly on
   exit. This damps the fine-tuning delta only, as PEFT mode does. It writes parameter data (under
   ZeRO-3 through ``deepspeed.zero.GatheredParameters`` with ``modifier_rank=0``, a collective every rank
   runs in the same order) and holds ``W0`` of every trained block plus ``W`` of the suppressed blocks
   in host memory. Not available on FSDP2-sharded models.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ist_ds.compat.deepspeed import is_zero3_param
from ist_ds.core.errors import ISTConfigError, ISTModelError
from ist_ds.model.layer_map import LayerMap

logger = logging.getLogger(__name__)

#: Tuner layer types whose forward multiplies the adapter delta by ``scaling[adapter]`` (see rule 1).
SCALING_TUNER_TYPES: tuple[type, ...] = (LoraLayer, LycorisLayer)


def uses_scaling(module: BaseTunerLayer) -> bool:
    """Whether ``module`` is damped through its ``scaling`` dict (rule 1) rather than a hook (rule 2)."""
    return isinstance(module, SCALING_TUNER_TYPES) and isinstance(getattr(module, "scaling", None), dict)


def _interpolation_hook(scale: float):
    """Forward hook giving ``base + scale * (out - base)``, ``base`` being the adapter-free output."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ISTModelError(
                f"cannot suppress {type(module).__name__}: its output is a {type(output).__name__}, "
                "not a tensor"
            )
        if getattr(module, "disable_adapters", False):
            return output  # adapter already off: nothing to damp
        base = module.base_layer(*args, **kwargs)
        if scale == 0.0:
            return base.to(output.dtype)
        return (base + scale * (output - base)).to(output.dtype)

    return hook


def _hidden_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise ISTModelError(
            f"cannot suppress the residual of {type(module).__name__}: its first argument (or hidden_states=) "
            f"is a {type(h).__name__}, not the hidden-state tensor; use full_suppression: delta"
        )
    return h


def _residual_hook(scale: float):
    """Forward hook giving ``h_in + scale * (h_out - h_in)`` for a block's hidden-state output."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any):
        h_in = _hidden_input(module, args, kwargs)
        if isinstance(output, torch.Tensor):
            h_out, rest = output, None
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            h_out, rest = output[0], output
        else:
            raise ISTModelError(
                f"cannot suppress the residual of {type(module).__name__}: its output is a "
                f"{type(output).__name__}, not a hidden-state tensor or a tuple starting with one"
            )
        if h_out.shape != h_in.shape:
            raise ISTModelError(
                f"cannot suppress the residual of {type(module).__name__}: output shape {tuple(h_out.shape)} "
                f"differs from the input's {tuple(h_in.shape)} (not a residual block)"
            )
        h_in = h_in.to(h_out.dtype)
        damped = h_in if scale == 0.0 else h_in + scale * (h_out - h_in)
        if rest is None:
            return damped
        return type(rest)([damped, *rest[1:]]) if isinstance(rest, list) else (damped, *rest[1:])

    return hook


@contextmanager
def suppress_residual(layer_map: LayerMap, layer_indices: Iterable[int], scale: float) -> Iterator[None]:
    """Full mode, rule 3: scale the residual contribution of the given blocks by ``scale``."""
    scale = float(scale)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for i in sorted(set(layer_indices)):
            handles.append(layer_map.layers[i].module.register_forward_hook(_residual_hook(scale), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _writable(params: list[torch.nn.Parameter]):
    """A context in which ``p.data`` is the whole parameter and writes to it stick (ZeRO-3: gathered)."""
    if any(is_zero3_param(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@contextmanager
def suppress_delta(layer_map: LayerMap, layer_indices: Iterable[int], scale: float) -> Iterator[None]:
    """Full mode, rule 4: set the given blocks' weights to ``W0 + scale * (W - W0)``; restore ``W`` exactly."""
    scale = float(scale)
    layers = [layer_map.layers[i] for i in sorted(set(layer_indices))]
    for layer in layers:
        if layer.initial_weights is None:
            raise ISTModelError(
                f"block {layer.index} has no copy of its initial weights; full_suppression: delta needs a layer "
                "map from discover_full_layers(..., keep_initial=True)"
            )
    saved: list[tuple[list[torch.nn.Parameter], list[torch.Tensor]]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                params = [p for _, p in layer.params]
                with _writable(params):
                    current = [p.data.to("cpu", copy=True) for p in params]
                    saved.append((params, current))
                    for p, w0, w in zip(params, layer.initial_weights, current):
                        w0 = w0.to(p.device, torch.float32)
                        p.data.copy_(w0 + scale * (p.data.float() - w0))
        yield
    finally:
        with torch.no_grad():
            for params, current in saved:
                with _writable(params):
                    for p, w in zip(params, current):
                        p.data.copy_(w)


@contextmanager
def suppress(layer_map: LayerMap, layer_indices: Iterable[int], scale: float) -> Iterator[None]:
    """Damp the PEFT output of every tuner module in the layers ``layer_indices`` by ``scale``.

    For a full-mode layer map (``layer_map.target == "full"``) the blocks themselves are damped instead,
    by rule 3 (``residual``) or rule 4 (``delta``) of the module docstring.

    See the module docstring for how each tuner type is damped. Everything is restored bit-exactly on
    exit, also when the body raises.
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ISTConfigError(f"suppression scale must be a finite number, got {scale!r}")
    indices = sorted(set(layer_indices))
    n = layer_map.num_layers
    for i in indices:
        if not 0 <= i < n:
            raise ISTConfigError(f"layer index {i!r} out of range for a model with {n} transformer blocks")
    if getattr(layer_map, "target", "peft") == "full":
        if scale == 1.0 or not indices:
            yield
            return
        rule = suppress_delta if layer_map.full_suppression == "delta" else suppress_residual
        logger.debug("suppressing blocks %s by %g (full mode, %s)", indices, scale, layer_map.full_suppression)
        with rule(layer_map, indices, scale):
            yield
        return
    modules = [m for i in indices for m in layer_map.layers[i].tuner_modules]
    for m in modules:
        if getattr(m, "merged", False):
            raise ISTModelError(
                f"cannot suppress a merged {type(m).__name__} adapter; unmerge the adapters before IST scoring"
            )
    if scale == 1.0 or not modules:
        yield
        return

    saved: list[tuple[Any, dict[str, Any]]] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for m in modules:
            if uses_scaling(m):
                scaling = m.scaling
                originals = {name: scaling[name] for name in m.active_adapters if name in scaling}
                saved.append((m, originals))
                for name, value in originals.items():
                    scaling[name] = value * scale
            else:
                handles.append(m.register_forward_hook(_interpolation_hook(scale), with_kwargs=True))
        logger.debug("suppressing layers %s by %g (%d scaling, %d hooked modules)",
                     indices, scale, len(saved), len(handles))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m, originals in saved:
            for name, value in originals.items():
                m.scaling[name] = value


__all__ = ["suppress", "suppress_residual", "suppress_delta", "uses_scaling", "SCALING_TUNER_TYPES"]
