"""Move a tensor's memory away and back without changing the tensor object.

IST takes the fp32 masters (and, on an accelerator, the Adam moments) of unselected layers off the
device. Other objects keep references to those tensors: the optimizer's ``param_groups`` and
``state`` keys, and under DeepSpeed the ``_hp_mapping`` fragments that are *views* of a master. A
move that replaced the tensor (``t.data = t.cpu()``, or popping it from a dict) would leave those
views holding the old storage, so nothing would be freed. Parking instead copies the contents out
(to pinned host memory, or to a file) and shrinks the tensor's storage to zero bytes in place; every
view and reference stays valid and, once unparked, sees the same memory refilled bit for bit. FSDP
frees unsharded parameters the same way (``untyped_storage().resize_(0)``).

Unparking from pinned memory uses ``non_blocking`` copies. On a CUDA device a :class:`CopyStream`
runs them on a side stream, so a prefetch issued right after one optimizer step overlaps the next
forward and backward; whoever reads the tensors first calls :meth:`CopyStream.wait`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Parked:
    """Where one parked tensor's contents are while its storage is empty."""

    tensor: torch.Tensor          # the parked tensor itself (storage of 0 bytes while parked)
    nbytes: int                   # storage bytes to re-allocate
    host: torch.Tensor | None     # the contents on the host (flat, same dtype), or None when on disk
    path: str | None = None       # the file holding the contents, for the disk target


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the storage behind ``t`` as allocated now (0 while parked)."""
    return t.untyped_storage().nbytes()


def can_park(t: torch.Tensor) -> bool:
    """Only a tensor that owns its whole storage, densely, can be parked without touching others."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.numel() * t.element_size() == storage_bytes(t) and storage_bytes(t) > 0)


def park(t: torch.Tensor, path: str | None = None) -> Parked:
    """Copy ``t`` out (host memory, or the file ``path``) and free its storage in place."""
    if not can_park(t):
        raise ValueError("tensor does not own a dense storage of its own; it cannot be parked")
    nbytes = storage_bytes(t)
    with torch.no_grad():
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                           pin_memory=t.device.type != "cpu" and torch.cuda.is_available())
        host.copy_(t)
    if path is not None:
        torch.save(host, path)
        host = None
    t.untyped_storage().resize_(0)
    return Parked(t, nbytes, host, path)


class CopyStream:
    """A side CUDA stream for host-to-device refills, and the event the compute stream waits on.

    On the CPU (and without CUDA) it runs copies inline and :meth:`wait` does nothing.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.stream = (torch.cuda.Stream(device=device)
                       if device is not None and device.type == "cuda" and torch.cuda.is_available() else None)
        self.event = None

    def run(self, copies) -> None:
        """Run ``copies()`` (a callable issuing the copies) on the side stream, after the compute stream's work."""
        if self.stream is None:
            copies()
            return
        # The refilled storage may reuse memory the compute stream freed: start after its queued work.
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            copies()
        self.event = torch.cuda.Event()
        self.event.record(self.stream)

    def wait(self) -> None:
        """Make the compute stream wait for the copies issued so far (call before reading the tensors)."""
        if self.event is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.event)
            self.event = None


def unpark(p: Parked, non_blocking: bool = True) -> torch.Tensor:
    """Re-allocate the storage of a parked tensor and copy its contents back, bit-identical."""
    t = p.tensor
    if p.path is not None:
        host = torch.load(p.path, map_location="cpu", weights_only=True)
        os.remove(p.path)
    else:
        host = p.host
    t.untyped_storage().resize_(p.nbytes)
    with torch.no_grad():
        t.copy_(host, non_blocking=non_blocking and t.device.type != "cpu")
    return t
