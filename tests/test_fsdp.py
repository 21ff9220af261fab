"""IST on FSDP2 (``fully_shard``), 2 CPU ranks (gloo): freezing, optimizer-state modes, agreement, DCP.

Each test forks two ranks from the pytest process and runs whole training runs inside them, so the
invariants are checked after every optimizer step on both ranks:

- the PEFT parameters of unselected layers (gathered with ``full_tensor()``) are bit-identical
  across the step; selected layers change;
- ``keep``: unselected layers' optimizer state (each rank's shard) is bit-identical across the step;
- ``offload`` (host and disk): the run is bit-identical to the ``keep`` run, and unselected layers
  hold no state in the optimizer;
- ``drop``: a re-selected layer starts from fresh state (Adam step 1);
- both ranks hold the same selection and scores at every step;
- a 2-rank run equals the single-process trainer on the same global batches (stated tolerance);
- a DCP checkpoint resumes bit-identically (2 -> 2 ranks) and within tolerance on 1 rank;
- bf16 mixed precision (reduce in fp32) and activation checkpointing keep every invariant.
"""

from __future__ import annotations

import os

import pytest
import torch

# Imported here, in the pytest process, so that the forked ranks inherit them instead of paying
# the imports (about 10 s) each.
import ist_ds.backends.fsdp  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
from distributed import run_ranks
from helpers import MICRO, check_step, global_batch, make_data, make_model, same_states, same_tensors

NUM_LAYERS = 8  # make_model's default
TRAIN_LAYERS = 2


def ist_block(mode="keep", target="host", offload_dir=None, **extra):
    block = {"train_layers": TRAIN_LAYERS, "update_interval": 3, "optimizer_state": mode, "seed": 7,
             "scoring_batch_size": 4, **extra}
    if mode == "offload":
        block["offload_target"] = target
        if target == "disk":
            block["offload_dir"] = offload_dir
    return block


# ---------------------------------------------------------------------- helpers run inside the ranks
def _init():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")


def _setup(block, data, world, model=None, dropout=0.0, **kwargs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.data import default_collate

    from ist_ds.backends.fsdp import setup

    kwargs.setdefault("lr", 1e-2)
    kwargs.setdefault("weight_decay", 0.1)
    kwargs.setdefault("max_grad_norm", 1.0)
    return setup(model if model is not None else make_model(dropout=dropout), block, mesh=init_device_mesh("cpu", (world,)), scoring_data=data,
                 collate_fn=default_collate, **kwargs)


def _full_params(run, reference=False):
    """Every layer's PEFT parameters gathered to full tensors (a collective, same order on all ranks).

    One all-gather of every local shard, cut back into ``Shard(0)`` pieces (each parameter here has a
    first dimension divisible by the world size); ``reference=True`` uses ``full_tensor()`` per
    parameter instead, 80 collectives.
    """
    import torch.distributed as dist

    layers = [[p for _, p in layer.params] for layer in run.layer_map.layers]
    if reference:
        return [[p.full_tensor().detach().clone() for p in ps] for ps in layers]
    world = dist.get_world_size()
    shards = [p.to_local().detach() for ps in layers for p in ps]
    assert all(s.shape[0] * world == p.shape[0] for s, p in zip(shards, (p for ps in layers for p in ps)))
    flat = torch.cat([s.reshape(-1) for s in shards])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    pieces = [g.split([s.numel() for s in shards]) for g in gathered]
    full = [torch.cat([pieces[r][i].view(shards[i].shape) for r in range(world)]) for i in range(len(shards))]
    out, k = [], 0
    for ps in layers:
        out.append(full[k:k + len(ps)])
        k += len(ps)
    return out


def _states(run):
    """Each layer's optimizer state on this rank (local shards), as held by the optimizer now."""
    state = run.optimizer.state
    out = {}
    for layer in run.layer_map.layers:
        out[layer.index] = [{k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in state[p].items()}
                            for _, p in layer.params if p in state and state[p]]
    return out




def _batch(data, step, rank, world):
    from torch.utils.data import default_collate

    rows = global_batch(data, step, world)[rank * MICRO:(rank + 1) * MICRO]
    return default_collate(rows)


def _train(run, data, rank, world, steps, start=0, check=True, mode="keep"):
    """Train ``steps`` optimizer steps, asserting the IST invariants after each one."""
    import torch.distributed as dist

    ist = run.ist
    history = []
    for step in range(start, start + steps):
        selected = ist.selected_layers
        if check:
            before_p, before_s = _full_params(run), _states(run)
        loss = run.model(**_batch(data, step, rank, world)).loss
        loss.backward()
        if check:  # frozen layers get no gradient at all; selected ones get fp32 sharded gradients
            for layer in run.layer_map.layers:
                for _, p in layer.params:
                    if layer.index in selected:
                        assert p.grad is not None and p.grad.dtype == torch.float32, f"step {step}: layer {layer.index}"
                    else:
                        assert p.grad is None, f"step {step}: unselected layer {layer.index} has a gradient"
        run.step()
        assert ist.step == step + 1
        if check:
            after_p, after_s = _full_params(run), _states(run)
            check_step(step, mode, NUM_LAYERS, selected, ist.selected_layers, before_p, after_p, before_s, after_s)
        gathered = [None] * world
        dist.all_gather_object(gathered, (selected, ist.scores.tolist()))
        assert all(g == gathered[0] for g in gathered), f"ranks disagree at step {step}: {gathered}"
        history.append((selected, ist.scores.clone(), float(loss.detach())))
    return history


def _local_state_bytes(run, per_layer=False):
    """Bytes of uniform-PEFT AdamW state on this rank: exp_avg + exp_avg_sq shards and the step scalars."""
    sizes = []
    for layer in run.layer_map.layers:
        sizes.append(sum(2 * p.to_local().numel() * 4 + 4 for _, p in layer.params))
    return sizes if per_layer else sum(sizes)


# ---------------------------------------------------------------------- 1: freezing and state modes
def _modes(rank, world, tmp):
    _init()
    data = make_data()
    out = {}
    for mode, target in (("keep", "host"), ("offload", "host"), ("offload", "disk"), ("drop", "host")):
        run = _setup(ist_block(mode, target, f"{tmp}/offload"), data, world)
        from ist_ds.observe.monitor import PeakStateProbe

        probe = PeakStateProbe(run.optimizer)  # state bytes right after each (gated) optimizer step
        if mode == "keep":  # the one-collective gather equals DTensor.full_tensor()
            assert all(same_tensors(a, b) for a, b in zip(_full_params(run), _full_params(run, reference=True)))
        history = _train(run, data, rank, world, 7, mode=mode)
        out[f"{mode}-{target}"] = {
            "history": history, "final": _full_params(run), "report": run.memory_report(),
            "counts": run.ist.selection_counts, "uniform_bytes": _local_state_bytes(run),
            "layer_bytes": _local_state_bytes(run, per_layer=True), "selected": run.ist.selected_layers,
            "offload_files": sorted(os.listdir(f"{tmp}/offload")) if target == "disk" else [],
            "peak": probe.peak,
        }
    return out


@pytest.fixture(scope="module")
def mode_runs(tmp_path_factory):
    return run_ranks(_modes, 2, str(tmp_path_factory.mktemp("fsdp_modes")))


def test_freezing_and_optimizer_state_modes(mode_runs):
    r0, r1 = mode_runs
    for key in r0:  # both ranks: same selections and bit-identical scores at every step
        assert [h[0] for h in r0[key]["history"]] == [h[0] for h in r1[key]["history"]]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(r0[key]["history"], r1[key]["history"]))
        assert all(len(h[0]) == TRAIN_LAYERS for h in r0[key]["history"])
        tally = [sum(i in h[0] for h in r0[key]["history"]) for i in range(NUM_LAYERS)]
        assert r0[key]["counts"] == tally  # steps each layer was trained in
    keep = r0["keep-host"]
    for key in ("offload-host", "offload-disk"):
        other = r0[key]
        assert [h[0] for h in other["history"]] == [h[0] for h in keep["history"]]
        for a, b in zip(keep["final"], other["final"]):
            assert same_tensors(a, b), f"{key} differs from keep"
        assert [h[2] for h in other["history"]] == [h[2] for h in keep["history"]]
    # drop restarts Adam for re-selected layers: same selections, different values.
    assert [h[0] for h in r0["drop-host"]["history"]] == [h[0] for h in keep["history"]]
    assert any(not same_tensors(a, b) for a, b in zip(keep["final"], r0["drop-host"]["final"]))
    # scores moved: importance updates ran after steps 3 and 6
    assert not torch.equal(keep["history"][-1][1], torch.zeros(NUM_LAYERS))
    assert not torch.equal(keep["history"][4][1], keep["history"][5][1])


def test_memory_report_by_location(mode_runs):
    for rank_runs in mode_runs:
        keep, host, disk, drop = (rank_runs[k] for k in ("keep-host", "offload-host", "offload-disk", "drop-host"))
        sel_bytes = sum(keep["layer_bytes"][i] for i in keep["selected"])
        trained = {i for h in keep["history"] for i in h[0]}
        keep_bytes = keep["report"]["optimizer_state_bytes"]
        # keep: the state of every layer trained so far stays live
        assert keep_bytes["live_cpu"] == sum(keep["layer_bytes"][i] for i in trained)
        assert keep_bytes["offloaded_host"] == keep_bytes["offloaded_disk"] == 0
        # Live state during the steps (peak probe on the optimizer's step): exactly the selected
        # layers' state for offload and drop, N_u / L of uniform PEFT; keep reaches every layer trained.
        def peak_selected(run):
            return max(sum(run["layer_bytes"][i] for i in h[0]) for h in run["history"])

        assert keep["peak"] == keep_bytes["live_cpu"]
        for run in (host, disk, drop):
            assert run["peak"] == peak_selected(run) == run["uniform_bytes"] * TRAIN_LAYERS // NUM_LAYERS
        # offload: between steps the selected layers' state at most is live, the rest sits in the store
        for run, where in ((host, "offloaded_host"), (disk, "offloaded_disk")):
            b = run["report"]["optimizer_state_bytes"]
            assert b.get("live_cpu", 0) <= sel_bytes
            assert b.get("live_cpu", 0) + b[where] == keep_bytes["live_cpu"]
        assert len(disk["offload_files"]) > 0
        # drop: nothing offloaded
        b = drop["report"]["optimizer_state_bytes"]
        assert b["offloaded_host"] == b["offloaded_disk"] == 0
        # parameter bytes: this rank's half of the selected layers' LoRA weights
        rep = keep["report"]
        assert rep["trainable_param_bytes"] * 2 == rep["trainable_param_bytes_unsharded"]


def _single_process_run(data):
    from torch.utils.data import default_collate

    from ist_ds.core import ISTConfig
    from ist_ds.backends.single import SingleProcessTrainer

    trainer = SingleProcessTrainer(make_model(), ISTConfig.from_dict(ist_block()), data, default_collate,
                                   lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    selections = []
    for step in range(7):
        selections.append(trainer.ist.selected_layers)
        trainer.train_step(default_collate(global_batch(data, step, 2)))
    return selections, trainer


def test_two_ranks_match_single_process_trainer(mode_runs):
    data = make_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads are many times slower for this tiny model here
    try:
        selections, trainer = _single_process_run(data)
    finally:
        torch.set_num_threads(threads)
    keep = mode_runs[0]["keep-host"]
    assert selections == [h[0] for h in keep["history"]]
    torch.testing.assert_close(trainer.ist.scores, keep["history"][-1][1], rtol=0, atol=1e-5)
    # Stated tolerance: Adam normalises each gradient element, so float-level differences in the
    # reduction order (the mean of 2 ranks' means vs one batch) can move an element with a near-zero
    # gradient by a fraction of a step. After 7 steps at lr 1e-2 every element agrees within 1e-4.
    single = [[p.detach() for _, p in layer.params] for layer in trainer.layer_map.layers]
    for a, b in zip(single, keep["final"]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------- 2: DCP checkpoints
SAVE_AT, END = 6, 9


def _snapshot(run):
    return {"final": _full_params(run), "states": _states(run), "scores": run.ist.scores.clone(),
            "selected": run.ist.selected_layers, "counts": run.ist.selection_counts, "step": run.ist.step,
            "report": run.memory_report()}


def _resume(rank, world, tmp):
    from ist_ds.core.errors import ISTCheckpointError

    _init()
    data = make_data()
    out = {}
    for mode, target, weights in (("keep", "host", "full"), ("offload", "disk", "trainable"),
                                  ("drop", "host", "trainable")):
        block = ist_block(mode, target, f"{tmp}/offload")
        ckpt = f"{tmp}/ckpt-{mode}"
        # LoRA dropout (exact only with each rank's saved RNG state); not in "keep", whose checkpoint is
        # also continued on 1 rank below, where the dropout masks are necessarily drawn differently
        dropout = 0.0 if mode == "keep" else 0.1
        run = _setup(block, data, world, dropout=dropout)
        if mode == "keep":  # saving before the first step leaves the (empty) optimizer state alone
            run.save_checkpoint(f"{tmp}/ckpt-step0")
            assert not run.optimizer.state
        _train(run, data, rank, world, SAVE_AT, check=False)
        run.save_checkpoint(ckpt, model_weights=weights)
        at_save = _snapshot(run)
        straight = _train(run, data, rank, world, END - SAVE_AT, start=SAVE_AT, check=False)
        a = _snapshot(run)
        del run
        fresh = _setup(block, data, world, dropout=dropout)
        fresh.load_checkpoint(ckpt)
        loaded = _snapshot(fresh)
        resumed = _train(fresh, data, rank, world, END - SAVE_AT, start=SAVE_AT, check=True, mode=mode)
        out[mode] = {"at_save": at_save, "loaded": loaded, "straight": straight, "resumed": resumed,
                     "a": a, "b": _snapshot(fresh)}
    # a checkpoint whose IST state holds a pickled object is refused, on every rank, before any collective
    import torch.distributed as dist

    import shutil

    from ist_ds.runtime.checkpoint import write_manifest

    bad, damaged = f"{tmp}/ckpt-bad", f"{tmp}/ckpt-damaged"
    if rank == 0:
        shutil.copytree(f"{tmp}/ckpt-keep", bad)
        with open(f"{bad}/ist_state.pt", "wb") as f:
            torch.save({"format": 1, "ist": ISTCheckpointError("x")}, f)
        write_manifest(bad)  # checksums that match: the safe loader is what refuses it
        shutil.copytree(f"{tmp}/ckpt-keep", damaged)
    dist.barrier()
    if rank == 1:  # a byte of rank 1's own DCP shard: every rank must stop with the same error
        with open(f"{damaged}/__1_0.distcp", "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    run = _setup(ist_block(), data, world)
    for key, path in (("unsafe", bad), ("damaged", damaged)):
        try:
            run.load_checkpoint(path)
            out[key] = "loaded"
        except ISTCheckpointError as exc:
            out[key] = str(exc)
    out["files"] = sorted(os.listdir(f"{tmp}/ckpt-keep"))
    return out


def _resume_one_rank(rank, world, tmp):
    """Load the 2-rank checkpoint on 1 rank and continue on the same global batches."""
    from torch.utils.data import default_collate

    _init()
    data = make_data()
    run = _setup(ist_block("keep"), data, world)
    run.load_checkpoint(f"{tmp}/ckpt-keep")
    loaded_step = run.ist.step
    selections = []
    for step in range(SAVE_AT, END):
        selections.append(run.ist.selected_layers)
        run.model(**default_collate(global_batch(data, step, 2))).loss.backward()
        run.step()
    return {"step": loaded_step, "selections": selections, "final": _full_params(run), "scores": run.ist.scores}


def test_dcp_checkpoint_resumes_bit_identically(tmp_path):
    results = run_ranks(_resume, 2, str(tmp_path))
    for res in results:
        for mode in ("keep", "offload", "drop"):
            r = res[mode]
            assert r["loaded"]["step"] == SAVE_AT
            assert r["loaded"]["selected"] == r["at_save"]["selected"]
            assert r["loaded"]["counts"] == r["at_save"]["counts"]
            assert torch.equal(r["loaded"]["scores"], r["at_save"]["scores"])
            for x, y in zip(r["loaded"]["final"], r["at_save"]["final"]):
                assert same_tensors(x, y), f"{mode}: parameters differ right after loading"
            for layer in range(NUM_LAYERS):  # the optimizer holds exactly what it held at the save
                assert same_states(r["loaded"]["states"][layer], r["at_save"]["states"][layer]), f"{mode} layer {layer}"
            assert r["loaded"]["report"]["optimizer_state_bytes"] == r["at_save"]["report"]["optimizer_state_bytes"]
            # continuing from the checkpoint equals continuing without it, bit for bit
            assert [h[0] for h in r["resumed"]] == [h[0] for h in r["straight"]]
            assert [h[2] for h in r["resumed"]] == [h[2] for h in r["straight"]]
            assert torch.equal(r["a"]["scores"], r["b"]["scores"])
            assert r["a"]["counts"] == r["b"]["counts"]
            for x, y in zip(r["a"]["final"], r["b"]["final"]):
                assert same_tensors(x, y), f"{mode}: resumed run differs"
            for layer in range(NUM_LAYERS):
                assert same_states(r["a"]["states"][layer], r["b"]["states"][layer]), f"{mode} layer {layer} state"
        assert "not plain data" in res["unsafe"], res["unsafe"]
        assert "__1_0.distcp is corrupted" in res["damaged"], res["damaged"]
        assert {"manifest.json", "rng_rank0.pt", "rng_rank1.pt", "ist_state.pt"} <= set(res["files"])
    assert results[0]["damaged"] == results[1]["damaged"]
    # DCP reshards on load: the 2-rank checkpoint continues on 1 rank. Same selections; parameters
    # within the tolerance of test_two_ranks_match_single_process_trainer (reduction order differs).
    one = run_ranks(_resume_one_rank, 1, str(tmp_path))[0]
    two = results[0]["keep"]
    assert one["step"] == SAVE_AT
    assert one["selections"] == [h[0] for h in two["straight"]]
    torch.testing.assert_close(one["scores"], two["a"]["scores"], rtol=0, atol=1e-5)
    for a, b in zip(one["final"], two["a"]["final"]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------- 3: bf16 and activation checkpointing
def _padded_data():
    """make_data() with 0-3 padded positions at the end of each row (masked, no labels)."""
    data = make_data()
    for i, row in enumerate(data):
        pad = i % 4
        if pad:
            row["attention_mask"][-pad:] = 0
            row["labels"][-pad:] = -100
    return data


def _bf16_ckpt(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    _init()
    data = _padded_data()
    out = {}
    # activation checkpointing recomputes exactly what the plain forward computed
    for ac in (True, False):
        run = _setup(ist_block(), data, world, activation_checkpointing=ac)
        out[f"ac={ac}"] = {"history": _train(run, data, rank, world, 4, check=ac), "final": _full_params(run)}
    # one activation-checkpoint wrapper per block, also when the model's own (Hugging Face) gradient
    # checkpointing is on, as the job runner sets it; the last block's MLP runs once in the forward and
    # once in the recomputation (torch would not recompute twice for nested wrappers, so the wrappers
    # themselves are counted)
    from torch.distributed._composable.contract import _get_registry

    for hf in (False, True):
        model = make_model()
        if hf:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        run = _setup(ist_block(), data, world, model=model, activation_checkpointing=True)
        calls, mlp = [], run.layer_map.layers[-1].module.mlp
        forward = mlp.forward  # counted in forward itself: module hooks do not fire in a recomputation
        mlp.forward = lambda *a, _f=forward, **k: (calls.append(1), _f(*a, **k))[1]
        run.model(**_batch(data, 0, rank, world)).loss.backward()
        run.step()
        out[f"mlp_runs_hf={hf}"] = len(calls)
        out[f"wrappers_hf={hf}"] = [int(getattr(layer.module, "gradient_checkpointing", False) is True)
                                    + int("checkpoint" in (_get_registry(layer.module) or {}))
                                    for layer in run.layer_map.layers]
    # gradient accumulation: every micro-batch of an optimizer step trains the same layers
    run = _setup(ist_block(), data, world)
    seen = []
    run.model.register_forward_pre_hook(
        lambda *a: seen.append((run.ist.step, tuple(run.ist.selected_layers))) if torch.is_grad_enabled() else None)
    for step in range(3):
        for micro in range(2):
            (run.model(**_batch(data, 2 * step + micro, rank, world)).loss / 2).backward()
        run.step()
    out["accumulation"] = seen
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    run = _setup(ist_block("drop"), data, world, mixed_precision=mp, activation_checkpointing=True)
    out["bf16"] = {"history": _train(run, data, rank, world, 7, mode="drop"),
                   "sharded_dtype": run.layer_map.layers[0].params[0][1].dtype}
    # IST off: plain FSDP2 through the same entry point, every layer trains
    plain = _setup(None, data, world)
    before = _full_params(plain)
    plain.model(**_batch(data, 0, rank, world)).loss.backward()
    plain.step()
    after = _full_params(plain)
    out["plain"] = {"changed": [not same_tensors(a, b) for a, b in zip(before, after)], "ist": plain.ist}
    return out


def test_bf16_mixed_precision_and_activation_checkpointing():
    r0, r1 = run_ranks(_bf16_ckpt, 2)
    with_ac, without = r0["ac=True"], r0["ac=False"]
    assert [h[0] for h in with_ac["history"]] == [h[0] for h in without["history"]]
    for a, b in zip(with_ac["final"], without["final"]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-7)
    bf16 = r0["bf16"]  # invariants were asserted inside the ranks at every step
    assert [h[0] for h in bf16["history"]] == [h[0] for h in r1["bf16"]["history"]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(bf16["history"], r1["bf16"]["history"]))
    assert not torch.equal(bf16["history"][-1][1], torch.zeros(NUM_LAYERS))
    assert bf16["sharded_dtype"] == torch.float32  # fp32 sharded parameters; bf16 only in compute
    assert r0["plain"]["changed"] == [True] * NUM_LAYERS and r0["plain"]["ist"] is None
    assert r0["mlp_runs_hf=False"] == 2 and r0["mlp_runs_hf=True"] == 2
    assert r0["wrappers_hf=False"] == [1] * NUM_LAYERS and r0["wrappers_hf=True"] == [1] * NUM_LAYERS
    seen = r0["accumulation"]
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 2]
    assert all(seen[k][1] == seen[k + 1][1] for k in range(0, 6, 2))


# ---------------------------------------------------------------------- 4: validation before sharding
def test_config_errors_before_sharding():
    from ist_ds.backends.fsdp import setup
    from ist_ds.core.errors import ISTConfigError, ISTModelError
    from ist_ds.jobs.models import build_model

    model = make_model()
    with pytest.raises(ISTConfigError, match="unknown key"):
        setup(model, {"train_layer": 2})
    with pytest.raises(ISTConfigError, match="train_layers=9"):
        setup(model, {"train_layers": 9}, scoring_data=[])
    with pytest.raises(ISTConfigError, match="scoring data"):
        setup(model, {"train_layers": 2})
    with pytest.raises(ISTConfigError, match="offload_dir"):
        setup(model, {"optimizer_state": "offload", "offload_target": "disk"})
    with pytest.raises(ISTModelError, match="no PEFT adapters"):
        setup(build_model("llama", num_hidden_layers=2), {"train_layers": 1})
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())
