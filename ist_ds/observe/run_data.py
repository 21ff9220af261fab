"""What ``ist-ds report`` knows about one finished run, read from its output directory.

A run directory holds TensorBoard event files (every ``events.out.tfevents.*`` below it, as written
by :mod:`ist_ds.observe.monitor`; a resumed run adds newer files), ``summary.json`` and
``recipe.yaml``. :func:`load_run` reads them into a :class:`RunData`; the plots
(:mod:`ist_ds.observe.plots`) and the table (:mod:`ist_ds.observe.report`) only read that. Where the
event files are missing (``training.tensorboard`` off) the numbers come from ``summary.json``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field

import yaml

from ist_ds.core.errors import ISTError

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"/layer_(\d+)$")


def layer_index(tag: str) -> int:
    """The layer number of a per-layer tag (``ist/importance/layer_07`` -> 7)."""
    return int(_LAYER.search(tag).group(1))


class ReportError(ISTError):
    """A run directory cannot be reported on."""


@dataclass
class RunData:
    """What the report knows about one run."""

    path: str
    label: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)

    @property
    def strategy(self) -> str:
        ist = self.recipe.get("ist") or {}
        if ist.get("enabled") is False:
            return "off"
        return str(ist.get("strategy", "ist" if "importance" in self.summary else "?"))

    @property
    def kind(self) -> str:
        """How the run is described: IST, RST, or uniform (every layer every step, or IST off)."""
        return {"ist": "IST", "rst": "RST", "all": "uniform", "off": "uniform"}.get(self.strategy, self.strategy)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        points = self.scalars.get(tag, [])
        return [s for s, _ in points], [v for _, v in points]

    def layer_tags(self, group: str) -> list[str]:
        """Tags ``group/layer_NN`` sorted by layer index."""
        tags = [t for t in self.scalars if t.startswith(group + "/") and _LAYER.search(t)]
        return sorted(tags, key=layer_index)

    def last(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return points[-1][1] if points else None

    def max(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return max(v for _, v in points) if points else None

    def mean(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return sum(v for _, v in points) / len(points) if points else None


def event_files(run_dir: str) -> list[str]:
    """Every TensorBoard event file below ``run_dir``, in path order."""
    return sorted(glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True))


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's event files, as ``[(step, value), ...]`` sorted by step.

    Files are merged oldest first; where a newer file (a resumed or repeated run in the same output
    directory) has points for a tag, it replaces the older points from its first step on.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    loaded = []
    for path in event_files(run_dir):
        acc = EventAccumulator(path, size_guidance={SCALARS: 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        events = {tag: acc.Scalars(tag) for tag in tags}
        first_wall = min((e[0].wall_time for e in events.values() if e), default=0.0)
        loaded.append((first_wall, events))
    merged: dict[str, list[tuple[int, float]]] = {}
    for _, events in sorted(loaded, key=lambda x: x[0]):
        for tag, evs in events.items():
            if not evs:
                continue
            first = min(e.step for e in evs)
            kept = [p for p in merged.get(tag, []) if p[0] < first]
            by_step = {}
            for e in sorted(evs, key=lambda e: e.wall_time):
                by_step[int(e.step)] = float(e.value)  # a repeated step keeps its newest value
            merged[tag] = kept + sorted(by_step.items())
    return merged


def load_run(run_dir: str, label: str | None = None) -> RunData:
    """Read ``run_dir`` (labelled ``label``, else its directory name); :class:`ReportError` if it holds
    nothing to report on."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir} is not a directory")
    summary, recipe = {}, {}
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    if os.path.exists(os.path.join(run_dir, "recipe.yaml")):
        with open(os.path.join(run_dir, "recipe.yaml")) as f:
            recipe = yaml.safe_load(f) or {}
    scalars = read_scalars(run_dir)
    if not scalars and not summary:
        raise ReportError(f"{run_dir} holds neither TensorBoard event files nor summary.json")
    if not scalars:
        logger.warning("%s: no TensorBoard event files (training.tensorboard off?); using summary.json only", run_dir)
    name = label or os.path.basename(os.path.normpath(run_dir))
    return RunData(path=run_dir, label=name, scalars=scalars, summary=summary, recipe=recipe)


# ---------------------------------------------------------------------- derived numbers
def selection_counts(run: RunData) -> tuple[list[float], int]:
    """(per layer, the steps it was trained in; the steps in all), or ``([], 0)`` when not recorded."""
    counts = run.summary.get("selection_counts")
    steps = run.summary.get("steps")
    if counts and steps:
        return [float(c) for c in counts], int(steps)
    tags = run.layer_tags("ist/selected_count")
    if not tags:
        return [], 0
    last_step = max(run.scalars[t][-1][0] for t in tags)
    return [run.last(t) for t in tags], last_step


def memory_numbers(run: RunData) -> tuple[float, float, float] | None:
    """(optimizer state held by the optimizer, most in any step; most offloaded; trainable parameter bytes)."""
    held = run.max("memory/optimizer_state_peak_bytes")
    if held is None:
        held = run.max("memory/optimizer_state_live_bytes")
    offloaded = run.max("memory/optimizer_state_offloaded_bytes")
    params = run.max("memory/trainable_param_bytes")
    if held is None:
        mem = run.summary.get("memory") or {}
        state = mem.get("optimizer_state_bytes") or {}
        if not state:
            return None
        held = sum(v for k, v in state.items() if k.startswith("live_"))
        offloaded = sum(v for k, v in state.items() if k.startswith("offloaded_"))
        params = mem.get("trainable_param_bytes")
    return float(held or 0.0), float(offloaded or 0.0), float(params or 0.0)


__all__ = ["ReportError", "RunData", "event_files", "layer_index", "load_run", "memory_numbers", "read_scalars",
           "selection_counts"]
