"""Under ZeRO-1/2/3 an unselected layer leaves nothing on the device but its bit16 weights.

One 2-rank launch runs, per ZeRO stage, bf16 training with uniform LoRA (no IST), IST keep, offload
and drop, and checks after every optimizer step on both ranks:

- the fp32 masters of unselected layers are parked (0 bytes held by the engine) with offload and
  drop, and in place with keep; a master comes back bit-identical (offload ends bit-identical to keep);
- unselected layers' LoRA weights are bit-identical across the step;
- both ranks end with the same weights (ZeRO-1/2's post-step all-gather skips unselected groups);
- between backward and step, ZeRO holds no gradient memory for an unselected layer (a zero-stride
  zero), and at most 0.30 of uniform's gradient bytes in all (N_u / L = 0.25) on ZeRO-1, 2 and 3.

The DeepSpeed internals this relies on are checked by name, signature and source in
:mod:`ist_ds.compat.deepspeed`; a changed DeepSpeed must be reported, not patched blindly.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_ranks

import test_deepspeed as T
from helpers import same_tensors

STEPS = 3
STAGES = (1, 2, 3)
SUB_GROUP_SIZE = 256  # elements: splits each layer's ZeRO-3 partition into several sub-groups
N_U, L = 2, T.NUM_LAYERS


def _lora(layer_map, stage):
    return T.gather_lora(layer_map, stage)


def _run(rank, world, stage, mode, data):
    import ist_ds
    from ist_ds.backends.zero_memory import zero_gradient_bytes
    from ist_ds.optim.parking import storage_bytes

    cfg = T.ds_config(stage, mode or "keep", bf16=True, scheduler=False)
    if stage == 3:  # several ZeRO-3 sub-groups per layer
        cfg["zero_optimization"]["sub_group_size"] = SUB_GROUP_SIZE
    if mode is None:
        cfg["ist"] = {"enabled": False}
    from ist_ds.model.layers import discover_layers

    model = T.make_model()
    layer_map = discover_layers(model)  # before anything freezes parameters
    engine, *_ = ist_ds.initialize(model=model, config=cfg, scoring_data=data)
    ist = getattr(engine, "ist", None)
    if ist is not None and stage == 3:
        owners = ist.zero_memory.layer_of
        assert len(owners) > len(set(owners)), f"expected several sub-groups per layer, got {owners}"
    grad_bytes, history = [], []
    for step in range(STEPS):
        selected = ist.selected_layers if ist is not None else list(range(L))
        before = _lora(layer_map, stage)
        rows = T.global_batch(data, step, world)[rank * T.MICRO:(rank + 1) * T.MICRO]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        engine.backward(engine(**batch).loss)
        grad_bytes.append(zero_gradient_bytes(engine.optimizer))
        if ist is not None:
            _check_no_gradient_memory_for_unselected(ist.zero_memory, engine.optimizer, stage)
        engine.step()
        after = _lora(layer_map, stage)
        for layer in range(L):
            if layer not in selected:
                assert same_tensors(before[layer], after[layer]), f"stage {stage} {mode}: layer {layer} changed"
        if ist is not None:
            gate = ist.controller.gate
            for layer in gate.all_layers:
                held = [storage_bytes(t) for t in gate.masters(layer)]
                if mode == "keep" or layer in ist.selected_layers:
                    assert all(held), f"stage {stage} {mode}: master of layer {layer} not in place"
                else:
                    assert not any(held), f"stage {stage} {mode}: master of unselected layer {layer} still held"
            history.append(list(ist.selected_layers))
    report = ist.memory_report() if ist is not None else None
    final = _lora(layer_map, stage)
    engine.destroy()
    return {"grad": max(grad_bytes), "final": final, "report": report, "history": history}


def _check_no_gradient_memory_for_unselected(memory, optimizer, stage):
    """Between backward and step, what ZeRO holds as the gradient of an unselected group costs nothing:
    a zero-stride zero (one element)."""
    from ist_ds.compat import deepspeed as ds

    grads = ds.averaged_gradients(optimizer)
    unselected = [i for i in range(len(memory.layer_of)) if not memory.trains_index(i)]
    assert unselected
    for i in unselected:
        for g in grads.get(i) or ():
            st = g.untyped_storage()
            assert st.nbytes() <= g.element_size(), f"group {i}: {st.nbytes()} bytes of gradient partition"
            assert not g.any(), f"group {i}: a non-zero gradient for an unselected layer"


def _all_stages(rank, world):
    data = T.make_data()
    return {(stage, mode): _run(rank, world, stage, mode, data)
            for stage in STAGES for mode in (None, "keep", "offload", "drop")}


def test_masters_and_gradients_of_unselected_layers_leave_the_device():
    results = run_ranks(_all_stages, 2)
    for key in results[0]:  # every rank ends with the same weights: the all-gathers that IST skips moved nothing
        for a, b in zip(results[0][key]["final"], results[1][key]["final"]):
            assert same_tensors(a, b), f"{key}: ranks hold different weights"
    for rank, res in enumerate(results):
        for stage in STAGES:
            uniform, keep, off, drop = (res[(stage, m)] for m in (None, "keep", "offload", "drop"))
            # masters come back bit-identical: offloading masters and moments changes nothing
            for a, b in zip(keep["final"], off["final"]):
                assert same_tensors(a, b), f"rank {rank} stage {stage}: offload differs from keep"
            assert off["history"] == keep["history"] == drop["history"]
            masters = off["report"]["master_bytes"]
            assert masters["engine"] * L == pytest.approx(N_U * (masters["engine"] + masters["host"])), masters
            for run in (keep, off, drop):
                # only the trained layers' gradients are held (N_u / L = 0.25, plus a zero and padding)
                assert run["grad"] <= 0.30 * uniform["grad"], (stage, run["grad"], uniform["grad"])


def test_deepspeed_internals_match_the_checked_version():
    from ist_ds.compat import deepspeed as ds

    assert ds.zero_internal_problems("zero12") == []
    assert ds.zero_internal_problems("zero3") == []


def test_a_changed_deepspeed_internal_is_reported():
    """The check can fail: a ZeRO optimizer whose methods changed shape is named, not patched."""
    from ist_ds.compat import deepspeed as ds

    class Changed(ds.zero12_class()):
        def get_flat_partition(self, tensors):  # a different signature
            return tensors

        def step(self, closure=None):  # no longer copies masters into the bit16 partitions
            return None

    changed = Changed.__new__(Changed)  # no __init__: its attributes are missing too
    problems = ds.zero_internal_problems("zero12", changed)
    assert any("get_flat_partition" in p for p in problems), problems
    assert any("bit16_partitions[partition_id].data.copy_" in p for p in problems), problems
    assert any("single_partition_of_fp32_groups" in p for p in problems), problems
    with pytest.raises(ds.DeepSpeedInternalsChanged, match="optimizer_state to 'keep'"):
        ds.check_zero_internals("zero12", changed)
