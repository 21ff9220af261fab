"""Full-layer IST (``target: full``): discovery, subsets, suppression, config errors, ZeRO-2/3 runs.

Single-process tests cover block-list discovery on plain Hugging Face models, the ``full_params``
subset, ``train_outside``, both full-mode suppression rules (residual: exact formula and exact
restore; delta: ``W0 + lambda * (W - W0)`` and exact restore) and the config errors. Two forked CPU
ranks run whole training runs on ZeRO-2 and ZeRO-3 and check after every optimizer step, on both
ranks, what tests/test_deepspeed.py checks for PEFT mode; a third 2-rank run does the same on FSDP2
(``fully_shard`` per block, where each block's fp32 sharded parameters are its masters):

- unselected blocks' weights and fp32 masters are bit-identical across the step; selected blocks change;
- parameters IST never trains (outside the blocks with ``train_outside: never``, the part of a block
  outside ``full_params``) are bit-identical to their initial values;
- ``keep``: unselected blocks' optimizer state is bit-identical across the step;
- ``offload`` (host, disk) ends bit-identical to ``keep``; unselected blocks hold no live state;
- ``drop``: a re-selected block restarts Adam at step 1; live state is at most ``N_u / L`` of ``keep``;
- both ranks hold the same selection and scores at every step, and the scores move.

A short job from ``configs/quickstart_full.yaml`` (single process) checks that the job runner trains
full-layer IST end to end: no PEFT wrapping, the saved model loads with ``transformers``, blocks
never selected and parameters outside the blocks equal the initial model's.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from distributed import run_ranks
from helpers import make_data
from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTConfigError, ISTModelError
from ist_ds.model.full_layers import discover_full_layers
from ist_ds.model.layers import discover_for
from ist_ds.jobs.models import build_model
from ist_ds.model.suppression import suppress

NUM_LAYERS = 4
MICRO = 2
INPUT_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, **kw).logits


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same_params(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- discovery
@pytest.mark.parametrize("arch, path, per_block", [("llama", "model.layers", 9), ("gpt2", "transformer.h", 12)])
def test_discovery_on_plain_model(arch, path, per_block):
    model = build_model(arch, seed=0)
    lm = discover_for(model, ISTConfig(target="full"))
    assert lm.target == "full" and lm.blocks_path == path and lm.num_layers == NUM_LAYERS
    assert all(len(layer.params) == per_block and layer.tuner_modules == [] for layer in lm.layers)
    assert all(n.startswith(f"{path}.{layer.index}.") for layer in lm.layers for n, _ in layer.params)
    in_blocks = {id(p) for layer in lm.layers for _, p in layer.params}
    # default train_outside (never): embeddings, final norm, LM head frozen and not in the map
    assert lm.outside_params == []
    for _, p in model.named_parameters():
        assert p.requires_grad == (id(p) in in_blocks)
    # always: every outside parameter trains; a second discovery of the same model gives the same map
    lm2 = discover_for(model, ISTConfig(target="full", train_outside="always"))
    assert {n for n, _ in lm2.outside_params} == {n for n, p in model.named_parameters() if id(p) not in in_blocks}
    assert all(p.requires_grad for p in model.parameters())
    # GPT-2 ties its LM head to the token embedding: the tensor appears once, under the embedding's name
    head = "lm_head.weight" if arch == "llama" else "transformer.wte.weight"
    lm3 = discover_for(model, ISTConfig(target="full", train_outside=[head.split(".")[-2]]))
    assert [n for n, _ in lm3.outside_params] == [head]
    assert [n for n, _ in lm3.layers[2].params] == [n for n, _ in lm.layers[2].params]
    assert sum(p.requires_grad for p in model.parameters()) == NUM_LAYERS * per_block + 1


def test_full_params_subset():
    model = build_model("llama", seed=0)
    lm = discover_for(model, ISTConfig(target="full", full_params=["self_attn", "mlp"]))
    names = [n.split(".", 3)[3] for n, _ in lm.layers[1].params]
    assert names == ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    norms = [p for n, p in model.named_parameters() if "layernorm" in n]
    assert norms and not any(p.requires_grad for p in norms)
    lm = discover_for(model, ISTConfig(target="full", full_params=["down_proj"]))
    assert [len(layer.params) for layer in lm.layers] == [1] * NUM_LAYERS
    with pytest.raises(ISTConfigError, match="full_params: no parameter.*containing 'attn_out' \\("):
        discover_for(model, ISTConfig(target="full", full_params=["mlp", "attn_out"]))
    with pytest.raises(ISTConfigError, match="train_outside: no parameter outside.*containing 'wte' \\("):
        discover_for(model, ISTConfig(target="full", train_outside=["wte", "lm_head"]))
    with pytest.raises(ISTConfigError, match="one string"):
        discover_full_layers(model, full_params="mlp")
    # an error leaves requires_grad as it was
    assert [len(layer.params) for layer in lm.layers] == [1] * NUM_LAYERS
    assert sum(p.requires_grad for p in model.parameters()) == NUM_LAYERS


class _Block(torch.nn.Module):
    def __init__(self, d=8, experts=0, tuple_out=False):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(experts))
        self.tuple_out = tuple_out

    def forward(self, h):
        out = h + torch.tanh(self.lin(h)) + sum((e(h) for e in self.experts), torch.zeros_like(h))
        return (out, "extra") if self.tuple_out else out


def test_block_list_heuristics():
    # a Sequential wrapper around the block list does not count; MoE experts inside a block never win
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ModuleList(_Block(experts=6) for _ in range(3)),
                                torch.nn.Linear(8, 8))
    assert discover_full_layers(model).blocks_path == "1"
    single = torch.nn.Module()
    single.layers = torch.nn.ModuleList([_Block(experts=6)])
    assert discover_full_layers(single).blocks_path == "layers"
    # two equal stacks side by side: ambiguous, blocks_path decides
    twin = torch.nn.Module()
    twin.encoder, twin.decoder = (torch.nn.ModuleList(_Block() for _ in range(2)) for _ in range(2))
    with pytest.raises(ISTModelError, match="blocks_path"):
        discover_full_layers(twin)
    assert discover_full_layers(twin, blocks_path="decoder").num_layers == 2
    with pytest.raises(ISTConfigError, match="does not exist"):
        discover_full_layers(twin, blocks_path="middle")
    with pytest.raises(ISTModelError, match="no torch.nn.ModuleList"):
        discover_full_layers(torch.nn.Linear(3, 3))
    shared = torch.nn.Module()
    shared.layers = torch.nn.ModuleList(_Block() for _ in range(2))
    shared.layers[1].lin = shared.layers[0].lin
    with pytest.raises(ISTModelError, match="shared with transformer block 0"):
        discover_full_layers(shared)


# ---------------------------------------------------------------------- suppression
def test_residual_suppression_formula_and_exact_restore():
    model = build_model("llama", seed=0).eval()
    lm = discover_for(model, ISTConfig(target="full"))
    before_params, clean = _snapshot(model), _logits(model)
    # the hooked block returns h_in + lambda * (h_out - h_in): capture the unsuppressed in/out of block 2
    seen = {}
    handle = lm.layers[2].module.register_forward_hook(
        lambda m, a, kw, out: seen.update(h_in=a[0].clone() if a else kw["hidden_states"].clone(), h_out=out.clone()),
        with_kwargs=True)
    _logits(model)
    handle.remove()
    got = {}
    with suppress(lm, [2], 0.25):
        handle = lm.layers[3].module.register_forward_pre_hook(
            lambda m, a, kw: got.update(h=a[0].clone() if a else kw["hidden_states"].clone()), with_kwargs=True)
        damped = _logits(model)
        handle.remove()
    torch.testing.assert_close(got["h"], seen["h_in"] + 0.25 * (seen["h_out"] - seen["h_in"]), rtol=0, atol=1e-6)
    assert not torch.allclose(damped, clean)
    assert torch.equal(_logits(model), clean) and _same_params(before_params, _snapshot(model))
    assert all(not layer.module._forward_hooks for layer in lm.layers)
    # scale 1 is a no-op; scale 0 on every block leaves embeddings -> final norm -> LM head
    with suppress(lm, [0, 1], 1.0):
        assert torch.equal(_logits(model), clean)
    with suppress(lm, range(NUM_LAYERS), 0.0):
        skipped = _logits(model)
    with torch.no_grad():
        direct = model.lm_head(model.model.norm(model.model.embed_tokens(INPUT_IDS)))
    torch.testing.assert_close(skipped, direct, rtol=1e-5, atol=1e-5)
    # restored also when the body raises
    with pytest.raises(RuntimeError):
        with suppress(lm, [1], 0.5):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model), clean)
    with pytest.raises(ISTConfigError, match="out of range"):
        with suppress(lm, [NUM_LAYERS], 0.5):
            pass


def test_residual_suppression_tuple_output():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(_Block(tuple_out=True) for _ in range(2))
    lm = discover_full_layers(model)
    h = torch.randn(3, 8)
    out, extra = model.layers[0](h)
    with suppress(lm, [0], 0.5):
        damped, extra2 = model.layers[0](h)
    torch.testing.assert_close(damped, h + 0.5 * (out - h))
    assert extra2 == extra and torch.equal(model.layers[0](h)[0], out)


def test_delta_suppression_matches_interpolated_weights():
    torch.manual_seed(0)
    model = build_model("llama", seed=0).eval()
    cfg = ISTConfig(target="full", full_params=["mlp"], full_suppression="delta")
    lm = discover_for(model, cfg)
    pristine = _logits(model)
    initial = _snapshot(model)
    with torch.no_grad():  # "fine-tune" every trained weight
        for layer in lm.layers:
            for _, p in layer.params:
                p.add_(0.05 * torch.randn_like(p))
    tuned_params, tuned = _snapshot(model), _logits(model)
    with suppress(lm, range(NUM_LAYERS), 0.0):
        torch.testing.assert_close(_logits(model), pristine, rtol=0, atol=0)
    with suppress(lm, [1, 3], 0.25):
        inside = _logits(model)
    assert _same_params(tuned_params, _snapshot(model)) and torch.equal(_logits(model), tuned)
    # the same forward with blocks 1 and 3 set by hand to W0 + 0.25 (W - W0)
    with torch.no_grad():
        for i in (1, 3):
            for name, p in lm.layers[i].params:
                p.copy_(initial[name] + 0.25 * (tuned_params[name] - initial[name]))
        torch.testing.assert_close(inside, _logits(model), rtol=0, atol=0)


# ---------------------------------------------------------------------- config
def test_config_keys_and_errors():
    c = ISTConfig.from_dict({"target": "full", "full_params": ["self_attn", "mlp"], "train_outside": ["lm_head"]})
    assert c.full_params == ("self_attn", "mlp") and c.outside_mode == ("lm_head",)
    assert ISTConfig.from_dict(c.to_dict()) == c and c.to_dict()["full_params"] == ["self_attn", "mlp"]
    assert ISTConfig(target="full").outside_mode == "never" and ISTConfig().outside_mode is None
    bad = [
        ({"target": "lora"}, "ist.target"),
        ({"full_params": ["mlp"]}, "full_params: is only used with target: full"),
        ({"train_outside": "always"}, "train_outside: is only used with target: full"),
        ({"full_suppression": "delta"}, "full_suppression: is only used with target: full"),
        ({"target": "full", "full_params": "mlp"}, "ist.full_params"),
        ({"target": "full", "full_params": []}, "ist.full_params"),
        ({"target": "full", "full_params": ["mlp", ""]}, "ist.full_params"),
        ({"target": "full", "train_outside": "sometimes"}, "ist.train_outside"),
        ({"target": "full", "train_outside": []}, "ist.train_outside"),
        ({"target": "full", "full_suppression": "weights"}, "ist.full_suppression"),
        ({"target": "full", "blocks": "model.layers"}, "unknown key"),
    ]
    for block, match in bad:
        with pytest.raises(ISTConfigError, match=match):
            ISTConfig.from_dict(block)


# ---------------------------------------------------------------------- single-process training
def test_single_process_trainer_full_mode():
    from ist_ds.backends.single import SingleProcessTrainer

    data = make_data(48)
    model = build_model("llama", seed=0)
    initial = _snapshot(model)
    cfg = {"target": "full", "full_params": ["self_attn", "mlp"], "train_layers": 1, "update_interval": 2,
           "scoring_batch_size": 4, "optimizer_state": "drop", "seed": 3}
    trainer = SingleProcessTrainer(model, cfg, data, default_collate, lr=1e-2, weight_decay=0.1)
    lm = trainer.layer_map
    trained_names = {n for layer in lm.layers for n, _ in layer.params}
    for step in range(5):
        selected = trainer.ist.selected_layers
        before = [[p.detach().clone() for _, p in layer.params] for layer in lm.layers]
        trainer.train_step(default_collate(data[step * 4:step * 4 + 4]))
        for layer in lm.layers:
            same = all(torch.equal(a, p) for a, (_, p) in zip(before[layer.index], layer.params))
            assert same == (layer.index not in selected), (step, layer.index, selected)
        live = [i for i in range(NUM_LAYERS) if any(p in trainer.optimizer.state for _, p in lm.layers[i].params)]
        assert set(live) <= set(trainer.ist.selected_layers)  # drop: only the next step's block may hold state
    final = _snapshot(model)
    for name in initial:
        if name not in trained_names:  # norms, embeddings, LM head: never trained
            assert torch.equal(initial[name], final[name]), name
    assert not torch.equal(trainer.ist.scores, torch.zeros(NUM_LAYERS))


# ---------------------------------------------------------------------- 2 ranks, ZeRO-2 and ZeRO-3
def ds_config(stage, mode, target="host", offload_dir=None, **ist):
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3,
                                                     "warmup_num_steps": 3}},
        "steps_per_print": 10_000,
        "ist": {"target": "full", "train_layers": 1, "suppress_layers": 2, "update_interval": 3,
                "optimizer_state": mode, "seed": 11, "scoring_batch_size": 4, **ist},
    }
    if stage == 3:  # partition every parameter (the default keeps small ones whole on every rank)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if mode == "offload":
        cfg["ist"]["offload_target"] = target
        if target == "disk":
            cfg["ist"]["offload_dir"] = offload_dir
    return cfg


def _gathered(engine, stage):
    import deepspeed

    named = list(engine.module.named_parameters())
    ctx = deepspeed.zero.GatheredParameters([p for _, p in named]) if stage == 3 else torch.no_grad()
    with ctx:
        return {n: p.detach().clone() for n, p in named}


def _state_of(engine):
    gate = engine.ist.controller.gate
    state = gate.optimizer.state
    return {layer: [{k: v.clone() for k, v in state[t].items()} for t in gate.masters(layer) if t in state and state[t]]
            for layer in gate.all_layers}


def _masters_of(engine):
    """Clones of each block's fp32 masters that are in place (offload/drop park unselected ones: skipped)."""
    from ist_ds.optim.parking import storage_bytes

    gate = engine.ist.controller.gate
    return {layer: [t.detach().clone() for t in gate.masters(layer) if storage_bytes(t)] for layer in gate.all_layers}


def _eq_list(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _eq_states(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _check_state_mode_and_agreement(step, mode, ist, selected, before_s, after_s, world):
    """offload/drop: unselected blocks hold no optimizer state; drop: a block re-selected after holding
    none restarts Adam at step 1; every rank has the same selection and scores."""
    import torch.distributed as dist

    if mode != "keep":
        for i in range(NUM_LAYERS):
            if i not in ist.selected_layers:
                assert after_s[i] == [], f"step {step}: unselected block {i} still holds optimizer state"
    if mode == "drop":
        for i in selected:
            if before_s[i] == []:
                assert all(float(s["step"]) == 1 for s in after_s[i]), f"step {step}: block {i} kept Adam's step"
    gathered = [None] * world
    dist.all_gather_object(gathered, (selected, ist.scores.tolist()))
    assert all(g == gathered[0] for g in gathered), f"ranks disagree at step {step}: {gathered}"


def _train_full(rank, world, cfg, steps, data):
    import ist_ds

    stage = cfg["zero_optimization"]["stage"]
    mode = cfg["ist"]["optimizer_state"]
    model = build_model("llama", seed=0)
    engine, *_ = ist_ds.initialize(model=model, config=cfg, scoring_data=data)
    from ist_ds.observe.monitor import PeakStateProbe

    probe = PeakStateProbe(engine.ist.controller.gate.optimizer)  # state bytes during each step
    ist = engine.ist
    lm = ist.layer_map
    block_names = [[n for n, _ in layer.params] for layer in lm.layers]
    outside_names = {n for n, _ in lm.outside_params}
    never = {n for n, _ in engine.module.named_parameters()} - {n for ns in block_names for n in ns} - outside_names
    initial = _gathered(engine, stage)
    history = []
    for step in range(steps):
        selected = ist.selected_layers
        before, before_m, before_s = _gathered(engine, stage), _masters_of(engine), _state_of(engine)
        rows = data[step * MICRO * world + rank * MICRO:][:MICRO]
        engine.backward(engine(**default_collate(rows)).loss)
        engine.step()
        after, after_m, after_s = _gathered(engine, stage), _masters_of(engine), _state_of(engine)
        for i, names in enumerate(block_names):
            same = all(torch.equal(before[n], after[n]) for n in names)
            if i in selected:
                assert not same, f"step {step}: selected block {i} did not change"
                continue
            assert same, f"step {step}: unselected block {i} changed"
            if before_m[i] and after_m[i]:  # ZeRO-3 shows the gate its partitions from the first step on
                assert _eq_list(before_m[i], after_m[i]), f"step {step}: fp32 master of block {i} changed"
            if mode == "keep":
                assert _eq_states(before_s[i], after_s[i]), f"step {step}: optimizer state of block {i} changed"
        for n in outside_names:
            assert not torch.equal(before[n], after[n]), f"step {step}: {n} (train_outside) did not train"
        for n in never:
            assert torch.equal(initial[n], after[n]), f"step {step}: {n} is never trained but changed"
        _check_state_mode_and_agreement(step, mode, ist, selected, before_s, after_s, world)
        history.append((selected, ist.scores.clone()))
    out = {"history": history, "final": _gathered(engine, stage), "report": ist.memory_report(),
           "never": sorted(never), "outside": sorted(outside_names), "peak": probe.peak}
    if stage == 3 and mode == "keep":  # residual suppression through ZeRO-3's own module hooks
        import dataclasses

        residual = dataclasses.replace(lm, full_suppression="residual")
        batch = default_collate(data[:MICRO])
        engine.module.eval()
        with torch.no_grad():
            clean = engine.module(**batch).logits
            with suppress(residual, [0, 2], 0.25):
                damped = engine.module(**batch).logits
            again = engine.module(**batch).logits
        out["residual"] = (torch.equal(clean, again), torch.equal(clean, damped))
        assert _same_params(out["final"], _gathered(engine, stage))
    engine.destroy()
    return out


def _full_runs(rank, world, stage, tmp):
    data = make_data(48)
    if stage == 2:
        ist = {"full_params": ["self_attn", "mlp"]}  # residual suppression, nothing outside trains
        modes = [("keep", "host"), ("offload", "host"), ("offload", "disk"), ("drop", "host")]
    else:
        ist = {"train_outside": ["lm_head"], "full_suppression": "delta"}
        modes = [("keep", "host"), ("offload", "host"), ("drop", "host")]
    return {f"{m}-{t}": _train_full(rank, world, ds_config(stage, m, t, f"{tmp}/offload", **ist), 7, data)
            for m, t in modes}


@pytest.mark.parametrize("stage", [2, 3])
def test_full_mode_zero(stage, tmp_path):
    r0, r1 = run_ranks(_full_runs, 2, stage, str(tmp_path))
    for key in r0:
        assert [h[0] for h in r0[key]["history"]] == [h[0] for h in r1[key]["history"]]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(r0[key]["history"], r1[key]["history"]))
    keep = r0["keep-host"]
    assert not torch.equal(keep["history"][-1][1], torch.zeros(NUM_LAYERS))  # updates at steps 3 and 6 moved scores
    if stage == 2:
        assert "model.embed_tokens.weight" in keep["never"] and "model.layers.0.input_layernorm.weight" in keep["never"]
    else:
        assert keep["outside"] == ["lm_head.weight"]
        assert keep["residual"] == (True, False)  # exact restore; the damped forward differs
    for key in (k for k in r0 if k.startswith("offload")):
        assert [h[0] for h in r0[key]["history"]] == [h[0] for h in keep["history"]]
        assert _same_params(keep["final"], r0[key]["final"]), f"{key} differs from keep"
    assert [h[0] for h in r0["drop-host"]["history"]] == [h[0] for h in keep["history"]]
    assert not _same_params(keep["final"], r0["drop-host"]["final"])  # drop restarted Adam somewhere

    def live(report):
        return sum(v for k, v in report["optimizer_state_bytes"].items() if k.startswith("live"))

    if stage == 2:  # during a step 1 of 4 blocks holds state with drop/offload; keep every block trained so far
        trained = len({i for h in keep["history"] for i in h[0]})
        assert trained > 1 and keep["peak"] == live(keep["report"])
        for key in ("drop-host", "offload-host", "offload-disk"):  # peak probe: measured inside the step
            assert r0[key]["peak"] == pytest.approx(keep["peak"] / trained, rel=0.01), key
        assert r0["offload-host"]["report"]["optimizer_state_bytes"]["offloaded_host"] > 0


# ---------------------------------------------------------------------- 2 ranks, FSDP2
def _fsdp_local(params):
    """This rank's shards of ``params`` (DTensor local tensors), cloned."""
    return [p.to_local().detach().clone() for p in params]


def _fsdp_states(run):
    """Each block's optimizer state on this rank (local shards), as held by the optimizer now."""
    state = run.optimizer.state
    return {layer.index: [{k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in state[p].items()}
                          for _, p in layer.params if p in state and state[p]]
            for layer in run.layer_map.layers}


def _train_fsdp_full(rank, world, block, steps, data):
    """Train ``steps`` steps of full-layer IST on FSDP2, asserting the invariants after each one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ist_ds.backends.fsdp import setup

    from ist_ds.observe.monitor import PeakStateProbe

    mode = block["optimizer_state"]
    run = setup(build_model("llama", seed=0), block, mesh=init_device_mesh("cpu", (world,)), scoring_data=data,
                collate_fn=default_collate, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    probe = PeakStateProbe(run.optimizer)  # state bytes right after each (gated) optimizer step
    ist, lm = run.ist, run.layer_map
    named = dict(run.model.named_parameters())
    in_blocks = {n for layer in lm.layers for n, _ in layer.params}
    outside = [n for n, _ in lm.outside_params]
    never = sorted(set(named) - in_blocks - set(outside))
    initial_never = _fsdp_local([named[n] for n in never])
    history = []
    for step in range(steps):
        selected = ist.selected_layers
        # each block's local shards are its fp32 master (FSDP2 keeps fp32 sharded parameters)
        before = [_fsdp_local([p for _, p in layer.params]) for layer in lm.layers]
        before_s, before_out = _fsdp_states(run), _fsdp_local([named[n] for n in outside])
        rows = data[step * MICRO * world + rank * MICRO:][:MICRO]
        loss = run.model(**default_collate(rows)).loss
        loss.backward()
        for layer in lm.layers:  # frozen blocks get no gradient at all: FSDP2 reduce-scatters nothing for them
            grads = [p.grad is not None for _, p in layer.params]
            assert all(grads) if layer.index in selected else not any(grads), (step, layer.index, selected)
        run.step()
        after, after_s = [_fsdp_local([p for _, p in layer.params]) for layer in lm.layers], _fsdp_states(run)
        for i in range(NUM_LAYERS):
            same = _eq_list(before[i], after[i])
            if i in selected:
                changed = torch.tensor([0.0 if same else 1.0])
                dist.all_reduce(changed)  # a rank's shard may hold only unchanged elements; the block must move
                assert changed.item() > 0, f"step {step}: selected block {i} did not change"
                continue
            assert same, f"step {step}: unselected block {i} changed"
            if mode == "keep":
                assert _eq_states(before_s[i], after_s[i]), f"step {step}: optimizer state of block {i} changed"
        if outside:
            now = _fsdp_local([named[n] for n in outside])
            assert not _eq_list(before_out, now), f"step {step}: {outside} did not train"
        now = _fsdp_local([named[n] for n in never])
        assert _eq_list(initial_never, now), f"step {step}: a never-trained parameter changed"
        _check_state_mode_and_agreement(step, mode, ist, selected, before_s, after_s, world)
        history.append((selected, ist.scores.clone()))
    final = [[p.full_tensor().detach().clone() for _, p in layer.params] for layer in lm.layers]

    def adam_bytes(params):  # exp_avg + exp_avg_sq (fp32 local shards) and the fp32 step scalar, per parameter
        return sum(2 * 4 * p.to_local().numel() + 4 for p in params)

    return {"history": history, "final": final, "report": run.memory_report(), "never": never, "outside": outside,
            "block_bytes": [adam_bytes(p for _, p in layer.params) for layer in lm.layers],
            "outside_bytes": adam_bytes(p for _, p in lm.outside_params), "offload_files": [], "peak": probe.peak}


def _fsdp_full_runs(rank, world, tmp):
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    data = make_data(48)
    base = {"target": "full", "train_layers": 1, "suppress_layers": 2, "update_interval": 3, "seed": 11,
            "scoring_batch_size": 4, "full_params": ["self_attn", "mlp"], "train_outside": ["lm_head"]}
    out = {}
    for mode, target in (("keep", "host"), ("offload", "host"), ("offload", "disk"), ("drop", "host")):
        block = dict(base, optimizer_state=mode)
        if mode == "offload":
            block["offload_target"] = target
            if target == "disk":
                block["offload_dir"] = f"{tmp}/offload"
        out[f"{mode}-{target}"] = _train_fsdp_full(rank, world, block, 7, data)
        if target == "disk":
            out[f"{mode}-{target}"]["offload_files"] = sorted(os.listdir(f"{tmp}/offload"))
    return out


def test_full_mode_fsdp(tmp_path):
    import ist_ds.backends.fsdp  # noqa: F401  (imported before forking: the ranks inherit it)

    r0, r1 = run_ranks(_fsdp_full_runs, 2, str(tmp_path))
    for key in r0:  # both ranks: same selections and bit-identical scores at every step
        assert [h[0] for h in r0[key]["history"]] == [h[0] for h in r1[key]["history"]]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(r0[key]["history"], r1[key]["history"]))
    keep = r0["keep-host"]
    assert keep["outside"] == ["lm_head.weight"]
    assert "model.embed_tokens.weight" in keep["never"] and "model.layers.0.input_layernorm.weight" in keep["never"]
    assert not torch.equal(keep["history"][-1][1], torch.zeros(NUM_LAYERS))  # updates at steps 3 and 6 moved scores
    for key in ("offload-host", "offload-disk"):
        assert [h[0] for h in r0[key]["history"]] == [h[0] for h in keep["history"]]
        assert all(_eq_list(a, b) for a, b in zip(keep["final"], r0[key]["final"])), f"{key} differs from keep"
    assert r0["offload-disk"]["offload_files"], "offload to disk wrote no file"
    assert [h[0] for h in r0["drop-host"]["history"]] == [h[0] for h in keep["history"]]
    assert not all(_eq_list(a, b) for a, b in zip(keep["final"], r0["drop-host"]["final"]))  # drop restarted Adam

    def live(report):
        return sum(v for k, v in report["optimizer_state_bytes"].items() if k.startswith("live"))

    for runs in (r0, r1):  # bytes on each rank: exact Adam state of the blocks that hold it, plus lm_head's
        keep, host, disk, drop = (runs[k] for k in ("keep-host", "offload-host", "offload-disk", "drop-host"))
        trained = {i for h in keep["history"] for i in h[0]}
        assert live(keep["report"]) == sum(keep["block_bytes"][i] for i in trained) + keep["outside_bytes"]
        assert keep["peak"] == live(keep["report"])
        for run, where in ((host, "offloaded_host"), (disk, "offloaded_disk")):
            b = run["report"]["optimizer_state_bytes"]
            assert b[where] > 0 and live(run["report"]) + b[where] == live(keep["report"])
        for run in (host, disk, drop):  # during a step (peak probe): N_u = 1 block's state live, plus lm_head's
            assert run["peak"] == max(run["block_bytes"][i] for h in run["history"] for i in h[0]) + run["outside_bytes"]
        assert drop["report"]["optimizer_state_bytes"]["offloaded_host"] == 0


def test_fsdp_refuses_delta_before_sharding():
    from ist_ds.backends.fsdp import setup

    model = build_model("llama", seed=0)
    with pytest.raises(ISTConfigError, match="delta is not supported on FSDP2"):
        setup(model, {"target": "full", "full_suppression": "delta", "strategy": "rst", "train_layers": 1})
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())


# ---------------------------------------------------------------------- the job runner
def test_recipe_requires_peft_none_with_full_target():
    from ist_ds.jobs.recipe import Recipe

    with pytest.raises(ISTConfigError, match="set peft.method: none"):
        Recipe.from_dict({"ist": {"target": "full"}})
    with pytest.raises(ISTConfigError, match="peft.method: none .* needs ist.target: full"):
        Recipe.from_dict({"peft": {"method": "none"}})
    recipe = Recipe.from_yaml("configs/quickstart_full.yaml")
    assert recipe.ist.target == "full" and recipe.peft.method == "none"
    assert recipe.with_overrides(["backend.name=single"]).ist == recipe.ist


def test_quickstart_full_job_single_process(tmp_path):
    """launch/train.py runs full-layer IST from configs/quickstart_full.yaml (backend single): blocks
    never selected, the blocks' norms (outside ``full_params``) and everything outside the blocks leave
    the job bit-identical to the initial model; selected blocks' attention and MLP weights moved."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from ist_ds.jobs.data import ByteTokenizer
    from ist_ds.jobs.recipe import Recipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    steps = 4
    cmd = [sys.executable, "launch/train.py", "--config", "configs/quickstart_full.yaml",
           "--set", "backend.name=single", "--set", f"training.max_steps={steps}", "--set", "training.log_every=2",
           "--set", "ist.train_layers=1", "--set", "ist.update_interval=2", "--set", "data.max_eval_examples=8",
           "--set", "training.tensorboard=false", "--set", f"output_dir={out}",
           "--set", "training.warmup_steps=0"]  # a warm-up's first step has lr 0: nothing would move
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model" / "config.json").is_file() and (out / "ist_state.pt").is_file()
    assert not (out / "adapter").exists()
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["selection_counts"]
    assert summary["steps"] == steps and sum(counts) == steps  # 1 block per step
    assert any(s != 0 for s in summary["scores"]) and "eval_loss" in summary

    recipe = Recipe.from_yaml(os.path.join(root, "configs/quickstart_full.yaml"))
    tok = ByteTokenizer()
    initial = build_model("llama", seed=recipe.model.seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **recipe.model.config)
    saved = load_file(out / "model" / "model.safetensors")
    start = dict(initial.named_parameters())
    assert set(start) <= set(saved)
    for name, p in start.items():
        same = torch.equal(p.detach(), saved[name])
        if name.startswith("model.layers."):
            block = int(name.split(".")[2])
            trained = counts[block] > 0 and ("self_attn" in name or "mlp" in name)
            assert same != trained, f"{name}: trained {trained} but {'unchanged' if same else 'changed'}"
        else:
            assert same, f"{name} is outside the blocks (train_outside: never) but changed"
    changed = {int(n.split(".")[2]) for n, p in start.items()
               if n.startswith("model.layers.") and not torch.equal(p.detach(), saved[n])}
    assert changed == {i for i, c in enumerate(counts) if c}, (changed, counts)  # exactly the blocks trained
    assert 1 <= len(changed) <= steps
    from transformers import AutoModelForCausalLM  # the output is an ordinary transformers checkpoint

    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.equal(p, saved[n]) for n, p in loaded.named_parameters())
