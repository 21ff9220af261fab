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
import copy
import gc
import importlib
import os

import pytest
import torch

import helpers
from distributed import run_ranks

# Loaded here once rather than in every forked rank: transformers.Trainer; DeepSpeed's Muon optimizer
# (with it torch._dynamo, several seconds), imported the first time DeepSpeed checks an optimizer; the
# CPU accelerator's shared-memory collectives op, JIT-loaded (under a file lock) by init_distributed.
for _module in ("transformers.trainer", "deepspeed.runtime.zero.muon.muon_optimizer", "peft"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)
with contextlib.suppress(Exception):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        get_accelerator().create_op_builder("ShareMemCommBuilder").load()

NUM_LAYERS = 8
SEQ = 16
MICRO = 2
GRAD_ACC = 2
STEPS = 16
SAVE_AT = 8


_BASE_MODEL = None


def make_model():
    """A fresh copy of one tiny LoRA Llama, built once per process.

    Only ever called inside forked ranks: torch compute in the pytest process before a fork can leave
    the ranks' thread pool unusable."""
    global _BASE_MODEL
    if _BASE_MODEL is None:
        _BASE_MODEL = helpers.make_model(seed=0, num_layers=NUM_LAYERS)
    return copy.deepcopy(_BASE_MODEL)


def fork_ranks(fn, world, *args, **kwargs):
    """``run_ranks`` with the parent's objects frozen out of the garbage collector: accelerate runs
    ``gc.collect()`` when training starts, which in a forked rank would otherwise walk (and copy) the
    whole inherited heap of torch, transformers and DeepSpeed, for seconds."""
    gc.collect()
    gc.freeze()
    try:
        return run_ranks(fn, world, *args, **kwargs)
    finally:
        gc.unfreeze()


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
    def full(p):  # FSDP2 shards parameters as DTensors; full_tensor() gathers them (on every rank)
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    with deepspeed.zero.GatheredParameters(flat, enabled=hasattr(flat[0], "ds_id")):
        return [[full(p).detach().clone() for p in ps] for ps in params]


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
            self.micro = []

        def forward_pre_hook(self, module, args, kwargs):
            """Each training forward (micro-batch): the IST step and layers it runs with."""
            if module.training and torch.is_grad_enabled() and self.trainer.ist is not None:
                self.micro.append((self.trainer.ist.step, self.trainer.ist.selected_layers))

        def on_step_begin(self, args, state, control, **kwargs):
            self.selected = self.trainer.ist.selected_layers
            self.before = _layer_params(self.trainer)
            self.micro = []

        def on_step_end(self, args, state, control, **kwargs):
            # gradient accumulation: every micro-batch of this optimizer step ran with its selection
            assert self.micro == [(state.global_step - 1, self.selected)] * GRAD_ACC, (state.global_step, self.micro)
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


def _cpu_fsdp_accelerator_config():
    """accelerate turns FSDP on only for accelerator devices; on this CPU-only machine the process
    state is set up over gloo and labelled multi-device, so that Trainer's FSDP2 path runs unchanged."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU
    return {"use_configured_state": True}


def _run(rank, world, backend, out_dir, resume_from=None, stage=2, steps=STEPS, save_at=SAVE_AT, **extra):
    from transformers import TrainingArguments

    from ist_ds.integrations import ISTTrainer, init_cpu_deepspeed

    kwargs, ist_config = {}, None
    if backend == "deepspeed":
        kwargs.update(deepspeed=ds_config(stage), accelerator_config=init_cpu_deepspeed())
    else:
        ist_config = {**ds_config(2)["ist"], "optimizer_state": "offload"}
        kwargs.update(use_cpu=True)
        if backend == "fsdp":
            kwargs.update(fsdp=True, accelerator_config=_cpu_fsdp_accelerator_config(),
                          fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                       "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                       "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    kwargs.update(extra)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=MICRO, per_device_eval_batch_size=4,
        gradient_accumulation_steps=GRAD_ACC, max_steps=steps, learning_rate=1e-2, weight_decay=0.1,
        max_grad_norm=1.0, logging_steps=3, eval_strategy="steps", eval_steps=save_at, save_strategy="steps",
        save_steps=save_at, load_best_model_at_end=True, disable_tqdm=True, seed=0, **kwargs,
    )
    probe = _probe_class()()
    trainer = ISTTrainer(model=make_model(), args=args, train_dataset=helpers.make_data(96, SEQ, seed=1),
                         eval_dataset=helpers.make_data(8, SEQ, seed=2), callbacks=[probe], ist_config=ist_config)
    probe.trainer = trainer
    trainer.model.register_forward_pre_hook(probe.forward_pre_hook, with_kwargs=True)
    trainer.train(resume_from_checkpoint=resume_from)
    if backend == "deepspeed" and stage == 3:  # ZeRO-3's linear was swapped for ist_ds's selective one
        from ist_ds.backends.zero3_linear import selective_linear
        assert torch.nn.functional.linear is selective_linear
    optimizer = trainer.model_wrapped.basic_optimizer if backend == "deepspeed" else trainer.optimizer
    return {
        "history": probe.history,
        "final": probe.final,
        "state": trainer.ist.state_dict(),
        "groups": [g.get("ist_layer") for g in optimizer.param_groups],
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "fsdp": trainer.is_fsdp_enabled,
    }


def _run_and_resume(rank, world, backend, tmp, **kwargs):
    first = _run(rank, world, backend, f"{tmp}/a", **kwargs)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    resumed = _run(rank, world, backend, f"{tmp}/b", resume_from=f"{tmp}/a/checkpoint-{SAVE_AT}", **kwargs)
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


def _check_run_and_resume(results, tmp_path, adapter=True):
    r0, r1 = results
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
    # the per-layer param groups reached the optimizer that is stepped
    assert set(first["groups"]) == set(range(NUM_LAYERS))

    # the checkpoint: IST state (plain data), adapter weights of every layer (unselected ones included)
    ckpt = tmp_path / "a" / f"checkpoint-{SAVE_AT}"
    saved = torch.load(ckpt / "ist_state.pt", weights_only=True)
    assert saved["step"] == SAVE_AT
    if adapter:
        from safetensors.torch import load_file

        lora = [k for k in load_file(str(ckpt / "adapter_model.safetensors")) if "lora_" in k]
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


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_freezing_agreement_and_resume(stage, tmp_path):
    results = fork_ranks(_run_and_resume, 2, "deepspeed", str(tmp_path), stage=stage)
    _check_run_and_resume(results, tmp_path)


def test_trainer_fsdp2_freezing_agreement_and_resume(tmp_path):
    results = fork_ranks(_run_and_resume, 2, "fsdp", str(tmp_path))
    assert results[0]["first"]["fsdp"]
    _check_run_and_resume(results, tmp_path, adapter=False)  # FSDP saves the model sharded


# ---------------------------------------------------------------------- no distributed run needed
def test_read_ist_config():
    from ist_ds.core import ISTConfig
    from ist_ds.core.errors import ISTConfigError
    from ist_ds.integrations import read_ist_config

    block = {"train_layers": 2, "seed": 3}
    assert read_ist_config({"ist": block}) == ISTConfig.from_dict(block)
    assert read_ist_config(None, block) == ISTConfig.from_dict(block)
    assert read_ist_config({"ist": block}, dict(block)) == ISTConfig.from_dict(block)
    assert not read_ist_config({"zero_optimization": {"stage": 2}}).enabled
    assert not read_ist_config(None, None).enabled
    with pytest.raises(ISTConfigError, match="twice"):
        read_ist_config({"ist": block}, {"train_layers": 3})
    with pytest.raises(ISTConfigError, match="unknown key"):
        read_ist_config({"ist": {"train_layer": 2}})


def _regroup(rank, world):
    from accelerate.utils import DummyOptim

    from ist_ds.integrations.hf_trainer_setup import regroup_by_layer
    from ist_ds.model.layers import discover_layers

    model = make_model()
    layer_map = discover_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = params[::2], params[1::2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}], lr=1e-2)
    regroup_by_layer(optimizer, layer_map)
    groups = optimizer.param_groups
    assert {g["ist_layer"] for g in groups} == set(range(NUM_LAYERS))
    assert len(groups) == 2 * NUM_LAYERS
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert sorted(by_id) == sorted(id(p) for p in params)
    assert all(by_id[id(p)]["weight_decay"] == 0.1 and by_id[id(p)]["lr"] == 1e-2 for p in decay)
    assert all(by_id[id(p)]["weight_decay"] == 0.0 and by_id[id(p)]["lr"] == 5e-3 for p in no_decay)
    for group in groups:
        layer = {id(p) for _, p in layer_map.layers[group["ist_layer"]].params}
        assert all(id(p) in layer for p in group["params"])
    regroup_by_layer(optimizer, layer_map)  # idempotent
    assert len(optimizer.param_groups) == 2 * NUM_LAYERS

    dummy = DummyOptim(params=params)  # an optimizer named in the DeepSpeed config
    regroup_by_layer(dummy, layer_map)
    assert {g["ist_layer"] for g in dummy.params} == set(range(NUM_LAYERS))
    return True


def test_regroup_keeps_the_trainers_groups():
    assert fork_ranks(_regroup, 1) == [True]


def _single_process_tensorboard(rank, world, tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(rank, world, "single", f"{tmp}/single", steps=6, save_at=3, report_to="tensorboard")
    (events,) = [os.path.join(d, f) for d, _, files in os.walk(f"{tmp}/single/runs") for f in files
                 if "tfevents" in f]
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    return run, accumulator.Tags()["scalars"]


def test_single_process_and_tensorboard_scalars(tmp_path):
    """One process, no DeepSpeed: freezing checked at every step; IST scalars reach TensorBoard."""
    (result,) = fork_ranks(_single_process_tensorboard, 1, str(tmp_path))
    run, tags = result
    assert [h[0] for h in run["history"]] == list(range(1, 7))
    assert {f"train/ist/score/layer_{i}" for i in range(NUM_LAYERS)} <= set(tags)
    assert {f"train/ist/trained/layer_{i}" for i in range(NUM_LAYERS)} <= set(tags)
    assert (tmp_path / "single" / "checkpoint-3" / "ist_state.pt").is_file()
