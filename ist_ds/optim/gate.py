"""Make "unselected" mean "untouched" inside any optimizer, sharded or not.

IST builds the optimizer with one param group per transformer layer, tagged with the layer index
under :data:`LAYER_KEY` (``-1`` for parameters outside the blocks, which always train). The gate
wraps the optimizer's ``step``: while it runs, the groups of unselected layers show an empty
``params`` list, so the optimizer neither applies a (zero) gradient, nor weight decay, nor advances
Adam's moments or step count for them.

This one seam serves every backend because of how each one calls the optimizer it wraps:
plain PyTorch and FSDP2 step the optimizer directly; DeepSpeed ZeRO-1/2 narrows ``param_groups``
to one group and calls the inner optimizer per group, ZeRO-3 does the same per sub-group (sub-groups
never straddle param groups), and all of them copy fp32 masters back to the model's weights after
the step, so an unstepped master leaves the weight bit-identical. DeepSpeed rewrites the ``params``
of the groups (flat fp32 partitions); the gate therefore learns which tensors belong to a layer by
watching the groups at each call rather than trusting the lists it was built with.

Besides the optimizer's own state, a backend can hand the gate more per-layer memory to move on a
selection change (:class:`LayerMemory`; under ZeRO, the fp32 masters and gradient partitions of
:mod:`ist_ds.backends.zero_memory`).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ist_ds.model.param_groups import LAYER_KEY
from ist_ds.optim.state_store import OptimizerStateStore, live_state_bytes


class LayerMemory(Protocol):
    """Per-layer memory a backend moves away while a layer is not selected (beyond the optimizer state).

    Optional, looked up when present: ``on_selection()`` (called once a new selection is in place),
    ``uninstall()`` (called by :meth:`OptimizerGate.unwrap`) and ``master_bytes()`` (for reports).
    """

    def release(self, layer: int) -> None: ...

    def restore(self, layer: int, non_blocking: bool = True) -> None: ...

    def restore_all(self) -> None: ...


class OptimizerGate:
    """Wraps ``optimizer.step`` so that only the selected layers' param groups are stepped."""

    def __init__(self, optimizer: torch.optim.Optimizer, store: OptimizerStateStore | None = None) -> None:
        self.optimizer = optimizer
        self.store = store or OptimizerStateStore("keep")
        self.memories: list[LayerMemory] = []
        self.selected: frozenset[int] = frozenset()
        self.all_layers = sorted({g[LAYER_KEY] for g in optimizer.param_groups if g.get(LAYER_KEY, -1) >= 0})
        # layer -> {id(tensor): tensor} of every tensor the optimizer has stepped (or could step) for it
        self._masters: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in self.all_layers}
        self._record(optimizer.param_groups)
        self._inner_step: Callable = optimizer.step

        def gated_step(*args, **kwargs):
            return self._gated_step(*args, **kwargs)

        optimizer.step = gated_step

    def _record(self, groups) -> None:
        for group in groups:
            layer = group.get(LAYER_KEY, -1)
            if layer >= 0:
                for t in group["params"]:
                    self._masters[layer][id(t)] = t

    def _gated_step(self, *args, **kwargs):
        groups = self.optimizer.param_groups
        self._record(groups)
        hidden = []
        for group in groups:
            layer = group.get(LAYER_KEY, -1)
            if layer >= 0 and layer not in self.selected:
                hidden.append((group, group["params"]))
                group["params"] = []
        try:
            return self._inner_step(*args, **kwargs)
        finally:
            for group, params in hidden:
                group["params"] = params

    def masters(self, layer: int) -> list[torch.Tensor]:
        """The tensors the optimizer holds state for on behalf of ``layer``."""
        return list(self._masters[layer].values())

    def select(self, selected) -> None:
        """Switch to a new selection: release the state of layers leaving it, restore those entering."""
        new = frozenset(selected)
        state = self.optimizer.state
        # Layers leave first, so that what they free is available to the layers entering.
        for layer in self.all_layers:
            if layer not in new:  # a no-op for state already released; also catches loaded state
                self.store.release(layer, state, self.masters(layer))
                for memory in self.memories:
                    memory.release(layer)
        for layer in self.all_layers:
            if layer in new:  # non_blocking copies from pinned memory: they overlap the next forward
                self.store.restore(layer, state)
                for memory in self.memories:
                    memory.restore(layer)
        self.selected = new
        for memory in self.memories:
            on_selection = getattr(memory, "on_selection", None)
            if on_selection is not None:
                on_selection()

    def restore_all(self) -> None:
        """Put every layer's state and memory back (before a checkpoint is written or loaded)."""
        self.store.restore_all(self.optimizer.state)
        for memory in self.memories:
            memory.restore_all()

    def trains(self, layer: int) -> bool:
        """Whether ``layer`` trains in the current step (parameters outside the blocks always do)."""
        return layer < 0 or layer in self.selected

    def unwrap(self) -> None:
        """Hand the optimizer back as it was (and undo what the backends' memories installed)."""
        self.optimizer.step = self._inner_step
        for memory in self.memories:
            uninstall = getattr(memory, "uninstall", None)
            if uninstall is not None:
                uninstall()
        self.memories.clear()

    # ------------------------------------------------------------------ reporting
    def state_bytes(self) -> dict[str, int]:
        """Optimizer-state bytes on this rank by location: live by device type, plus the store's."""
        out = {f"live_{dev}": n for dev, n in live_state_bytes(self.optimizer.state).items()}
        for where, n in self.store.offloaded_bytes().items():
            out[f"offloaded_{where}"] = n
        return out

    def master_bytes(self) -> dict[str, int] | None:
        """fp32 master bytes by location, where a backend tracks masters separately (ZeRO); else None."""
        found = [m.master_bytes() for m in self.memories if hasattr(m, "master_bytes")]
        if not found:
            return None
        return {k: sum(f[k] for f in found) for k in found[0]}
