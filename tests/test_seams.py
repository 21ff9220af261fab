"""The seams between ist_ds's parts are ``typing.Protocol``s, and every implementation satisfies its own.

- ``Scorer`` (ist_ds/runtime/controller.py): what the controller calls for the importance update;
- ``Collectives`` (ist_ds/runtime/collectives.py): what runs over the data-parallel ranks;
- ``JobBackend`` (ist_ds/jobs/adapters.py): what the job runner needs from a backend, and
  ``BACKENDS``, the registry of backend names the recipe's validation reads.

``isinstance`` against a ``runtime_checkable`` protocol only checks that the names exist, so
:func:`_problems` also compares each method's parameters with the protocol's and finds where each data
attribute is set: a renamed parameter or a forgotten attribute fails here, not inside a 2-rank job.
Instances are checked too where they are cheap to build (one process; the collectives on 2 forked
ranks); the runner checks every adapter it builds (:func:`ist_ds.jobs.adapters.build_backend`).
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch
from torch.utils.data import default_collate

from distributed import run_ranks
from helpers import make_data, make_model
from ist_ds.core import ISTConfig, ImportanceState
from ist_ds.core.errors import ISTConfigError
from ist_ds.jobs import adapters
from ist_ds.jobs.adapters import BACKEND_NAMES, BACKENDS, DeepSpeedRun, FSDPRun, JobBackend, SingleRun
from ist_ds.jobs.recipe import CHOICES, Recipe
from ist_ds.model.layers import discover_layers
from ist_ds.runtime.collectives import Collectives, LocalCollectives, TorchCollectives
from ist_ds.runtime.controller import ISTController, Scorer
from ist_ds.runtime.scoring import ImportanceScorer, ScoringStream

EMPTY = inspect.Parameter.empty
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _set_attributes(cls) -> set[str]:
    """Names a class (or a base) defines, and the ``self.<name> = ...`` assignments of its ``__init__``s."""
    names = set()
    for klass in cls.__mro__[:-1]:
        names |= set(vars(klass))
        init = vars(klass).get("__init__")
        if init is None:
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(init)))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            names |= {t.attr for t in targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                      and t.value.id == "self"}
    return names


def _problems(cls, proto) -> list[str]:
    """How ``cls`` falls short of ``proto``: missing methods or attributes, parameters that differ."""
    problems = []
    for attr in vars(proto).get("__annotations__", {}):
        if attr not in _set_attributes(cls):
            problems.append(f"{attr}: never set")
    for name, spec in vars(proto).items():
        if name.startswith("_") or not callable(spec):
            continue
        impl = getattr(cls, name, None)
        if not callable(impl):
            problems.append(f"{name}: missing")
            continue
        want = list(inspect.signature(spec).parameters.values())[1:]
        have = list(inspect.signature(impl).parameters.values())[1:]
        by_name = {p.name: p for p in have}
        for w in want:
            h = by_name.get(w.name)
            if h is None:
                problems.append(f"{name}: no parameter {w.name!r}")
            elif w.default is not EMPTY and h.default is EMPTY:
                problems.append(f"{name}: {w.name!r} must be optional")
        if [p.name for p in have if p.kind in POSITIONAL][:len(want)] != [w.name for w in want if w.kind in POSITIONAL]:
            problems.append(f"{name}: positional parameters {[p.name for p in have]}, the protocol's {[w.name for w in want]}")
        wanted = {w.name for w in want}
        extra = [p.name for p in have if p.name not in wanted and p.default is EMPTY and p.kind not in VARIADIC]
        if extra:
            problems.append(f"{name}: extra required parameter(s) {extra}")
    return problems


@pytest.mark.parametrize("proto, cls", [
    (Collectives, LocalCollectives), (Collectives, TorchCollectives), (Scorer, ImportanceScorer),
    (JobBackend, DeepSpeedRun), (JobBackend, FSDPRun), (JobBackend, SingleRun),
], ids=lambda x: x.__name__)
def test_every_implementation_matches_its_protocol(proto, cls):
    assert _problems(cls, proto) == []


def test_the_signature_check_catches_mismatches():
    class Renamed:
        rank = 0

        def __init__(self):
            self.world_size = 1

        def all_reduce_sum(self, t):  # renamed parameter
            return t

        def check_agreement(self, value, describe):  # default dropped
            return None

        def gather_objects(self, obj, timeout):  # an extra required parameter
            return [obj]

    assert sorted(_problems(Renamed, Collectives)) == sorted([
        "all_reduce_sum: no parameter 'tensor'", "all_reduce_sum: positional parameters ['t'], the protocol's ['tensor']",
        "all_reduce_sum: extra required parameter(s) ['t']", "check_agreement: 'describe' must be optional", "gather_objects: extra required parameter(s) ['timeout']",
        "check_same: missing"])
    assert "model: never set" in _problems(Renamed, JobBackend)


class FixedScorer:
    """A scorer that is not ImportanceScorer: losses from a formula, a counter for its state."""

    def __init__(self):
        self.calls = 0
        self.loaded = None

    @staticmethod
    def formula(suppression_sets):
        return [1.0 + 0.25 * k + 0.01 * sum(s) for k, s in enumerate(suppression_sets)]

    def losses(self, suppression_sets):
        self.calls += 1
        return self.formula(suppression_sets)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.loaded = state


def test_instances_satisfy_their_protocols_and_the_controller_needs_no_more():
    model = make_model(num_layers=4)
    layer_map = discover_layers(model)
    data = make_data(8)
    scorer = ImportanceScorer(model, layer_map, data, default_collate, ScoringStream(len(data), 4), 0.0)
    assert isinstance(scorer, Scorer) and isinstance(LocalCollectives(), Collectives)
    assert not isinstance(object(), Scorer) and not isinstance(object(), Collectives)

    cfg = ISTConfig.from_dict({"train_layers": 2, "update_interval": 2, "seed": 3})
    fixed = FixedScorer()
    assert isinstance(fixed, Scorer)
    controller = ISTController(cfg, layer_map, scorer=fixed)
    controller.start()
    controller.after_optimizer_step()
    controller.after_optimizer_step()  # step 2: the importance update, through FixedScorer
    sets = controller.last_suppression_sets
    assert fixed.calls == 1 and controller.last_losses == FixedScorer.formula(sets)
    expected = ImportanceState(layer_map.num_layers, cfg)
    expected.update(sets, FixedScorer.formula(sets))
    assert torch.equal(controller.scores, expected.scores) and controller.scores.abs().sum() > 0
    state = controller.state_dict()
    assert state["scoring"] == {"calls": 1}  # the scorer's own state travels in the IST state
    again = FixedScorer()
    ISTController(cfg, layer_map, scorer=again).load_state_dict(state)
    assert again.loaded == {"calls": 1}

    recipe = Recipe.from_dict({"backend": {"name": "single"}, "ist": {"strategy": "rst", "train_layers": 2},
                               "training": {"max_steps": 2, "micro_batch_size": 2, "global_batch_size": 2}})
    run = SingleRun(recipe, make_model(num_layers=4), data, default_collate, "cpu", total_steps=2)
    assert isinstance(run, JobBackend)


def _torch_collectives(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    comm = TorchCollectives()
    total = comm.all_reduce_sum(torch.tensor([float(rank + 1)]))
    return isinstance(comm, Collectives), comm.rank, comm.world_size, float(total)


def test_torch_collectives_satisfy_the_protocol_on_two_ranks():
    assert run_ranks(_torch_collectives, 2) == [(True, 0, 2, 3.0), (True, 1, 2, 3.0)]


def test_backend_registry_is_the_one_list_of_names(monkeypatch):
    assert BACKEND_NAMES == tuple(BACKENDS) == ("deepspeed", "fsdp", "single")
    assert CHOICES[("backend", "name")] is BACKEND_NAMES
    with pytest.raises(ISTConfigError, match="deepspeed, fsdp, single"):
        Recipe.from_dict({"backend": {"name": "horovod"}})
    with pytest.raises(ISTConfigError, match=r"unknown backend 'horovod'; known: deepspeed, fsdp, single"):
        adapters.backend_entry("horovod")

    class Incomplete:  # an adapter without model_state and adapter_state
        model, device, ist = torch.nn.Linear(1, 1), torch.device("cpu"), None

        def train_step(self, micro_batches):
            return 0.0

        def lr(self):
            return 0.0

        def save_checkpoint(self, directory, tag):
            pass

        def load_checkpoint(self, directory):
            return 0

    seen = {}

    def factory(recipe, model, train_dataset, collate, **kwargs):
        seen.update(kwargs)
        return Incomplete()

    monkeypatch.setitem(BACKENDS, "single", adapters.BackendEntry(factory, framework="torch", single_process=True))
    with pytest.raises(TypeError, match="'single' backend's adapter Incomplete lacks adapter_state, model_state"):
        adapters.build_backend(Recipe.from_dict({"backend": {"name": "single"}}), None, [], None, world_size=1,
                               total_steps=3, on_cpu=True)
    assert seen == {"world_size": 1, "total_steps": 3, "on_cpu": True}
