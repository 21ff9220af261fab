"""The three ways a job can train: DeepSpeed, FSDP2, or one plain PyTorch process.

Each adapter offers the same small surface to the job loop in :mod:`ist_ds.jobs.runner`: ``model`` (the
module to run forwards on), ``train_step(micro_batches) -> loss``, ``lr()``, ``ist`` (the
controller, or None when IST is off), ``save_checkpoint(dir)``/``load_checkpoint(dir)``,
``adapter_state()`` (the full PEFT weights, on rank 0, for ``save_pretrained``) and ``model_state()``
(every weight of the model, full size, on rank 0: the output of full-layer IST). Both are collectives
on sharded backends, so every rank calls them; ranks other than 0 get ``None``.
"""

from __future__ import annotations

import logging
import os

import torch

from ist_ds.compat import deepspeed as ds_compat
from ist_ds.core.errors import ISTConfigError
from ist_ds.jobs.recipe import Recipe

logger = logging.getLogger(__name__)


def deepspeed_config(recipe: Recipe, world_size: int, total_steps: int, on_cpu: bool) -> dict:
    """The DeepSpeed config of a job: the user's file (if any) completed from the recipe.

    Values the user's file sets win; a scalar it sets differently from the recipe is an error (one
    job, one batch size), except DeepSpeed's ``"auto"``, which is filled in.
    """
    from ist_ds.backends.deepspeed import read_ds_config

    t = recipe.training
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise ISTConfigError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size="
            f"{t.micro_batch_size} x world size {world_size}; choose a global batch that is a multiple of "
            f"{t.micro_batch_size * world_size}")
    grad_acc = t.global_batch_size // (t.micro_batch_size * world_size)
    user = read_ds_config(recipe.backend.deepspeed_config)
    if "ist" in user and user["ist"] != recipe.ist.to_dict() and recipe.ist != type(recipe.ist)():
        raise ISTConfigError("both the recipe and its DeepSpeed config carry an 'ist' block; keep one")
    optimizer_params = {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}
    if on_cpu and not recipe.backend.offload_optimizer:
        optimizer_params["torch_adam"] = True  # FusedAdam needs CUDA
    filled = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_acc,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": recipe.backend.zero_stage},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": max(1, t.warmup_steps),  # DeepSpeed rejects 0
            "warmup_type": "linear", "total_num_steps": max(total_steps, t.warmup_steps + 1)}},
    }
    if recipe.backend.offload_optimizer:
        filled["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if recipe.model.dtype == "bfloat16":
        filled["bf16"] = {"enabled": True}
    if t.tensorboard:  # DeepSpeed's own monitor writes the job's scalars (ist_ds.observe.monitor); rank 0 only
        from ist_ds.observe.monitor import JOB_NAME, tensorboard_dir

        filled["tensorboard"] = {"enabled": True, "output_path": tensorboard_dir(recipe.output_dir),
                                 "job_name": JOB_NAME}
    config = dict(user)
    for key, value in filled.items():
        if key not in config or config[key] == "auto":
            config[key] = value
        elif not isinstance(value, dict) and key != "steps_per_print" and config[key] != value:
            raise ISTConfigError(f"the DeepSpeed config sets {key}={config[key]!r} but the recipe implies "
                                 f"{value!r}; change one of them")
    config.setdefault("ist", recipe.ist.to_dict())
    return config


class DeepSpeedRun:
    def __init__(self, recipe: Recipe, model, train_dataset, collate, world_size: int, total_steps: int,
                 on_cpu: bool) -> None:
        import ist_ds

        self.config = deepspeed_config(recipe, world_size, total_steps, on_cpu)
        self.engine, _, _, _ = ist_ds.initialize(model=model, config=self.config, scoring_data=train_dataset,
                                                 collate_fn=collate)
        self.model = self.engine.module
        self.device = self.engine.device
        self.ist = getattr(self.engine, "ist", None)
        self.ist = self.ist.controller if self.ist is not None else None
        self.stage = self.engine.zero_optimization_stage()

    def train_step(self, micro_batches: list[dict]) -> float:
        total = 0.0
        for mb in micro_batches:
            loss = self.engine(**{k: v.to(self.device) for k, v in mb.items()}).loss
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        return total / len(micro_batches)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.save_checkpoint(directory, tag=tag)

    def load_checkpoint(self, directory: str) -> int:
        """Load the latest checkpoint in ``directory``; returns its step (0 when there is none)."""
        path, _ = self.engine.load_checkpoint(directory)
        return ds_compat.global_steps(self.engine) if path is not None else 0

    def adapter_state(self) -> dict | None:
        """Full PEFT weights on rank 0 (gathered from ZeRO-3 partitions), None elsewhere."""
        import deepspeed
        import torch.distributed as dist
        from peft import get_peft_model_state_dict

        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if self.stage == 3:
            params = [p for _, p in self.model.named_parameters()]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = get_peft_model_state_dict(self.model) if rank0 else None
                return {k: v.detach().clone().cpu() for k, v in state.items()} if rank0 else None
        return get_peft_model_state_dict(self.model) if rank0 else None

    def model_state(self) -> dict | None:
        """Every weight of the model on rank 0 as host tensors (ZeRO-3: gathered one parameter at a time)."""
        import deepspeed
        import torch.distributed as dist

        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if self.stage != 3:
            return _host_state(self.model) if rank0 else None
        out = {}
        for name, p in self.model.named_parameters():  # one gather at a time: never the whole model at once
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank0:
                    out[name] = p.detach().to("cpu", copy=True)
        if not rank0:
            return None
        keys = self.model.state_dict().keys()  # persistent buffers only, as state_dict() has them
        out.update({n: b.detach().to("cpu", copy=True) for n, b in self.model.named_buffers() if n in keys})
        return out


def _host_state(model: torch.nn.Module) -> dict:
    """``model.state_dict()`` as host copies: tied weights become separate tensors, as safetensors needs."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class SingleRun:
    """One plain PyTorch process, with the same learning-rate schedule as the other backends
    (linear warm-up over ``training.warmup_steps``, then linear decay to 0 at the last step)."""

    def __init__(self, recipe: Recipe, model, train_dataset, collate, device, total_steps: int | None = None) -> None:
        from ist_ds.backends.single import SingleProcessTrainer

        t = recipe.training
        self.trainer = SingleProcessTrainer(model, recipe.ist, train_dataset, collate, lr=t.lr,
                                            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                                            device=device)
        self.model = self.trainer.model
        self.device = self.trainer.device
        self.ist = self.trainer.ist
        total = total_steps if total_steps is not None else t.max_steps
        # Set on the param groups directly (as LambdaLR would): the IST gate already wraps the step.
        self._schedule = warmup_decay(max(total, t.warmup_steps + 1), t.warmup_steps)
        self._base_lr = t.lr
        self._steps = 0
        self._apply_lr()

    def _apply_lr(self) -> None:
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = self._base_lr * self._schedule(self._steps)

    def train_step(self, micro_batches: list[dict]) -> float:
        loss = self.trainer.train_step(micro_batches)
        self._steps += 1
        self._apply_lr()
        return loss

    def lr(self) -> float:
        return float(self.trainer.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, directory: str, tag: str) -> None:
        raise ISTConfigError("checkpoints of the single-process backend are not supported; "
                             "use backend.name: deepspeed (also for one process)")

    def load_checkpoint(self, directory: str) -> int:
        raise ISTConfigError("resuming the single-process backend is not supported; use backend.name: deepspeed")

    def adapter_state(self) -> dict:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def model_state(self) -> dict:
        return _host_state(self.model)


def warmup_decay(total_steps: int, warmup_steps: int):
    """Linear warm-up to 1, then linear decay to 0 at ``total_steps`` (DeepSpeed's WarmupDecayLR shape)."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class FSDPRun:
    def __init__(self, recipe: Recipe, model, train_dataset, collate, total_steps: int) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from ist_ds.backends.fsdp import setup

        t = recipe.training
        mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if recipe.model.dtype == "bfloat16" else None)
        schedule = warmup_decay(total_steps, t.warmup_steps)
        self.fsdp = setup(model, recipe.ist, lr=t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                          mixed_precision=mixed, activation_checkpointing=recipe.model.gradient_checkpointing,
                          reshard_after_forward=recipe.backend.reshard_after_forward is not False,
                          scoring_data=train_dataset, collate_fn=collate,
                          lr_scheduler_factory=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.model = self.fsdp.model
        self.device = self.fsdp.device
        self.ist = self.fsdp.controller

    def train_step(self, micro_batches: list[dict]) -> float:
        total = 0.0
        for mb in micro_batches:
            loss = self.model(**self.fsdp.to_device(mb)).loss / len(micro_batches)
            loss.backward()
            total += float(loss.detach())
        self.fsdp.step()
        return total

    def lr(self) -> float:
        return float(self.fsdp.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, directory: str, tag: str) -> None:
        import torch.distributed as dist

        from ist_ds.runtime.checkpoint import publish_latest, remove_stale_tmp

        self.fsdp.save_checkpoint(os.path.join(directory, tag))  # its manifest is written before 'latest'
        if not dist.is_initialized() or dist.get_rank() == 0:
            remove_stale_tmp(directory)
            publish_latest(directory, tag)
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, directory: str) -> int:
        from ist_ds.runtime.checkpoint import read_latest

        tag = read_latest(directory)
        if tag is None:
            return 0
        self.fsdp.load_checkpoint(os.path.join(directory, tag))
        return self.ist.step if self.ist is not None else 0

    def adapter_state(self) -> dict | None:
        """Full PEFT weights (a collective), returned on rank 0 with PEFT's adapter key names."""
        import torch.distributed as dist
        from peft import get_peft_model_state_dict

        full = self.fsdp.full_trainable_state_dict()
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return get_peft_model_state_dict(self.model, state_dict=full)

    def model_state(self) -> dict | None:
        """Every weight as a full host tensor on rank 0 (a collective; FSDP2 gathers each DTensor)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
