"""IST inside Hugging Face ``transformers.Trainer``: swap ``Trainer`` for :class:`ISTTrainer`.

A Trainer script keeps its model, data, ``TrainingArguments`` and launcher (``deepspeed``,
``torchrun``, ``accelerate launch``); the ``ist`` settings come from the DeepSpeed config's ``ist``
block (``--deepspeed ds_config.json``) or from ``ISTTrainer(..., ist_config={...})``::

    from ist_ds.integrations import ISTTrainer

    trainer = ISTTrainer(model=peft_model, args=training_args, train_dataset=train, data_collator=collator)
    trainer.train()

Why a ``Trainer`` subclass and not a ``TrainerCallback``: a callback can toggle ``requires_grad``,
which is wrong under DeepSpeed ZeRO (a parameter frozen after ``deepspeed.initialize`` keeps moving
with Adam's momentum; one frozen before is never trained). IST needs three things a callback cannot
reach, so :class:`ISTTrainerMixin` overrides the Trainer methods that own them:

- ``create_optimizer``: the optimizer gets one param group per transformer layer, tagged with the
  layer index (:func:`~ist_ds.model.param_groups.layer_param_groups`), keeping the Trainer's own groups
  (its weight-decay split, its optimizer class and arguments). With an ``optimizer`` section in the
  DeepSpeed config, the parameters Trainer hands to DeepSpeed are regrouped the same way.
- the optimizer that is really stepped exists only once Trainer/accelerate ran
  ``deepspeed.initialize`` (or wrapped the model for FSDP/DDP): at ``on_train_begin`` the
  :class:`~ist_ds.optim.gate.OptimizerGate` wraps ``engine.basic_optimizer`` under DeepSpeed
  (what ZeRO 0-3 call per param group), or the torch optimizer inside accelerate's wrapper
  otherwise, and the :class:`~ist_ds.runtime.controller.ISTController` is built around it.
- checkpoints: ``_save_checkpoint`` writes the IST state to ``ist_state.pt`` in the checkpoint
  folder (and, once Trainer wrote its files, a checksum manifest that ``train`` verifies on every
  rank before resuming; :mod:`ist_ds.runtime.checkpoint`), and puts offloaded optimizer state back (and every IST layer back to trainable) while
  Trainer saves the model and optimizer (``save_model`` too), so nothing of an unselected layer is
  left out; ``train`` remembers ``resume_from_checkpoint`` so that the state is read back when
  training resumes; under FSDP2, ``_load_optimizer_and_scheduler`` lets torch.distributed.checkpoint
  load an optimizer state that has no entries for layers IST never trained; ``_load_best_model``
  first hands every layer back (training is over).

The controller runs after every real optimizer step (``on_step_end``: once per
``gradient_accumulation_steps`` micro-batches, after DeepSpeed's ``engine.step`` or the torch
optimizer's ``step``), so ``trainer.ist.step == trainer.state.global_step``. Per-layer scores and how
often each layer trained are added to the Trainer's training logs (``report_to`` tensorboard, wandb,
...; the integrations write on the main process only).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Mapping

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import is_datasets_available

from ist_ds.runtime.checkpoint import IST_STATE_FILE, MANIFEST_FILE, atomic_torch_save, safe_load, verify_checkpoint, write_manifest
from ist_ds.runtime.collectives import default_collectives
from ist_ds.runtime.controller import ISTController
from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTConfigError
from ist_ds.model.layers import LayerMap, discover_layers, set_trainable
from ist_ds.optim.gate import LAYER_KEY
from ist_ds.model.param_groups import layer_param_groups
from ist_ds.backends import zero3_linear
from ist_ds.backends.deepspeed_support import refuse_unsupported
from ist_ds.backends.zero_memory import install_zero_memory
from ist_ds.runtime.build import build_controller

try:  # layer discovery for the config's target (PEFT blocks, or whole blocks in full mode)
    from ist_ds.model.layers import discover_for as _discover
except ImportError:  # a version without full-layer mode
    def _discover(model: torch.nn.Module, config: ISTConfig) -> LayerMap:
        return discover_layers(model, config.blocks_path)

logger = logging.getLogger(__name__)

#: File name of the IST state inside a Trainer checkpoint folder (``checkpoint-<step>/``).
IST_STATE_NAME = IST_STATE_FILE


# ---------------------------------------------------------------------------------------- config
def read_ist_config(deepspeed_config: Mapping[str, Any] | None = None,
                    ist_config: ISTConfig | Mapping[str, Any] | None = None) -> ISTConfig:
    """The IST settings of a run: the explicit ``ist_config``, else the DeepSpeed config's ``ist`` block.

    Both may be given only when they agree. Neither gives ``ISTConfig(enabled=False)``: the trainer
    then behaves exactly like ``transformers.Trainer``.
    """
    block = deepspeed_config.get("ist") if deepspeed_config is not None else None
    if ist_config is not None:
        config = ISTConfig.from_dict(ist_config)
        if block is not None and ISTConfig.from_dict(block) != config:
            raise ISTConfigError(
                "IST settings were given twice and differ: as ist_config= and as the 'ist' block of the "
                "DeepSpeed config; keep one of them"
            )
        return config
    return ISTConfig.from_dict(block)


def _deepspeed_config_of(trainer) -> dict | None:
    """The DeepSpeed config dict Trainer/accelerate will use, or None without DeepSpeed."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        config = getattr(plugin, "deepspeed_config", None)
        if isinstance(config, dict):
            return config
    hf_config = getattr(trainer.args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    return None


# ---------------------------------------------------------------------------------------- CPU helper
def init_cpu_deepspeed(backend: str = "gloo") -> dict:
    """Let accelerate count the ranks of a DeepSpeed job on DeepSpeed's CPU accelerator.

    accelerate derives the number of processes of a DeepSpeed job from a device backend (NCCL and
    friends); with ``DS_ACCELERATOR=cpu`` it finds none, so every rank believes it is alone (wrong
    ``train_batch_size``, no data sharding). Call this before each ``TrainingArguments`` and pass
    what it returns as ``accelerator_config``: it sets up accelerate's process state over ``backend``
    once (DeepSpeed's ``init_distributed`` runs as usual), and clears the per-Trainer accelerator
    state so that a second Trainer in the same process gets its own DeepSpeed config.

    Returns ``{"use_configured_state": True}``, or ``{}`` (nothing done) in a single process or when
    DeepSpeed's accelerator is not the CPU one.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return {}
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return {}
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    world = int(os.environ["WORLD_SIZE"])
    shared = PartialState._shared_state
    if shared and (shared.get("distributed_type") != DistributedType.DEEPSPEED or shared.get("num_processes") != world):
        AcceleratorState._reset_state(reset_partial_state=True)  # as TrainingArguments itself would
    if not PartialState._shared_state:
        previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend=backend)
        finally:
            if previous is None:
                os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    state = PartialState()
    if state.distributed_type != DistributedType.DEEPSPEED or state.num_processes != world:
        raise RuntimeError(f"accelerate set up {state.distributed_type} with {state.num_processes} processes, "
                           f"expected DeepSpeed with WORLD_SIZE={world}")
    AcceleratorState._reset_state(reset_partial_state=False)
    return {"use_configured_state": True}


# ---------------------------------------------------------------------------------------- callback
class _ISTCallback(TrainerCallback):
    """Drives the controller from the Trainer's loop events (added by :class:`ISTTrainerMixin`)."""

    def __init__(self, trainer: "ISTTrainerMixin") -> None:
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self._trainer._ist_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self._trainer._ist_after_step()

    def on_train_end(self, args, state, control, **kwargs):
        self._trainer._ist_finish()


# ---------------------------------------------------------------------------------------- trainer
class ISTTrainerMixin:
    """Adds IST to a ``transformers.Trainer`` (sub)class: ``class MyTrainer(ISTTrainerMixin, SFTTrainer)``.

    Extra keyword arguments:

    - ``ist_config``: the ``ist`` block (dict or :class:`~ist_ds.core.ISTConfig`); by default the
      ``ist`` block of the DeepSpeed config. Without either, IST is off.
    - ``scoring_dataset``: map-style dataset of the importance update's scoring batches; by default
      ``train_dataset``. Columns the model does not accept are removed as Trainer does
      (``remove_unused_columns``); the collated batches must carry ``labels``.
    - ``scoring_data_collator``: by default the Trainer's ``data_collator``.
    - ``ist_log_layers``: add per-layer scores and training frequencies to the training logs
      (default True).

    After ``train()`` began, ``trainer.ist`` is the :class:`~ist_ds.runtime.controller.ISTController`
    (``selected_layers``, ``scores``, ``step``, ``selection_counts``, ``state_dict()``).
    """

    def __init__(self, *args, ist_config: ISTConfig | Mapping[str, Any] | None = None, scoring_dataset=None,
                 scoring_data_collator: Callable | None = None, ist_log_layers: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ds_config = _deepspeed_config_of(self)
        self.ist_config: ISTConfig = read_ist_config(ds_config, ist_config)
        if self.ist_config.enabled and ds_config is not None:
            refuse_unsupported(ds_config, self.model)  # partial/NVMe offload, pipeline parallelism
        self.ist: ISTController | None = None
        self._ist_scoring_dataset = scoring_dataset
        self._ist_scoring_collator = scoring_data_collator
        self._ist_log_layers = ist_log_layers
        self._ist_active = False
        self._ist_resume_from: str | None = None
        self._ist_view_depth = 0
        self._ist_trained_since_log: list[int] = []
        self._ist_steps_since_log = 0
        self._ist_step_mismatch_warned = False
        self._ist_skipped_steps = 0
        self._ist_layers: LayerMap | None = None
        if not self.ist_config.enabled:
            logger.info("no 'ist' settings (or enabled: false): training as a plain Trainer")
            return
        if self.model is not None:  # fail early on a model IST cannot use
            self.ist_config.resolve(self._ist_layer_map(self.model).num_layers)
        self.add_callback(_ISTCallback(self))

    def _ist_layer_map(self, model: torch.nn.Module) -> LayerMap:
        """The IST layers of ``model``: found once, found again only if the wrapping replaced the
        parameters (FSDP2's ``fully_shard`` does; DeepSpeed and DDP keep them)."""
        cached = self._ist_layers
        if cached is not None:
            live = {id(p) for p in model.parameters()}
            if all(id(p) in live for layer in cached.layers for _, p in layer.params):
                return cached
        self._ist_layers = _discover(model, self.ist_config)
        return self._ist_layers

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """Trainer's optimizer (its class, arguments and weight-decay groups), one param group per layer."""
        optimizer = super().create_optimizer(model)
        if self.ist_config.enabled and optimizer is not None:
            _regroup_by_layer(optimizer, self._ist_layer_map(self.model if model is None else model))
        return optimizer

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        path = resume_from_checkpoint
        if isinstance(path, bool):
            path = get_last_checkpoint(self.args.output_dir) if path else None  # Trainer raises if None
        self._ist_resume_from = os.fspath(path) if path is not None else None
        if self._ist_resume_from is not None and self.ist_config.enabled:
            self._ist_verify(self._ist_resume_from)
        safe = (_safe_deepspeed_loads() if self._ist_resume_from is not None and self.ist_config.enabled
                and getattr(self, "is_deepspeed_enabled", False) else contextlib.nullcontext())
        try:
            with safe:
                return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._ist_resume_from = None
            self._ist_finish()

    def _ist_begin(self) -> None:
        """Build the controller around the optimizer Trainer steps; restore a checkpoint's IST state."""
        if not self.ist_config.enabled:
            return
        self._ist_finish()  # a previous train() (or an auto_find_batch_size retry)
        config = self.ist_config
        model = self.model  # DeepSpeed: engine.module; FSDP: the wrapped model; DDP: the bare model
        layer_map = self._ist_layer_map(model)
        config.resolve(layer_map.num_layers)
        optimizer = self._ist_stepped_optimizer()
        dataset, collate = self._ist_scoring_data() if config.strategy == "ist" else (None, None)
        collectives = default_collectives()
        controller = build_controller(model, config, optimizer, layer_map, dataset, collate, self.args.device,
                                      collectives, forward=self._ist_forward, rank=collectives.rank)
        self.ist = controller
        self._ist_active = True
        if getattr(self, "is_deepspeed_enabled", False) and self.model_wrapped.zero_optimization_stage() == 3:
            zero3_linear.install()  # frozen linears stop saving their inputs for backward
        if getattr(self, "is_deepspeed_enabled", False):
            # ZeRO-1/2/3: no gradient partitions for unselected layers; offload/drop park their masters too
            install_zero_memory(self.model_wrapped, controller, config, collectives.rank)
        if self._ist_resume_from is not None:
            self._ist_load(self._ist_resume_from)
        controller.start()
        self._ist_trained_since_log = [0] * layer_map.num_layers
        self._ist_steps_since_log = 0
        logger.info("IST on Trainer (%s): %d layers, %d trained per step, strategy %s, optimizer state %s",
                    self._ist_backend_name(), layer_map.num_layers, controller.importance.num_train,
                    config.strategy, config.optimizer_state)

    def _ist_after_step(self) -> None:
        """After each real optimizer step: importance update (every T steps), next selection.

        A step the optimizer skipped (fp16 overflow, under DeepSpeed or torch AMP) trained nothing:
        IST does not count it and keeps its selection.
        """
        if not self._ist_active:
            return
        if self._ist_step_skipped():
            self._ist_skipped_steps += 1
            logger.info("optimizer step skipped (gradient overflow); IST keeps step %d", self.ist.step)
            return
        controller = self.ist
        for i in controller.selected:
            self._ist_trained_since_log[i] += 1
        self._ist_steps_since_log += 1
        controller.after_optimizer_step()
        if controller.step + self._ist_skipped_steps != self.state.global_step and not self._ist_step_mismatch_warned:
            self._ist_step_mismatch_warned = True
            logger.warning("IST step %d differs from the Trainer's global step %d (was the IST state restored "
                           "from another run?)", controller.step, self.state.global_step)

    def _ist_step_skipped(self) -> bool:
        try:
            return bool(self.accelerator.optimizer_step_was_skipped)
        except (AttributeError, TypeError):
            return False

    def _ist_finish(self) -> None:
        """Hand the model and optimizer back as given: offloaded state restored, every layer trainable."""
        if not self._ist_active:
            return
        gate = self.ist.gate
        try:
            gate.restore_all()
            set_trainable(self.ist.layer_map, range(self.ist.num_layers))
        finally:
            gate.unwrap()
            self._ist_active = False

    def _ist_backend_name(self) -> str:
        if getattr(self, "is_deepspeed_enabled", False):
            return f"DeepSpeed ZeRO-{self.model_wrapped.zero_optimization_stage()}"
        if getattr(self, "is_fsdp_enabled", False):
            return "FSDP"
        return f"{self.args.parallel_mode.value}, {self.args.world_size} process(es)"

    def _ist_stepped_optimizer(self):
        """The optimizer object whose ``step`` updates the parameters (the one the gate must wrap)."""
        if getattr(self, "is_deepspeed_enabled", False):
            optimizer = getattr(self.model_wrapped, "basic_optimizer", None)
        else:
            optimizer = self.optimizer
            while hasattr(getattr(optimizer, "optimizer", None), "param_groups"):  # accelerate's wrappers
                optimizer = optimizer.optimizer
        if optimizer is None or not any(LAYER_KEY in g for g in optimizer.param_groups):
            raise RuntimeError(
                "the optimizer Trainer steps has no per-layer IST param groups; was it created outside "
                "ISTTrainer.create_optimizer (optimizers=/optimizer_cls_and_kwargs with a prebuilt optimizer "
                "that has already stepped), or did this DeepSpeed version drop extra param-group keys?"
            )
        return optimizer

    # ------------------------------------------------------------------ scoring
    def _ist_scoring_data(self):
        dataset = self._ist_scoring_dataset if self._ist_scoring_dataset is not None else self.train_dataset
        collator = self._ist_scoring_collator if self._ist_scoring_collator is not None else self.data_collator
        if dataset is None:
            raise ISTConfigError("strategy 'ist' needs scoring data: a train_dataset or scoring_dataset=")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ISTConfigError("the importance update needs a map-style dataset (len and indexing); the training "
                                 "data is iterable: pass scoring_dataset= (e.g. a few hundred training examples)")
        if len(dataset) == 0:
            raise ISTConfigError("the IST scoring dataset is empty")
        # What Trainer does to the training data before its collator (remove_unused_columns).
        if is_datasets_available():
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="IST scoring")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="IST scoring")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="IST scoring")
        probe = collator([dataset[0]])
        if "labels" not in probe:
            raise ISTConfigError(
                f"the IST scoring batches have no 'labels' (collated keys: {sorted(probe)}); the importance "
                "update needs the causal-LM labels the training loss uses (use a collator that sets them, e.g. "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False))"
            )
        return dataset, collator

    def _ist_forward(self, model, batch: dict) -> torch.Tensor:
        """One scoring forward, prepared as Trainer prepares training inputs (device, dtype, autocast)."""
        inputs = self._prepare_input({k: v for k, v in batch.items() if k != "labels"})
        with self.compute_loss_context_manager():
            return model(**inputs).logits

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._ist_active and "loss" in logs:
            logs = {**logs, **self._ist_log_values()}
        return super().log(logs, *args, **kwargs)

    def _ist_log_values(self) -> dict[str, float]:
        controller = self.ist
        out: dict[str, float] = {}
        if self._ist_log_layers:
            width = len(str(controller.num_layers - 1))
            steps = max(self._ist_steps_since_log, 1)
            scores = controller.scores.tolist() if self.ist_config.strategy == "ist" else None
            for i in range(controller.num_layers):
                if scores is not None:
                    out[f"ist/score/layer_{i:0{width}d}"] = float(scores[i])
                out[f"ist/trained/layer_{i:0{width}d}"] = self._ist_trained_since_log[i] / steps
        if controller.last_losses:
            out["ist/scoring_loss"] = float(sum(controller.last_losses) / len(controller.last_losses))
            out["ist/update_seconds"] = float(controller.last_update_seconds)
        self._ist_trained_since_log = [0] * controller.num_layers
        self._ist_steps_since_log = 0
        return out

    # ------------------------------------------------------------------ checkpoints
    @contextlib.contextmanager
    def _ist_full_view(self):
        """While Trainer saves: every layer trainable, offloaded optimizer state back in the optimizer.

        Trainer saves PEFT models with ``exclude_frozen_parameters`` under DeepSpeed, and an
        optimizer saves only the state it holds; both would otherwise drop unselected layers.
        """
        if not self._ist_active or self._ist_view_depth:
            yield
            return
        controller = self.ist
        gate = controller.gate
        self._ist_view_depth += 1
        try:
            gate.restore_all()
            set_trainable(controller.layer_map, range(controller.num_layers))
            yield
        finally:
            self._ist_view_depth -= 1
            set_trainable(controller.layer_map, controller.selected)
            gate.select(controller.selected)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        with self._ist_full_view():
            run_dir = (self._get_output_dir(trial=trial) if hasattr(self, "_get_output_dir")
                       else self.args.output_dir)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if self._ist_active and self.args.should_save:
                self._ist_save(folder)
            out = super()._save_checkpoint(model, trial, *args, **kwargs)
            if self._ist_active and os.path.isdir(folder):
                # Every rank has written its files; the checksums of all of them, hashed by all ranks.
                write_manifest(folder, self.ist.comm, self.ist_config.verify_engine_files)
            return out

    def _ist_save(self, folder: str) -> None:
        """Write ``ist_state.pt``: the controller's state, plus which layers the optimizer holds no state for."""
        gate = self.ist.gate
        state = self.ist.state_dict()
        state["trainer"] = {"layers_without_optimizer_state": [
            layer for layer in gate.all_layers
            if not any(t in gate.optimizer.state and gate.optimizer.state[t] for t in gate.masters(layer))]}
        os.makedirs(folder, exist_ok=True)
        atomic_torch_save(state, os.path.join(folder, IST_STATE_NAME))  # never half-written

    def _load_optimizer_and_scheduler(self, checkpoint, *args, **kwargs):
        # torch.distributed.checkpoint (FSDP2) refuses to load an optimizer state dict that lacks the
        # state of a parameter requiring grad; layers IST never trained (or dropped) have none. Such
        # parameters are marked frozen while the optimizer loads, so their state is left empty.
        layers = []
        if checkpoint is not None and self.ist_config.enabled and getattr(self, "is_fsdp_enabled", False):
            path = os.path.join(checkpoint, IST_STATE_NAME)
            if os.path.isfile(path):
                saved = safe_load(path)
                layers = list((saved.get("trainer") or {}).get("layers_without_optimizer_state", []))
        params = self._ist_layer_map(self.model).parameters_of(layers) if layers else []
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            return super()._load_optimizer_and_scheduler(checkpoint, *args, **kwargs)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def save_model(self, *args, **kwargs):
        with self._ist_full_view():
            return super().save_model(*args, **kwargs)

    def _load_best_model(self, *args, **kwargs):
        # Training is over: hand every layer back before Trainer loads the best weights (and, under
        # DeepSpeed, that checkpoint's optimizer state, which must not be mixed with offloaded state).
        self._ist_finish()
        return super()._load_best_model(*args, **kwargs)

    def _ist_verify(self, checkpoint: str) -> None:
        """Check the checkpoint's manifest on every rank together, before Trainer loads anything."""
        if not any(os.path.isfile(os.path.join(checkpoint, n)) for n in (IST_STATE_NAME, MANIFEST_FILE)):
            return  # a checkpoint written without IST: Trainer's own business
        verify_checkpoint(checkpoint, default_collectives(), self.ist_config.verify_engine_files)

    def _ist_load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, IST_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning("checkpoint %s holds no %s; IST starts afresh at step %d", checkpoint, IST_STATE_NAME,
                           self.state.global_step)
            self.ist.step = self.state.global_step
            return
        state = safe_load(path)
        saved = state.get("config") or {}
        changed = sorted(k for k, v in self.ist_config.to_dict().items() if k in saved and saved[k] != v)
        if changed:
            logger.warning("resuming with IST settings that differ from the checkpoint's: %s",
                           ", ".join(f"{k}: {saved[k]!r} -> {getattr(self.ist_config, k)!r}" for k in changed))
        self.ist.load_state_dict(state)
        logger.info("IST state restored from %s (step %d, selected %s)", path, self.ist.step, self.ist.selected)


class ISTTrainer(ISTTrainerMixin, Trainer):
    """``transformers.Trainer`` with IST; see :class:`ISTTrainerMixin` for the extra arguments."""


# ---------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _safe_deepspeed_loads():
    """While Trainer resumes: DeepSpeed reads its checkpoint files as plain data (ist_ds.runtime.checkpoint.safe_load).

    Trainer builds the engine and loads its checkpoint inside ``train``, before any callback runs, so
    the engine's checkpoint engine is patched at the class for that time.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load
    TorchCheckpointEngine.load = lambda self, path, map_location=None: safe_load(path, map_location)
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


def _regroup_by_layer(optimizer, layer_map: LayerMap) -> None:
    """Split an optimizer's param groups by IST layer, in place (groups keep their options)."""
    from accelerate.utils import DummyOptim

    if isinstance(optimizer, DummyOptim):  # DeepSpeed config's optimizer: these become model_parameters
        params = list(optimizer.params)
        if not (params and isinstance(params[0], dict) and all(LAYER_KEY in g for g in params)):
            optimizer.params = layer_param_groups(layer_map, params)
        return
    groups = optimizer.param_groups
    if groups and all(LAYER_KEY in g for g in groups):
        return
    if optimizer.state:
        raise ISTConfigError("the optimizer has already stepped; IST needs to regroup it per layer before "
                             "its first step")
    regrouped = layer_param_groups(layer_map, groups)
    optimizer.param_groups = []
    for group in regrouped:
        optimizer.add_param_group(group)
    logger.info("%s regrouped into %d per-layer param groups", type(optimizer).__name__, len(regrouped))


__all__ = ["ISTTrainer", "ISTTrainerMixin", "IST_STATE_NAME", "init_cpu_deepspeed", "read_ist_config"]
