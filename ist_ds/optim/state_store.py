"""Where the optimizer state of unselected layers lives: kept, offloaded or dropped.

Works on any ``torch.optim.Optimizer``-like object whose ``state`` maps a tensor (the parameter the
optimizer steps: the parameter itself in plain PyTorch and FSDP2, a flat fp32 master partition under
DeepSpeed ZeRO) to a dict of tensors. Nothing here knows about a backend. State held as DTensors
(FSDP2) is moved and counted by its local shard, and re-wrapped with the same sharding on restore.

- ``keep``: nothing moves (the reference behaviour).
- ``offload``: the state of a layer leaves the optimizer when the layer is deselected and comes back,
  bit-identical, when it is selected again. Targets: ``host`` (pinned CPU memory when the optimizer
  lives on an accelerator, copied back with ``non_blocking``) or ``disk`` (one file per tensor set,
  read back with ``torch.load(weights_only=True)``). A tensor on an accelerator is *parked*
  (:mod:`ist_ds.optim.parking`): its storage shrinks to 0 bytes in place and is refilled on
  restore, so views of it held elsewhere (DeepSpeed links fragments of the moments to each
  parameter) neither keep the memory alive nor go stale.
- ``drop``: the state is freed (its storage too, even where views of it are held elsewhere); the
  optimizer re-creates it at zero the next time it steps the tensor (torch AdamW and
  DeepSpeedCPUAdam both do so lazily), so a re-selected layer restarts Adam at step 1.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ist_ds.optim.parking import can_park

try:  # FSDP2 keeps the optimizer state of a sharded parameter as a DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

logger = logging.getLogger(__name__)


def _tensor_bytes(value) -> int:
    """Bytes this process holds for ``value``: the local shard of a DTensor, else the whole tensor."""
    if isinstance(value, DTensor):
        value = value.to_local()
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


@dataclass
class _Offloaded:
    """One tensor's optimizer state while it is away from the optimizer."""

    host: dict | None = None           # key -> tensor on the host (or a non-tensor value)
    path: str | None = None            # the file on disk, for the disk target
    devices: dict = field(default_factory=dict)  # key -> device the tensor came from
    parked: dict = field(default_factory=dict)   # key -> the accelerator tensor itself, storage freed
    dtensors: dict = field(default_factory=dict)  # key -> (mesh, placements, shape, stride) of a DTensor
    nbytes: int = 0


class OptimizerStateStore:
    """Moves the optimizer state of whole layers out of, and back into, an optimizer."""

    def __init__(self, mode: str = "keep", target: str = "host", directory: str | None = None,
                 rank: int = 0) -> None:
        self.mode = mode
        self.target = target
        self.directory = directory
        self.rank = rank
        self._away: dict[int, list[tuple[torch.Tensor, _Offloaded]]] = {}
        if mode == "offload" and target == "disk":
            if not directory:
                raise ValueError("offload to disk needs a directory")
            os.makedirs(directory, exist_ok=True)

    # ------------------------------------------------------------------ moves
    def release(self, layer: int, state: Mapping, tensors: Iterable[torch.Tensor]) -> None:
        """Take ``layer``'s state out of the optimizer (``offload``) or free it (``drop``)."""
        if self.mode == "keep":
            return
        for j, t in enumerate(tensors):
            if t not in state:
                continue
            entry = state.pop(t)
            # An empty entry holds nothing; storing it would shadow state already offloaded for ``t``
            # (DeepSpeed's lazy hp-param linkage indexes the defaultdict ``state`` for every group).
            if self.mode == "drop":
                _free(entry)
                continue
            if not entry:
                continue
            self._away.setdefault(layer, []).append((t, self._offload(layer, j, entry)))

    def restore(self, layer: int, state: dict, non_blocking: bool = True) -> None:
        """Put an offloaded layer's state back into the optimizer (a no-op for keep and drop)."""
        for t, off in self._away.pop(layer, []):
            state[t] = self._load(off, non_blocking)

    def restore_all(self, state: dict) -> list[int]:
        """Bring every offloaded layer back (before a checkpoint). Returns the layers it moved."""
        layers = sorted(self._away)
        for layer in layers:
            self.restore(layer, state, non_blocking=False)
        return layers

    def _offload(self, layer: int, j: int, entry: dict) -> _Offloaded:
        off = _Offloaded()
        host = {}
        for key, value in entry.items():
            if isinstance(value, DTensor):  # move only this rank's shard; re-wrapped on restore
                off.dtensors[key] = (value.device_mesh, value.placements, value.shape, value.stride())
                value = value.to_local()
            if torch.is_tensor(value):
                off.devices[key] = value.device
                off.nbytes += _tensor_bytes(value)
                if value.device.type == "cpu":
                    host[key] = value  # already on the host: keep the very tensor, no copy
                else:
                    pinned = torch.empty(value.shape, dtype=value.dtype, device="cpu",
                                         pin_memory=torch.cuda.is_available())
                    pinned.copy_(value)
                    host[key] = pinned
                    if can_park(value):  # free the device memory in place; refilled on restore
                        value.untyped_storage().resize_(0)
                        off.parked[key] = value
            else:
                host[key] = value
        if self.target == "disk":
            off.path = os.path.join(self.directory, f"rank{self.rank}-layer{layer}-{j}.pt")
            torch.save(host, off.path)
        else:
            off.host = host
        return off

    @staticmethod
    def _load(off: _Offloaded, non_blocking: bool) -> dict:
        if off.path is not None:
            host = torch.load(off.path, map_location="cpu", weights_only=True)
            os.remove(off.path)
        else:
            host = off.host
        out = {}
        for key, value in host.items():
            if key in off.parked:  # refill the very tensor that was parked
                target = off.parked[key]
                target.untyped_storage().resize_(value.numel() * value.element_size())
                target.copy_(value, non_blocking=non_blocking)
                out[key] = target
            elif key in off.devices and value.device != off.devices[key]:
                out[key] = value.to(off.devices[key], non_blocking=non_blocking)
            else:
                out[key] = value
        for key, (mesh, placements, shape, stride) in off.dtensors.items():
            out[key] = DTensor.from_local(out[key], mesh, placements, run_check=False, shape=shape, stride=stride)
        return out

    # ------------------------------------------------------------------ accounting
    def offloaded_layers(self) -> list[int]:
        return sorted(self._away)

    def offloaded_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state held by the store, by location (``host``, ``disk``)."""
        out = {"host": 0, "disk": 0}
        for entries in self._away.values():
            for _, off in entries:
                out["disk" if off.path else "host"] += off.nbytes
        return out


def _free(entry: dict) -> None:
    """Free the memory of dropped state even where views of it are held elsewhere."""
    for value in entry.values():
        if isinstance(value, DTensor):
            value = value.to_local()
        if torch.is_tensor(value) and value.device.type != "cpu" and can_park(value):
            value.untyped_storage().resize_(0)


def live_state_bytes(state: Mapping) -> dict[str, int]:
    """Bytes of optimizer state held by the optimizer itself, by device type (``cpu``, ``cuda``...)."""
    out: dict[str, int] = defaultdict(int)
    for entry in state.values():
        for value in entry.values():
            if torch.is_tensor(value):
                out[value.device.type] += _tensor_bytes(value)
    return dict(out)
