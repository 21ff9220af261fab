"""IST through Hugging Face ``transformers.Trainer`` (:class:`ist_ds.integrations.ISTTrainer`).

Two CPU ranks (DeepSpeed's CPU accelerator, gloo) forked from the pytest process run whole Trainer
jobs with a tiny PEFT LoRA Llama, with gradient accumulation, weight decay, gradient clipping,
evaluation, ``save_steps`` checkpoints and ``load_best_model_at_end``:

- ZeRO-2 with the Trainer's own optimizer (torch AdamW, weight-decay split) and ``offload`` of
  unselected layers' optimizer state; ZeRO-3 with the DeepSpeed config's optimizer (``auto``
  values) and ``drop``;
- a probe callback snapshots every layer's PEFT parameters at ``on_step_begin`` and
  ``on_step_end`` (gathered under ZeRO-3): unselected layers are bit-identical across every
  optimizer step, selected layers change;
- selections and scores are identical on both ranks, and the scores moved;
- a second Trainer resumed from the ``save_steps`` checkpoint ends with the same IST state (step,
  scores, selection, generator, scoring stream) and the same PEFT weights as the uninterrupted run;
- the checkpoint holds ``ist_state.pt`` (loadable with ``weights_only=True``) and every layer's
  adapter weights; the training logs carry per-layer IST scalars.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from distributed import run_ranks

# Imported here once rather than in every forked rank: DeepSpeed imports its Muon optimizer (and with
# it torch._dynamo, several seconds) the first time it checks an optimizer; transformers.Trainer.
for _module in ("transformers.trainer", "deepspeed.runtime.zero.muon.muon_optimizer", "peft"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)

NUM_LAYERS = 8
SEQ = 16
MICRO = 2
GRAD_ACC = 2
STEPS = 12
SAVE_AT = 6


def make_model():
    from ist_ds.models import apply_peft, build_model

    return apply_peft(build_model("llama", seed=0, num_hidden_layers=NUM_LAYERS), "lora", r=4, alpha=8)


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (SEQ,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()})
    return out


def ds_config(stage):
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
        "ist": {"train_layers": 2, "update_interval": 3, "scoring_batch_size": 4, "seed": 7,
                "optimizer_state": "offload" if stage == 2 else "drop"},
    }
    if stage == 3:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto", "torch_adam": True}}
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


# ---------------------------------------------------------------------- run inside the ranks
def _layer_params(trainer):
    import deepspeed

    params = [[p for _, p in layer.params] for layer in trainer.ist.layer_map.layers]
    flat = [p for ps in params for p in ps]
    with deepspeed.zero.GatheredParameters(flat, enabled=hasattr(flat[0], "ds_id")):
        return [[p.detach().clone() for p in ps] for ps in params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _probe_class():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """Checks the freezing invariant across every optimizer step; records the IST history."""

        def __init__(self):
            self.trainer = None
            self.history = []
            self.final = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.selected = self.trainer.ist.selected_layers
            self.before = _layer_params(self.trainer)

        def on_step_end(self, args, state, control, **kwargs):
            after = _layer_params(self.trainer)
            for layer in range(NUM_LAYERS):
                unchanged = _same(self.before[layer], after[layer])
                if layer in self.selected:
                    assert not unchanged, f"step {state.global_step}: selected layer {layer} did not change"
                else:
                    assert unchanged, f"step {state.global_step}: unselected layer {layer} changed"
            self.history.append((state.global_step, self.selected, self.trainer.ist.scores.clone()))
            self.final = after

    return Probe


def _run(rank, world, stage, out_dir, resume_from=None):
    from transformers import TrainingArguments

    from ist_ds.integrations import ISTTrainer, init_cpu_deepspeed

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=MICRO, per_device_eval_batch_size=4,
        gradient_accumulation_steps=GRAD_ACC, max_steps=STEPS, learning_rate=1e-2, weight_decay=0.1,
        max_grad_norm=1.0, logging_steps=3, eval_strategy="steps", eval_steps=SAVE_AT, save_strategy="steps",
        save_steps=SAVE_AT, load_best_model_at_end=True, report_to="none", disable_tqdm=True, seed=0,
        deepspeed=ds_config(stage), accelerator_config=init_cpu_deepspeed(),
    )
    probe = _probe_class()()
    trainer = ISTTrainer(model=make_model(), args=args, train_dataset=make_data(96, 1),
                         eval_dataset=make_data(8, 2), callbacks=[probe])
    probe.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from)
    ist_logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "history": probe.history,
        "final": probe.final,
        "state": trainer.ist.state_dict(),
        "groups": [g.get("ist_layer") for g in trainer.model_wrapped.basic_optimizer.param_groups],
        "logs": ist_logs,
    }


def _stage(rank, world, stage, tmp):
    import torch.distributed as dist

    first = _run(rank, world, stage, f"{tmp}/a")
    dist.barrier()
    resumed = _run(rank, world, stage, f"{tmp}/b", resume_from=f"{tmp}/a/checkpoint-{SAVE_AT}")
    return {"first": first, "resumed": resumed}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "importance":
            assert torch.equal(a[key]["scores"], b[key]["scores"]), (a[key], b[key])
            assert a[key]["num_updates"] == b[key]["num_updates"]
        elif torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], (key, a[key], b[key])


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_freezing_agreement_and_resume(stage, tmp_path):
    r0, r1 = run_ranks(_stage, 2, stage, str(tmp_path))
    first = r0["first"]
    # every optimizer step was checked, on both ranks, and the ranks agree
    assert [h[0] for h in first["history"]] == list(range(1, STEPS + 1))
    for a, b in zip(first["history"], r1["first"]["history"]):
        assert a[1] == b[1] and torch.equal(a[2], b[2]), (a, b)
    assert all(len(h[1]) == 2 for h in first["history"])
    assert len({tuple(h[1]) for h in first["history"]}) > 1, "the selection never changed"
    assert not torch.equal(first["history"][-1][2], torch.zeros(NUM_LAYERS)), "the scores never moved"
    _assert_same_state(first["state"], r1["first"]["state"])
    assert first["state"]["step"] == STEPS
    # per-layer groups reached the optimizer DeepSpeed steps
    assert set(first["groups"]) == set(range(NUM_LAYERS))

    # the checkpoint: IST state, adapter weights of every layer
    ckpt = tmp_path / "a" / f"checkpoint-{SAVE_AT}"
    saved = torch.load(ckpt / "ist_state.pt", weights_only=True)
    assert saved["step"] == SAVE_AT
    from safetensors.torch import load_file

    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    lora = [k for k in adapter if "lora_" in k]
    assert {int(k.split("layers.")[1].split(".")[0]) for k in lora} == set(range(NUM_LAYERS))
    assert len(lora) == NUM_LAYERS * 5 * 2

    # resumed run = uninterrupted run
    resumed = r0["resumed"]
    assert [h[0] for h in resumed["history"]] == list(range(SAVE_AT + 1, STEPS + 1))
    assert [h[1] for h in resumed["history"]] == [h[1] for h in first["history"][SAVE_AT:]]
    for a, b in zip(resumed["history"], first["history"][SAVE_AT:]):
        assert torch.equal(a[2], b[2])
    _assert_same_state(first["state"], resumed["state"])
    _assert_same_state(resumed["state"], r1["resumed"]["state"])
    for a, b in zip(first["final"], resumed["final"]):
        assert _same(a, b), "the resumed run's PEFT weights differ from the uninterrupted run's"

    # per-layer scalars in the training logs
    logs = first["logs"]
    assert len(logs) == STEPS // 3
    assert f"ist/score/layer_{NUM_LAYERS - 1}" in logs[-1] and "ist/trained/layer_0" in logs[-1]
    assert sum(logs[0][f"ist/trained/layer_{i}"] for i in range(NUM_LAYERS)) == pytest.approx(2.0)
