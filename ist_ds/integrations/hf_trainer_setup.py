"""What :class:`~ist_ds.integrations.hf_trainer.ISTTrainerMixin` settles before training: the IST
settings of the run and an optimizer with one param group per IST layer."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTConfigError
from ist_ds.model.layers import LayerMap
from ist_ds.model.param_groups import layer_param_groups
from ist_ds.model.param_groups import LAYER_KEY

logger = logging.getLogger(__name__)


def read_ist_config(deepspeed_config: Mapping[str, Any] | None = None,
                    ist_config: ISTConfig | Mapping[str, Any] | None = None) -> ISTConfig:
    """The IST settings of a run: the explicit ``ist_config``, else the DeepSpeed config's ``ist`` block.

    Both may be given only when they agree. Neither gives ``ISTConfig(enabled=False)``: the trainer
    then behaves exactly like ``transformers.Trainer``.
    """
    block = deepspeed_config.get("ist") if deepspeed_config is not None else None
    if ist_config is not None:
        config = ISTConfig.from_dict(ist_config)
        if block is not None and ISTConfig.from_dict(block) != config:
            raise ISTConfigError(
                "IST settings were given twice and differ: as ist_config= and as the 'ist' block of the "
                "DeepSpeed config; keep one of them"
            )
        return config
    return ISTConfig.from_dict(block)


def regroup_by_layer(optimizer, layer_map: LayerMap) -> None:
    """Split an optimizer's param groups by IST layer, in place (groups keep their options)."""
    from accelerate.utils import DummyOptim

    if isinstance(optimizer, DummyOptim):  # DeepSpeed config's optimizer: these become model_parameters
        params = list(optimizer.params)
        if not (params and isinstance(params[0], dict) and all(LAYER_KEY in g for g in params)):
            optimizer.params = layer_param_groups(layer_map, params)
        return
    groups = optimizer.param_groups
    if groups and all(LAYER_KEY in g for g in groups):
        return
    if optimizer.state:
        raise ISTConfigError("the optimizer has already stepped; IST needs to regroup it per layer before "
                             "its first step")
    regrouped = layer_param_groups(layer_map, groups)
    optimizer.param_groups = []
    for group in regrouped:
        optimizer.add_param_group(group)
    logger.info("%s regrouped into %d per-layer param groups", type(optimizer).__name__, len(regrouped))


__all__ = ["read_ist_config", "regroup_by_layer"]
