"""transformers and accelerate internals ist_ds uses, checked against transformers 5.24.0 and accelerate 1.15.0.

``transformers.Trainer`` (:mod:`ist_ds.integrations.hf_trainer`):

- private methods IST runs around, overridden by :class:`TrainerHooks` (which calls ``super()`` and
  hands over to public-named hooks): ``_save_checkpoint(model, trial)`` (a checkpoint folder is
  written), ``_load_optimizer_and_scheduler(checkpoint)`` (a resume loads the optimizer),
  ``_load_best_model()`` (``load_best_model_at_end``);
- private methods called on the trainer: ``_get_output_dir(trial)``,
  ``_remove_unused_columns(dataset, description)``,
  ``_get_collator_with_removed_columns(data_collator, description)``, ``_prepare_input(data)``;
- attributes set in ``__init__``: ``is_deepspeed_enabled``, ``is_fsdp_enabled``, and
  ``args.hf_deepspeed_config`` (the parsed ``--deepspeed`` config).

accelerate: ``PartialState._shared_state`` (the process state every ``PartialState`` shares) and
``AcceleratorState._reset_state(reset_partial_state)`` (:mod:`ist_ds.integrations.cpu_deepspeed`).

Configs: ``PretrainedConfig._name_or_path``, where a config was loaded from (behind the read-only
use of the public ``name_or_path``) (:mod:`ist_ds.jobs.pretrained`).

transformers' model registries: ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``
(``transformers.models.auto.modeling_auto``) and ``CONFIG_MAPPING_NAMES``
(``transformers.models.auto.configuration_auto``) (:mod:`ist_ds.jobs.models`).

:func:`trainer_internal_problems` checks the Trainer's part on the installed transformers;
``tests/test_compat.py`` exercises every name here on the installed versions.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ist_ds.compat.signatures import method_problems

CHECKED_VERSIONS = {"transformers": "5.24.0", "accelerate": "1.15.0"}

#: Trainer's private methods used here, with the parameters they take (after ``self``).
TRAINER_METHODS = {
    "_save_checkpoint": ("model", "trial"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_best_model": (),
    "_get_output_dir": ("trial",),
    "_remove_unused_columns": ("dataset", "description"),
    "_get_collator_with_removed_columns": ("data_collator", "description"),
    "_prepare_input": ("data",),
}
#: Lines of ``transformers.trainer`` that call the overridden methods: without them an override never runs.
TRAINER_CALLS = ("self._save_checkpoint(model, trial)",
                 "self._load_optimizer_and_scheduler(resume_from_checkpoint)",
                 "self._load_best_model()")


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {"transformers": transformers.__version__, "accelerate": accelerate.__version__}


def trainer_internal_problems(trainer_cls=None) -> list[str]:
    """What differs in ``transformers.Trainer`` (or ``trainer_cls``) from what ist_ds relies on; empty if nothing."""
    import transformers.trainer

    cls = trainer_cls if trainer_cls is not None else transformers.Trainer
    out = method_problems(cls, TRAINER_METHODS)
    try:
        source = inspect.getsource(transformers.trainer)
    except (OSError, TypeError):
        return out + ["cannot read the source of transformers.trainer"]
    out += [f"transformers.trainer no longer calls {line!r}" for line in TRAINER_CALLS if line not in source]
    return out


# ---------------------------------------------------------------------- Trainer: overridden privates
class TrainerHooks:
    """Runs code around three private ``Trainer`` methods, through public-named hooks.

    Put it before ``transformers.Trainer`` in the bases (``ISTTrainerMixin`` derives from it). Each
    private method calls its hook with a zero-argument function that runs Trainer's own method; the
    default hooks just call it. Only this class spells the private names.
    """

    def around_save_checkpoint(self, save: Callable[[], Any], run_dir: str) -> Any:
        """Called for every checkpoint folder Trainer writes (under ``run_dir``); must call ``save()``."""
        return save()

    def around_load_optimizer_and_scheduler(self, load: Callable[[], Any], checkpoint: str | None) -> Any:
        """Called when Trainer loads a checkpoint's optimizer and LR scheduler; must call ``load()``."""
        return load()

    def before_load_best_model(self) -> None:
        """Called when training is over, before Trainer loads the best checkpoint's weights."""

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        return self.around_save_checkpoint(
            lambda: super(TrainerHooks, self)._save_checkpoint(model, trial, *args, **kwargs),
            trainer_output_dir(self, trial))

    def _load_optimizer_and_scheduler(self, checkpoint, *args, **kwargs):
        return self.around_load_optimizer_and_scheduler(
            lambda: super(TrainerHooks, self)._load_optimizer_and_scheduler(checkpoint, *args, **kwargs),
            checkpoint)

    def _load_best_model(self, *args, **kwargs):
        self.before_load_best_model()
        return super()._load_best_model(*args, **kwargs)


# ---------------------------------------------------------------------- Trainer: privates called
def trainer_output_dir(trainer, trial=None) -> str:
    """The folder Trainer writes this run's checkpoints to (``_get_output_dir(trial)``; ``args.output_dir`` without it)."""
    get = getattr(trainer, "_get_output_dir", None)
    return get(trial=trial) if get is not None else trainer.args.output_dir


def remove_unused_columns(trainer, dataset, description: str):
    """A ``datasets.Dataset`` without the columns the model's forward does not take (``_remove_unused_columns``)."""
    return trainer._remove_unused_columns(dataset, description=description)


def collator_removing_unused_columns(trainer, collator: Callable, description: str) -> Callable:
    """``collator`` preceded by Trainer's removal of unused columns (``_get_collator_with_removed_columns``)."""
    return trainer._get_collator_with_removed_columns(collator, description=description)


def prepare_inputs(trainer, data):
    """``data`` moved to the Trainer's device (and DeepSpeed's float dtype) as for training (``_prepare_input``)."""
    return trainer._prepare_input(data)


def trainer_uses_deepspeed(trainer) -> bool:
    """Whether Trainer/accelerate run this trainer under DeepSpeed (``is_deepspeed_enabled``)."""
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def trainer_uses_fsdp(trainer) -> bool:
    """Whether Trainer/accelerate run this trainer under FSDP (``is_fsdp_enabled``)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def trainer_deepspeed_config(trainer) -> dict | None:
    """The DeepSpeed config dict Trainer/accelerate will use, or None without DeepSpeed.

    accelerate's ``state.deepspeed_plugin.deepspeed_config`` when DeepSpeed is enabled, else the
    ``TrainingArguments``' parsed ``--deepspeed`` config (``args.hf_deepspeed_config.config``).
    """
    if trainer_uses_deepspeed(trainer):
        plugin = trainer.accelerator.state.deepspeed_plugin
        config = getattr(plugin, "deepspeed_config", None)
        if isinstance(config, dict):
            return config
    hf_config = getattr(trainer.args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    return None


# ---------------------------------------------------------------------- accelerate
def accelerate_shared_state() -> dict:
    """The process state every accelerate ``PartialState`` shares (``PartialState._shared_state``; empty before one exists)."""
    from accelerate.state import PartialState

    return PartialState._shared_state


def reset_accelerate_state(reset_partial_state: bool) -> None:
    """Forget accelerate's per-``Accelerator`` state (and the process state too with ``reset_partial_state``).

    ``AcceleratorState._reset_state(reset_partial_state=...)``, as ``TrainingArguments`` itself calls it.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=reset_partial_state)


# ---------------------------------------------------------------------- configs and model registries
def drop_config_source(config) -> None:
    """Make ``config`` forget where it was loaded from (delete ``_name_or_path``; ``name_or_path`` is then None).

    A model built from it (``from_config``) and saved elsewhere then does not name the source.
    """
    if hasattr(config, "_name_or_path"):
        delattr(config, "_name_or_path")



def causal_lm_model_types() -> list[str]:
    """Every ``model_type`` ``AutoModelForCausalLM`` can build (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def config_model_types() -> list[str]:
    """Every ``model_type`` ``AutoConfig`` knows (``CONFIG_MAPPING_NAMES``), sorted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)
