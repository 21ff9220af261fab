"""The ``ist`` configuration block: defaults, strict validation and layer counts.

The same block is read by every backend (single process, DeepSpeed, FSDP2) and by the launcher, so
it is validated in one place. Defaults follow the IST authors' reference code (see docs/config.md).
Counts of layers (``train_layers``, ``suppress_layers``) are either an ``int`` (a number of layers)
or a ``float`` in (0, 1] (a fraction of the ``L`` transformer blocks, rounded down as the reference
does with ``int(L * fraction)``).

``target`` chooses what a "layer" trains: ``peft`` (the PEFT parameters of a block, the reference) or
``full`` (the block's own weights, all of them or the ``full_params`` subset; docs/full_mode.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ist_ds.core.errors import ISTConfigError

STRATEGIES = ("ist", "rst", "all")
OPTIMIZER_STATE_MODES = ("keep", "offload", "drop")
OFFLOAD_TARGETS = ("host", "disk")
TARGETS = ("peft", "full")
TRAIN_OUTSIDE_MODES = ("always", "never")
FULL_SUPPRESSION_MODES = ("residual", "delta")


@dataclass(frozen=True)
class ResolvedCounts:
    """Layer counts of a config applied to a model with ``num_layers`` blocks."""

    num_layers: int
    num_train: int
    num_suppress: int
    num_sets: int


@dataclass(frozen=True)
class ISTConfig:
    """Hyper-parameters of IST and the options of the backends that run it.

    Attributes mirror the keys of the ``ist`` block one to one; docs/config.md documents each.
    """

    enabled: bool = True
    strategy: str = "ist"
    train_layers: int | float = 0.25
    suppress_layers: int | float = 0.5
    num_suppression_sets: int = 3
    update_interval: int = 10
    eta: float = 10.0
    suppression_scale: float = 0.25
    scoring_batch_size: int = 16
    scoring_micro_batch_size: int | None = None
    initial_score: float = 0.0
    seed: int = 0
    optimizer_state: str = "keep"
    offload_target: str = "host"
    offload_dir: str | None = None
    blocks_path: str | None = None
    agreement_check_interval: int = 1
    target: str = "peft"
    full_params: tuple[str, ...] | None = None
    train_outside: str | tuple[str, ...] | None = None
    full_suppression: str = "residual"
    verify_engine_files: bool = True

    def __post_init__(self) -> None:
        for key in ("full_params", "train_outside"):  # a list from YAML/JSON; stored as a tuple (immutable)
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        _validate(self)

    @property
    def outside_mode(self) -> str | tuple[str, ...] | None:
        """Full mode: which parameters outside the blocks train (``always``, ``never`` or name
        substrings; ``null`` means ``never``). PEFT mode: None."""
        if self.target != "full":
            return None
        return self.train_outside or "never"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> "ISTConfig":
        """Build a config from an ``ist`` block, rejecting unknown keys and wrong types."""
        if block is None:
            return cls(enabled=False)
        if isinstance(block, ISTConfig):
            return block
        if not isinstance(block, Mapping):
            raise ISTConfigError(f"the 'ist' block must be a mapping, got {type(block).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ISTConfigError(
                f"unknown key(s) in the 'ist' block: {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(block))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("full_params", "train_outside"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    def replace(self, **changes: Any) -> "ISTConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ layer counts
    def resolve(self, num_layers: int) -> ResolvedCounts:
        """Turn fractions into layer counts for a model with ``num_layers`` blocks.

        Raises :class:`ISTConfigError` when a count falls outside ``1..L`` (also when a fraction
        rounds down to zero layers) or when more distinct suppression sets are asked for than exist.
        """
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ISTConfigError(f"the model must have at least one transformer block, got {num_layers!r}")
        n_train = _count("train_layers", self.train_layers, num_layers)
        n_suppress = _count("suppress_layers", self.suppress_layers, num_layers)
        if self.strategy == "ist":
            distinct = math.comb(num_layers, n_suppress)
            if self.num_suppression_sets > distinct:
                raise ISTConfigError(
                    f"num_suppression_sets={self.num_suppression_sets} distinct suppression sets of "
                    f"{n_suppress} layers are asked for, but only {distinct} exist with {num_layers} layers"
                )
        if self.strategy == "all":
            n_train = num_layers
        return ResolvedCounts(num_layers, n_train, n_suppress, self.num_suppression_sets)


def _count(key: str, value: int | float, num_layers: int) -> int:
    if isinstance(value, float):
        n = int(num_layers * value)
        if n < 1:
            raise ISTConfigError(
                f"{key}={value} is a fraction of the {num_layers} layers that rounds down to {n} layers; "
                f"it must select at least 1 layer"
            )
        return n
    if not 1 <= value <= num_layers:
        raise ISTConfigError(f"{key}={value} must be between 1 and the number of layers ({num_layers})")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _validate(c: ISTConfig) -> None:
    def fail(key: str, msg: str) -> None:
        raise ISTConfigError(f"ist.{key}: {msg} (got {getattr(c, key)!r})")

    for key in ("enabled", "verify_engine_files"):
        if not isinstance(getattr(c, key), bool):
            fail(key, "must be true or false")
    if c.strategy not in STRATEGIES:
        fail("strategy", f"must be one of {', '.join(STRATEGIES)}")
    for key in ("train_layers", "suppress_layers"):
        v = getattr(c, key)
        if _is_int(v):
            if v < 1:
                fail(key, "a layer count must be at least 1")
        elif isinstance(v, float) and not isinstance(v, bool):
            if not (math.isfinite(v) and 0.0 < v <= 1.0):
                fail(key, "a fraction of the layers must lie in (0, 1]")
        else:
            fail(key, "must be an integer number of layers or a fraction in (0, 1]")
    for key, low in (("num_suppression_sets", 1), ("update_interval", 1), ("scoring_batch_size", 1),
                     ("seed", 0), ("agreement_check_interval", 0)):
        v = getattr(c, key)
        if not _is_int(v):
            fail(key, "must be an integer")
        if v < low:
            fail(key, f"must be at least {low}")
    if c.scoring_micro_batch_size is not None:
        if not _is_int(c.scoring_micro_batch_size) or c.scoring_micro_batch_size < 1:
            fail("scoring_micro_batch_size", "must be a positive integer or null")
    for key in ("eta", "initial_score"):
        if not _is_real(getattr(c, key)):
            fail(key, "must be a finite number")
    if not _is_real(c.suppression_scale) or not 0.0 <= c.suppression_scale <= 1.0:
        fail("suppression_scale", "must be a number in [0, 1]")
    if c.optimizer_state not in OPTIMIZER_STATE_MODES:
        fail("optimizer_state", f"must be one of {', '.join(OPTIMIZER_STATE_MODES)}")
    if c.offload_target not in OFFLOAD_TARGETS:
        fail("offload_target", f"must be one of {', '.join(OFFLOAD_TARGETS)}")
    if c.offload_dir is not None and not (isinstance(c.offload_dir, str) and c.offload_dir):
        fail("offload_dir", "must be a non-empty path string or null")
    if c.blocks_path is not None and not (isinstance(c.blocks_path, str) and c.blocks_path):
        fail("blocks_path", "must be a dotted module path such as 'base_model.model.model.layers', or null")
    if c.target not in TARGETS:
        fail("target", f"must be one of {', '.join(TARGETS)}")
    if c.full_params is not None:
        if (not isinstance(c.full_params, tuple) or not c.full_params
                or not all(isinstance(s, str) and s for s in c.full_params)):
            fail("full_params", "must be a non-empty list of parameter-name substrings such as "
                                "['self_attn', 'mlp'], or null for every parameter of a block")
    if isinstance(c.train_outside, tuple):
        if not c.train_outside or not all(isinstance(s, str) and s for s in c.train_outside):
            fail("train_outside", "a list must hold non-empty parameter-name substrings such as ['lm_head']")
    elif c.train_outside is not None and c.train_outside not in TRAIN_OUTSIDE_MODES:
        fail("train_outside", f"must be one of {', '.join(TRAIN_OUTSIDE_MODES)}, a list of parameter-name "
                              "substrings, or null")
    if c.full_suppression not in FULL_SUPPRESSION_MODES:
        fail("full_suppression", f"must be one of {', '.join(FULL_SUPPRESSION_MODES)}")
    # Options that contradict each other.
    if c.target != "full":
        if c.full_params is not None:
            fail("full_params", "is only used with target: full (in PEFT mode the adapters decide what trains)")
        if c.train_outside is not None:
            fail("train_outside", "is only used with target: full (in PEFT mode trainable parameters "
                                  "outside the blocks, e.g. modules_to_save, always train)")
        if c.full_suppression != "residual":
            fail("full_suppression", "is only used with target: full (PEFT mode damps the adapters' output)")
    if c.offload_target != "host" and c.optimizer_state != "offload":
        fail("offload_target", "is only used with optimizer_state: offload")
    if c.offload_target == "disk" and c.offload_dir is None:
        raise ISTConfigError("ist.offload_target: disk needs a directory in ist.offload_dir (got none)")
    if c.offload_dir is not None and c.offload_target != "disk":
        fail("offload_dir", "is only used with optimizer_state: offload and offload_target: disk")
