"""Checkpoint files that survive kills and refuse foreign code.

- **Publish last.** A checkpoint directory counts only once its IST state file exists and ``latest``
  names it. Ranks write their files, meet at a barrier, then rank 0 writes the IST state and replaces
  ``latest`` atomically (temporary file, ``fsync``, ``os.replace``). A kill at any moment leaves the
  previous ``latest`` pointing at a complete checkpoint.
- **Safe loading.** Every file is read with ``torch.load(weights_only=True)``: tensors, containers
  and plain numbers only, plus a short allowlist of DeepSpeed's own data classes. A checkpoint that
  would need any other class (i.e. pickled code) is refused with :class:`ISTCheckpointError`.
- **Exact resume.** Each rank saves its RNG states (torch, CUDA, Python's ``random``), so dropout
  and anything else random continues as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import os
import random

import torch

from ist_ds.errors import ISTCheckpointError

LATEST = "latest"
IST_STATE_FILE = "ist_state.pt"


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's data classes that its checkpoint files contain (none runs code when unpickled)."""
    found = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        found += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return found


def safe_load(path: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's data classes allowed; clear errors."""
    if not os.path.isfile(path):
        raise ISTCheckpointError(f"checkpoint file missing: {path}")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure to read is the same user-facing problem
        if "Unsupported global" in str(e) or "weights_only" in str(e).lower() and "GLOBAL" in str(e):
            raise ISTCheckpointError(f"{path} contains pickled objects that are not plain data; refusing to load "
                                     f"it ({str(e).splitlines()[-1][:300]})") from e
        raise ISTCheckpointError(f"{path} cannot be read: it is truncated, corrupted or not a checkpoint "
                                 f"({type(e).__name__}: {str(e)[:300]})") from e


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_latest(save_dir: str, tag: str) -> None:
    atomic_write_text(os.path.join(save_dir, LATEST), tag)


def read_latest(load_dir: str) -> str | None:
    """The tag ``latest`` names, or None when there is no checkpoint yet; errors for a broken one."""
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise ISTCheckpointError(f"{path} is empty")
    if not os.path.isfile(os.path.join(load_dir, tag, IST_STATE_FILE)):
        raise ISTCheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint "
                                 f"(no {IST_STATE_FILE} in {os.path.join(load_dir, tag)})")
    return tag


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"
