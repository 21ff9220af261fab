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
- checkpoints (:mod:`ist_ds.integrations.hf_trainer_checkpoints`): each checkpoint folder gets the
  IST state (``ist_state.pt``) and, once Trainer wrote its files, a checksum manifest that ``train``
  verifies on every rank before resuming (:mod:`ist_ds.runtime.checkpoint`); offloaded optimizer
  state is put back (and every IST layer made trainable) while Trainer saves the model and optimizer
  (``save_model`` too), so nothing of an unselected layer is left out; ``train`` remembers
  ``resume_from_checkpoint`` so that the state is read back when training resumes; under FSDP2 the
  optimizer loads without entries for layers IST never trained; ``load_best_model_at_end`` first
  gets every layer back (training is over). Trainer's methods for these are private: they are
  overridden in :mod:`ist_ds.compat.transformers`, which calls public-named hooks.

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
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_datasets_available

from ist_ds.backends import zero3_linear
from ist_ds.backends.deepspeed_support import refuse_unsupported
from ist_ds.backends.zero_memory import install_zero_memory
from ist_ds.compat import deepspeed as ds_compat
from ist_ds.compat import transformers as hf_compat
from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTConfigError
from ist_ds.integrations.cpu_deepspeed import init_cpu_deepspeed
from ist_ds.integrations.hf_trainer_checkpoints import IST_STATE_NAME, ISTCheckpointMixin
from ist_ds.integrations.hf_trainer_setup import read_ist_config, regroup_by_layer
from ist_ds.model.layers import LayerMap, discover_for, set_trainable
from ist_ds.model.param_groups import LAYER_KEY
from ist_ds.runtime.build import build_controller
from ist_ds.runtime.checkpoint import safe_load
from ist_ds.runtime.collectives import default_collectives
from ist_ds.runtime.controller import ISTController

logger = logging.getLogger(__name__)


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
class ISTTrainerMixin(ISTCheckpointMixin):
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
        ds_config = hf_compat.trainer_deepspeed_config(self)
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
        changed = hf_compat.trainer_internal_problems()
        if changed:  # the checkpoint hooks may not run: IST state missing from checkpoints, or not restored
            logger.warning("transformers %s differs from the version ISTTrainer was checked against (%s): %s",
                           hf_compat.versions()["transformers"], hf_compat.CHECKED_VERSIONS["transformers"],
                           "; ".join(changed))
        self.add_callback(_ISTCallback(self))

    def _ist_layer_map(self, model: torch.nn.Module) -> LayerMap:
        """The IST layers of ``model``: found once, found again only if the wrapping replaced the
        parameters (FSDP2's ``fully_shard`` does; DeepSpeed and DDP keep them)."""
        cached = self._ist_layers
        if cached is not None:
            live = {id(p) for p in model.parameters()}
            if all(id(p) in live for layer in cached.layers for _, p in layer.params):
                return cached
        self._ist_layers = discover_for(model, self.ist_config)
        return self._ist_layers

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """Trainer's optimizer (its class, arguments and weight-decay groups), one param group per layer."""
        optimizer = super().create_optimizer(model)
        if self.ist_config.enabled and optimizer is not None:
            regroup_by_layer(optimizer, self._ist_layer_map(self.model if model is None else model))
        return optimizer

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        path = resume_from_checkpoint
        if isinstance(path, bool):
            path = get_last_checkpoint(self.args.output_dir) if path else None  # Trainer raises if None
        self._ist_resume_from = os.fspath(path) if path is not None else None
        if self._ist_resume_from is not None and self.ist_config.enabled:
            self._ist_verify(self._ist_resume_from)
        # Trainer builds the engine and loads its checkpoint inside train, before any callback runs:
        # DeepSpeed reads its files as plain data (safe_load) for that time.
        safe = (ds_compat.checkpoint_files_loaded_with(safe_load) if self._ist_resume_from is not None
                and self.ist_config.enabled and hf_compat.trainer_uses_deepspeed(self) else contextlib.nullcontext())
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
        if hf_compat.trainer_uses_deepspeed(self) and self.model_wrapped.zero_optimization_stage() == 3:
            zero3_linear.install()  # frozen linears stop saving their inputs for backward
        if hf_compat.trainer_uses_deepspeed(self):
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
        if hf_compat.trainer_uses_deepspeed(self):
            return f"DeepSpeed ZeRO-{self.model_wrapped.zero_optimization_stage()}"
        if hf_compat.trainer_uses_fsdp(self):
            return "FSDP"
        return f"{self.args.parallel_mode.value}, {self.args.world_size} process(es)"

    def _ist_stepped_optimizer(self):
        """The optimizer object whose ``step`` updates the parameters (the one the gate must wrap)."""
        if hf_compat.trainer_uses_deepspeed(self):
            optimizer = ds_compat.basic_optimizer(self.model_wrapped)
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
                dataset = hf_compat.remove_unused_columns(self, dataset, "IST scoring")
            else:
                collator = hf_compat.collator_removing_unused_columns(self, collator, "IST scoring")
        else:
            collator = hf_compat.collator_removing_unused_columns(self, collator, "IST scoring")
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
        inputs = hf_compat.prepare_inputs(self, {k: v for k, v in batch.items() if k != "labels"})
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


class ISTTrainer(ISTTrainerMixin, Trainer):
    """``transformers.Trainer`` with IST; see :class:`ISTTrainerMixin` for the extra arguments."""


__all__ = ["ISTTrainer", "ISTTrainerMixin", "IST_STATE_NAME", "init_cpu_deepspeed", "read_ist_config"]
