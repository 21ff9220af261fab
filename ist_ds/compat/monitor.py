"""DeepSpeed's monitor internals ist_ds uses, checked against DeepSpeed 0.19.8.

The job runner logs IST's scalars through the DeepSpeed engine's own monitor, so that they land in
the same TensorBoard (or wandb, CSV, Comet) files as DeepSpeed's. Writing goes through the public
``write_events``; finding the monitor and its TensorBoard writer does not:

- ``engine.monitor``: the engine's ``MonitorMaster`` (``deepspeed.monitor.monitor``), with ``enabled``;
- ``MonitorMaster.tb_monitor``: its ``TensorBoardMonitor`` (None without TensorBoard, and on ranks
  other than 0), with ``summary_writer`` (a ``torch.utils.tensorboard.SummaryWriter``),
  ``output_path`` and ``job_name``.

A module of its own rather than part of :mod:`ist_ds.compat.deepspeed`: DeepSpeed's monitor package
is separate from its engine and ZeRO code, changes on its own, and only :mod:`ist_ds.observe` uses it.
``tests/test_compat.py`` checks every name here on a live engine's monitor.
"""

from __future__ import annotations

import os

CHECKED_VERSION = "0.19.8"


def deepspeed_monitor(engine):
    """The engine's enabled ``MonitorMaster`` (``engine.monitor``), or None (no monitor, or none enabled)."""
    master = getattr(engine, "monitor", None)
    if master is not None and getattr(master, "enabled", False):
        return master
    return None


def flush_tensorboard(master) -> None:
    """Flush the TensorBoard writer of a ``MonitorMaster`` (``tb_monitor.summary_writer``), if it has one.

    The engine owns the writer and may still write to it, so it is flushed, not closed.
    """
    tb = getattr(master, "tb_monitor", None)
    writer = getattr(tb, "summary_writer", None) if tb is not None else None
    if writer is not None:
        writer.flush()


def tensorboard_event_dir(master) -> str | None:
    """Where a ``MonitorMaster`` writes TensorBoard events (``tb_monitor.output_path``/``job_name``), or None."""
    tb = getattr(master, "tb_monitor", None)
    if tb is None:
        return None
    return os.path.join(str(tb.output_path), str(tb.job_name))
