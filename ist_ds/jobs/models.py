"""Tiny random-initialised causal LMs and PEFT wrapping, for tests, demos and benchmarks.

No pretrained causal LM can be downloaded here, and IST's machinery (layer discovery, suppression,
selective freezing under ZeRO/FSDP) only needs the *structure* of a real model: a ``ModuleList`` of
transformer blocks carrying PEFT modules. :func:`build_model` therefore builds the real HuggingFace
architecture from a config, just very small, and :func:`apply_peft` wraps it with one of the PEFT
methods IST supports, using peft's own config classes so that we test against what users run.

Sizes default to hidden 64, 4 layers, 4 heads (2 KV heads where the architecture has grouped-query
attention), intermediate 128, vocabulary 259 (256 byte values + PAD, BOS, EOS, the byte tokenizer's ids) and 512 positions.
Dropout defaults to 0 so that forwards are deterministic; pass e.g. ``attention_dropout=0.1`` to
change it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from ist_ds.compat import transformers as hf_compat
from ist_ds.core.errors import ISTConfigError

logger = logging.getLogger(__name__)

#: Token ids of the byte-level toy vocabulary: bytes are 0..255, then these three.
# The byte tokenizer's special ids (ist_ds.jobs.data.tokenizer.ByteTokenizer), so that a model built here
# and that tokenizer agree without any configuration.
PAD_TOKEN_ID = 256
BOS_TOKEN_ID = 257
EOS_TOKEN_ID = 258
VOCAB_SIZE = 259

ARCHS: tuple[str, ...] = ("llama", "qwen2", "mistral", "gpt2")
METHODS: tuple[str, ...] = ("lora", "dora", "loha", "lokr", "ia3")

#: Modules adapted by LoRA-like methods (LoRA, DoRA, LoHa, LoKr). For the Llama family these are the
#: IST paper's choice (q, k, v, up, down). GPT-2's ``c_proj`` suffix matches both the attention output
#: and the MLP output projection.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}

#: Modules adapted by IA3. peft requires ``feedforward_modules`` to be a subset of ``target_modules``
#: *as strings*, so for GPT-2 the two ``c_proj`` projections are named by their parent to let only the
#: MLP one be a feedforward (input-scaling) module.
DEFAULT_IA3_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
}

#: IA3 modules whose learned vector scales the *input* (the second FFN projection), as in the IA3 paper.
DEFAULT_IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "qwen2": ["down_proj"],
    "mistral": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
}

_LLAMA_LIKE_DEFAULTS: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": PAD_TOKEN_ID,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}

_GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "n_embd": 64,
    "n_inner": 128,
    "n_layer": 4,
    "n_head": 4,
    "n_positions": 512,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": PAD_TOKEN_ID,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}

# The common (Llama) vocabulary mapped onto GPT-2's config names, so callers can size any arch alike.
_GPT2_ALIASES: dict[str, str] = {
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "intermediate_size": "n_inner",
    "max_position_embeddings": "n_positions",
}

_CONFIG_AND_MODEL: dict[str, tuple[type, type]] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
}


def causal_lm_archs() -> list[str]:
    """Every ``model_type`` transformers can build as a causal LM from a config (its ``AutoConfig`` names)."""
    return hf_compat.causal_lm_model_types()


def check_arch(arch: str) -> None:
    """Raise ``ISTConfigError`` unless transformers knows ``arch`` as a causal-LM architecture."""
    if arch in _CONFIG_AND_MODEL:
        return
    if arch in causal_lm_archs():
        return
    if arch in hf_compat.config_model_types():
        raise ISTConfigError(f"arch {arch!r} is known to transformers but has no causal-LM head "
                             "(AutoModelForCausalLM cannot build it)")
    close = [a for a in causal_lm_archs() if a.startswith(arch[:3])][:8]
    raise ISTConfigError(f"unknown arch {arch!r}: not a model_type of transformers' AutoConfig"
                         + (f" (similar: {', '.join(close)})" if close else ""))



def _generic_config(arch: str, overrides: dict[str, Any]):
    """A small config of any other architecture: the tiny Llama sizes for the keys its config has."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(arch)
    kwargs = {k: v for k, v in _LLAMA_LIKE_DEFAULTS.items() if hasattr(default, k)}
    kwargs.update(overrides)
    heads = kwargs.get("num_attention_heads")
    if heads and "num_key_value_heads" in kwargs and "num_key_value_heads" not in overrides \
            and heads % kwargs["num_key_value_heads"]:
        kwargs["num_key_value_heads"] = heads
    if getattr(default, "head_dim", None) is not None and "head_dim" not in overrides and heads:
        kwargs["head_dim"] = kwargs.get("hidden_size", default.hidden_size) // heads  # not the big model's 128/256
    return AutoConfig.for_model(arch, **kwargs)


def build_model(arch: str, seed: int | None = None, **overrides: Any) -> transformers.PreTrainedModel:
    """Build a tiny, randomly initialised causal LM of architecture ``arch``.

    ``overrides`` go into the HuggingFace config (``num_hidden_layers=8``, ``hidden_size=256``, ...).
    For GPT-2 the Llama-style names ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
    ``intermediate_size`` and ``max_position_embeddings`` are mapped onto ``n_layer``, ``n_embd``,
    ``n_head``, ``n_inner`` and ``n_positions``, and ``num_key_value_heads`` is ignored (GPT-2 has
    no grouped-query attention). ``seed`` seeds torch's global generator before initialisation so
    that equal seeds give bit-identical weights.

    Any other causal-LM ``model_type`` transformers' ``AutoConfig`` knows (``gemma``, ``phi3``,
    ``qwen3``, ...) is built through ``AutoModelForCausalLM.from_config``, with the tiny sizes above
    for the keys its config has (and ``head_dim = hidden_size / heads``) unless ``overrides`` says.
    """
    check_arch(arch)
    if arch not in _CONFIG_AND_MODEL:  # any other architecture transformers knows
        config = _generic_config(arch, overrides)
        if seed is not None:
            torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config)
    config_cls, model_cls = _CONFIG_AND_MODEL[arch]
    if arch == "gpt2":
        kwargs = dict(_GPT2_DEFAULTS)
        for key, value in overrides.items():
            if key == "num_key_value_heads":
                logger.debug("gpt2 has no grouped-query attention; ignoring num_key_value_heads=%r", value)
                continue
            kwargs[_GPT2_ALIASES.get(key, key)] = value
    else:
        kwargs = dict(_LLAMA_LIKE_DEFAULTS)
        kwargs.update(overrides)
        heads = kwargs["num_attention_heads"]
        if "num_key_value_heads" not in overrides and heads % kwargs["num_key_value_heads"] != 0:
            # Caller changed the head count only; fall back to plain multi-head attention.
            kwargs["num_key_value_heads"] = heads
    config = config_cls(**kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(config)
    logger.debug("built %s with %d parameters", arch, sum(p.numel() for p in model.parameters()))
    return model


def _arch_of(model: torch.nn.Module) -> str | None:
    """The ARCHS key of a HF model (via ``config.model_type``), or None when it is none of them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in _CONFIG_AND_MODEL else None


def _uses_conv1d(model: torch.nn.Module) -> bool:
    """Whether the model has transformers' ``Conv1D`` (GPT-2 style, weight stored fan-in x fan-out)."""
    return any(isinstance(m, Conv1D) for m in model.modules())


def apply_peft(
    model: torch.nn.Module,
    method: str = "lora",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    **extra: Any,
) -> PeftModel:
    """Wrap ``model`` with a PEFT method via ``peft.get_peft_model`` and return the ``PeftModel``.

    ``method`` is one of ``lora``, ``dora`` (LoRA with ``use_dora=True``), ``loha``, ``lokr``, ``ia3``.
    ``target_modules`` defaults to :data:`DEFAULT_TARGET_MODULES` (IA3: :data:`DEFAULT_IA3_TARGET_MODULES`)
    for the model's architecture; ``extra`` goes into the peft config (e.g. ``modules_to_save``,
    ``feedforward_modules``, ``task_type``, which defaults to ``CAUSAL_LM``). ``dropout`` is LoRA's
    ``lora_dropout`` and LoHa/LoKr's ``rank_dropout``; IA3 has no ``r``/``alpha``/``dropout`` and ignores them.

    GPT-2's ``Conv1D`` needs ``fan_in_fan_out=True`` for LoRA/DoRA/IA3; it is set automatically. A
    layer type the method cannot wrap raises ``ISTConfigError`` (LoHa and LoKr in peft 0.21 do not
    support ``Conv1D``, so not GPT-2), and so do ``target_modules`` that match no module; the model
    may be partly wrapped by then and should be discarded.
    """
    if method not in METHODS:
        raise ISTConfigError(f"unknown PEFT method {method!r}; expected one of {', '.join(METHODS)}")
    arch = _arch_of(model)
    if target_modules is None:
        table = DEFAULT_IA3_TARGET_MODULES if method == "ia3" else DEFAULT_TARGET_MODULES
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        if arch is None and set(table["llama"]) <= names:
            arch = "llama"  # a Llama-shaped architecture (Gemma, Qwen3, OLMo, ...): the same projections
        if arch is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ISTConfigError(
                f"target_modules is required for a model that is not one of {', '.join(ARCHS)} and lacks "
                f"{', '.join(table['llama'])} (config.model_type={model_type!r}); set peft.target_modules"
            )
        target_modules = list(table[arch])
    conv1d = _uses_conv1d(model)

    config: Any
    kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM", **extra}
    if method in ("lora", "dora"):
        kwargs.setdefault("fan_in_fan_out", conv1d)
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
            use_dora=(method == "dora"), **kwargs,
        )
    elif method == "loha":
        config = LoHaConfig(r=r, alpha=alpha, rank_dropout=dropout, target_modules=target_modules, **kwargs)
    elif method == "lokr":
        config = LoKrConfig(r=r, alpha=alpha, rank_dropout=dropout, target_modules=target_modules, **kwargs)
    else:  # ia3
        if "feedforward_modules" not in kwargs:
            # peft demands feedforward_modules to be a subset of target_modules (compared as strings).
            defaults = DEFAULT_IA3_FEEDFORWARD_MODULES.get(arch or "", [])
            kwargs["feedforward_modules"] = [m for m in defaults if m in target_modules]
        kwargs.setdefault("fan_in_fan_out", conv1d)
        config = IA3Config(target_modules=target_modules, **kwargs)

    try:
        peft_model = get_peft_model(model, config)
    except (TypeError, ValueError) as exc:
        # peft raises TypeError for a target layer type the method cannot wrap (LoHa/LoKr and GPT-2's
        # Conv1D in peft 0.21), ValueError when target_modules matches no module of the model. The
        # model may be partly wrapped by then: discard it.
        hint = " (LoHa/LoKr do not support GPT-2's Conv1D; use lora, dora or ia3)" if conv1d and isinstance(
            exc, TypeError) else ""
        raise ISTConfigError(f"peft cannot apply {method!r} to this model: {exc}{hint}") from exc
    logger.debug("applied %s to %s (targets %s)", method, arch, target_modules)
    return peft_model


__all__ = [
    "ARCHS", "METHODS", "BOS_TOKEN_ID", "EOS_TOKEN_ID", "PAD_TOKEN_ID", "VOCAB_SIZE",
    "DEFAULT_TARGET_MODULES", "DEFAULT_IA3_TARGET_MODULES", "DEFAULT_IA3_FEEDFORWARD_MODULES",
    "build_model", "apply_peft", "causal_lm_archs", "check_arch",
]
