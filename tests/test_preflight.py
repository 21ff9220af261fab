"""Checks before launch: one error line for bad input, ``ist-ds check``, and the rules of stop and resume."""

import json
import logging
import os
import random

import pytest
import torch

from distributed import run_ranks
from ist_ds.jobs.cli import main
from ist_ds.jobs.recipe import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config", os.path.join(ROOT, "configs/quickstart.yaml"), "--set", "training.max_steps=2",
         "--set", "training.progress=false", "--set", "training.tensorboard=false"]


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """The CLI runs in this process: keep its launcher variables and log handlers out of later tests."""
    env = dict(os.environ)
    log = logging.getLogger("ist_ds")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    os.environ.clear()
    os.environ.update(env)
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


BAD_INPUTS = {  # name: (extra arguments, what the one error line must say); {tmp} is the test's directory
    "yaml-override": (["--set", "ist.train_layers=[1"], "is not valid YAML"),
    "peft-targets": (["--set", "peft.target_modules=[nope]"], "Target modules {{'nope'}} not found"),
    "zero-layers": (["--set", "model.config.num_hidden_layers=0"], "num_hidden_layers must be a positive number"),
    "no-config-json": (["--set", "model.path={tmp}/no_config", "--set", "model.config={{}}"], "has no config.json"),
    "missing-model": (["--set", "model.path={tmp}/missing", "--set", "model.config={{}}"],
                      "model.path: path does not exist: {tmp}/missing"),
    "missing-tokenizer": (["--set", "data.tokenizer={tmp}/missing"], "data.tokenizer: path does not exist"),
    "output-dir": (["--set", "output_dir={tmp}/a_file/out"], "cannot be created"),
    "single-stop": (["--set", "training.stop_after_steps=1"], "single writes and loads no checkpoints"),
    "resume-nothing": (["--set", "backend.name=deepspeed", "--resume"], "no checkpoint in"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_before_training(tmp_path, capsys, case):
    (tmp_path / "no_config").mkdir()
    (tmp_path / "a_file").write_text("x")
    extra, needle = BAD_INPUTS[case]
    extra, needle = [a.format(tmp=tmp_path) for a in extra], needle.format(tmp=tmp_path)
    out_dir = tmp_path / "out"
    rc, out, err = _cli(capsys, "train", *QUICK, "--set", "backend.name=single", "--set", f"output_dir={out_dir}",
                        *extra)
    lines = err.strip().splitlines()
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("ist-ds: error: "), err[-2000:]
    assert needle in lines[0]
    assert "loss" not in out and not out_dir.exists()  # nothing trained, nothing written


def test_check_reports_every_missing_path_at_once(capsys):
    rc, out, err = _cli(capsys, "check", os.path.join(ROOT, "configs/paper_llama7b_lora.yaml"), "--world-size", "16")
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("ist-ds: error: ")]
    assert sorted(e.split(":")[2].strip() for e in errors) == ["data.tokenizer", "data.train", "model.path"], err
    assert all("path does not exist" in e for e in errors), err
    assert "repo" not in (out + err).lower()
    assert "micro 1 x 16 rank(s) x 1 accumulation" in out  # the checks that do not need the paths still ran


def _local_model_recipe(tmp, **training):
    """A recipe on a local model directory that holds a config and no weights at all."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300).save_pretrained(tmp / "model")
    assert sorted(os.listdir(tmp / "model")) == ["config.json"]
    raw = {"model": {"path": str(tmp / "model")}, "peft": {"target_modules": ["q_proj", "v_proj"]},
           "data": {"num_train": 64}, "training": {"micro_batch_size": 4, "global_batch_size": 16, **training},
           "ist": {"train_layers": 2, "suppress_layers": 3}, "output_dir": str(tmp / "out")}
    path = tmp / "recipe.yaml"
    path.write_text(json.dumps(raw))
    return str(path)


def test_check_validates_a_recipe_without_loading_weights(tmp_path, capsys):
    recipe = _local_model_recipe(tmp_path)
    rc, out, err = _cli(capsys, "check", recipe, "--world-size", "2")
    assert rc == 0, err
    assert "6 transformer blocks" in out and "IST trains 2 of 6" in out, out
    assert "micro 4 x 2 rank(s) x 2 accumulation step(s); 4 steps per epoch" in out, out
    assert "DeepSpeed config: ZeRO stage 2" in out and err == ""
    assert "tokenizer: byte (259 tokens)" in out, out  # the directory has no tokenizer of its own

    # The same through `launch/train.py --check`: nothing trains, nothing is written.
    rc, out, err = _cli(capsys, "train", "--config", recipe, "--check", "--world-size", "4")
    assert rc == 0 and "micro 4 x 4 rank(s) x 1" in out and not (tmp_path / "out").exists()

    for extra, needle in [
        (["--world-size", "3"], "not divisible by micro_batch_size=4 x world size 3"),
        (["--world-size", "2", "--set", "data.num_train=12"], "smaller than one global batch"),  # 6 a rank, 8 needed
        (["--set", "peft.target_modules=[q_proj, nope_proj]", "--set", "ist.train_layers=7"],
         "train_layers"),  # 7 of 6 layers; the PEFT targets are fine (peft needs one to match)
        (["--set", "peft.target_modules=[nope_proj]"], "{'nope_proj'} not found"),
        (["--set", "backend.deepspeed_config={zero_optimization: {stage: 2, bogus: 1}}"], "bogus"),
    ]:
        rc, out, err = _cli(capsys, "check", recipe, *extra)
        errors = [line for line in err.splitlines() if line.startswith("ist-ds: error: ")]
        assert rc == 2 and len(errors) == 1 and needle in errors[0], (extra, err)

    # A model directory with its own tokenizer: the job uses that one, and the check says so.
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")
    rc, out, err = _cli(capsys, "check", recipe)
    assert rc == 0 and f"tokenizer: the model's own ({tmp_path / 'model'})" in out, out


def _job(rank, world, recipe, **kwargs):
    from ist_ds.jobs.runner import run

    return run(recipe, **kwargs)


def test_stop_leaves_a_checkpoint_and_resume_keeps_the_loss_history(tmp_path):
    out = tmp_path / "run"
    raw = {"model": {"config": {"num_hidden_layers": 4}}, "data": {"num_train": 64, "max_eval_examples": 0},
           "training": {"max_steps": 4, "micro_batch_size": 2, "global_batch_size": 4, "log_every": 1, "seed": 7,
                        "progress": False, "tensorboard": False},
           "backend": {"name": "deepspeed", "zero_stage": 0}, "ist": {"train_layers": 1, "suppress_layers": 1},
           "output_dir": str(out)}
    stop = Recipe.from_dict({**raw, "training": {**raw["training"], "stop_after_steps": 2}})
    assert stop.training.save_every == 0
    first = run_ranks(_job, 1, stop)[0]
    assert first == {"steps": 2, "stopped_early": True}
    assert (out / "checkpoints" / "latest").read_text() == "step2"  # a stop without save_every still saves
    history = [json.loads(line) for line in (out / "train_losses.jsonl").read_text().splitlines()]
    assert [p["step"] for p in history] == [1, 2]

    # Python's random was seeded per rank before training: the saved state is the seeded one.
    from ist_ds.jobs.runner import seed_rank

    saved = torch.load(out / "checkpoints" / "step2" / "rng_rank0.pt", weights_only=True)["python"]
    seed_rank(7, 0)
    assert tuple(saved[1]) == random.getstate()[1]

    summary = run_ranks(_job, 1, Recipe.from_dict(raw), resume=True)[0]
    assert [s for s, _ in summary["train_losses"]] == [1, 2, 3, 4]
    assert [v for _, v in summary["train_losses"][:2]] == [p["loss"] for p in history]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["train_losses"] == [list(p) for p in summary["train_losses"]]

    # The explicit opt-in: --resume --allow-fresh-start on a directory without a checkpoint starts at step 0.
    fresh = Recipe.from_dict({**raw, "training": {**raw["training"], "max_steps": 1},
                              "output_dir": str(tmp_path / "new")})
    assert run_ranks(_job, 1, fresh, resume=True, allow_fresh_start=True)[0]["train_losses"][0][0] == 1


def test_python_random_is_seeded_per_rank():
    from ist_ds.jobs.runner import seed_rank

    draws = []
    for rank in (0, 1, 0):
        random.seed()  # whatever state a process starts with
        seed_rank(3, rank)
        draws.append([random.random() for _ in range(3)])
    assert draws[0] == draws[2] and draws[0] != draws[1]


def test_output_dir_check_names_the_directory_that_decides(tmp_path, monkeypatch):
    """An existing output_dir, or the nearest existing ancestor of a new one, must be a writable directory."""
    from ist_ds.jobs.preflight import CheckReport, _check_output_dir

    (tmp_path / "a_file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # root may write anywhere, so "not writable" is what os.access says of `locked`
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(locked) and real_access(p, mode))
    cases = {
        str(tmp_path): ("fact", "exists, writable"),
        str(tmp_path / "new" / "deeper"): ("fact", "will be created"),
        str(tmp_path / "a_file"): ("problem", "exists and is not a directory"),
        str(tmp_path / "a_file" / "out"): ("problem", f"cannot be created: {tmp_path / 'a_file'} is not a directory"),
        str(locked): ("problem", "exists and is not writable"),
        str(locked / "out" / "deeper"): ("problem", f"cannot be created: {locked} is not writable"),
    }
    for path, (kind, needle) in cases.items():
        report = CheckReport()
        _check_output_dir(path, report)
        found = report.facts if kind == "fact" else report.problems
        assert len(report.facts) + len(report.problems) == 1 and needle in found[0], (path, report)
    assert not (tmp_path / "new").exists()  # the check creates nothing
