"""``ist-ds report``: plots and a Markdown summary of one or more finished runs.

Reads each run directory's TensorBoard event files (every ``events.out.tfevents.*`` below it, as
written by :mod:`ist_ds.observe.monitor`), its ``summary.json`` and ``recipe.yaml``, and writes into ``out``:

- ``loss.png``: training loss of every run over the optimizer steps (held-out loss as markers when
  it was evaluated during training);
- ``selection.png``: per layer, the fraction of optimizer steps it was trained in, one bar per run;
- ``importance_<run>.png``: for every IST run, a heatmap of the importance (``-score``) of each layer
  over the steps;
- ``memory.png``: optimizer state held in the optimizer and trainable parameter bytes (rank 0);
- ``report.md``: a table of final numbers with the plots embedded.

Matplotlib runs on its Agg backend; nothing needs a display.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from ist_ds.core.errors import ISTError

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"/layer_(\d+)$")


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
        return sorted(tags, key=lambda t: int(_LAYER.search(t).group(1)))

    def last(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return points[-1][1] if points else None

    def max(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return max(v for _, v in points) if points else None

    def mean(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return sum(v for _, v in points) / len(points) if points else None


# ---------------------------------------------------------------------- reading
def event_files(run_dir: str) -> list[str]:
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


# ---------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _legend_label(run: RunData) -> str:
    return run.label if run.kind.lower() in run.label.lower() else f"{run.label} ({run.kind})"


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_loss(runs: list[RunData], path: str) -> str | None:
    """Training loss of every run over the steps, held-out loss as markers."""
    if not any(run.scalars.get("train/loss") or run.summary.get("train_losses") for run in runs):
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    any_eval = False
    for run, color in zip(runs, _colors(len(runs))):
        steps, values = run.series("train/loss")
        if not steps and run.summary.get("train_losses"):
            steps, values = zip(*run.summary["train_losses"])
        ax.plot(steps, values, color=color, linewidth=1.8, marker="o", markersize=3, label=_legend_label(run))
        e_steps, e_values = run.series("eval/loss")
        if not e_steps and run.summary.get("eval_loss") is not None and run.summary.get("steps"):
            e_steps, e_values = [run.summary["steps"]], [run.summary["eval_loss"]]
        if e_steps:
            any_eval = True
            ax.plot(e_steps, e_values, color=color, linestyle=":", marker="D", markersize=6,
                    markeredgecolor="black", markeredgewidth=0.6)
    handles, labels = ax.get_legend_handles_labels()
    if any_eval:
        handles.append(Line2D([], [], color="grey", linestyle=":", marker="D", markeredgecolor="black",
                              markeredgewidth=0.6))
        labels.append("held-out loss (same colour)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.set_title("Training loss (mean over each logging window, all ranks)")
    ax.grid(alpha=0.3)
    ax.legend(handles, labels)
    return _save(fig, path)


def plot_selection(runs: list[RunData], path: str) -> str | None:
    """Per layer, the fraction of steps it was trained in (one bar per run).

    Runs that trained every layer in every step (uniform PEFT) are not drawn as bars, which would
    dwarf the others, but named in the legend.
    """
    rows, every_step = [], []
    for run, color in zip(runs, _colors(len(runs))):
        counts, steps = _selection_counts(run)
        if not counts or not steps:
            continue
        fractions = [c / steps for c in counts]
        (every_step if all(f >= 1.0 for f in fractions) else rows).append((run, fractions, color))
    if not rows and not every_step:
        return None
    plt = _pyplot()
    from matplotlib.patches import Patch

    num_layers = max(len(r[1]) for r in rows + every_step)
    fig, ax = plt.subplots(figsize=(min(16, max(8, 0.3 * num_layers * max(len(rows), 1) + 3)), 4.5),
                           layout="constrained")
    width = 0.8 / max(len(rows), 1)
    for j, (run, fractions, color) in enumerate(rows):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(fractions))]
        ax.bar(xs, fractions, width=width, color=color, label=_legend_label(run))
    if rows:
        # Every sparse run trains N_u of L layers per step: the mean fraction is N_u / L.
        mean = sum(rows[0][1]) / len(rows[0][1])
        ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"N_u / L = {mean:.3g}")
        ax.set_ylim(0, min(1.05, max(max(f) for _, f, _ in rows) * 1.35))
    else:
        ax.set_ylim(0, 1.05)
    handles, labels = ax.get_legend_handles_labels()
    for run, _, color in every_step:
        handles.append(Patch(color=color, alpha=0.5))
        labels.append(f"{_legend_label(run)}: every layer, every step (1.0)")
    ax.set_xticks(range(num_layers))
    ax.set_xlabel("transformer layer")
    ax.set_ylabel("fraction of optimizer steps trained")
    ax.set_title("How often each layer was trained")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles, labels, loc="upper right", ncols=2 if len(handles) > 3 else 1)
    return _save(fig, path)


def _selection_counts(run: RunData) -> tuple[list[float], int]:
    counts = run.summary.get("selection_counts")
    steps = run.summary.get("steps")
    if counts and steps:
        return [float(c) for c in counts], int(steps)
    tags = run.layer_tags("ist/selected_count")
    if not tags:
        return [], 0
    last_step = max(run.scalars[t][-1][0] for t in tags)
    return [run.last(t) for t in tags], last_step


def plot_importance(run: RunData, path: str) -> str | None:
    """Heatmap of the importance (-score) of every layer over the steps, beside how often each layer trained."""
    tags = run.layer_tags("ist/importance")
    if not tags:
        return None
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    steps = sorted({s for t in tags for s, _ in run.scalars[t]})
    index = {s: k for k, s in enumerate(steps)}
    grid = [[math.nan] * len(steps) for _ in tags]
    for row, tag in enumerate(tags):
        for s, v in run.scalars[tag]:
            grid[row][index[s]] = v
    # A value logged at step k is the state after step k: it holds until the next logged step. The
    # last one (the final state) gets a narrow column so that the axis ends where training ended.
    last_width = max(1.0, 0.02 * (steps[-1] - steps[0]))
    x_edges = steps + [steps[-1] + last_width]
    y_edges = [i - 0.5 for i in range(len(tags) + 1)]
    finite = [abs(v) for row in grid for v in row if not math.isnan(v)]
    bound = max(finite + [1e-6])
    layer_ids = [int(_LAYER.search(t).group(1)) for t in tags]
    counts, total = _selection_counts(run)
    fig, (ax, side) = plt.subplots(1, 2, figsize=(10, max(3.4, 0.3 * len(tags) + 1.8)), sharey=True,
                                   gridspec_kw={"width_ratios": [4, 1]}, layout="constrained")
    mesh = ax.pcolormesh(x_edges, y_edges, grid, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound),
                         shading="flat")
    tick_every = max(1, len(layer_ids) // 16)
    ax.set_yticks(range(0, len(layer_ids), tick_every), [str(i) for i in layer_ids[::tick_every]])
    ax.set_xlim(steps[0], x_edges[-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("transformer layer")
    ax.set_title(f"Layer importance over training: {run.label}")
    if counts and total:
        fractions = [c / total for c in counts]
        final = [grid[row][-1] for row in range(len(tags))]
        colors = [mesh.cmap(mesh.norm(v)) if not math.isnan(v) else "grey" for v in final]
        side.barh(range(len(fractions)), fractions, color=colors, edgecolor="black", linewidth=0.4)
        # The mean fraction is N_u / L: what uniform sampling (RST) gives every layer.
        side.axvline(sum(fractions) / len(fractions), color="black", linestyle="--", linewidth=1)
        side.set_xlim(0, min(1.0, max(fractions) * 1.25))
        side.set_xlabel("fraction of steps trained\n(dashed: N_u / L, uniform)")
        side.set_title("Trained; colour: final importance", fontsize=9)
    else:
        side.set_axis_off()
    cbar = fig.colorbar(mesh, ax=[ax, side], pad=0.01)
    cbar.set_label("importance (-score); red: trained more often")
    return _save(fig, path)


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


def plot_memory(runs: list[RunData], path: str) -> str | None:
    """Optimizer state held during a step, offloaded, and trainable parameter bytes of each run (rank 0)."""
    rows = [(run, *numbers) for run in runs if (numbers := memory_numbers(run)) is not None]
    if not rows:
        return None
    plt = _pyplot()
    scale, unit = _byte_unit(max(max(r[1:]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 3), 4.2), layout="constrained")
    series = [(1, "optimizer state held in a step (max)", "#1f77b4"),
              (2, "optimizer state offloaded by IST (max)", "#aec7e8"),
              (3, "trainable parameters in a step", "#ff7f0e")]
    series = [x for x in series if any(r[x[0]] for r in rows)]  # e.g. nothing offloaded: no bars
    width = 0.8 / max(len(series), 1)
    for k, (col, name, color) in enumerate(series):
        xs = [j + (k - (len(series) - 1) / 2) * width for j in range(len(rows))]
        values = [r[col] / scale for r in rows]
        bars = ax.bar(xs, values, width=width, color=color, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(rows)), [_legend_label(r[0]) for r in rows])
    ax.set_ylabel(f"{unit} on rank 0")
    ax.set_title("Optimizer state and trainable parameters per rank")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    ax.legend()
    return _save(fig, path)


def _byte_unit(n: float) -> tuple[float, str]:
    for scale, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= scale:
            return float(scale), unit
    return 1.0, "bytes"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    scale, unit = _byte_unit(n)
    return f"{n / scale:.1f} {unit}" if unit != "bytes" else f"{n:.0f} B"


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


# ---------------------------------------------------------------------- the report
def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _unique_labels(run_dirs: list[str], labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(run_dirs):
            raise ReportError(f"{len(labels)} labels for {len(run_dirs)} run directories")
        return list(labels)
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n) for d, n in zip(run_dirs, names)]


def final_table(runs: list[RunData]) -> list[list[str]]:
    header = ["run", "strategy", "steps", "ranks", "final train loss", "held-out loss", "accuracy",
              "optimizer state in a step", "trainable params", "importance update (s)", "tokens/s"]
    rows = [header]
    for run in runs:
        s = run.summary
        live, _, params = memory_numbers(run) or (None, None, None)
        final_loss = s.get("final_train_loss", run.last("train/loss"))
        eval_loss = s.get("eval_loss", run.last("eval/loss"))
        accuracy = s.get("eval_accuracy", run.last("eval/accuracy"))
        tps = run.mean("train/tokens_per_second")
        rows.append([run.label, run.kind, _fmt(s.get("steps")), _fmt(s.get("world_size")), _fmt(final_loss),
                     _fmt(eval_loss), _fmt(accuracy, 3), _fmt_bytes(live), _fmt_bytes(params),
                     _fmt(run.mean("ist/update_seconds"), 3), _fmt(tps, 0) if tps is not None else "-"])
    return rows


def _markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def write_report(run_dirs: list[str], out_dir: str, labels: list[str] | None = None,
                 title: str = "IST run report") -> dict[str, str]:
    """Render the plots and ``report.md`` for ``run_dirs`` into ``out_dir``; returns {name: path}."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(d, label) for d, label in zip(run_dirs, _unique_labels(run_dirs, labels))]
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}
    sections: list[tuple[str, str, str]] = []  # (heading, file name, caption)

    def add(name: str, path: str | None, heading: str, caption: str) -> None:
        if path is not None:
            written[name] = path
            sections.append((heading, os.path.basename(path), caption))

    add("loss", plot_loss(runs, os.path.join(out_dir, "loss.png")), "Training loss",
        "Mean training loss of each logging window (all ranks), per optimizer step.")
    add("selection", plot_selection(runs, os.path.join(out_dir, "selection.png")), "Which layers were trained",
        "Fraction of optimizer steps in which each layer's PEFT parameters were trained. RST is flat "
        "around N_u / L, uniform PEFT is 1 everywhere, IST follows the learned importance.")
    for run in runs:
        add(f"importance_{run.label}",
            plot_importance(run, os.path.join(out_dir, f"importance_{_file_label(run.label)}.png")),
            f"Importance over training: {run.label}",
            "Importance (-score) of each layer after every importance update; red layers are drawn "
            "for training more often, blue ones less often and suppressed more often while scoring.")
    add("memory", plot_memory(runs, os.path.join(out_dir, "memory.png")), "Memory",
        "Bytes on rank 0 (its share under ZeRO): the most optimizer state the optimizer held right "
        "after a step, the most optimizer state IST kept offloaded, and the parameters that train in a step.")

    lines = [f"# {title}", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
             _markdown_table(final_table(runs)), ""]
    for heading, filename, caption in sections:
        lines += [f"## {heading}", "", caption, "", f"![{heading}]({filename})", ""]
    report_path = os.path.join(out_dir, "report.md")
    with open(report_path, "w") as f:
        f.write("\n".join(lines))
    written["report"] = report_path
    return written
