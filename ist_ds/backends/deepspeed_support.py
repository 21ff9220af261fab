"""DeepSpeed setups IST cannot run correctly, refused before ``deepspeed.initialize``.

- **Partial optimizer offload** (``offload_optimizer.ratio`` < 1): ZeRO-Offload++ then steps part of
  every group with a second, on-device optimizer that IST's optimizer gate never sees, so unselected
  layers would move.
- **NVMe offload** (``offload_optimizer`` or ``offload_param`` on ``device: nvme``): ZeRO-Infinity
  swaps sub-groups in and out around the inner step; IST's state modes and checkpoints have not been
  made to work with its swapper.
- **Pipeline parallelism** (a ``deepspeed.pipe.PipelineModule``, or an ``mpu`` with more than one
  pipeline stage): each stage holds only some transformer blocks, while IST selects, scores and
  checks agreement over all of them on every rank.
"""

from __future__ import annotations

from typing import Any

from ist_ds.core.errors import ISTConfigError


def refuse_unsupported(ds_config: dict, model: Any = None, mpu: Any = None) -> None:
    """Raise :class:`ISTConfigError` naming the setting when the DeepSpeed setup is one IST cannot run."""
    zero = ds_config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return  # DeepSpeed reports a malformed section itself
    for section in ("offload_optimizer", "offload_param"):
        offload = zero.get(section) or {}
        if not isinstance(offload, dict):
            continue
        if str(offload.get("device", "none")).lower() == "nvme":
            raise ISTConfigError(
                f"zero_optimization.{section}.device: nvme (ZeRO-Infinity) is not supported with IST; its "
                "swapper moves optimizer sub-groups behind IST's optimizer gate. Use device: cpu, or turn IST off")
    ratio = (zero.get("offload_optimizer") or {}).get("ratio", 1.0) if isinstance(zero.get("offload_optimizer"), dict) else 1.0
    try:
        partial = float(ratio) < 1.0
    except (TypeError, ValueError):
        partial = False
    if partial:
        raise ISTConfigError(
            f"zero_optimization.offload_optimizer.ratio={ratio}: partial optimizer offload is not supported with "
            "IST (the part kept on the device is stepped by a second optimizer that IST's gate does not see); "
            "use ratio 1.0 (the default)")
    pipeline = ds_config.get("pipeline") or {}
    stages = pipeline.get("stages") if isinstance(pipeline, dict) else None
    if _is_pipeline_module(model) or (isinstance(stages, int) and stages > 1) or _pipe_world(mpu) > 1:
        raise ISTConfigError(
            "pipeline parallelism is not supported with IST: each pipeline stage holds only some transformer "
            "blocks, while IST selects and scores all of them on every rank. Use ZeRO data parallelism (stages 0-3)")


def _is_pipeline_module(model: Any) -> bool:
    try:
        from deepspeed.pipe import PipelineModule
    except ImportError:
        return False
    return isinstance(model, PipelineModule)


def _pipe_world(mpu: Any) -> int:
    getter = getattr(mpu, "get_pipe_parallel_world_size", None) or getattr(
        mpu, "get_pipeline_model_parallel_world_size", None)
    if getter is None:
        return 1
    try:
        return int(getter())
    except Exception:  # noqa: BLE001 - an mpu that cannot answer is not a pipeline
        return 1
