"""Every DeepSpeed internal ist_ds uses, checked against DeepSpeed 0.19.8.

DeepSpeed has no public API for what IST needs beyond freezing layers inside the optimizer step, so
this module names every attribute, method and module path used, each in a function named for what it
gets, and :func:`check_zero_internals` verifies the ZeRO optimizer's on the live optimizer before
anything is patched: a DeepSpeed that changed one of them is refused with an error naming it, instead
of silently training wrong. ``tests/test_compat.py`` exercises each of them on a live DeepSpeed.

**ZeRO memory savings** (:mod:`ist_ds.backends.zero_memory`: fp32 masters of unselected layers off
the device, no gradient partitions for them).

ZeRO-1/2 (``DeepSpeedZeroOptimizer``), per param group ``i``:

- ``single_partition_of_fp32_groups[i]``: the fp32 master partition this rank steps (one tensor per
  group, its own storage); ``parallel_partitioned_bit16_groups[i][rank]``: the bit16 partition the
  step copies the master into; ``params_in_partition[i]``; ``cpu_offload``;
- ``averaged_gradients[i]``: the gradient partition held from backward to step, built by
  ``get_all_grad_tensors`` (zeros for parameters without a gradient), ``get_flat_partition`` and, for
  bf16 with fp32 accumulation, ``_build_compact_grad_partition_buffer``;
- ``step``: for every group flattens the gradient into ``master.grad``, steps the inner optimizer
  (``_optimizer_step``) and copies ``master.data`` into the bit16 partition, then all-gathers every
  group's bit16 partitions through the module-level ``all_gather_dp_groups`` of
  ``deepspeed.runtime.zero.stage_1_and_2`` (:func:`filter_zero12_allgather` wraps it).

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``), per sub-group ``s``:

- ``fp32_partitioned_groups_flat[s]`` (the master; it *is* the weight partition when the weights are
  fp32 on the device), ``fp16_partitioned_groups_flat[s]``, ``fp16_groups[s]``,
  ``sub_group_to_group_id[s]``, ``offload_optimizer``, ``grad_partitions_flat_buffer``;
- ``independent_gradient_partition_epilogue`` builds ``averaged_gradients[s]`` (views of the flat
  gradient buffer for parameters that require grad, new zero tensors for the others);
- ``step`` calls, per sub-group, ``_prepare_sub_group``, ``unscale_and_clip_grads``,
  ``_optimizer_step``, ``_reassign_or_swap_out_partitioned_parameters`` and ``_release_sub_group``
  (:data:`ZERO3_SUB_GROUP_STEP_METHODS`).

**ZeRO-3 parameters**: a partitioned parameter carries ``ds_id`` (its id in the optimizer's maps),
``ds_numel`` (its full element count; ``numel()`` is 0 once partitioned) and ``partition_numel()``.

**ZeRO-3 linear** (:mod:`ist_ds.backends.zero3_linear`): with ``memory_efficient_linear`` (the
default) ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide by ``zero3_linear_wrap`` of
``deepspeed.runtime.zero.linear``, which applies ``LinearFunctionForZeroStage3``; its ``setup_context``
saves ``(input, weight, bias)`` and its backward reads the input only for the weight's gradient.

**Engine**: ``engine.basic_optimizer`` (the optimizer ZeRO steps), ``engine.global_steps``,
``engine.skipped_steps``, ``engine.dp_world_size``, ``engine.checkpoint_engine.load``; the class
``TorchCheckpointEngine`` (``deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine``) that reads
checkpoint files; the classes its checkpoint files pickle (``LossScaler``, ``DynamicLossScaler``,
``ZeroStageEnum``, ``fragment_address``); ``deepspeed.runtime.config.DeepSpeedConfig`` (validation).
DeepSpeed's monitor is in :mod:`ist_ds.compat.monitor`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

from ist_ds.compat.signatures import method_problems

CHECKED_VERSION = "0.19.8"

ZERO12_ATTRS = ("single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "params_in_partition",
                "averaged_gradients", "cpu_offload", "partition_size", "real_dp_process_group", "optimizer",
                "bit16_groups_flat", "gradient_accumulation_dtype", "dtype")
ZERO12_METHODS = {
    "step": ("closure",),
    "copy_grads_in_partition": ("param", "group_idx"),
    "_use_compact_grad_partition_buffer": ("group_idx",),
    "get_all_grad_tensors": ("tensor_list", "dtype"),
    "get_flat_partition": ("tensor_list", "first_offset", "partition_size", "dtype", "device",
                           "param_group_idx", "return_tensor_list"),
    "_build_compact_grad_partition_buffer": ("group_idx",),
}
ZERO3_ATTRS = ("fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "fp16_groups",
               "sub_group_to_group_id", "offload_optimizer", "averaged_gradients", "grad_partitions_flat_buffer",
               "optimizer", "gradient_accumulation_dtype", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
ZERO3_METHODS = {
    "independent_gradient_partition_epilogue": (),
    "_prepare_sub_group": ("sub_group_id", "timer_names"),
    "unscale_and_clip_grads": ("sub_group_id", "total_norm"),
    "_optimizer_step": ("sub_group_id",),
    "_reassign_or_swap_out_partitioned_parameters": ("sub_group_id",),
    "_release_sub_group": ("sub_group_id", "timer_names"),
}
# Lines of DeepSpeed's own code whose behaviour the patches depend on (see each patch's docstring).
ZERO12_COPY_SOURCE = ("if self.grads_in_partition is None:",
                      "new_grad_tensor = self.grads_in_partition.view(-1).narrow(0, self.grads_in_partition_offset, param.numel())")
ZERO12_STEP_SOURCE = ("self.single_partition_of_fp32_groups[i].grad = single_grad_partition",
                      "bit16_partitions[partition_id].data.copy_(fp32_partition.data)",
                      "self._optimizer_step(i)",
                      "all_gather_dp_groups(groups_flat=self.bit16_groups_flat,")
ZERO3_EPILOGUE_SOURCE = ("if param.requires_grad else torch.zeros_like(param.ds_tensor)",)
ZERO3_PARTITION_GRADS_SOURCE = ("grad_buffer = self.__param_id_to_grad_partition[param.ds_id].narrow(0, 0, grad_partition.numel())",
                                "if self.micro_step_id == 0:  # don't accumulate")
ZERO3_STEP_SOURCE = ("self._prepare_sub_group(sub_group_id, timer_names)",
                     "self.unscale_and_clip_grads(sub_group_id, scaled_global_grad_norm)",
                     "self._optimizer_step(sub_group_id)",
                     "self._reassign_or_swap_out_partitioned_parameters(sub_group_id)",
                     "self._release_sub_group(sub_group_id, timer_names)")
#: ZeRO-3 methods ``step`` calls once per sub-group, each taking ``sub_group_id`` first.
ZERO3_SUB_GROUP_STEP_METHODS = ("_prepare_sub_group", "unscale_and_clip_grads", "_optimizer_step",
                                "_reassign_or_swap_out_partitioned_parameters", "_release_sub_group")
#: The ZeRO-1/2 method that builds a group's compact fp32 gradient partition (bf16 weights).
ZERO12_COMPACT_GRAD_BUILDER = "_build_compact_grad_partition_buffer"


class DeepSpeedInternalsChanged(RuntimeError):
    """A DeepSpeed internal that IST relies on is missing or changed shape."""


def version() -> str:
    import deepspeed

    return deepspeed.__version__


def zero12_class():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer


def zero3_class():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return DeepSpeedZeroOptimizer_Stage3


def zero_kind(optimizer) -> str | None:
    """``"zero12"``, ``"zero3"`` or None (stage 0, BF16_Optimizer, anything else)."""
    if isinstance(optimizer, zero3_class()):
        return "zero3"
    if isinstance(optimizer, zero12_class()):
        return "zero12"
    return None


def _unwrap(fn):
    """The function under DeepSpeed's decorators (``instrument_w_nvtx`` does not use functools.wraps)."""
    fn = inspect.unwrap(fn)
    while getattr(fn, "__name__", "") == "wrapped_fn" and fn.__closure__:
        inner = [c.cell_contents for c in fn.__closure__ if inspect.isfunction(c.cell_contents)]
        if len(inner) != 1:
            break
        fn = inspect.unwrap(inner[0])
    return fn


def _problems(cls, attrs, methods, sources, obj=None) -> list[str]:
    out = method_problems(cls, methods, _unwrap)
    if obj is not None:
        out += [f"{cls.__name__} instance has no attribute {a!r}" for a in attrs if not hasattr(obj, a)]
    for method, lines in sources:
        try:
            src = inspect.getsource(_unwrap(getattr(cls, method)))
        except (OSError, TypeError, AttributeError):
            out.append(f"cannot read the source of {cls.__name__}.{method}")
            continue
        out += [f"{cls.__name__}.{method} no longer contains {line!r}" for line in lines if line not in src]
    return out


def zero_internal_problems(kind: str, optimizer=None) -> list[str]:
    """What differs from the DeepSpeed internals IST was checked against (empty when nothing does)."""
    if kind == "zero12":
        cls = type(optimizer) if optimizer is not None else zero12_class()
        return _problems(cls, ZERO12_ATTRS, ZERO12_METHODS,
                         [("step", ZERO12_STEP_SOURCE), ("copy_grads_in_partition", ZERO12_COPY_SOURCE)], optimizer)
    cls = type(optimizer) if optimizer is not None else zero3_class()
    return _problems(cls, ZERO3_ATTRS, ZERO3_METHODS,
                     [("independent_gradient_partition_epilogue", ZERO3_EPILOGUE_SOURCE),
                      ("partition_grads", ZERO3_PARTITION_GRADS_SOURCE),
                      ("step", ZERO3_STEP_SOURCE)], optimizer)


def check_zero_internals(kind: str, optimizer=None) -> None:
    problems = zero_internal_problems(kind, optimizer)
    if problems:
        raise DeepSpeedInternalsChanged(
            f"DeepSpeed {version()} differs from {CHECKED_VERSION}, the version ist_ds's ZeRO memory savings "
            f"were checked against: " + "; ".join(problems)
            + ". Set ist.optimizer_state to 'keep' (nothing is moved), or use DeepSpeed " + CHECKED_VERSION)


# ---------------------------------------------------------------------- engine
def basic_optimizer(engine):
    """The optimizer ZeRO / the bf16 wrapper / stage 0 actually step (torch AdamW, DeepSpeedCPUAdam...).

    ``engine.basic_optimizer``; None when the engine has none (no optimizer, or a DeepSpeed without it).
    """
    return getattr(engine, "basic_optimizer", None)


def global_steps(engine) -> int:
    """Optimizer steps the engine took (``engine.global_steps``; counts steps skipped for overflow too)."""
    return engine.global_steps


def skipped_steps(engine) -> int:
    """Optimizer steps DeepSpeed skipped (fp16 overflow); 0 where the engine does not count them."""
    return int(getattr(engine, "skipped_steps", 0))


def data_parallel_world_size(engine) -> int:
    """Ranks the engine's ZeRO partitions are spread over (``engine.dp_world_size``)."""
    return int(engine.dp_world_size)


def set_checkpoint_loader(engine, load) -> None:
    """Make the engine read its own checkpoint files with ``load(path, map_location)``.

    Replaces ``engine.checkpoint_engine.load`` (a ``TorchCheckpointEngine`` on this DeepSpeed).
    """
    engine.checkpoint_engine.load = lambda path, map_location=None: load(path, map_location)


@contextlib.contextmanager
def checkpoint_files_loaded_with(load) -> Iterator[None]:
    """While open, every DeepSpeed engine reads its checkpoint files with ``load(path, map_location)``.

    For engines built inside the block (a Trainer builds its engine and loads a checkpoint within one
    call): patches ``TorchCheckpointEngine.load`` at the class and restores it on exit.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load
    TorchCheckpointEngine.load = lambda self, path, map_location=None: load(path, map_location)
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


def checkpoint_safe_globals() -> list:
    """DeepSpeed's data classes that its checkpoint files pickle (none runs code when unpickled).

    ``LossScaler``/``DynamicLossScaler`` (``deepspeed.runtime.fp16.loss_scaler``), ``ZeroStageEnum``
    (``deepspeed.runtime.zero.config``), ``fragment_address`` (``deepspeed.utils.tensor_fragment``);
    empty when DeepSpeed is not installed.
    """
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def validated_config(config: dict):
    """DeepSpeed's parsed config object for ``config`` (``deepspeed.runtime.config.DeepSpeedConfig``).

    Raises what DeepSpeed raises for an invalid config (ValueError, AssertionError, pydantic errors).
    Needs no process group only when ``train_batch_size`` is consistent for world size 1.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


# ---------------------------------------------------------------------- ZeRO-3 parameters
def is_zero3_param(p) -> bool:
    """Whether ZeRO-3 partitioned ``p`` (it carries ``ds_id``)."""
    return hasattr(p, "ds_id")


def zero3_numel(p) -> int:
    """Elements of a parameter, also when ZeRO-3 partitioned it (``ds_numel``; ``numel()`` is 0 then)."""
    return int(getattr(p, "ds_numel", p.numel()))


def zero3_param_id(p) -> int:
    """ZeRO-3's id of a partitioned parameter (``ds_id``), the key of the optimizer's per-parameter maps."""
    return p.ds_id


def zero3_partition_numel(p) -> int:
    """Elements of this rank's partition of a ZeRO-3 parameter (``partition_numel()``, padding included)."""
    return int(p.partition_numel())


# ---------------------------------------------------------------------- ZeRO-3 linear
def zero3_linear_function():
    """DeepSpeed's autograd function behind ZeRO-3's memory-efficient linear (``LinearFunctionForZeroStage3``).

    Relied on: ``setup_context(ctx, inputs, output)`` saves ``(input, weight, bias)`` with
    ``save_for_backward``, and ``backward`` reads the input only when ``ctx.needs_input_grad[1]``.
    """
    from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3

    return LinearFunctionForZeroStage3


def zero3_linear_wrap():
    """The function ZeRO-3 installs as ``torch.nn.functional.linear`` (``zero3_linear_wrap``)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap as wrap

    return wrap


def replace_zero3_linear(replacement: Callable) -> bool:
    """Make ``replacement`` ``torch.nn.functional.linear`` where ZeRO-3 installed its own; True if it is now.

    ZeRO-3 swaps ``torch.nn.functional.linear`` process-wide for ``zero3_linear_wrap`` and keeps
    torch's in ``linear_bk`` to restore it; that record is left untouched, so whatever restores torch's
    linear still does. Nothing happens when the linear is anything else (torch's own because
    ``memory_efficient_linear`` is off, or another library's replacement).
    """
    import torch

    current = torch.nn.functional.linear
    if current is replacement:
        return True
    if current is not zero3_linear_wrap():
        return False
    torch.nn.functional.linear = replacement
    return True


# ---------------------------------------------------------------------- ZeRO-1/2
def zero12_master(optimizer, group: int):
    return optimizer.single_partition_of_fp32_groups[group]


def zero12_bit16_partition(optimizer, group: int):
    import deepspeed.comm as dist

    rank = dist.get_rank(group=optimizer.real_dp_process_group[group])
    return optimizer.parallel_partitioned_bit16_groups[group][rank]


def zero12_num_groups(optimizer) -> int:
    return len(optimizer.single_partition_of_fp32_groups)


def zero12_partition_size(optimizer, group: int) -> int:
    return int(optimizer.partition_size[group])


def zero12_group_of_params(optimizer, tensor_list) -> int | None:
    """The group whose ``params_in_partition`` list is ``tensor_list`` (by identity), else None."""
    for i, params in enumerate(optimizer.params_in_partition):
        if params is tensor_list:
            return i
    return None


def grad_partition_group(grad_buffers, flat_partition):
    """ZeRO-1/2's container of a compact (fp32-accumulated) gradient partition."""
    from deepspeed.runtime.zero.stage_1_and_2 import GradPartitionBufferGroup

    return GradPartitionBufferGroup(grad_buffers, flat_partition)


def zero12_grad_accum_dtype(optimizer):
    """The dtype ZeRO-1/2 accumulate gradients in (fp32 for bf16 weights by default)."""
    return optimizer.gradient_accumulation_dtype


def zero12_contiguous_grads(optimizer):
    """ZeRO-2's buffer of the gradients of this rank's partition (allocated at the first reduction), or None."""
    return getattr(optimizer, "grads_in_partition", None)


_ALLGATHER_FILTERS: dict[int, Callable[[int], bool]] = {}


def filter_zero12_allgather(optimizer, keep: Callable[[int], bool] | None) -> None:
    """Let ZeRO-1/2's all-gather of bit16 partitions skip the groups for which ``keep(i)`` is false.

    DeepSpeed calls the module-level ``all_gather_dp_groups`` with the optimizer's own
    ``bit16_groups_flat`` list; the wrapper (installed once) recognises that list by identity and
    narrows every per-group list to the kept groups. Every other call, and every other optimizer,
    goes through unchanged. ``keep`` must give the same answer on every rank; None removes the filter.
    """
    import deepspeed.runtime.zero.stage_1_and_2 as zero12

    if not getattr(zero12.all_gather_dp_groups, "ist_filtered", False):
        original = zero12.all_gather_dp_groups

        def all_gather_dp_groups(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor,
                                 allgather_bucket_size):
            keep_group = _ALLGATHER_FILTERS.get(id(groups_flat))
            if keep_group is not None:
                kept = [i for i in range(len(groups_flat)) if keep_group(i)]
                groups_flat = [groups_flat[i] for i in kept]
                partitioned_param_groups = [partitioned_param_groups[i] for i in kept]
                dp_process_group = [dp_process_group[i] for i in kept]
            return original(groups_flat=groups_flat, partitioned_param_groups=partitioned_param_groups,
                            dp_process_group=dp_process_group, start_alignment_factor=start_alignment_factor,
                            allgather_bucket_size=allgather_bucket_size)

        all_gather_dp_groups.ist_filtered = True
        all_gather_dp_groups.__wrapped__ = original
        zero12.all_gather_dp_groups = all_gather_dp_groups
    if keep is None:
        _ALLGATHER_FILTERS.pop(id(optimizer.bit16_groups_flat), None)
    else:
        _ALLGATHER_FILTERS[id(optimizer.bit16_groups_flat)] = keep


def zero12_uses_compact_grads(optimizer, group) -> bool:
    """Whether a group's gradients go to a compact fp32 partition (bf16 weights, fp32 accumulation)."""
    if group is None:
        group = 0
    return bool(optimizer._use_compact_grad_partition_buffer(group))


def zero12_allocate_contiguous_grads(optimizer, groups) -> None:
    """Allocate ZeRO-2's contiguous partition-gradient buffer for the parameters of ``groups`` only.

    DeepSpeed allocates it (``grads_in_partition``) at the first reduction of a backward, sized for
    every parameter of every group, and fills it from offset 0 in reduction order; a buffer allocated
    here first is used instead. A gradient that does not fit fails loudly in DeepSpeed's ``narrow``.
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    total = sum(p.numel() for i in groups for p in optimizer.params_in_partition[i])
    optimizer.grads_in_partition = torch.empty(int(total), dtype=optimizer.dtype,
                                               device=get_accelerator().current_device_name())
    optimizer.grads_in_partition_offset = 0


def zero12_offloads(optimizer) -> bool:
    return bool(optimizer.cpu_offload)


# ---------------------------------------------------------------------- ZeRO-3
def zero3_num_sub_groups(optimizer) -> int:
    return len(optimizer.fp32_partitioned_groups_flat)


def zero3_master(optimizer, sub_group: int):
    return optimizer.fp32_partitioned_groups_flat[sub_group]


def zero3_weight_partition(optimizer, sub_group: int):
    return optimizer.fp16_partitioned_groups_flat[sub_group]


def zero3_param_group_of(optimizer, sub_group: int) -> int:
    return optimizer.sub_group_to_group_id[sub_group]


def zero3_params(optimizer, sub_group: int) -> list:
    return optimizer.fp16_groups[sub_group]


def zero3_offloads(optimizer) -> bool:
    return bool(optimizer.offload_optimizer)


def zero3_grad_buffer(optimizer):
    return optimizer.grad_partitions_flat_buffer


def zero3_grad_partition_map(optimizer) -> dict:
    """ZeRO-3's ``ds_id -> gradient partition`` views (views of ``grad_partitions_flat_buffer``).

    ``partition_grads`` copies (first micro-step) or adds each reduced gradient partition into the
    view it finds here; the epilogue hands the views of parameters that require grad to the step.
    """
    return optimizer._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition


def set_zero3_grad_buffer(optimizer, buffer) -> None:
    optimizer.grad_partitions_flat_buffer = buffer


def zero3_grad_accum_dtype(optimizer):
    return optimizer.gradient_accumulation_dtype


def averaged_gradients(optimizer) -> dict:
    return optimizer.averaged_gradients
