"""One optimizer param group per transformer layer, tagged with its index.

IST decides per step which layers train; the optimizer gate hides whole param groups from the step,
so the groups must not mix layers. Hyper-parameters of the caller's own groups (a different
learning rate or no weight decay for some parameters) are kept: a layer whose parameters came from
two caller groups gets two groups, both tagged with the layer.
"""

from __future__ import annotations

import logging
from typing import Iterable

from ist_ds.model.layer_map import LayerMap

logger = logging.getLogger(__name__)

#: The key of a param group that holds the index of its layer; the optimizer gate reads it.
LAYER_KEY = "ist_layer"

OUTSIDE = -1  # the tag of parameters outside the blocks; they train at every step


def layer_param_groups(layer_map: LayerMap, params: Iterable | None = None, **defaults) -> list[dict]:
    """Regroup ``params`` (parameters or group dicts, as given to an optimizer) by IST layer.

    ``params=None`` means every trainable parameter the layer map knows. Parameters the layer map
    does not know (frozen base weights) are left out, as an optimizer would ignore them anyway.
    """
    owner: dict[int, int] = {}
    for layer in layer_map.layers:
        for _, p in layer.params:
            owner[id(p)] = layer.index
    for _, p in layer_map.outside_params:
        owner[id(p)] = OUTSIDE

    if params is None:
        user_groups = [{"params": [p for layer in layer_map.layers for _, p in layer.params]
                        + [p for _, p in layer_map.outside_params]}]
    else:
        params = list(params)
        user_groups = params if params and isinstance(params[0], dict) else [{"params": params}]

    grouped: dict[tuple[int, int], dict] = {}
    skipped = 0
    for gi, group in enumerate(user_groups):
        options = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            layer = owner.get(id(p))
            if layer is None:
                skipped += 1
                continue
            key = (layer if layer != OUTSIDE else 1 << 30, gi)
            if key not in grouped:
                grouped[key] = {**defaults, **options, "params": [], LAYER_KEY: layer}
            grouped[key]["params"].append(p)
    if skipped:
        logger.debug("%d parameters outside the IST layer map were left out of the optimizer", skipped)
    missing = set(owner) - {id(p) for g in grouped.values() for p in g["params"]}
    if missing:
        logger.warning("%d trainable PEFT parameters were not given to the optimizer; they will not train",
                       len(missing))
    return [grouped[k] for k in sorted(grouped)]
