"""Checkpoints: exact resume, crash safety, a killed rank, and damaged or foreign checkpoints."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_ranks
from ist_ds.core.errors import ISTCheckpointError
from ist_ds.jobs.recipe import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

BASE = {
    "model": {"config": {"num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128}},
    "peft": {"dropout": 0.1},  # dropout makes the RNG state matter
    "data": {"num_train": 256, "num_test": 16, "max_eval_examples": 8, "cutoff_len": 96},
    "training": {"max_steps": 8, "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "log_every": 4,
                 "save_every": 3, "warmup_steps": 2, "progress": False, "tensorboard": False},
    "ist": {"train_layers": 2, "suppress_layers": 3, "update_interval": 3, "scoring_batch_size": 4},
}


def recipe(out, stage=2, mode="offload", dtype="float32", **training):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw["model"] = {**BASE["model"], "dtype": dtype}
    raw["training"] = {**BASE["training"], **training}
    raw["backend"] = {"name": "deepspeed", "zero_stage": stage}
    raw["ist"] = {**BASE["ist"], "optimizer_state": mode}
    raw["output_dir"] = str(out)
    return Recipe.from_dict(raw)


def _job(rank, world, r, resume=False):
    from ist_ds.jobs.runner import run

    return run(r, resume=resume)


def _final(out):
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    ist = torch.load(os.path.join(out, "ist_state.pt"), weights_only=True)
    return adapter, ist


def _optim_files(out, tag):
    d = os.path.join(out, "checkpoints", tag)
    return {f: torch.load(os.path.join(d, f), weights_only=False) for f in sorted(os.listdir(d)) if "optim" in f}


def _same_nested(a, b, path=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same_nested(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_nested(x, y, f"{path}[{i}]")
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's LossScaler
        assert type(a) is type(b), path
        _same_nested(vars(a), vars(b), path)
    else:  # step, selection, counts, scoring position, config, DeepSpeed's scalars: compared too
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


# offload and drop park the fp32 masters of unselected layers (ZeRO-1/2/3): a save puts them back
@pytest.mark.parametrize("stage, mode, dtype", [(1, "offload", "float32"), (2, "offload", "bfloat16"),
                                               (3, "drop", "float32")])
def test_stop_and_resume_is_bit_identical(tmp_path, stage, mode, dtype):
    full, split = tmp_path / "full", tmp_path / "split"
    run_ranks(_job, 2, recipe(full, stage, mode, dtype))
    stopped = run_ranks(_job, 2, recipe(split, stage, mode, dtype, stop_after_steps=5))
    assert stopped[0]["stopped_early"] and stopped[0]["steps"] == 5
    assert (split / "checkpoints" / "latest").read_text() == "step5"
    resumed = run_ranks(_job, 2, recipe(split, stage, mode, dtype), resume=True)
    (a_full, ist_full), (a_split, ist_split) = _final(full), _final(split)
    assert a_full.keys() == a_split.keys()
    for k in a_full:
        assert torch.equal(a_full[k], a_split[k]), k
    _same_nested(ist_full, ist_split)  # scores, step, generator, selection, counts, scoring stream
    _same_nested(_optim_files(full, "step8"), _optim_files(split, "step8"))
    assert resumed[0]["scores"] == ist_full["importance"]["scores"].tolist()


def test_damaged_and_foreign_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    run_ranks(_job, 2, recipe(out, 2, "keep", max_steps=3, save_every=3))
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step3"

    # A checkpoint of a model with another number of layers.
    other = recipe(tmp_path / "other", 2, "keep", max_steps=3)
    raw = other.to_dict()
    raw["model"]["config"]["num_hidden_layers"] = 8
    raw["output_dir"] = str(out)
    with pytest.raises(AssertionError, match="6 IST layers; this model has 8"):
        run_ranks(_job, 2, Recipe.from_dict(raw), resume=True)

    # A truncated optimizer file.
    optim = ckpt / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    with pytest.raises(AssertionError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated or corrupted"):
        run_ranks(_job, 2, recipe(out, 2, "keep", max_steps=3), resume=True)

    # 'latest' naming a directory that never completed.
    (ckpt / "step9").mkdir()
    (ckpt / "latest").write_text("step9")
    with pytest.raises(AssertionError, match="not a complete checkpoint"):
        run_ranks(_job, 2, recipe(out, 2, "keep", max_steps=3), resume=True)


def test_pickled_code_is_not_executed(tmp_path):
    from ist_ds.runtime.checkpoint import safe_load

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ISTCheckpointError, match="not plain data"):
        safe_load(str(path))
    assert not (tmp_path / "pwned").exists()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


def _launch(out, port, *extra):
    cmd = [os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
           "--config", "configs/quickstart.yaml", "--set", f"output_dir={out}", "--set", "training.max_steps=40",
           "--set", "training.save_every=5", "--set", "training.log_every=5", "--set", "data.max_eval_examples=8",
           "--set", "backend.dist_timeout_s=300", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_killed_rank_fails_fast_and_relaunch_resumes(tmp_path):
    """SIGKILL one rank mid-training: the job ends promptly with an error; --resume finishes it, and the
    result equals an uninterrupted run."""
    ref = _launch(tmp_path / "ref", 29741)
    ref_out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_out[-3000:]

    out = tmp_path / "run"
    job = _launch(out, 29742)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists() or (out / "checkpoints" / "latest").read_text() == "step5":
        assert job.poll() is None and time.time() < deadline, "the job ended before a second checkpoint"
        time.sleep(0.2)
    ranks = [c for p in _children(job.pid) for c in _children(p)] or _children(job.pid)
    assert ranks, "no rank processes found"
    os.kill(ranks[-1], signal.SIGKILL)
    killed_at = time.time()
    log, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.time() - killed_at < 90, "the job did not end promptly after a rank died"
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest in {"step10", "step15", "step20", "step25", "step30", "step35"}

    again = _launch(out, 29743, "--resume")
    log2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, log2[-3000:]
    assert f"resumed from" in log2
    a, b = _final(tmp_path / "ref"), _final(out)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    _same_nested(a[1], b[1])
