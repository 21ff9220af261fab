"""The signature check every compat module runs on the framework methods it relies on."""

from __future__ import annotations

import inspect
from typing import Callable


def method_problems(cls, methods: dict[str, tuple[str, ...]], unwrap: Callable = lambda fn: fn) -> list[str]:
    """What differs in ``cls`` from ``{method: leading parameter names after self}``; empty if nothing.

    ``unwrap`` finds the function under decorators that hide its signature (DeepSpeed's do).
    """
    out = []
    for name, params in methods.items():
        fn = getattr(cls, name, None)
        if not callable(fn):
            out.append(f"{cls.__name__}.{name} is missing")
            continue
        got = tuple(p for p in inspect.signature(unwrap(fn)).parameters if p != "self")
        if got[:len(params)] != params:
            out.append(f"{cls.__name__}.{name}{got} no longer takes {params}")
    return out
