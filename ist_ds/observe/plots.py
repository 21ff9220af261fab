"""The figures of ``ist-ds report``, one function per PNG, each drawn from :class:`RunData` only.

- :func:`plot_loss`: training loss of every run over the optimizer steps (held-out loss as markers
  when it was evaluated during training);
- :func:`plot_selection`: per layer, the fraction of optimizer steps it was trained in, one bar per run;
- :func:`plot_importance`: for one IST run, a heatmap of the importance (``-score``) of each layer
  over the steps, beside how often each layer trained;
- :func:`plot_memory`: optimizer state held in the optimizer and trainable parameter bytes (rank 0).

Each returns the path it wrote, or None when the runs hold nothing to draw. Matplotlib is imported
on first use and runs on its Agg backend; nothing needs a display.
"""

from __future__ import annotations

import math

from ist_ds.observe.run_data import RunData, layer_index, memory_numbers, selection_counts


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
        counts, steps = selection_counts(run)
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
    layer_ids = [layer_index(t) for t in tags]
    counts, total = selection_counts(run)
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

def plot_memory(runs: list[RunData], path: str) -> str | None:
    """Optimizer state held during a step, offloaded, and trainable parameter bytes of each run (rank 0)."""
    rows = [(run, *numbers) for run in runs if (numbers := memory_numbers(run)) is not None]
    if not rows:
        return None
    plt = _pyplot()
    scale, unit = byte_unit(max(max(r[1:]) for r in rows))
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


def byte_unit(n: float) -> tuple[float, str]:
    """(scale, unit name) to show ``n`` bytes in: the largest of GiB, MiB, KiB not above ``n``, else bytes."""
    for scale, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= scale:
            return float(scale), unit
    return 1.0, "bytes"


__all__ = ["byte_unit", "plot_importance", "plot_loss", "plot_memory", "plot_selection"]
