"""The single-process trainer: the reference semantics every backend is tested against."""

import pytest
import torch
from torch.utils.data import default_collate

from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTConfigError, ISTModelError
from ist_ds.jobs.models import apply_peft, build_model
from ist_ds.backends.single import SingleProcessTrainer

L = 6


def model(seed=0, method="lora"):
    return apply_peft(build_model("llama", seed=seed, num_hidden_layers=L), method, r=4, alpha=8)


def data(n=48, seq=12):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (seq,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def snapshot(trainer):
    lm = trainer.layer_map
    params = [[p.detach().clone() for _, p in layer.params] for layer in lm.layers]
    state = trainer.optimizer.state
    states = [[{k: v.clone() for k, v in state[p].items()} for _, p in layer.params if p in state and state[p]]
              for layer in lm.layers]
    return params, states


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def same_states(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def run(mode, tmp_path=None, steps=9, method="lora", **extra):
    cfg = {"train_layers": 2, "update_interval": 3, "optimizer_state": mode, "scoring_batch_size": 4, **extra}
    if mode == "offload" and extra.get("offload_target") == "disk":
        cfg["offload_dir"] = str(tmp_path)
    ds = data()
    trainer = SingleProcessTrainer(model(method=method), cfg, ds, default_collate, lr=1e-2, weight_decay=0.1,
                                   max_grad_norm=1.0)
    history = []
    for step in range(steps):
        selected = trainer.ist.selected_layers
        before = snapshot(trainer)
        start = (step * 4) % (len(ds) - 4)
        trainer.train_step(default_collate(ds[start:start + 4]))
        after = snapshot(trainer)
        history.append((selected, before, after, trainer.ist.selected_layers))
    return trainer, history


@pytest.mark.parametrize("mode, target", [("keep", "host"), ("offload", "host"), ("offload", "disk"), ("drop", "host")])
def test_unselected_layers_are_untouched(mode, target, tmp_path):
    extra = {"offload_target": target} if mode == "offload" else {}
    trainer, history = run(mode, tmp_path, **extra)
    for step, (selected, (p0, s0), (p1, s1), nxt) in enumerate(history):
        for layer in range(L):
            if layer in selected:
                assert not same(p0[layer], p1[layer]), f"step {step}: selected layer {layer} did not train"
            else:
                assert same(p0[layer], p1[layer]), f"step {step}: unselected layer {layer} changed"
                if mode == "keep":
                    assert same_states(s0[layer], s1[layer])
            if mode != "keep" and layer not in nxt:
                assert s1[layer] == [], f"step {step}: layer {layer} still holds optimizer state"
    assert trainer.ist.importance.num_updates == 3  # steps 3, 6, 9


def test_offload_is_bit_identical_to_keep(tmp_path):
    keep, _ = run("keep")
    for target in ("host", "disk"):
        off, _ = run("offload", tmp_path / target, offload_target=target)
        for a, b in zip(keep.layer_map.layers, off.layer_map.layers):
            assert same([p for _, p in a.params], [p for _, p in b.params])
        assert torch.equal(keep.ist.scores, off.ist.scores)
    assert list((tmp_path / "disk").iterdir()) != []  # the disk store really wrote files


def test_drop_restarts_adam_on_reselection():
    trainer, history = run("drop", steps=12)
    restarted = 0
    for selected, (p0, s0), (p1, s1), _ in history:
        for layer in selected:
            if s0[layer] == []:
                assert all(float(s["step"]) == 1 for s in s1[layer])
                restarted += 1
    assert restarted > 0


def test_rst_and_plain_peft():
    trainer, history = run("keep", strategy="rst")
    assert torch.equal(trainer.ist.scores, torch.zeros(L))  # RST never scores
    assert all(len(h[0]) == 2 for h in history)
    plain = SingleProcessTrainer(model(), {"enabled": False}, data(), default_collate, lr=1e-2)
    assert plain.ist is None
    before = [p.detach().clone() for layer in plain.layer_map.layers for _, p in layer.params]
    plain.train_step(default_collate(data()[:4]))
    after = [p for layer in plain.layer_map.layers for _, p in layer.params]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed == len(after) // 2  # every lora_B moves (lora_A gets no gradient while B is zero)


def test_a_layer_frozen_for_long_trains_again():
    trainer, history = run("keep", steps=16)
    last_trained, gaps = {}, []
    for step, (selected, (p0, _), (p1, _), _) in enumerate(history):
        for layer in selected:
            if layer in last_trained and step - last_trained[layer] >= 4:
                gaps.append(layer)
                assert not same(p0[layer], p1[layer])  # trains normally after a long freeze
            last_trained[layer] = step
    assert gaps, "no layer was re-selected after 4 or more frozen steps"


def test_bad_inputs_fail_before_training():
    with pytest.raises(ISTConfigError, match="rounds down"):
        SingleProcessTrainer(model(), {"train_layers": 0.1}, data(), default_collate)
    with pytest.raises(ISTConfigError, match="unknown key"):
        SingleProcessTrainer(model(), {"train_layer": 2}, data(), default_collate)
    with pytest.raises(ISTModelError, match="no PEFT adapters"):
        SingleProcessTrainer(build_model("llama", num_hidden_layers=L), ISTConfig(), data(), default_collate)
