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
scoring must leave the model bit-identical. ``scale == 1`` is a no-op. Merged adapters cannot be damped
(their delta is inside the base weight) and raise ``ISTModelError``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ist_ds.errors import ISTConfigError, ISTModelError
from ist_ds.layers import LayerMap

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


@contextmanager
def suppress(layer_map: LayerMap, layer_indices: Iterable[int], scale: float) -> Iterator[None]:
    """Damp the PEFT output of every tuner module in the layers ``layer_indices`` by ``scale``.

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


__all__ = ["suppress", "uses_scaling", "SCALING_TUNER_TYPES"]
