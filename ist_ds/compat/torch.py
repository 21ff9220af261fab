"""torch internals ist_ds uses, checked against torch 2.13.0.

Both serve the FSDP2 backend (:mod:`ist_ds.backends.fsdp`):

- ``torch.distributed._composable.checkpoint``: activation checkpointing applied to a module in
  place, keeping its parameter names (``fully_shard`` and IST's layer discovery then see the same
  names as without it). The public ``torch.utils.checkpoint`` wraps a function, not a module, and the
  wrapper class of ``torch.distributed.algorithms._checkpoint`` renames every parameter.
- ``FSDPModule._get_fsdp_state()._lazy_init()``: FSDP2's lazy initialisation, which otherwise runs at
  the first forward. It fixes each block's gradient and reduce dtypes from the parameters that
  require grad at that moment, so IST runs it while every PEFT parameter is still trainable.

``tests/test_compat.py`` exercises both on a live FSDP2 module.
"""

from __future__ import annotations

import torch

CHECKED_VERSION = "2.13.0"


def version() -> str:
    return torch.__version__


def checkpoint_activations(module: torch.nn.Module) -> None:
    """Recompute ``module``'s forward in the backward pass, in place, parameter names unchanged.

    ``torch.distributed._composable.checkpoint(module)``.
    """
    from torch.distributed._composable import checkpoint

    checkpoint(module)


def fsdp_lazy_init(model: torch.nn.Module) -> bool:
    """Run FSDP2's lazy initialisation of a ``fully_shard`` root now; False where this torch lacks it.

    ``model._get_fsdp_state()._lazy_init()`` (idempotent: the first forward then skips it).
    """
    get_state = getattr(model, "_get_fsdp_state", None)
    if get_state is None:
        return False
    lazy_init = getattr(get_state(), "_lazy_init", None)
    if lazy_init is None:
        return False
    lazy_init()
    return True
