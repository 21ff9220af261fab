"""The job runner's single-process backend follows the recipe's learning-rate schedule."""

import torch
from torch.utils.data import default_collate

from ist_ds.jobs.models import apply_peft, build_model
from ist_ds.jobs.recipe import Recipe
from ist_ds.jobs.adapters import SingleRun, warmup_decay


def test_single_backend_warms_up_and_decays_like_the_others():
    recipe = Recipe.from_dict({
        "backend": {"name": "single"},
        "training": {"max_steps": 6, "warmup_steps": 2, "lr": 1e-2, "micro_batch_size": 2, "global_batch_size": 2},
        "ist": {"strategy": "rst", "train_layers": 2, "seed": 1},
        "output_dir": "/nonexistent/never-written",
    })
    model = apply_peft(build_model("llama", seed=0, num_hidden_layers=4), "lora", r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(0, 256, (16,), generator=g)), "labels": ids.clone()} for _ in range(12)]
    run = SingleRun(recipe, model, rows, default_collate, "cpu", total_steps=6)
    schedule = warmup_decay(6, 2)  # the FSDP backend's LambdaLR factor; DeepSpeed's WarmupDecayLR shape
    lrs, moved = [], []
    for step in range(6):
        lrs.append(run.lr())
        params = run.trainer.layer_map.parameters_of(run.ist.selected_layers)
        before = [p.detach().clone() for p in params]
        run.train_step([default_collate(rows[2 * step:2 * step + 2])])
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, params)))
    assert lrs == [1e-2 * schedule(s) for s in range(6)]
    assert lrs[0] == 0.0 and lrs[1] == 0.5e-2 and lrs[2] == 1e-2 and lrs[5] < lrs[3]
    assert moved == [False] + [True] * 5  # the optimizer steps with that rate (0 in the first warm-up step)
