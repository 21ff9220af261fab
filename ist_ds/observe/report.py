"""``ist-ds report``: plots and a Markdown summary of one or more finished runs.

Reads each run directory (:mod:`ist_ds.observe.run_data`) and writes into ``out``:

- ``loss.png``, ``selection.png``, ``importance_<run>.png`` (every IST run) and ``memory.png``
  (:mod:`ist_ds.observe.plots` draws them);
- ``report.md``: a table of final numbers with the plots embedded, each under a heading and a caption
  that says how to read it.
"""

from __future__ import annotations

import math
import os
import re

from ist_ds.observe.plots import byte_unit, plot_importance, plot_loss, plot_memory, plot_selection
from ist_ds.observe.run_data import ReportError, RunData, load_run, memory_numbers


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    scale, unit = byte_unit(n)
    return f"{n / scale:.1f} {unit}" if unit != "bytes" else f"{n:.0f} B"


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


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
    """The summary table, header first: one row of final numbers per run, as text."""
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


__all__ = ["final_table", "write_report"]
