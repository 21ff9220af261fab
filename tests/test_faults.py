"""Faults around DeepSpeed runs and checkpoints: ranks that disagree, damaged files, skipped steps,
unsupported setups, another world size; plus the checkpoint manifest on its own.

The 2-rank checks share one forked launch (``_deepspeed_faults``); the world-size check needs a
second, 1-rank launch.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import ist_ds.backends.deepspeed  # noqa: F401  imported once here, inherited by the forked ranks
from distributed import run_ranks
from helpers import make_data, make_model
from ist_ds.runtime.checkpoint import (IST_STATE_FILE, MANIFEST_FILE, atomic_torch_save, read_latest, remove_stale_tmp,
                               verify_checkpoint, write_manifest)
from ist_ds.core.errors import ISTCheckpointError, ISTConfigError

NUM_LAYERS = 4
MICRO = 2


def _flip(path, offset=None, count=4):
    """Invert ``count`` bytes in the middle of a file (same size: only a checksum can tell)."""
    data = bytearray(open(path, "rb").read())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, at + count):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------------- the manifest, one process
def _fake_checkpoint(d):
    os.makedirs(d / "sub", exist_ok=True)
    g = torch.Generator().manual_seed(0)
    atomic_torch_save({"step": 3, "generator": g.get_state(), "scores": torch.zeros(8)}, str(d / IST_STATE_FILE))
    atomic_torch_save({"torch": torch.get_rng_state()}, str(d / "rng_rank0.pt"))
    torch.save({"w": torch.randn(1000)}, d / "mp_rank_00_model_states.pt")
    torch.save({"w": torch.randn(10)}, d / "sub" / "shard.distcp")


def test_manifest_catches_flipped_bytes_and_names_the_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt)
    manifest = write_manifest(str(ckpt))
    assert sorted(manifest["files"]) == [IST_STATE_FILE, "mp_rank_00_model_states.pt", "rng_rank0.pt",
                                         os.path.join("sub", "shard.distcp")]
    assert json.loads((ckpt / MANIFEST_FILE).read_text()) == manifest
    verify_checkpoint(str(ckpt))  # intact

    # Four bytes flipped in the middle of the IST state (they land in the generator state, which
    # torch.load accepts): refused, naming the file, whatever the engine-file switch says.
    original = (ckpt / IST_STATE_FILE).read_bytes()
    _flip(ckpt / IST_STATE_FILE)
    torch.load(ckpt / IST_STATE_FILE, weights_only=True)  # still loads: only the checksum can tell
    for engine in (True, False):
        with pytest.raises(ISTCheckpointError, match=f"{IST_STATE_FILE} is corrupted"):
            verify_checkpoint(str(ckpt), verify_engine_files=engine)
    (ckpt / IST_STATE_FILE).write_bytes(original)

    # An engine file: hashed unless switched off; a size change is caught either way.
    _flip(ckpt / "sub" / "shard.distcp")
    with pytest.raises(ISTCheckpointError, match="shard.distcp is corrupted"):
        verify_checkpoint(str(ckpt))
    verify_checkpoint(str(ckpt), verify_engine_files=False)
    with open(ckpt / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(ISTCheckpointError, match="mp_rank_00_model_states.pt is truncated or corrupted"):
        verify_checkpoint(str(ckpt), verify_engine_files=False)

    # A missing file, a damaged manifest, no manifest.
    (ckpt / "rng_rank0.pt").unlink()
    with pytest.raises(ISTCheckpointError, match="rng_rank0.pt is missing"):
        verify_checkpoint(str(ckpt), verify_engine_files=False)
    (ckpt / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ISTCheckpointError, match="manifest.json is damaged"):
        verify_checkpoint(str(ckpt))
    (ckpt / MANIFEST_FILE).unlink()
    with pytest.raises(ISTCheckpointError, match="has no manifest.json"):
        verify_checkpoint(str(ckpt))


def test_engine_files_unhashed_when_switched_off_at_save(tmp_path):
    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt)
    files = write_manifest(str(ckpt), hash_engine_files=False)["files"]
    assert files[IST_STATE_FILE]["sha256"] and files["rng_rank0.pt"]["sha256"]
    assert files["mp_rank_00_model_states.pt"]["sha256"] is None
    _flip(ckpt / "mp_rank_00_model_states.pt")
    verify_checkpoint(str(ckpt))  # nothing to compare but the size
    _flip(ckpt / IST_STATE_FILE)
    with pytest.raises(ISTCheckpointError, match=IST_STATE_FILE):
        verify_checkpoint(str(ckpt))


def test_latest_needs_a_manifest_and_stale_temporaries_go(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root / "step1")
    (root / "latest").write_text("step1")
    with pytest.raises(ISTCheckpointError, match="no manifest.json"):
        read_latest(str(root))
    write_manifest(str(root / "step1"))
    assert read_latest(str(root)) == "step1"

    stale = [root / "latest.tmp.4242", root / "step1" / f"{IST_STATE_FILE}.tmp.17"]
    kept = [root / "notes.tmp", root / "step1" / "data.tmp.txt"]
    for p in stale + kept:
        p.write_text("x")
    removed = remove_stale_tmp(str(root))
    assert sorted(removed) == sorted(map(str, stale))
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


# ---------------------------------------------------------------------- refused DeepSpeed setups
def _tiny_model():
    return make_model(seed=0, num_layers=NUM_LAYERS)


def _ds_config(grad_acc=1, **ist):
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": grad_acc,
        "gradient_clipping": 1.0, "steps_per_print": 10_000,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "ist": {"train_layers": 1, "suppress_layers": 2, "update_interval": 2, "seed": 3, "scoring_batch_size": 4,
                **ist},
    }


class _PipeMPU:
    def get_pipe_parallel_world_size(self):
        return 2


@pytest.mark.parametrize("change, match", [
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}},
     "offload_optimizer.ratio=0.3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}},
     "offload_optimizer.device: nvme"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}},
     "offload_param.device: nvme"),
    ({"pipeline": {"stages": 2}}, "pipeline parallelism"),
    ("mpu", "pipeline parallelism"),
])
def test_unsupported_deepspeed_setups_are_refused_at_initialize(change, match):
    import ist_ds

    cfg, kwargs = _ds_config(), {}
    if change == "mpu":
        kwargs["mpu"] = _PipeMPU()
    else:
        cfg.update(change)
    # Refused before deepspeed.initialize: no process group is needed (none exists here).
    with pytest.raises(ISTConfigError, match=match):
        ist_ds.initialize(model=_tiny_model(), config=cfg, scoring_data=make_data(), **kwargs)


# ---------------------------------------------------------------------- 2 ranks, one launch
def _batch(data, i, rank):
    rows = data[(i * 2 + rank) * MICRO % len(data):][:MICRO]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _ist_snapshot(ist):
    c = ist.controller
    return {"step": c.step, "selected": list(c.selected), "counts": list(c.selection_counts),
            "scores": c.scores.clone(), "updates": c.importance.state_dict()["num_updates"],
            "generator": c.generator.get_state().clone()}


def _deepspeed_faults(rank, world, tmp):
    import torch.distributed as dist

    import ist_ds
    from ist_ds.core.errors import ISTAgreementError

    out = {}
    data = make_data()
    # 1. Ranks with different configs (same seed, another update_interval): refused at initialize, on
    #    every rank, naming the key, before the first mismatched collective.
    try:
        ist_ds.initialize(model=_tiny_model(), config=_ds_config(update_interval=2 + rank), scoring_data=data)
        out["agreement"] = "initialized"
    except ISTAgreementError as e:
        out["agreement"] = str(e)

    # 2. Gradient accumulation: the selection holds across the micro-batches of a step.
    engine, *_ = ist_ds.initialize(model=_tiny_model(), config=_ds_config(grad_acc=2), scoring_data=data)
    ist = engine.ist
    micro_log = []
    for i in range(6):  # 3 optimizer steps
        micro_log.append((ist.step, tuple(ist.selected_layers)))
        engine.backward(engine(**_batch(data, i, rank)).loss)
        engine.step()
    out["micro_log"] = micro_log

    # 3. A step DeepSpeed skips (inf gradients; fp16 overflow's signal) does not advance IST. At IST
    #    step 3 the next step would be 4 = 2 * update_interval: an importance update would run.
    before = _ist_snapshot(ist)
    skipped_before = engine.skipped_steps
    for i in range(2):
        loss = engine(**_batch(data, 10 + i, rank)).loss
        engine.backward(loss * float("inf"))
        engine.step()
    out["skip"] = {"engine_skipped": engine.skipped_steps - skipped_before, "before": before,
                   "after": _ist_snapshot(ist), "ist_skipped": ist.skipped_steps}
    for i in range(2):  # the next real step advances it
        engine.backward(engine(**_batch(data, 12 + i, rank)).loss)
        engine.step()
    out["after_real_step"] = _ist_snapshot(ist)

    # 4. The save publishes a manifest before 'latest' and removes what an interrupted save left.
    ckpt = f"{tmp}/ckpt"
    if rank == 0:
        os.makedirs(f"{ckpt}/old", exist_ok=True)
        for stale in (f"{ckpt}/latest.tmp.999", f"{ckpt}/old/{IST_STATE_FILE}.tmp.998"):
            open(stale, "w").close()
    dist.barrier()
    engine.save_checkpoint(ckpt, tag="t1")
    out["files"] = sorted(os.listdir(ckpt)), sorted(os.listdir(f"{ckpt}/old"))
    with open(f"{ckpt}/t1/{MANIFEST_FILE}") as f:
        out["manifest"] = sorted(json.load(f)["files"])

    # 5. One rank's damaged file: every rank raises the same clear error, before DeepSpeed loads anything.
    victim = f"{ckpt}/t1/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    original = open(victim, "rb").read()
    dist.barrier()
    if rank == 1:
        _flip(victim)
    dist.barrier()
    scores_before = ist.scores.clone()
    try:
        engine.load_checkpoint(ckpt)
        out["damaged"] = "loaded"
    except ISTCheckpointError as e:
        out["damaged"] = str(e)
    out["untouched"] = torch.equal(scores_before, ist.scores)
    dist.barrier()
    if rank == 1:
        open(victim, "wb").write(original)
    dist.barrier()
    path, _ = engine.load_checkpoint(ckpt)  # intact again: loads
    out["reloaded"] = path is not None and ist.step == out["after_real_step"]["step"]
    engine.destroy()
    return out


def _load_on_one_rank(rank, world, tmp):
    import ist_ds

    engine, *_ = ist_ds.initialize(model=_tiny_model(), config=_ds_config(grad_acc=4), scoring_data=make_data())
    try:
        engine.load_checkpoint(f"{tmp}/ckpt")
        return "loaded"
    except ISTCheckpointError as e:
        return str(e)


def test_deepspeed_faults_two_ranks(tmp_path):
    results = run_ranks(_deepspeed_faults, 2, str(tmp_path))
    for rank, r in enumerate(results):
        # 1. config disagreement: ISTAgreementError on every rank, naming the key and each rank's value
        assert "ist.update_interval: rank 0: 2, rank 1: 3" in r["agreement"], r["agreement"]
        # 2. micro-batches of one optimizer step train the same layers; the step moves at the boundary
        log = r["micro_log"]
        assert [s for s, _ in log] == [0, 0, 1, 1, 2, 2]
        for k in range(0, 6, 2):
            assert log[k][1] == log[k + 1][1]
        # 3. the skipped step: DeepSpeed skipped it, IST did not advance (step, selection, counts,
        #    importance schedule, generator); the next real step advanced it
        skip = r["skip"]
        assert skip["engine_skipped"] == 1 and skip["ist_skipped"] == 1
        b, a = skip["before"], skip["after"]
        assert b["step"] == 3 and a["step"] == 3
        assert a["selected"] == b["selected"] and a["counts"] == b["counts"] and a["updates"] == b["updates"]
        assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["generator"], b["generator"])
        nxt = r["after_real_step"]
        assert nxt["step"] == 4 and nxt["updates"] == b["updates"] + 1
        # 4. manifest of every file; stale temporaries removed
        top, old = r["files"]
        assert not [f for f in top if ".tmp." in f] and old == [], r["files"]
        assert IST_STATE_FILE in r["manifest"] and "rng_rank1.pt" in r["manifest"]
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in r["manifest"]
        # 5. the damaged file of rank 1 named on both ranks; nothing loaded; intact again, it loads
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is corrupted" in r["damaged"], (rank, r["damaged"])
        assert r["untouched"] and r["reloaded"]
    assert results[0]["damaged"] == results[1]["damaged"]

    # 6. another world size: refused, naming DeepSpeed's universal checkpoint conversion
    one = run_ranks(_load_on_one_rank, 1, str(tmp_path))[0]
    assert "written by 2 data-parallel ranks and this run has 1" in one and "ds_to_universal" in one, one
