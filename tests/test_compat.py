"""Every framework internal named in ist_ds/compat/, exercised on the installed frameworks.

Each internal has a test that fails, naming it, when a new DeepSpeed, torch, transformers or
accelerate removes or changes it. They run on live objects, not mocks: a ZeRO-3 engine and an FSDP2
module in one forked single-rank process (gloo), a Trainer in another, the rest in the test process.

``test_no_framework_internal_outside_compat`` keeps it that way: it reads ist_ds/ (without compat/)
and fails, naming file and line, on a private attribute of another library, an import from a private
module path, or a known undocumented framework attribute.
"""

from __future__ import annotations

import ast
import os
import re
import traceback
from pathlib import Path

import pytest
import torch

from distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]


# ====================================================================== the guard
#: Undocumented framework attributes without a leading underscore (DeepSpeed engine and ZeRO-3
#: parameters, DeepSpeed's monitor, Trainer and TrainingArguments attributes set in __init__).
DENIED_NAMES = frozenset({
    "ds_id", "ds_numel", "ds_tensor", "partition_numel", "basic_optimizer", "global_steps", "skipped_steps",
    "dp_world_size", "checkpoint_engine", "tb_monitor", "summary_writer", "linear_bk",
    "is_deepspeed_enabled", "is_fsdp_enabled", "hf_deepspeed_config",
})
#: Framework modules without a documented API (besides any module path with a ``_private`` segment).
DENIED_MODULES = ("deepspeed.runtime", "deepspeed.monitor", "deepspeed.utils.tensor_fragment",
                  "transformers.models.auto")
_PRIVATE_IDENTIFIER = re.compile(r"_[A-Za-z]\w*")
_BY_NAME = ("getattr", "hasattr", "setattr", "delattr")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_denied(module: str) -> bool:
    if module == "ist_ds" or module.startswith("ist_ds."):
        return False
    return (any(_private(part) for part in module.split("."))
            or any(module == m or module.startswith(m + ".") for m in DENIED_MODULES))


def scan_for_framework_internals(package: Path) -> list[str]:
    """``file:line: what`` for every use of a framework internal in ``package``, outside its compat/.

    A ``_name`` attribute (not a dunder) counts as another library's private when no code of the
    package outside compat/ defines that name (function, class, argument, assignment, import), on
    any object, ``self`` included: a Trainer subclass's ``self._prepare_input`` is Trainer's. A string
    naming such an attribute (a ``getattr``-family argument, an element of a literal tuple or list of
    names to patch or loop over) counts too.
    """
    files = sorted(p for p in package.rglob("*.py") if "compat" not in p.relative_to(package).parts)
    trees = {p: ast.parse(p.read_text(), str(p)) for p in files}
    defined: set[str] = set()
    own_attrs: set[str] = set()  # self.X = ... somewhere: X is the package's own attribute
    for tree in trees.values():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(n.name)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                defined.add(n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                defined.add(n.attr)
                if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                    own_attrs.add(n.attr)
            elif isinstance(n, ast.arg):
                defined.add(n.arg)
            elif isinstance(n, ast.alias):
                defined.add((n.asname or n.name).split(".")[0])

    out = []
    for path, tree in trees.items():
        where = path.relative_to(package.parent)
        compat_aliases = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "") == "ist_ds.compat":
                compat_aliases |= {a.asname or a.name for a in n.names}
            elif isinstance(n, ast.Import):
                compat_aliases |= {a.asname for a in n.names if a.asname and a.name.startswith("ist_ds.compat.")}

        def own(base: ast.expr, name: str) -> bool:
            return isinstance(base, ast.Name) and (
                base.id in compat_aliases or base.id in ("self", "cls") and name in own_attrs)

        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute):
                if _private(n.attr) and n.attr not in defined:
                    out.append(f"{where}:{n.lineno}: private attribute .{n.attr} of another library")
                elif n.attr in DENIED_NAMES and not own(n.value, n.attr):
                    out.append(f"{where}:{n.lineno}: undocumented framework attribute .{n.attr}")
            elif isinstance(n, ast.Import):
                out += [f"{where}:{n.lineno}: import {a.name}" for a in n.names if _module_denied(a.name)]
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and _module_denied(n.module or ""):
                out.append(f"{where}:{n.lineno}: from {n.module} import ...")
            by_name = []  # strings naming attributes: getattr(x, "name"), and names listed to patch or loop over
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _BY_NAME
                    and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant)):
                by_name.append((n.args[0], n.args[1].value))
            elif isinstance(n, (ast.Tuple, ast.List, ast.Set)):
                by_name += [(None, e.value) for e in n.elts if isinstance(e, ast.Constant)]
            for base, name in by_name:
                if not isinstance(name, str):
                    continue
                if _PRIVATE_IDENTIFIER.fullmatch(name) and _private(name) and name not in defined:
                    out.append(f"{where}:{n.lineno}: private attribute {name!r} of another library, by name")
                elif name in DENIED_NAMES and not (base is not None and own(base, name)):
                    out.append(f"{where}:{n.lineno}: undocumented framework attribute {name!r}, by name")
    return sorted(set(out))


def test_no_framework_internal_outside_compat():
    found = scan_for_framework_internals(ROOT / "ist_ds")
    assert not found, ("framework internals outside ist_ds/compat/ (add a function there, named for what it "
                       "gets, and a test here):\n" + "\n".join(found))


def test_the_guard_finds_each_kind_of_internal(tmp_path):
    """The guard can fail: each kind of use is reported with its file and line; own names pass."""
    pkg = tmp_path / "ist_ds"
    (pkg / "compat").mkdir(parents=True)
    (pkg / "compat" / "deepspeed.py").write_text("def f(p):\n    return p.ds_id, p._private_thing\n")
    (pkg / "mod.py").write_text(
        "from torch.distributed._composable import checkpoint\n"  # 1
        "from deepspeed.runtime.config import DeepSpeedConfig\n"  # 2
        "from ist_ds.compat import deepspeed as ds\n"  # 3
        "class Mine:\n"  # 4
        "    def __init__(self):\n"  # 5
        "        self._own = 1\n"  # 6
        "        self.skipped_steps = 0\n"  # 7
        "    def run(self, engine, p, trainer):\n"  # 8
        "        n = getattr(p, 'ds_numel', 0)\n"  # 9
        "        state = engine._get_fsdp_state()\n"  # 10
        "        steps = engine.global_steps + self.skipped_steps + ds.global_steps(engine)\n"  # 11
        "        trainer._prepare_input(n)\n"  # 12
        "        self._prepare_input(n)\n"  # 13
        "        setattr(engine, '_build_compact', None)\n"  # 14
        "        for name in ('step', '_optimizer_step'):\n"  # 15
        "            getattr(engine, name)\n"  # 16
        "        return self._own, state, steps, trainer.is_deepspeed_enabled, 'x'.removesuffix('_train')\n"  # 17
    )
    found = scan_for_framework_internals(pkg)
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [1, 2, 9, 10, 11, 12, 13, 14, 15, 17], "\n".join(found)
    assert all(f.startswith("ist_ds/mod.py:") for f in found), found
    assert any("._get_fsdp_state" in f for f in found) and any("'ds_numel'" in f for f in found)


# ====================================================================== live DeepSpeed and FSDP2 (one rank)
def _check(results: dict, name: str, fn, *args) -> None:
    """Run one check; its failure is recorded under its name, the other checks still run."""
    try:
        results[name] = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - reported by the test that reads it
        results[name] = ("failed", traceback.format_exc())


def _fsdp_checks(results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ist_ds.compat import torch as torch_compat

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.forwards = 0

        def forward(self, x):
            self.forwards += 1
            return torch.tanh(self.lin(x))

    model = torch.nn.Sequential(Block(), Block())
    names = [n for n, _ in model.named_parameters()]

    def checkpoint_activations():
        torch_compat.checkpoint_activations(model[0])
        return [n for n, _ in model.named_parameters()] == names

    _check(results, "checkpoint_activations", checkpoint_activations)
    mesh = init_device_mesh("cpu", (1,))
    for module in (model[0], model[1], model):
        fully_shard(module, mesh=mesh)
    state = model._get_fsdp_state()

    def lazy_init():
        before = state._is_root
        ran = torch_compat.fsdp_lazy_init(model)
        return before, ran, state._is_root

    _check(results, "fsdp_lazy_init", lazy_init)

    def recompute():
        model(torch.randn(2, 4)).sum().backward()
        return model[0].forwards, model[1].forwards

    _check(results, "checkpoint_recomputes", recompute)


def _zero3_checks(results: dict, tmp: str) -> None:
    import deepspeed
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from ist_ds.compat import deepspeed as ds
    from ist_ds.compat import monitor as monitor_compat
    from ist_ds.runtime.checkpoint import safe_load

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    full = {n: p.numel() for n, p in model.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10_000,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "tensorboard": {"enabled": True, "output_path": os.path.join(tmp, "tb"), "job_name": "compat"},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    params = dict(engine.module.named_parameters())

    _check(results, "is_zero3_param", lambda: all(ds.is_zero3_param(p) for p in params.values()))
    _check(results, "zero3_numel", lambda: ({n: ds.zero3_numel(p) for n, p in params.items()},
                                            {n: p.numel() for n, p in params.items()}, full))
    _check(results, "zero3_param_id", lambda: sorted(ds.zero3_param_id(p) for p in params.values())
           == sorted(ds.zero3_grad_partition_map(engine.optimizer)))
    _check(results, "zero3_partition_numel", lambda: {n: ds.zero3_partition_numel(p) for n, p in params.items()})
    _check(results, "zero3_internals", lambda: ds.zero_internal_problems("zero3", engine.optimizer))
    _check(results, "basic_optimizer", lambda: (type(ds.basic_optimizer(engine)).__name__,
                                                ds.basic_optimizer(engine) is engine.optimizer.optimizer))
    _check(results, "data_parallel_world_size", lambda: ds.data_parallel_world_size(engine))
    _check(results, "zero3_linear_installed", lambda: torch.nn.functional.linear is ds.zero3_linear_wrap())

    def replace_linear():
        wrap = torch.nn.functional.linear

        def mine(x, w, b=None):
            return wrap(x, w, b)

        try:
            return ds.replace_zero3_linear(mine), torch.nn.functional.linear is mine, ds.replace_zero3_linear(mine)
        finally:
            torch.nn.functional.linear = wrap

    _check(results, "replace_zero3_linear", replace_linear)

    def step_counters():
        before = ds.global_steps(engine)
        engine.backward(engine(torch.randn(1, 8)).sum())
        engine.step()
        return before, ds.global_steps(engine), hasattr(engine, "skipped_steps"), ds.skipped_steps(engine)

    _check(results, "global_and_skipped_steps", step_counters)

    def monitor():
        master = monitor_compat.deepspeed_monitor(engine)
        master.write_events([("compat/x", 1.0, 0)])
        monitor_compat.flush_tensorboard(master)
        where = monitor_compat.tensorboard_event_dir(master)
        events = [f for f in os.listdir(where) if "tfevents" in f] if where and os.path.isdir(where) else []
        return where, events, type(master.tb_monitor.summary_writer).__name__

    _check(results, "deepspeed_monitor", monitor)
    checkpoints = os.path.join(tmp, "ckpt")
    engine.save_checkpoint(checkpoints, tag="t")

    def class_loader():
        read = []
        with ds.checkpoint_files_loaded_with(lambda path, map_location=None: read.append(path) or safe_load(path, map_location)):
            path, _ = engine.load_checkpoint(checkpoints, tag="t")
        return path is not None, len(read), TorchCheckpointEngine.load.__name__

    _check(results, "checkpoint_files_loaded_with", class_loader)

    def engine_loader():
        read = []
        ds.set_checkpoint_loader(engine, lambda path, map_location=None: read.append(path) or safe_load(path, map_location))
        path, _ = engine.load_checkpoint(checkpoints, tag="t")
        return path is not None, len(read)

    _check(results, "set_checkpoint_loader", engine_loader)
    engine.destroy()


def _live_distributed(rank, world, tmp):
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")  # takes over the group
    results: dict = {}
    _fsdp_checks(results)
    _zero3_checks(results, tmp)
    return results


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    (results,) = run_ranks(_live_distributed, 1, str(tmp_path_factory.mktemp("compat")))
    return results


def _ok(live, name):
    status, value = live[name]
    assert status == "ok", f"{name} failed on the installed framework:\n{value}"
    return value


def test_zero3_param_ds_id(live):
    assert _ok(live, "is_zero3_param") is True, "ZeRO-3 parameters no longer carry ds_id"
    assert _ok(live, "zero3_param_id") is True, "ds_id is no longer the key of ZeRO-3's gradient partitions"


def test_zero3_param_ds_numel(live):
    ds_numel, numel, full = _ok(live, "zero3_numel")
    assert ds_numel == full, f"ds_numel {ds_numel} is not the full element count {full}"
    assert all(n == 0 for n in numel.values()), f"partitioned parameters report numel() {numel}"


def test_zero3_param_partition_numel(live):
    assert _ok(live, "zero3_partition_numel") == _ok(live, "zero3_numel")[2], \
        "partition_numel() on one rank is not the whole parameter"


def test_zero3_optimizer_internals_on_a_live_optimizer(live):
    assert _ok(live, "zero3_internals") == []
    from ist_ds.compat import deepspeed as ds

    assert set(ds.ZERO3_SUB_GROUP_STEP_METHODS) <= set(ds.ZERO3_METHODS)  # all checked by name and signature
    assert ds.ZERO12_COMPACT_GRAD_BUILDER in ds.ZERO12_METHODS


def test_engine_basic_optimizer(live):
    assert _ok(live, "basic_optimizer") == ("AdamW", True), "engine.basic_optimizer is not the optimizer ZeRO steps"


def test_engine_dp_world_size(live):
    assert _ok(live, "data_parallel_world_size") == 1, "engine.dp_world_size is not the data-parallel world size"


def test_engine_global_steps(live):
    before, after, _, _ = _ok(live, "global_and_skipped_steps")
    assert (before, after) == (0, 1), "engine.global_steps did not count the optimizer step"


def test_engine_skipped_steps(live):
    _, _, has_skipped, skipped = _ok(live, "global_and_skipped_steps")
    assert has_skipped and skipped == 0, "the engine no longer counts skipped steps (engine.skipped_steps)"


def test_torch_checkpoint_engine_load(live):
    loaded, reads, name = _ok(live, "checkpoint_files_loaded_with")
    assert loaded and reads > 0, "TorchCheckpointEngine.load patched at the class is not what the engine reads with"
    assert name == "load", "TorchCheckpointEngine.load was not restored"


def test_engine_checkpoint_engine_load(live):
    loaded, reads = _ok(live, "set_checkpoint_loader")
    assert loaded and reads > 0, "engine.checkpoint_engine.load is not what the engine reads with"


def test_checkpoint_safe_globals():
    from ist_ds.compat import deepspeed as ds

    names = sorted(type_.__name__ for type_ in ds.checkpoint_safe_globals())
    assert names == ["DynamicLossScaler", "LossScaler", "ZeroStageEnum", "fragment_address"]


def test_deepspeed_config_validation():
    from ist_ds.compat import deepspeed as ds

    ds.validated_config({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
                         "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}})
    with pytest.raises(Exception, match="zero_optimization|bogus|extra"):
        ds.validated_config({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
                             "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2, "bogus": 1}})


def test_zero3_installs_its_linear(live):
    assert _ok(live, "zero3_linear_installed") is True, "ZeRO-3 no longer installs zero3_linear_wrap as F.linear"
    assert _ok(live, "replace_zero3_linear") == (True, True, True)
    from ist_ds.compat import deepspeed as ds

    assert ds.replace_zero3_linear(lambda *a: None) is False  # torch's own linear here: left alone


def test_zero3_linear_function_saves_input_weight_bias():
    from ist_ds.compat import deepspeed as ds

    x, w, b = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True), torch.randn(5)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ds.zero3_linear_function().apply(x, w, b)
    expected = [t.untyped_storage().data_ptr() for t in (x, w, b)]
    assert saved == expected, "LinearFunctionForZeroStage3 no longer saves exactly (input, weight, bias)"


def test_deepspeed_monitor(live):
    where, events, writer = _ok(live, "deepspeed_monitor")
    assert where and where.endswith(os.path.join("tb", "compat")), \
        f"tb_monitor.output_path/job_name is {where!r}, not the configured tensorboard output"
    assert events, f"no TensorBoard events in {where} after flushing tb_monitor.summary_writer"
    assert writer == "SummaryWriter", f"tb_monitor.summary_writer is a {writer}"


def test_fsdp_lazy_init(live):
    assert _ok(live, "fsdp_lazy_init") == (None, True, True), \
        "FSDPModule._get_fsdp_state()._lazy_init() did not run FSDP2's lazy initialisation"


def test_composable_checkpoint(live):
    assert _ok(live, "checkpoint_activations") is True, "composable checkpoint renamed the module's parameters"
    assert _ok(live, "checkpoint_recomputes") == (2, 1), "composable checkpoint did not recompute the block"


# ====================================================================== transformers and accelerate
@pytest.mark.parametrize("name", ["_save_checkpoint", "_load_optimizer_and_scheduler", "_load_best_model",
                                  "_get_output_dir", "_remove_unused_columns",
                                  "_get_collator_with_removed_columns", "_prepare_input"])
def test_trainer_private_method(name):
    """Trainer still has the method, with the parameters compat/transformers.py calls it with."""
    from ist_ds.compat import transformers as hf

    assert name in hf.TRAINER_METHODS
    problems = [p for p in hf.trainer_internal_problems() if f".{name}" in p]
    assert not problems, problems


def test_trainer_still_calls_the_overridden_methods():
    from ist_ds.compat import transformers as hf

    problems = [p for p in hf.trainer_internal_problems() if "no longer calls" in p or "source" in p]
    assert not problems, problems


def test_a_changed_trainer_is_reported():
    from transformers import Trainer

    from ist_ds.compat import transformers as hf

    class Changed(Trainer):
        def _prepare_input(self, tensors, device):  # a different signature
            return tensors

    reported = hf.trainer_internal_problems(Changed)
    assert any("_prepare_input" in p for p in reported), reported


def test_causal_lm_registry():
    from ist_ds.compat import transformers as hf

    assert {"llama", "gpt2", "qwen2", "mistral"} <= set(hf.causal_lm_model_types())


def test_config_registry():
    from ist_ds.compat import transformers as hf

    configs = hf.config_model_types()
    assert set(hf.causal_lm_model_types()) <= set(configs) and "vit" in configs


def test_config_source(tmp_path):
    from transformers import AutoConfig, LlamaConfig

    from ist_ds.compat import transformers as hf

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.name_or_path == str(tmp_path), "a loaded config no longer records its source in name_or_path"
    hf.drop_config_source(config)
    assert config.name_or_path is None, "deleting PretrainedConfig._name_or_path did not clear name_or_path"


def _trainer_checks(rank, world, out_dir):
    from accelerate.state import PartialState
    from transformers import Trainer, TrainingArguments

    import test_deepspeed as T
    from ist_ds.compat import transformers as hf

    results: dict = {}

    def accelerate_state():
        hf.reset_accelerate_state(reset_partial_state=True)
        empty = dict(hf.accelerate_shared_state())
        PartialState(cpu=True)
        shared = hf.accelerate_shared_state()
        keys = {"distributed_type", "num_processes"} <= set(shared)
        hf.reset_accelerate_state(reset_partial_state=False)  # keeps the process state
        kept = bool(hf.accelerate_shared_state())
        return empty, keys, kept

    _check(results, "accelerate_state", accelerate_state)
    calls = []

    class Recording(hf.TrainerHooks, Trainer):
        def around_save_checkpoint(self, save, run_dir):
            calls.append(("save", run_dir))
            return save()

        def around_load_optimizer_and_scheduler(self, load, checkpoint):
            calls.append(("load", checkpoint))
            return load()

        def before_load_best_model(self):
            calls.append(("best", None))

    data = T.make_data(8)
    args = dict(output_dir=out_dir, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2,
                eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                load_best_model_at_end=True, use_cpu=True, disable_tqdm=True, report_to=[], seed=0)
    trainer = Recording(model=T.make_model(), args=TrainingArguments(**args), train_dataset=data, eval_dataset=data[:2])

    def hooks():
        trainer.train()
        resumed = Recording(model=T.make_model(), args=TrainingArguments(**{**args, "max_steps": 3}),
                            train_dataset=data, eval_dataset=data[:2])
        resumed.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-2"))
        return calls

    _check(results, "trainer_hooks", hooks)
    _check(results, "trainer_output_dir", lambda: hf.trainer_output_dir(trainer, None) == out_dir)
    _check(results, "trainer_flags", lambda: (hf.trainer_uses_deepspeed(trainer), hf.trainer_uses_fsdp(trainer),
                                              hf.trainer_deepspeed_config(trainer)))

    def prepare():
        batch = hf.prepare_inputs(trainer, {"input_ids": data[0]["input_ids"], "x": [torch.ones(2)]})
        return sorted(batch), batch["input_ids"].device.type

    _check(results, "prepare_inputs", prepare)

    def collator():
        remove = hf.collator_removing_unused_columns(trainer, lambda rows: rows, "compat")
        return sorted(remove([{**data[0], "not_a_model_input": 1}])[0])

    _check(results, "collator_removing_unused_columns", collator)

    def remove_columns():
        try:
            import datasets
        except ImportError:
            return None
        rows = datasets.Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2], "not_a_model_input": 0}])
        return sorted(hf.remove_unused_columns(trainer, rows, "compat").column_names)

    _check(results, "remove_unused_columns", remove_columns)

    def deepspeed_trainer():
        ds_args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, report_to=[],
                                    deepspeed={"train_micro_batch_size_per_gpu": "auto",
                                               "zero_optimization": {"stage": 2}})
        ds_trainer = Trainer(model=T.make_model(), args=ds_args, train_dataset=data)
        return (hf.trainer_uses_deepspeed(ds_trainer),
                hf.trainer_deepspeed_config(ds_trainer)["zero_optimization"]["stage"])

    _check(results, "trainer_deepspeed_config", deepspeed_trainer)
    return results


@pytest.fixture(scope="module")
def trainer_live(tmp_path_factory):
    from test_hf_trainer import fork_ranks

    (results,) = fork_ranks(_trainer_checks, 1, str(tmp_path_factory.mktemp("trainer")))
    return results


def test_accelerate_shared_state(trainer_live):
    empty, keys, _ = _ok(trainer_live, "accelerate_state")
    assert keys, "PartialState._shared_state no longer holds distributed_type and num_processes"
    assert empty == {}, "PartialState._shared_state is not empty after a full reset"


def test_accelerate_reset_state(trainer_live):
    empty, _, kept = _ok(trainer_live, "accelerate_state")
    assert empty == {}, "AcceleratorState._reset_state(reset_partial_state=True) left PartialState._shared_state"
    assert kept, "AcceleratorState._reset_state(reset_partial_state=False) cleared the process state"


def test_hook_around_save_checkpoint(trainer_live):
    calls = _ok(trainer_live, "trainer_hooks")
    saves = [c for c in calls if c[0] == "save"]
    assert len(saves) >= 2 and all(run_dir and os.path.isdir(run_dir) for _, run_dir in saves), \
        f"Trainer._save_checkpoint was not called per checkpoint through the hook: {calls}"


def test_hook_around_load_optimizer_and_scheduler(trainer_live):
    calls = _ok(trainer_live, "trainer_hooks")
    loads = [c for c in calls if c[0] == "load"]
    assert loads and loads[-1][1].endswith("checkpoint-2"), \
        f"Trainer._load_optimizer_and_scheduler did not run on resume: {calls}"


def test_hook_before_load_best_model(trainer_live):
    calls = _ok(trainer_live, "trainer_hooks")
    assert ("best", None) in calls, f"Trainer._load_best_model did not run (load_best_model_at_end): {calls}"


def test_trainer_output_dir(trainer_live):
    assert _ok(trainer_live, "trainer_output_dir") is True, "Trainer._get_output_dir(None) is not args.output_dir"


def test_trainer_prepare_input(trainer_live):
    assert _ok(trainer_live, "prepare_inputs") == (["input_ids", "x"], "cpu")


def test_trainer_collator_with_removed_columns(trainer_live):
    kept = _ok(trainer_live, "collator_removing_unused_columns")
    assert "not_a_model_input" not in kept and "input_ids" in kept, kept


def test_trainer_backend_flags(trainer_live):
    assert _ok(trainer_live, "trainer_flags") == (False, False, None)
    assert _ok(trainer_live, "trainer_deepspeed_config") == (True, 2), \
        "Trainer.is_deepspeed_enabled / accelerate's deepspeed_plugin config not as expected"


def test_remove_unused_columns(trainer_live):
    kept = _ok(trainer_live, "remove_unused_columns")
    if kept is None:
        pytest.skip("the datasets package is not installed (Trainer._remove_unused_columns' signature is checked above)")
    assert kept == ["input_ids", "labels"], kept
