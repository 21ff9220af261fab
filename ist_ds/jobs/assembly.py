"""The parts of a job that follow from its recipe alone: the model directory, the tokenizer and
training-data sources, and the model with its PEFT adapters.

The job runner builds from these functions, and so does ``launch/hf_trainer_train.py``, so that a
recipe means the same model and data under every entry point.
"""

from __future__ import annotations

import logging
import os

import torch

from ist_ds.jobs.adapters import backend_entry
from ist_ds.jobs.recipe import Recipe

logger = logging.getLogger(__name__)


def model_directory(recipe: Recipe) -> str | None:
    """The local Hugging Face directory of a pretrained model (a GGUF file converted once), None when
    the recipe builds one from scratch (see ist_ds/jobs/pretrained.py)."""
    m = recipe.model
    if m.path is None and m.gguf_file is None:
        return None
    from ist_ds.jobs.pretrained import model_directory as resolve

    return resolve(m.path, m.gguf_file, m.cache_dir)


def tokenizer_source(recipe: Recipe, model_dir: str | None) -> str | None:
    """``data.tokenizer``, or by default the pretrained model's own tokenizer (else the byte tokenizer)."""
    if recipe.data.tokenizer is not None or model_dir is None:
        return recipe.data.tokenizer
    from ist_ds.jobs.pretrained import has_tokenizer

    return model_dir if has_tokenizer(model_dir) else None


def train_data_source(recipe: Recipe) -> str:
    """``data.train``, or ``data.fallback`` when ``data.train`` names a path that does not exist."""
    d = recipe.data
    if d.fallback is not None and d.train != "embedded" and not os.path.exists(d.train):
        logger.warning("data.train %s does not exist; using data.fallback %s", d.train, d.fallback)
        return d.fallback
    return d.train


def full_mode(recipe: Recipe) -> bool:
    """Whether the job trains the blocks' own weights (``ist.target: full``) instead of PEFT adapters."""
    return recipe.ist.target == "full"


def build_recipe_model(recipe: Recipe, tokenizer, model_dir: str | None = None):
    """The recipe's model with its PEFT adapters (none with ``ist.target: full``)."""
    from ist_ds.jobs.models import apply_peft, build_model

    m, p = recipe.model, recipe.peft
    bf16 = m.dtype == "bfloat16" and not backend_entry(recipe.backend.name).keeps_fp32_params
    dtype = torch.bfloat16 if bf16 else torch.float32
    if model_dir is None and (m.path or m.gguf_file):
        model_dir = model_directory(recipe)
    if model_dir is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        if getattr(tokenizer, "pad_token_id", None) is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        overrides = dict(m.config)
        overrides.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # the tokenizer's special ids
            if getattr(tokenizer, key, None) is not None:
                overrides.setdefault(key, getattr(tokenizer, key))
        model = build_model(m.arch, seed=m.seed, **overrides).to(dtype)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if full_mode(recipe):  # the backend's discovery sets requires_grad on the blocks (ist.full_params)
        logger.info("ist.target: full: training the transformer blocks' own weights, no PEFT adapters")
        return model
    extra = {"modules_to_save": list(p.modules_to_save)} if p.modules_to_save else {}
    return apply_peft(model, p.method, r=p.r, alpha=p.alpha, dropout=p.dropout,
                      target_modules=list(p.target_modules) if p.target_modules else None, **extra)
