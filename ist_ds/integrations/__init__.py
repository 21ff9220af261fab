"""Integrations of IST into third-party training loops.

- :mod:`ist_ds.integrations.hf_trainer`: Hugging Face ``transformers.Trainer`` (DeepSpeed ZeRO 0-3,
  FSDP, DDP or one process) through :class:`ISTTrainer` / :class:`ISTTrainerMixin`;
  :func:`~ist_ds.integrations.cpu_deepspeed.init_cpu_deepspeed` for its DeepSpeed jobs on the CPU.

Names are imported lazily so that ``import ist_ds.integrations`` does not import ``transformers``.
"""

from __future__ import annotations

_HF_TRAINER_NAMES = ("ISTTrainer", "ISTTrainerMixin", "IST_STATE_NAME", "init_cpu_deepspeed", "read_ist_config")

__all__ = list(_HF_TRAINER_NAMES)


def __getattr__(name: str):
    if name == "init_cpu_deepspeed":  # needs neither transformers nor the Trainer
        from ist_ds.integrations.cpu_deepspeed import init_cpu_deepspeed

        return init_cpu_deepspeed
    if name in _HF_TRAINER_NAMES:
        from ist_ds.integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
