"""The training recipe: one YAML file that describes a whole fine-tuning job, validated strictly.

Sections: ``model``, ``peft``, ``data``, ``training``, ``backend``, ``ist`` (the same block a
DeepSpeed config carries; see docs/config.md) and ``output_dir``. Every key has a default, so an
empty file is the embedded quick start; unknown keys, wrong types and impossible values raise one
:class:`~ist_ds.core.errors.ISTConfigError` naming the key, before anything is built or written.

Full-layer IST (``ist.target: full``) goes with ``peft.method: none``: the job then trains the
model's own blocks and no adapter is added. Both keys are required so that a recipe says plainly
whether it fine-tunes adapters or weights.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTConfigError
from ist_ds.jobs.adapters import BACKEND_NAMES


@dataclass(frozen=True)
class ModelSection:
    arch: str = "llama"                 # from-scratch architecture: any causal-LM model_type of transformers' AutoConfig
    path: str | None = None             # a local Hugging Face model directory (or the directory holding gguf_file)
    gguf_file: str | None = None        # a GGUF file in `path` (or a file path), converted once into a cached HF directory
    cache_dir: str | None = None        # where GGUF conversions are cached (default $IST_DS_CACHE or ~/.cache/ist_ds)
    config: dict = field(default_factory=dict)  # overrides of the architecture's config
    dtype: str = "float32"              # float32 | bfloat16
    gradient_checkpointing: bool = False
    seed: int = 0                       # initialisation seed of a from-scratch model


@dataclass(frozen=True)
class PeftSection:
    method: str = "lora"                # lora | dora | loha | lokr | ia3 | none (with ist.target: full)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None


@dataclass(frozen=True)
class DataSection:
    train: str = "embedded"             # "embedded", an LLM-Adapters JSON file, a task directory, or a directory of tasks
    fallback: str | None = None         # used instead of `train` (with a warning) when `train` does not exist
    test: str | None = None
    tokenizer: str | None = None        # None: the pretrained model's own, else the byte tokenizer; "byte"; or a local HF dir
    cutoff_len: int = 256
    train_on_inputs: bool = True
    num_train: int = 2000               # embedded task only
    num_test: int = 200                 # embedded task only
    max_eval_examples: int = 200
    seed: int = 0                       # embedded task generation


@dataclass(frozen=True)
class TrainingSection:
    max_steps: int = 0                  # optimizer steps; 0 means run `epochs` epochs
    epochs: int = 1
    micro_batch_size: int = 4
    global_batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0                 # 0: evaluate at the end only
    eval_at_start: bool = False         # also evaluate before the first step (a before/after comparison)
    sample_answers: int = 0             # at the end, log the model's greedy answer to this many held-out prompts
    save_every: int = 0                 # 0: no checkpoints; else every N steps and at the end
    stop_after_steps: int = 0           # stop (with a checkpoint) after this step, e.g. to fit a scheduler slot
    progress: bool = True               # a progress bar on rank 0 when stdout is a terminal
    tensorboard: bool = True


@dataclass(frozen=True)
class BackendSection:
    name: str = "deepspeed"             # deepspeed | fsdp | single (ist_ds.jobs.adapters.BACKENDS)
    deepspeed_config: Any = None        # a DeepSpeed JSON path or mapping; missing keys filled from `training`
    zero_stage: int = 2
    offload_optimizer: bool = False     # ZeRO-Offload of the optimizer to the host (DeepSpeedCPUAdam)
    reshard_after_forward: bool | None = None  # FSDP2 only: free gathered blocks after forward (default true)
    dist_timeout_s: int = 600           # collective timeout: a dead or unreachable rank fails the job after this


SECTIONS = {"model": ModelSection, "peft": PeftSection, "data": DataSection, "training": TrainingSection,
            "backend": BackendSection}
CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16"),
    ("peft", "method"): ("lora", "dora", "loha", "lokr", "ia3", "none"),
    ("backend", "name"): BACKEND_NAMES,  # the adapter registry is the one list of backends
    ("backend", "zero_stage"): (0, 1, 2, 3),
}
POSITIVE = {("peft", "r"), ("peft", "alpha"), ("data", "cutoff_len"), ("data", "num_train"),
            ("training", "epochs"), ("training", "micro_batch_size"), ("training", "global_batch_size"),
            ("training", "log_every"), ("backend", "dist_timeout_s")}
NON_NEGATIVE = {("data", "num_test"), ("data", "max_eval_examples"), ("training", "max_steps"),
                ("training", "warmup_steps"), ("training", "eval_every"), ("training", "sample_answers"), ("training", "save_every"), ("training", "stop_after_steps"),
                ("training", "weight_decay"), ("training", "seed"), ("model", "seed"), ("data", "seed")}


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    backend: BackendSection = field(default_factory=BackendSection)
    ist: ISTConfig = field(default_factory=ISTConfig)
    output_dir: str = "runs/quickstart"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "Recipe":
        raw = dict(raw or {})
        allowed = set(SECTIONS) | {"ist", "output_dir"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ISTConfigError(f"unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                                 f"allowed: {', '.join(sorted(allowed))}")
        built = {name: _section(name, section_cls, raw.get(name)) for name, section_cls in SECTIONS.items()}
        ist = ISTConfig.from_dict(raw["ist"]) if "ist" in raw else ISTConfig()
        output_dir = raw.get("output_dir", "runs/quickstart")
        if not isinstance(output_dir, str) or not output_dir:
            raise ISTConfigError(f"output_dir must be a non-empty path, got {output_dir!r}")
        recipe = cls(ist=ist, output_dir=output_dir, **built)
        _cross_checks(recipe)
        return recipe

    @classmethod
    def from_yaml(cls, path: str) -> "Recipe":
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise ISTConfigError(f"recipe file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ISTConfigError(f"recipe {path} is not valid YAML: {e}") from None
        if raw is not None and not isinstance(raw, Mapping):
            raise ISTConfigError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["ist"] = self.ist.to_dict()
        out["output_dir"] = self.output_dir
        return out

    def with_overrides(self, overrides: list[str]) -> "Recipe":
        """Apply ``section.key=value`` overrides (values parsed as YAML), re-validating everything."""
        raw = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ISTConfigError(f"override {item!r} must look like section.key=value")
            dotted, value = item.split("=", 1)
            parts = dotted.split(".")
            target = raw
            for part in parts[:-1]:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise ISTConfigError(f"override {item!r}: {part!r} is not a section")
            try:
                target[parts[-1]] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                what = "; ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
                raise ISTConfigError(f"override {item!r}: {value!r} is not valid YAML ({what or e}); quote "
                                     "a value meant as a string") from None
        return Recipe.from_dict(raw)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _section(name: str, cls: type, raw: Any):
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ISTConfigError(f"section {name!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ISTConfigError(f"unknown key(s) in {name!r}: {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(sorted(hints))}")
    for key, value in raw.items():
        if not _matches(value, hints[key]):
            raise ISTConfigError(f"{name}.{key}: expected {_describe(hints[key])}, got {value!r}")
        if (name, key) in CHOICES and value not in CHOICES[(name, key)]:
            raise ISTConfigError(f"{name}.{key}: must be one of {', '.join(map(str, CHOICES[(name, key)]))}, got {value!r}")
        if (name, key) in POSITIVE and value <= 0:
            raise ISTConfigError(f"{name}.{key}: must be positive, got {value!r}")
        if (name, key) in NON_NEGATIVE and value < 0:
            raise ISTConfigError(f"{name}.{key}: must not be negative, got {value!r}")
    values = {k: (float(v) if hints[k] in (float, float | None) and isinstance(v, int) else v) for k, v in raw.items()}
    return cls(**values)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint)).replace("list", "list of strings")


def _cross_checks(r: Recipe) -> None:
    t = r.training
    if t.global_batch_size % t.micro_batch_size:
        raise ISTConfigError(f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                             f"training.micro_batch_size={t.micro_batch_size}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        raise ISTConfigError(f"training.max_grad_norm must be positive or null, got {t.max_grad_norm}")
    if not t.lr > 0:
        raise ISTConfigError(f"training.lr must be positive, got {t.lr}")
    # Full-layer IST trains the blocks' own weights; adapters would be trained along with them (and
    # PEFT mode has nothing to train without adapters), so the two keys must agree.
    if r.ist.target == "full" and r.peft.method != "none":
        raise ISTConfigError(f"ist.target: full trains the transformer blocks' own weights without PEFT adapters, "
                             f"but peft.method is {r.peft.method!r}; set peft.method: none")
    if r.peft.method == "none" and r.ist.target != "full":
        raise ISTConfigError("peft.method: none (no adapters) needs ist.target: full; PEFT mode (the default "
                             "target) trains the adapters of a PEFT method")
    if not 0 <= r.peft.dropout < 1:
        raise ISTConfigError(f"peft.dropout must lie in [0, 1), got {r.peft.dropout}")
    if r.backend.deepspeed_config is not None and r.backend.name != "deepspeed":
        raise ISTConfigError("backend.deepspeed_config is set but backend.name is "
                             f"{r.backend.name!r}; it is only read by the deepspeed backend")
    if r.backend.deepspeed_config is not None and not isinstance(r.backend.deepspeed_config, (str, dict)):
        raise ISTConfigError("backend.deepspeed_config must be a JSON path or a mapping")
    if r.backend.offload_optimizer and r.backend.name != "deepspeed":
        raise ISTConfigError("backend.offload_optimizer is a DeepSpeed (ZeRO-Offload) option")
    if r.backend.reshard_after_forward is not None and r.backend.name != "fsdp":
        raise ISTConfigError("backend.reshard_after_forward is an FSDP2 option; set backend.name: fsdp or remove it")
    _model_checks(r.model)


def _model_checks(m: ModelSection) -> None:
    """What can be told about the model before anything is loaded (the files are checked when it is)."""
    if m.gguf_file is not None and not m.gguf_file.endswith(".gguf"):
        raise ISTConfigError(f"model.gguf_file must name a .gguf file, got {m.gguf_file!r}")
    if m.path is None and m.gguf_file is None:
        from ist_ds.jobs.models import check_arch

        try:
            check_arch(m.arch)  # any causal-LM model_type transformers' AutoConfig knows
        except ISTConfigError as e:
            raise ISTConfigError(f"model.arch: {e}") from None
    elif m.config:
        raise ISTConfigError("model.config overrides a from-scratch architecture; with model.path or "
                             "model.gguf_file the model's own config is used")
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = m.config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ISTConfigError(f"model.config.{key} must be a positive number of transformer layers "
                                 f"(IST selects among them), got {value!r}")
