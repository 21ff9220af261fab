"""Monitoring: TensorBoard scalars of a 2-rank DeepSpeed job and a single-process job, the report, the bar.

One 2-rank DeepSpeed job (ranks forked from this process, ``ist_ds.jobs.runner.run`` in each) and one
single-process job run once per module; the tests read their event files back.
"""

from __future__ import annotations

import glob
import io
import logging
import os

import pytest

from distributed import run_ranks
from ist_ds.jobs.recipe import Recipe

LAYERS = 4
STEPS, LOG_EVERY, UPDATE_EVERY, EVAL_EVERY = 12, 4, 3, 6
LOG_POINTS = [4, 8, 12]
UPDATES = [3, 6, 9, 12]
IST_POINTS = sorted({0, *LOG_POINTS, *UPDATES})  # step 0: the state before training


def _recipe(out, backend="deepspeed", strategy="ist", **ist):
    return Recipe.from_dict({
        "model": {"config": {"num_hidden_layers": LAYERS, "hidden_size": 64, "intermediate_size": 128}},
        "data": {"num_train": 256, "num_test": 16, "max_eval_examples": 8, "cutoff_len": 96},
        "training": {"max_steps": STEPS, "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
                     "log_every": LOG_EVERY, "eval_every": EVAL_EVERY, "progress": False, "tensorboard": True},
        "backend": {"name": backend, "zero_stage": 2},
        "ist": {"strategy": strategy, "train_layers": 2, "suppress_layers": 2, "update_interval": UPDATE_EVERY,
                "scoring_batch_size": 4, "optimizer_state": "drop", **ist},
        "output_dir": str(out),
    })


def _job(rank, world, recipe):
    from ist_ds.jobs.runner import run

    return run(recipe)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitor")
    ist_dir, rst_dir = base / "ist", base / "rst"
    run_ranks(_job, 2, _recipe(ist_dir))
    run_ranks(_job, 1, _recipe(rst_dir, backend="single", strategy="rst"))
    return ist_dir, rst_dir


def _scalars(run_dir):
    from ist_ds.observe.run_data import read_scalars

    return read_scalars(str(run_dir))


def _steps(scalars, tag):
    return [s for s, _ in scalars[tag]]


def test_deepspeed_job_writes_events_on_rank_0_only(runs):
    ist_dir, _ = runs
    files = glob.glob(str(ist_dir / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files  # one writer: rank 0's
    assert os.path.dirname(files[0]) == str(ist_dir / "tensorboard" / "train")
    s = _scalars(ist_dir)
    assert "Train/Samples/lr" in s  # DeepSpeed's own monitor wrote into the same file

    for tag in ("train/loss", "train/lr", "train/tokens_per_second"):
        assert _steps(s, tag) == LOG_POINTS, tag
    assert all(v > 0 for _, v in s["train/tokens_per_second"])
    for i in range(LAYERS):
        for group in ("ist/importance", "ist/train_prob", "ist/selected_count"):
            assert _steps(s, f"{group}/layer_{i:02d}") == IST_POINTS, (group, i)
    for tag in ("ist/update_seconds", "ist/scoring_loss_mean", "ist/scoring_loss_spread"):
        assert _steps(s, tag) == UPDATES, tag
    assert all(v > 0 for _, v in s["ist/update_seconds"])
    for tag in ("memory/optimizer_state_live_bytes", "memory/optimizer_state_offloaded_bytes",
                "memory/optimizer_state_peak_bytes", "memory/trainable_param_bytes"):
        assert _steps(s, tag) == IST_POINTS, tag
    assert _steps(s, "eval/loss") == [EVAL_EVERY, STEPS] and _steps(s, "eval/accuracy") == [STEPS]

    # The values are the controller's: probabilities sum to 1, counts add up to 2 layers x 12 steps.
    last = {tag: points[-1][1] for tag, points in s.items()}
    assert sum(last[f"ist/train_prob/layer_{i:02d}"] for i in range(LAYERS)) == pytest.approx(1.0)
    assert sum(last[f"ist/selected_count/layer_{i:02d}"] for i in range(LAYERS)) == 2 * STEPS
    import json

    summary = json.loads((ist_dir / "summary.json").read_text())
    assert [last[f"ist/importance/layer_{i:02d}"] for i in range(LAYERS)] == pytest.approx(summary["importance"])
    assert last["train/loss"] == pytest.approx(summary["final_train_loss"])
    assert last["eval/loss"] == pytest.approx(summary["eval_loss"])
    assert any(v != 0 for v in summary["importance"])
    assert last["memory/optimizer_state_peak_bytes"] > 0


def test_single_backend_writes_events_through_summary_writer(runs):
    _, rst_dir = runs
    files = glob.glob(str(rst_dir / "tensorboard" / "train" / "events.out.tfevents.*"))
    assert len(files) == 1
    s = _scalars(rst_dir)
    assert "Train/Samples/lr" not in s  # no DeepSpeed here
    assert _steps(s, "train/loss") == LOG_POINTS
    # RST has no scores: counts and memory, no importance, no importance updates.
    assert _steps(s, "ist/selected_count/layer_00") == sorted({0, *LOG_POINTS})
    assert not any(t.startswith(("ist/importance", "ist/train_prob", "ist/update_seconds")) for t in s)


def _nontrivial_png(path):
    import matplotlib.image as mpimg
    import numpy as np

    assert os.path.getsize(path) > 5_000, path
    assert os.path.getsize(path) < 200_000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, (path, img.shape)
    colours = np.unique(img[..., :3].reshape(-1, 3).round(2), axis=0)
    assert len(colours) > 20, (path, len(colours))  # not a blank canvas


def test_report_renders_plots_and_markdown(runs, tmp_path):
    from ist_ds.jobs.cli import main

    ist_dir, rst_dir = runs
    out = tmp_path / "report"
    assert main(["report", str(ist_dir), str(rst_dir), "--out", str(out)]) == 0
    for name in ("loss.png", "selection.png", "importance_ist.png", "memory.png"):
        _nontrivial_png(out / name)
    assert not (out / "importance_rst.png").exists()  # RST has no importance
    md = (out / "report.md").read_text()
    for name in ("loss.png", "selection.png", "importance_ist.png", "memory.png"):
        assert f"]({name})" in md
    table = [line for line in md.splitlines() if line.startswith("| ist ") or line.startswith("| rst ")]
    assert len(table) == 2 and "| IST |" in table[0] and "| RST |" in table[1]


def test_report_errors(tmp_path, capsys):
    from ist_ds.jobs.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "neither TensorBoard event files nor summary.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--out", str(tmp_path / "o")])  # at least one run directory


def test_report_merges_a_resumed_runs_event_files(tmp_path):
    import time

    from ist_ds.observe.monitor import SummaryWriterMonitor
    from ist_ds.observe.run_data import read_scalars

    first = SummaryWriterMonitor(str(tmp_path / "tensorboard" / "train"))
    for step in (0, 4, 8, 12):  # the first run got to step 12, its last checkpoint was step 8
        first.log(step, {"train/loss": 10.0 - step})
    first.close()
    time.sleep(1.1)  # a new event file name (its timestamp) and later wall times
    resumed = SummaryWriterMonitor(str(tmp_path / "tensorboard" / "train"))
    for step in (8, 12, 16):
        resumed.log(step, {"train/loss": 100.0 + step})
    resumed.close()
    assert read_scalars(str(tmp_path))["train/loss"] == [(0, 10.0), (4, 6.0), (8, 108.0), (12, 112.0), (16, 116.0)]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_and_logging_share_the_terminal():
    from ist_ds.observe.console import setup_logging
    from ist_ds.observe.monitor import Progress

    term = _Terminal()
    root = logging.getLogger("ist_ds")
    saved = (list(root.handlers), root.level, root.propagate)
    setup_logging(0, 1)
    handler = root.handlers[0]
    handler.setStream(term)
    try:
        bar = Progress(3, "train", enabled=True, stream=term)
        assert bar.active
        bar.step(loss=1.2345, tokens=4000, seconds=0.5, layers=[1, 3], num_layers=4)
        logging.getLogger("ist_ds.jobs.runner").info("a log line")
        bar.step(loss=1.1, tokens=4000, seconds=0.5, layers=[0, 1, 2, 3], num_layers=4)
        bar.close()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        root.propagate = saved[2]
    text = term.getvalue()
    assert "loss 1.2345" in text and "8.0k tok/s" in text and "layers 1,3" in text and "layers all" in text
    assert "a log line" in text
    assert handler.stream is term  # restored after the bar closed
    # Off on other ranks, with progress: false, and when the stream is not a terminal.
    assert not Progress(3, "train", enabled=False, stream=term).active
    assert not Progress(3, "train", enabled=True, stream=io.StringIO()).active
