"""One recipe format for every entry point: the FSDP2 wrapper and the Trainer launcher read the job runner's
recipe (the FSDP2 recipe itself runs through launch/train.py in tests/test_launch.py's SLURM test)."""

import importlib.util
import json
import os

import pytest

from ist_ds.core.errors import ISTConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fsdp_wrapper_is_launch_train_with_the_fsdp_recipe(monkeypatch):
    import runpy

    import ist_ds.jobs.cli

    calls = []
    monkeypatch.setattr(ist_ds.jobs.cli, "main", lambda argv: calls.append(argv) or 0)
    for argv, config in ((["--set", "training.max_steps=3"], os.path.join("configs", "fsdp_ist.yaml")),
                         (["--config", "mine.yaml", "--resume"], "mine.yaml")):
        monkeypatch.setattr("sys.argv", ["launch/fsdp_train.py", *argv])
        with pytest.raises(SystemExit):
            runpy.run_path(os.path.join(ROOT, "launch/fsdp_train.py"), run_name="__main__")
        got = calls[-1]
        assert got[0] == "train" and got[got.index("--config") + 1].endswith(config) and got.count("--config") == 1
        assert [a for a in got[1:] if a not in ("--config", got[got.index("--config") + 1])] == \
            [a for a in argv if a not in ("--config", "mine.yaml")]


def test_trainer_launcher_takes_the_recipe_and_command_line_flags_win(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    script = _load("launch/hf_trainer_train.py", "hf_trainer_train")
    recipe, args = script.parse_args(["--config", os.path.join(ROOT, "configs/quickstart.yaml"),
                                      "--set", f"output_dir={tmp_path / 'out'}", "--set", "training.max_steps=7",
                                      "--learning_rate", "1e-3", "--report_to", "none"])
    t = recipe.training
    assert args.per_device_train_batch_size == t.micro_batch_size == 4
    assert args.gradient_accumulation_steps == t.global_batch_size // t.micro_batch_size == 4
    assert args.max_steps == 7 and args.warmup_steps == t.warmup_steps == 10 and args.logging_steps == t.log_every
    assert args.output_dir == str(tmp_path / "out") and args.learning_rate == 1e-3  # the flag wins over lr 3e-3
    with pytest.raises(ISTConfigError, match="world size 3"):
        script.training_defaults(recipe, world_size=3)

    # A short run in this process: the recipe's model (8 layers), adapters, data and ist block under Trainer.
    out = tmp_path / "run"
    rc = script.main(["--config", os.path.join(ROOT, "configs/quickstart.yaml"), "--set", "data.num_train=64",
                      "--set", "data.max_eval_examples=4", "--set", "ist.update_interval=2",
                      "--output_dir", str(out), "--max_steps", "2", "--report_to", "none", "--use_cpu",
                      "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--disable_tqdm", "true"])
    assert rc == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


def test_data_fallback_when_the_training_data_is_missing(tmp_path):
    """configs/smollm2_commonsense.yaml reads ../shared/data/commonsense where it exists and the embedded task
    where it does not (a user's fresh clone)."""
    from ist_ds.jobs.recipe import Recipe
    from ist_ds.jobs.assembly import train_data_source

    missing = Recipe.from_dict({"data": {"train": str(tmp_path / "nope"), "fallback": "embedded"}})
    assert train_data_source(missing) == "embedded"
    present = Recipe.from_dict({"data": {"train": str(tmp_path), "fallback": "embedded"}})
    assert train_data_source(present) == str(tmp_path)
    assert train_data_source(Recipe.from_dict({"data": {"train": str(tmp_path / "nope")}})) == str(tmp_path / "nope")
    shipped = Recipe.from_yaml(os.path.join(ROOT, "configs/smollm2_commonsense.yaml"))
    assert shipped.model.gguf_file.endswith(".gguf") and shipped.data.fallback == "embedded"
    assert shipped.training.eval_at_start and shipped.training.sample_answers == 1
    assert shipped.backend.name == "deepspeed" and shipped.training.global_batch_size == 2 * shipped.training.micro_batch_size
