"""The pure IST algorithm: config validation, samplers and the reference update rule."""

import math

import pytest
import torch

from ist_ds.core import ISTConfig, ImportanceState, sample_uniform_layers
from ist_ds.core.errors import ISTCheckpointError, ISTConfigError


def reference_update(scores, sets, losses, eta):
    """The update exactly as the authors' ist.py writes it, element by element."""
    rewards = [math.exp(-l) for l in losses]
    mean = sum(rewards) / len(rewards)
    rewards = [r - mean for r in rewards]
    prob = scores.sigmoid()
    for k in range(len(sets)):
        for i in range(scores.numel()):
            if i in sets[k]:
                scores[i] += rewards[k] * prob[i] * (1 - prob[i]) * eta


def test_defaults_follow_reference():
    c = ISTConfig()
    counts = c.resolve(32)
    assert (counts.num_train, counts.num_suppress, counts.num_sets) == (8, 16, 3)
    assert (c.update_interval, c.eta, c.suppression_scale, c.scoring_batch_size, c.initial_score) == (10, 10.0, 0.25, 16, 0.0)


def test_replays_reference_rule_for_several_updates():
    cfg = ISTConfig(eta=10.0, initial_score=0.3)
    state = ImportanceState(8, cfg)
    ref = torch.full((8,), 0.3)
    g = torch.Generator().manual_seed(1234)
    fixed_losses = [[2.1, 1.7, 2.5], [1.2, 1.9, 1.1], [0.4, 3.0, 0.9], [2.2, 2.2, 2.3]]
    for losses in fixed_losses:
        sets = state.sample_suppression_sets(g)
        assert len(sets) == 3 and all(len(s) == 4 for s in sets)
        reference_update(ref, sets, losses, 10.0)
        state.update(sets, losses)
        torch.testing.assert_close(state.scores, ref, rtol=0, atol=1e-6)
    assert state.num_updates == 4
    assert not torch.equal(state.scores, torch.full((8,), 0.3))


def test_update_moves_layers_whose_suppression_helped_toward_unimportant():
    state = ImportanceState(4, ISTConfig(suppress_layers=2, num_suppression_sets=2))
    state.update([[0, 1], [2, 3]], [0.5, 2.0])  # suppressing 0,1 gave the lower loss
    assert state.scores[0] > 0 and state.scores[1] > 0
    assert state.scores[2] < 0 and state.scores[3] < 0
    state2 = ImportanceState(4, ISTConfig(suppress_layers=2, num_suppression_sets=2))
    state2.update([[0, 1], [1, 2]], [1.0, 1.0])  # equal losses: zero advantage, nothing moves
    assert torch.equal(state2.scores, torch.zeros(4))


def test_train_sampler_draws_without_replacement_with_sigmoid_weights():
    state = ImportanceState(4, ISTConfig(train_layers=1))
    state.scores = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        (i,) = state.sample_train_layers(g)
        counts[i] += 1
    expected = (-state.scores).sigmoid() / (-state.scores).sigmoid().sum()
    torch.testing.assert_close(counts / n, expected, atol=0.012, rtol=0)
    # Two of four, without replacement: P({0,1}) from sequential weighted draws.
    state2 = ImportanceState(4, ISTConfig(train_layers=2))
    state2.scores = state.scores.clone()
    w = (-state2.scores).sigmoid()
    p01 = w[0] / w.sum() * w[1] / (w.sum() - w[0]) + w[1] / w.sum() * w[0] / (w.sum() - w[1])
    hits = 0
    for _ in range(n):
        sel = state2.sample_train_layers(g)
        assert sel == sorted(set(sel)) and len(sel) == 2
        hits += sel == [0, 1]
    assert abs(hits / n - float(p01)) < 0.012


def test_suppression_sets_are_distinct_and_follow_sigmoid_of_scores():
    state = ImportanceState(6, ISTConfig(suppress_layers=3, num_suppression_sets=2))
    state.scores = torch.tensor([3.0, 3.0, 3.0, -3.0, -3.0, -3.0])
    g = torch.Generator().manual_seed(7)
    hits = torch.zeros(6)
    for _ in range(400):
        sets = state.sample_suppression_sets(g)
        assert len({tuple(s) for s in sets}) == 2
        for s in sets:
            assert s == sorted(s) and len(set(s)) == 3
            hits[s] += 1
    assert hits[:3].min() > 3 * hits[3:].max()  # high score = suppressed more often


def test_all_distinct_sets_are_found_when_k_equals_their_number():
    state = ImportanceState(4, ISTConfig(suppress_layers=3, num_suppression_sets=4))
    sets = state.sample_suppression_sets(torch.Generator().manual_seed(0))
    assert sorted(sets) == [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]


def test_uniform_sampler_for_rst():
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(5)
    for _ in range(5000):
        sel = sample_uniform_layers(5, 2, g)
        assert len(set(sel)) == 2
        counts[sel] += 1
    torch.testing.assert_close(counts / 5000, torch.full((5,), 0.4), atol=0.03, rtol=0)


def test_same_seed_same_draws():
    a, b = ImportanceState(10), ImportanceState(10)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(5):
        assert a.sample_train_layers(ga) == b.sample_train_layers(gb)
        assert a.sample_suppression_sets(ga) == b.sample_suppression_sets(gb)


def test_fractions_and_counts():
    assert ISTConfig(train_layers=0.5, suppress_layers=3).resolve(8).num_train == 4
    assert ISTConfig(train_layers=2).resolve(8).num_train == 2
    assert ISTConfig(strategy="all").resolve(8).num_train == 8


@pytest.mark.parametrize("block, needle", [
    ({"unknown_key": 1}, "unknown_key"),
    ({"train_layers": "2"}, "train_layers"),
    ({"train_layers": True}, "train_layers"),
    ({"train_layers": 0}, "train_layers"),
    ({"train_layers": 1.5}, "train_layers"),
    ({"suppress_layers": -0.5}, "suppress_layers"),
    ({"num_suppression_sets": 0}, "num_suppression_sets"),
    ({"update_interval": 2.0}, "update_interval"),
    ({"eta": float("nan")}, "eta"),
    ({"suppression_scale": 1.5}, "suppression_scale"),
    ({"scoring_batch_size": 0}, "scoring_batch_size"),
    ({"strategy": "lisa"}, "strategy"),
    ({"optimizer_state": "evict"}, "optimizer_state"),
    ({"offload_target": "disk"}, "offload_target"),
    ({"optimizer_state": "offload", "offload_target": "disk"}, "offload_dir"),
    ({"offload_dir": "/tmp/x"}, "offload_dir"),
    ({"enabled": "yes"}, "enabled"),
])
def test_bad_blocks_raise_one_clear_error(block, needle):
    with pytest.raises(ISTConfigError, match=needle):
        ISTConfig.from_dict(block)


@pytest.mark.parametrize("block, layers, needle", [
    ({"train_layers": 0.1}, 8, "rounds down to 0"),
    ({"train_layers": 9}, 8, "between 1 and"),
    ({"suppress_layers": 0.05}, 8, "rounds down to 0"),
    ({"suppress_layers": 4, "num_suppression_sets": 3}, 4, "only 1 exist"),
    ({"suppress_layers": 1, "num_suppression_sets": 5}, 4, "only 4 exist"),
])
def test_counts_that_do_not_fit_the_model(block, layers, needle):
    with pytest.raises(ISTConfigError, match=needle):
        ImportanceState(layers, ISTConfig.from_dict(block))


def test_state_dict_round_trip_and_mismatch():
    a = ImportanceState(6)
    a.update(a.sample_suppression_sets(torch.Generator().manual_seed(1)), [1.0, 2.0, 3.0])
    b = ImportanceState(6)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.scores, b.scores) and b.num_updates == 1
    with pytest.raises(ISTCheckpointError, match="6 layers"):
        ImportanceState(8).load_state_dict(a.state_dict())
