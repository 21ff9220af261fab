"""What IST does, made visible: TensorBoard scalars and the rank-0 progress bar.

A :class:`Monitor` takes ``log(step, {tag: value})`` and ``close()``. :func:`build_monitor` picks one
per job and rank: DeepSpeed's own monitor (``engine.monitor``, which also feeds wandb, CSV or Comet
when the DeepSpeed config turns them on) for the DeepSpeed backend, a
``torch.utils.tensorboard.SummaryWriter`` for the FSDP and single-process backends, and a monitor
that writes nothing on every rank but 0 or when ``training.tensorboard`` is off.

The scalar dictionaries come from :func:`ist_scalars` (scores, training probabilities, selection
counts, the importance update, the memory report) and the job loop (loss, learning rate, tokens per
second, held-out numbers). Tag names are listed in docs/monitoring.md; every per-layer tag ends in
``layer_NN`` (zero-padded, at least two digits) so that TensorBoard sorts layers in order.

:class:`Progress` is the tqdm bar of rank 0; while it is open, log records of ``ist_ds`` are
written above it instead of through it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any, Callable, Mapping

import torch

from ist_ds.compat import monitor as monitor_compat

logger = logging.getLogger(__name__)

#: Event files go to ``<output_dir>/TENSORBOARD_DIR/JOB_NAME`` (DeepSpeed: ``output_path/job_name``).
TENSORBOARD_DIR = "tensorboard"
JOB_NAME = "train"


def tensorboard_dir(output_dir: str) -> str:
    """The directory DeepSpeed is told to write to (``output_path``); events land in ``JOB_NAME`` below it."""
    return os.path.join(output_dir, TENSORBOARD_DIR)


# ---------------------------------------------------------------------- sinks
class Monitor:
    """Where a job's scalars go. This base class writes nothing (ranks other than 0, TensorBoard off)."""

    enabled = False
    probe: "PeakStateProbe | None" = None

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``{tag: value}`` at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and release what the monitor holds."""

    def log_ist(self, step: int, controller) -> None:
        """Record :func:`ist_scalars` of ``controller`` (nothing when disabled or IST is off)."""
        if self.enabled and controller is not None:
            scalars = ist_scalars(controller)
            if self.probe is not None:
                scalars["memory/optimizer_state_peak_bytes"] = float(self.probe.take())
            self.log(step, scalars)


class SummaryWriterMonitor(Monitor):
    """A plain ``torch.utils.tensorboard.SummaryWriter`` (FSDP and single-process backends)."""

    enabled = True

    def __init__(self, log_dir: str, flush_secs: int = 10) -> None:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class DeepSpeedMonitor(Monitor):
    """DeepSpeed's ``MonitorMaster`` (``engine.monitor``): TensorBoard, wandb, CSV, Comet as configured.

    DeepSpeed itself writes only on global rank 0 and flushes after every ``write_events``.
    """

    enabled = True

    def __init__(self, master) -> None:
        self.master = master

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if scalars:
            self.master.write_events([(tag, float(value), int(step)) for tag, value in scalars.items()])

    def close(self) -> None:
        monitor_compat.flush_tensorboard(self.master)  # the engine owns the writer and may still write to it


def build_monitor(recipe, backend, rank: int) -> Monitor:
    """The monitor of a job on this rank: DeepSpeed's when the engine has one enabled, else a SummaryWriter."""
    if rank != 0 or not recipe.training.tensorboard:
        return Monitor()
    engine = getattr(backend, "engine", None)
    master = monitor_compat.deepspeed_monitor(engine) if engine is not None else None
    if master is not None:
        logger.info("TensorBoard: DeepSpeed monitor, events in %s", _deepspeed_log_dir(master))
        monitor: Monitor = DeepSpeedMonitor(master)
    else:
        log_dir = os.path.join(tensorboard_dir(recipe.output_dir), JOB_NAME)
        logger.info("TensorBoard: events in %s", log_dir)
        monitor = SummaryWriterMonitor(log_dir)
    gate = getattr(getattr(backend, "ist", None), "gate", None)
    if gate is not None:
        monitor.probe = PeakStateProbe(gate.optimizer)
    return monitor


class PeakStateProbe:
    """The most optimizer-state bytes the optimizer held right after one of its steps, since last asked.

    Between two steps the optimizer holds less than during one (``drop`` and ``offload`` release
    the state of layers leaving the selection, and a layer entering it gets its state when it is
    stepped), so this is the figure that shows what a step needs. Wraps ``optimizer.step`` (the IST
    gate's); DeepSpeed ZeRO calls it once per param group or sub-group, and the maximum over those
    calls is the state after the whole step. Rank 0 only: it measures this rank's share.
    """

    def __init__(self, optimizer) -> None:
        from ist_ds.optim.state_store import live_state_bytes

        self.peak = 0
        inner = optimizer.step

        def step(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.peak = max(self.peak, sum(live_state_bytes(optimizer.state).values()))
            return out

        optimizer.step = step

    def take(self) -> int:
        peak, self.peak = self.peak, 0
        return peak


def _deepspeed_log_dir(master) -> str:
    return monitor_compat.tensorboard_event_dir(master) or "(no TensorBoard; other DeepSpeed monitors)"


# ---------------------------------------------------------------------- scalars
def layer_tag(group: str, layer: int, num_layers: int) -> str:
    """``group/layer_NN``, zero-padded to the width of the largest index (at least two digits)."""
    width = max(2, len(str(max(num_layers - 1, 0))))
    return f"{group}/layer_{layer:0{width}d}"


def training_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """``sigmoid(-s) / sum(sigmoid(-s))``: each layer's share of the sampling weight (sums to 1)."""
    w = torch.sigmoid(-scores.detach().double().cpu())
    return w / w.sum()


def importance_updated(controller) -> bool:
    """Whether the optimizer step that just finished was followed by an importance update."""
    if controller is None or controller.config.strategy != "ist":
        return False
    return controller.step > 0 and controller.step % controller.config.update_interval == 0


def memory_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """``memory/*`` tags from ``controller.memory_report()`` (bytes on this rank)."""
    out: dict[str, float] = {"memory/trainable_param_bytes": float(report["trainable_param_bytes"])}
    state = report.get("optimizer_state_bytes")
    if state is not None:
        out["memory/optimizer_state_live_bytes"] = float(sum(v for k, v in state.items() if k.startswith("live_")))
        out["memory/optimizer_state_offloaded_bytes"] = float(
            sum(v for k, v in state.items() if k.startswith("offloaded_")))
        for where, n in sorted(state.items()):
            out[f"memory/optimizer_state_bytes/{where}"] = float(n)
    return out


def ist_scalars(controller) -> dict[str, float]:
    """``ist/*`` and ``memory/*`` tags of the controller's state after the current optimizer step.

    Importance and training probability only with ``strategy: ist`` (RST and uniform have no
    scores); ``ist/update_seconds`` and the scoring losses only right after an importance update.
    Nothing here is a collective: it is safe to call on rank 0 alone.
    """
    if controller is None:
        return {}
    n = controller.num_layers
    out: dict[str, float] = {}
    if controller.config.strategy == "ist":
        scores = controller.scores.detach().double().cpu()
        prob = training_probabilities(scores)
        for i in range(n):
            out[layer_tag("ist/importance", i, n)] = float(-scores[i])
        for i in range(n):
            out[layer_tag("ist/train_prob", i, n)] = float(prob[i])
    for i, count in enumerate(controller.selection_counts):
        out[layer_tag("ist/selected_count", i, n)] = float(count)
    if importance_updated(controller):
        out["ist/update_seconds"] = float(controller.last_update_seconds)
        losses = [float(x) for x in controller.last_losses]
        if losses:
            out["ist/scoring_loss_mean"] = sum(losses) / len(losses)
            out["ist/scoring_loss_spread"] = max(losses) - min(losses)
    out.update(memory_scalars(controller.memory_report()))
    return out


# ---------------------------------------------------------------------- progress bar
class _AboveBar:
    """A stream for logging handlers: each write goes above the open tqdm bar(s)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


def _human(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}" if unit else f"{x:.0f}"
        x /= 1000
    return f"{x:.1f}T"


class Progress:
    """The tqdm bar of rank 0, or nothing.

    Shown only when ``enabled`` (rank 0 and ``training.progress``) and ``stream`` (stdout by default)
    is a terminal. While it is open, the ``ist_ds`` logging handlers that write to that terminal
    write above the bar, so log lines and the bar do not tear each other. ``total_is_bound``: the
    total is an upper bound, and the bar ends full at whatever count it reached.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "step", *, enabled: bool = True,
                 initial: int = 0, stream=None, leave: bool = True, total_is_bound: bool = False) -> None:
        self.bar = None
        self._total_is_bound = total_is_bound
        self._swapped: list[tuple[logging.StreamHandler, Any]] = []
        self._rate: float | None = None
        stream = stream if stream is not None else sys.stdout
        if not enabled or not _isatty(stream):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream,
                        leave=leave)
        for handler in logging.getLogger("ist_ds").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr, stream):
                self._swapped.append((handler, handler.stream))
                handler.setStream(_AboveBar(handler.stream))

    @property
    def active(self) -> bool:
        return self.bar is not None

    def step(self, loss: float | None = None, tokens: int | None = None, seconds: float | None = None,
             layers: list[int] | None = None, num_layers: int | None = None) -> None:
        """Advance by one step and show its loss, tokens per second (smoothed) and trained layers."""
        if self.bar is None:
            return
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tokens is not None and seconds:
            rate = tokens / seconds
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
            parts.append(f"{_human(self._rate)} tok/s")
        if layers is not None:
            shown = "all" if num_layers is not None and len(layers) == num_layers else ",".join(map(str, layers))
            parts.append(f"layers {shown}")
        self.bar.set_postfix_str(" | ".join(parts), refresh=False)
        self.bar.update(1)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` that advances the bar by one on every call (e.g. the forward of an evaluation)."""
        if self.bar is None:
            return fn

        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.bar.update(1)
            return out

        return counted

    def close(self) -> None:
        if self.bar is None:
            return
        if self._total_is_bound and self.bar.total is not None and self.bar.n < self.bar.total:
            self.bar.total = self.bar.n  # the total was an upper bound; end the bar full
            self.bar.refresh()
        self.bar.close()
        self.bar = None
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped = []

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def eval_forward_count(num_loss_examples: int, num_choice_records: int, batch_size: int, world_size: int) -> int:
    """Upper bound on the forwards one rank runs in the final evaluation (loss batches + one per record)."""
    per_rank = math.ceil(num_loss_examples / world_size)
    return math.ceil(per_rank / batch_size) + math.ceil(num_choice_records / world_size)

