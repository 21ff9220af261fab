"""The three ways a job can train: DeepSpeed, FSDP2, or one plain PyTorch process.

Each adapter offers the same small surface to the job loop in :mod:`ist_ds.jobs.runner`, written
down as the :class:`JobBackend` protocol. :data:`BACKENDS` maps each ``backend.name`` to its adapter
factory and to the few facts the runner needs before the adapter exists (how ranks join, whether
it runs one process, whether the model is loaded in bf16); it is the one list of backend names,
which the recipe's validation reads too. :func:`build_backend` looks a name up and checks the result.

The protocol lives here, beside the adapters and the registry whose factories must return it; the
runner, its only consumer, imports it from here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch

from ist_ds.compat import deepspeed as ds_compat
from ist_ds.core.errors import ISTConfigError

if TYPE_CHECKING:
    from ist_ds.jobs.recipe import Recipe
    from ist_ds.runtime.controller import ISTController

logger = logging.getLogger(__name__)


@runtime_checkable
class JobBackend(Protocol):
    """What the job loop needs from a backend, whatever engine runs the model underneath."""

    #: The module to run forwards on (held-out loss, multiple-choice accuracy, sample answers), and
    #: whose ``config`` / ``peft_config`` the job writes beside the weights. Not a wrapper: plain
    #: ``model(**batch)`` must work on it.
    model: torch.nn.Module
    #: Where evaluation batches go before a forward on :attr:`model`.
    device: torch.device
    #: The IST controller (selection, scores, counts, state), or None when IST is off: the loop logs
    #: the selection of each step and the summary reports the scores and memory from it.
    ist: ISTController | None

    def train_step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over this rank's micro-batches (gradient accumulation inside); the mean
        loss. The job owns the data order so that a resumed run sees the same batches."""
        ...

    def lr(self) -> float:
        """The learning rate of the next step, for the log lines and TensorBoard (each engine keeps its
        schedule in a different place)."""
        ...

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Write a resumable checkpoint ``tag`` under ``directory`` and publish it as the latest.
        Every rank calls it; the backend's own format (DeepSpeed's, DCP) with IST's state inside."""
        ...

    def load_checkpoint(self, directory: str) -> int:
        """Load the latest checkpoint in ``directory``; the optimizer step it was taken at (0 when
        there is none), from which the job resumes its data stream and loss history."""
        ...

    def adapter_state(self) -> dict | None:
        """The full PEFT weights with PEFT's key names, on rank 0 (None elsewhere), for the job's
        ``adapter/`` output. A collective on sharded backends: every rank calls it."""
        ...

    def model_state(self) -> dict | None:
        """Every weight of the model, full size, as host tensors on rank 0 (None elsewhere): the
        ``model/`` output of full-layer IST. A collective on sharded backends: every rank calls it."""
        ...


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
    """A job on a DeepSpeed engine (ZeRO 0-3) built by :func:`ist_ds.initialize` from the recipe."""

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
    """A job on FSDP2: :func:`ist_ds.backends.fsdp.setup` with the recipe's warm-up/decay schedule."""

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


# ---------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BackendEntry:
    """One ``backend.name``: its adapter factory and what the runner must know before calling it."""

    #: ``factory(recipe, model, train_dataset, collate, world_size=, total_steps=, on_cpu=)``.
    factory: Callable[..., JobBackend]
    #: Which framework joins the ranks (:func:`ist_ds.jobs.dist_env.init_distributed`).
    framework: str
    #: Whether the backend runs exactly one process (a launcher that starts more is an error).
    single_process: bool = False
    #: Whether the model is loaded in fp32 even with ``model.dtype: bfloat16`` (FSDP2 keeps fp32
    #: parameters and computes in bf16 through its MixedPrecisionPolicy).
    keeps_fp32_params: bool = False


def _deepspeed_run(recipe, model, train_dataset, collate, *, world_size, total_steps, on_cpu) -> JobBackend:
    return DeepSpeedRun(recipe, model, train_dataset, collate, world_size, total_steps, on_cpu)


def _fsdp_run(recipe, model, train_dataset, collate, *, world_size, total_steps, on_cpu) -> JobBackend:
    return FSDPRun(recipe, model, train_dataset, collate, total_steps)


def _single_run(recipe, model, train_dataset, collate, *, world_size, total_steps, on_cpu) -> JobBackend:
    return SingleRun(recipe, model, train_dataset, collate, "cpu" if on_cpu else "cuda", total_steps)


#: Every ``backend.name`` a recipe may give, in the order the docs list them.
BACKENDS: dict[str, BackendEntry] = {
    "deepspeed": BackendEntry(_deepspeed_run, framework="deepspeed"),
    "fsdp": BackendEntry(_fsdp_run, framework="torch", keeps_fp32_params=True),
    "single": BackendEntry(_single_run, framework="torch", single_process=True),
}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)


def backend_entry(name: str) -> BackendEntry:
    """The registry entry of ``name``; :class:`ISTConfigError` naming the known backends otherwise."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ISTConfigError(f"backend.name: unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}") from None


def build_backend(recipe: Recipe, model, train_dataset, collate, *, world_size: int, total_steps: int,
                  on_cpu: bool) -> JobBackend:
    """The adapter of ``recipe.backend.name``, checked against :class:`JobBackend`."""
    run = backend_entry(recipe.backend.name).factory(recipe, model, train_dataset, collate, world_size=world_size,
                                                      total_steps=total_steps, on_cpu=on_cpu)
    if not isinstance(run, JobBackend):
        missing = [m for m in _protocol_members(JobBackend) if not hasattr(run, m)]
        raise TypeError(f"the {recipe.backend.name!r} backend's adapter {type(run).__name__} lacks {', '.join(missing)}")
    return run


def _protocol_members(proto) -> list[str]:
    """The attribute and method names a protocol declares (not ``object``'s or ``Protocol``'s own)."""
    names = set(getattr(proto, "__annotations__", {}))
    names |= {n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}
    return sorted(names)
