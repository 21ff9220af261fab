"""IST on DeepSpeed, 2 CPU ranks (gloo): freezing, optimizer-state modes and agreement, ZeRO 0-3.

Each test forks two ranks from the pytest process and runs whole training runs inside them, so the
invariants are checked after every optimizer step on both ranks:

- the PEFT parameters of unselected layers, and their fp32 masters / ZeRO partitions, are
  bit-identical across the step; selected layers change;
- ``keep``: unselected layers' optimizer state is bit-identical across the step;
- ``offload`` (host and disk): the run is bit-identical to the ``keep`` run, and unselected layers
  hold no state in the optimizer;
- ``drop``: a re-selected layer starts from fresh state (Adam step 1);
- both ranks hold the same selection and scores at every step;
- a 2-rank run equals the single-process trainer on the same global batches.
"""

from __future__ import annotations


import pytest
import torch

from distributed import run_ranks
from helpers import MICRO, check_step, global_batch, make_data, make_model, same_tensors

NUM_LAYERS = 8  # make_model's default


def ds_config(stage, mode="keep", offload_optimizer=False, bf16=False, grad_acc=1, scheduler=True,
              offload_target="host", offload_dir=None, torch_adam=True, weight_decay=0.1, **ist):
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": grad_acc,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": weight_decay}},
        "steps_per_print": 10_000,
        "ist": {"train_layers": 2, "update_interval": 3, "optimizer_state": mode, "seed": 7,
                "scoring_batch_size": 4, **ist},
    }
    if torch_adam:
        cfg["optimizer"]["params"]["torch_adam"] = True
    if mode == "offload":
        cfg["ist"]["offload_target"] = offload_target
        if offload_target == "disk":
            cfg["ist"]["offload_dir"] = offload_dir
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2,
                                                           "warmup_num_steps": 3}}
    if offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


# ---------------------------------------------------------------------- helpers run inside the ranks
def _full_params(engine, stage):
    return gather_lora(engine.ist.layer_map, stage)


def gather_lora(lm, stage):
    """Every layer's PEFT parameters, whole (gathered under ZeRO-3), cloned."""
    import deepspeed

    params = [[p for _, p in layer.params] for layer in lm.layers]
    flat = [p for ps in params for p in ps]
    if stage == 3:
        with deepspeed.zero.GatheredParameters(flat):
            return [[p.detach().clone() for p in ps] for ps in params]
    return [[p.detach().clone() for p in ps] for ps in params]


def _masters(engine):
    """Clones of every layer's fp32 masters that are in place (parked ones hold no storage: skipped)."""
    from ist_ds.optim.parking import storage_bytes

    gate = engine.ist.controller.gate
    return {layer: [t.detach().clone() for t in gate.masters(layer) if storage_bytes(t)] for layer in gate.all_layers}


def _states(engine):
    gate = engine.ist.controller.gate
    state = gate.optimizer.state
    out = {}
    for layer in gate.all_layers:
        out[layer] = [{k: v.clone() if torch.is_tensor(v) else v for k, v in state[t].items()}
                      for t in gate.masters(layer) if t in state and state[t]]
    return out




def _train(rank, world, cfg, steps, data, check=True, grad_acc=1, checkpointing=False):
    """One IST run on DeepSpeed with the invariants asserted after every optimizer step."""
    import deepspeed
    import torch.distributed as dist

    import ist_ds

    stage = cfg["zero_optimization"]["stage"]
    mode = cfg["ist"]["optimizer_state"]
    model = make_model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = ist_ds.initialize(model=model, config=cfg, scoring_data=data)
    from ist_ds.observe.monitor import PeakStateProbe

    probe = PeakStateProbe(engine.ist.controller.gate.optimizer)  # state bytes during each step
    if stage == 3:  # ZeRO-3's memory-efficient linear, swapped for ist_ds's selective one
        from ist_ds.backends.zero3_linear import selective_linear
        assert torch.nn.functional.linear is selective_linear
    ist = engine.ist
    history = []
    for step in range(steps):
        selected = ist.selected_layers
        before_p, before_m, before_s = _full_params(engine, stage), _masters(engine), _states(engine)
        rows = global_batch(data, step, world)
        for micro in range(grad_acc):
            mb = rows[rank * MICRO:(rank + 1) * MICRO] if grad_acc == 1 else \
                data[(step * grad_acc + micro) * MICRO * world + rank * MICRO:][:MICRO]
            batch = {k: torch.stack([r[k] for r in mb]).to(engine.device) for k in mb[0]}
            if cfg.get("bf16", {}).get("enabled"):
                pass
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        assert ist.step == step + 1
        after_p, after_m, after_s = _full_params(engine, stage), _masters(engine), _states(engine)
        if check:
            check_step(step, mode, NUM_LAYERS, selected, ist.selected_layers, before_p, after_p, before_s, after_s,
                       before_m, after_m)
        gathered = [None] * world
        dist.all_gather_object(gathered, (selected, ist.scores.tolist()))
        assert all(g == gathered[0] for g in gathered), f"ranks disagree at step {step}: {gathered}"
        history.append((selected, ist.scores.clone(), [float(loss)]))
    report = ist.memory_report()
    final = _full_params(engine, stage)
    counts = ist.selection_counts
    engine.destroy()
    return {"history": history, "final": final, "report": report, "counts": counts, "peak": probe.peak}


def _stage_modes(rank, world, stage, tmp, offload_optimizer=False):
    data = make_data()
    out = {}
    for mode, target in (("keep", "host"), ("offload", "host"), ("offload", "disk"), ("drop", "host")):
        cfg = ds_config(stage, mode, offload_optimizer=offload_optimizer, offload_target=target,
                        offload_dir=f"{tmp}/offload", torch_adam=not offload_optimizer)
        out[f"{mode}-{target}"] = _train(rank, world, cfg, 7, data)
    return out


def _assert_runs(results):
    r0, r1 = results
    for key in r0:
        sel0 = [h[0] for h in r0[key]["history"]]
        assert sel0 == [h[0] for h in r1[key]["history"]]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(r0[key]["history"], r1[key]["history"]))
    keep = r0["keep-host"]
    for key in ("offload-host", "offload-disk"):
        other = r0[key]
        assert [h[0] for h in other["history"]] == [h[0] for h in keep["history"]]
        for a, b in zip(keep["final"], other["final"]):
            assert same_tensors(a, b), f"{key} differs from keep"
    # drop restarts Adam for re-selected layers: same selections, different values.
    assert any(not same_tensors(a, b) for a, b in zip(keep["final"], r0["drop-host"]["final"]))
    # scores moved (an importance update ran at steps 3 and 6)
    assert not torch.equal(keep["history"][-1][1], torch.zeros(NUM_LAYERS))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_freezing_and_state_modes(stage, tmp_path):
    _assert_runs(run_ranks(_stage_modes, 2, stage, str(tmp_path)))


def test_zero_offload_optimizer_cpu_adam(tmp_path):
    """ZeRO-2 with DeepSpeed's own offload_optimizer (DeepSpeedCPUAdam) under every IST mode."""
    _assert_runs(run_ranks(_stage_modes, 2, 2, str(tmp_path), offload_optimizer=True))


def _drop_memory(rank, world):
    data = make_data()
    runs = {}
    for mode in ("keep", "drop"):
        cfg = ds_config(2, mode, scheduler=False)
        runs[mode] = _train(rank, world, cfg, 3, data, check=False)
    return runs


def test_drop_holds_n_over_l_of_optimizer_state():
    runs = run_ranks(_drop_memory, 2)[0]
    keep, drop = runs["keep"], runs["drop"]
    # Measured during the steps (the peak probe wraps the optimizer's step): after a step, drop has
    # released everything, so a figure taken then would be 0 whatever the step held.
    trained = {i for h in keep["history"] for i in h[0]}
    per_layer = keep["peak"] / len(trained)  # keep holds the state of every layer trained so far
    assert keep["peak"] > 0 and len(trained) > 2
    assert drop["peak"] == pytest.approx(2 * per_layer, rel=0.01)  # N_u = 2 of L = 8 layers, no more


def _client_optimizer_bf16_acc_ckpt(rank, world):
    """Client torch AdamW, bf16, gradient accumulation, activation checkpointing."""
    import deepspeed

    import ist_ds

    data = make_data()
    out = {}
    cfg = ds_config(2, "keep", bf16=True, grad_acc=2)
    out["bf16_acc_ckpt"] = _train(rank, world, cfg, 4, data, grad_acc=2, checkpointing=True)
    # client optimizer instead of the config's
    cfg = ds_config(3, "drop", scheduler=False)
    del cfg["optimizer"]
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine, *_ = ist_ds.initialize(model=model, optimizer=opt, config=cfg, scoring_data=data)
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    assert len(engine.basic_optimizer.param_groups) == NUM_LAYERS
    for step in range(4):
        selected = engine.ist.selected_layers
        before = _full_params(engine, 3)
        rows = global_batch(data, step, world)[rank * MICRO:(rank + 1) * MICRO]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        engine.backward(engine(**batch).loss)
        engine.step()
        after = _full_params(engine, 3)
        for layer in range(NUM_LAYERS):
            assert same_tensors(before[layer], after[layer]) == (layer not in selected)
    engine.destroy()
    return out


def test_client_optimizer_bf16_accumulation_checkpointing():
    results = run_ranks(_client_optimizer_bf16_acc_ckpt, 2)
    assert [h[0] for h in results[0]["bf16_acc_ckpt"]["history"]] == [h[0] for h in results[1]["bf16_acc_ckpt"]["history"]]


def _ds_equivalence(rank, world, stage):
    data = make_data()
    cfg = ds_config(stage, "keep", scheduler=False, weight_decay=0.1)
    run = _train(rank, world, cfg, 7, data, check=False)
    return run


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_single_process_trainer(stage):
    """ZeRO-3 also runs ist_ds's selective linear (inputs of frozen linears not saved for backward)."""
    from ist_ds.core import ISTConfig
    from ist_ds.backends.single import SingleProcessTrainer
    from torch.utils.data import default_collate

    results = run_ranks(_ds_equivalence, 2, stage)
    data = make_data()
    cfg = ds_config(2, "keep")
    trainer = SingleProcessTrainer(make_model(), ISTConfig.from_dict(cfg["ist"]), data, default_collate,
                                   lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    selections = []
    for step in range(7):
        selections.append(trainer.ist.selected_layers)
        trainer.train_step(default_collate(global_batch(data, step, 2)))
    assert selections == [h[0] for h in results[0]["history"]]
    torch.testing.assert_close(trainer.ist.scores, results[0]["history"][-1][1], rtol=0, atol=1e-5)
    # Stated tolerance: Adam normalises each gradient element, so float-level differences in the
    # reduction order (2 ranks' mean vs one batch) can move an element with a near-zero gradient by
    # a fraction of a step. After 7 steps at lr 1e-2 every element agrees within 1e-4 (1% of one step).
    single = [[p.detach() for _, p in layer.params] for layer in trainer.layer_map.layers]
    for a, b in zip(single, results[0]["final"]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)
