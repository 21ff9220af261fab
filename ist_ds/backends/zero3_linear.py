"""ZeRO-3's memory-efficient linear, saving a linear's input only when its weight trains.

ZeRO-3 (with ``zero_optimization.memory_efficient_linear``, on by default) replaces
``torch.nn.functional.linear`` process-wide by an autograd function that saves the weight as the
parameter itself (so the gathered weight can be released after the forward and gathered again in
backward) and *always* saves the input. The input is needed only for the weight's gradient. Under
uniform LoRA that costs little, but under IST most LoRA weights are frozen in a step, and the frozen
base weights never need it: with DeepSpeed's function every base linear of every block still keeps
its input alive until backward, which erases a quarter of the activation memory that freezing
unselected layers saves (bench/memory.py measures both).

:class:`SelectiveLinearFunction` is DeepSpeed's function with one change: the input is saved only
when the weight requires grad at the forward (``ctx.needs_input_grad[1]`` is then true; otherwise
DeepSpeed's backward never reads the input). Everything else (autocast handling, gathering a
partitioned weight in backward, the bias gradient) is DeepSpeed's own code, inherited.

:func:`install` swaps it in for DeepSpeed's function, only where DeepSpeed installed its own. What
this relies on in DeepSpeed (the function, what it saves, how ZeRO-3 installs it) is named in
:mod:`ist_ds.compat.deepspeed`.
"""

from __future__ import annotations

import functools
import logging

import torch

from ist_ds.compat import deepspeed as ds_compat

logger = logging.getLogger(__name__)


@functools.cache
def _selective_function():
    """Built on first use, so that importing ist_ds does not import DeepSpeed."""
    base = ds_compat.zero3_linear_function()

    class SelectiveLinearFunction(base):
        @staticmethod
        def setup_context(ctx, inputs, output):
            base.setup_context(ctx, inputs, output)
            weight = inputs[1]
            if not weight.requires_grad:
                bias = inputs[2] if len(inputs) > 2 else None
                ctx.save_for_backward(None, weight, bias)  # replaces DeepSpeed's (input, weight, bias)

    return SelectiveLinearFunction


def selective_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` under ZeRO-3 with IST: see the module docstring."""
    return _selective_function().apply(input, weight, bias)


def install() -> bool:
    """Use :func:`selective_linear` where DeepSpeed installed its ZeRO-3 linear; True if swapped.

    Does nothing when ``torch.nn.functional.linear`` is anything else (torch's own, because
    ``memory_efficient_linear`` is off, or another library's replacement).
    """
    already = torch.nn.functional.linear is selective_linear
    swapped = ds_compat.replace_zero3_linear(selective_linear)
    if swapped and not already:
        logger.info("ZeRO-3 linear: inputs are saved for backward only where the weight trains")
    return swapped


__all__ = ["selective_linear", "install"]
