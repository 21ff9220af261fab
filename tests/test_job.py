"""The job runner end to end: the quick start under the deepspeed launcher, and recipe errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ist_ds.core.errors import ISTConfigError
from ist_ds.jobs.recipe import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


def test_quickstart_under_deepspeed_launcher(tmp_path):
    out = tmp_path / "run"
    cmd = [os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29731", "launch/train.py",
           "--config", "configs/quickstart.yaml", "--set", "training.max_steps=12", "--set", "training.log_every=4",
           "--set", "ist.update_interval=4", "--set", "data.max_eval_examples=8", "--set", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "importance (-score)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert sum(summary["selection_counts"]) == 2 * 12  # 2 layers trained in each of 12 steps
    assert any(s != 0 for s in summary["scores"])  # importance updates at steps 4, 8, 12 moved the scores
    # The adapter loads into plain peft.
    from peft import PeftModel

    from ist_ds.jobs.data import ByteTokenizer
    from ist_ds.jobs.models import build_model

    recipe = Recipe.from_yaml(os.path.join(ROOT, "configs/quickstart.yaml"))
    tok = ByteTokenizer()
    base = build_model("llama", seed=recipe.model.seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **recipe.model.config)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    state = torch.load(out / "ist_state.pt", weights_only=True)
    assert state["step"] == 12


@pytest.mark.parametrize("raw, needle", [
    ({"training": {"micro_batch_size": 3, "global_batch_size": 16}}, "not a multiple"),
    ({"training": {"lr": "fast"}}, "training.lr"),
    ({"model": {"dtype": "float8"}}, "model.dtype"),
    ({"peft": {"method": "prefix"}}, "peft.method"),
    ({"ist": {"optimizer_state": "evict"}}, "optimizer_state"),
    ({"backend": {"name": "fsdp", "deepspeed_config": "x.json"}}, "deepspeed_config"),
    ({"dataa": {}}, "unknown top-level"),
    ({"data": {"cutoff": 10}}, "unknown key"),
])
def test_recipe_errors(raw, needle):
    with pytest.raises(ISTConfigError, match=needle):
        Recipe.from_dict(raw)


def test_world_size_must_divide_the_global_batch():
    from ist_ds.jobs.adapters import deepspeed_config

    recipe = Recipe.from_dict({"training": {"micro_batch_size": 4, "global_batch_size": 16}})
    with pytest.raises(ISTConfigError, match="world size 3"):
        deepspeed_config(recipe, world_size=3, total_steps=10, on_cpu=True)


def test_cli_reports_bad_config_without_writing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ist: {train_layers: 0.01}\nmodel: {config: {num_hidden_layers: 8}}\n"
                   f"backend: {{name: single}}\noutput_dir: {tmp_path / 'out'}\n")
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(bad)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "train_layers=0.01" in proc.stderr and "rounds down to 0" in proc.stderr
    assert not (tmp_path / "out").exists()
