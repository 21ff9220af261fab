"""The model part of the pre-flight check (:mod:`ist_ds.jobs.preflight`): structure without weights.

A wrong ``model.path``, a PEFT target that matches nothing or an ``ist`` count larger than the
number of blocks otherwise shows up only after every rank has loaded the weights. Here the recipe's
model is built on the meta device from its config alone (a Hugging Face ``config.json``, a GGUF
file's header, or ``model.arch`` from scratch), the PEFT method is applied and the transformer blocks
are discovered exactly as the backend will do it, and the ``ist`` counts are resolved against them.
Nothing is allocated and no weight is read.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ist_ds.jobs.recipe import Recipe

if TYPE_CHECKING:
    from ist_ds.jobs.preflight import CheckReport


def check_model(recipe: Recipe, tokenizer, ist, report: CheckReport) -> None:
    """Build the model on the meta device, apply PEFT (or full mode), discover its blocks and resolve
    the ``ist`` counts (``ist``: the IST config the job will use); findings go into ``report``."""
    model = _meta_model(recipe, tokenizer, report)
    if model is None:
        return
    from ist_ds.jobs.models import apply_peft
    from ist_ds.model.full_layers import discover_full_layers
    from ist_ds.model.layers import discover_layers

    p = recipe.peft
    try:
        if ist.target == "full":
            # keep_initial copies weights to the host; a meta model has none, and the map is the same.
            layer_map = discover_full_layers(model, ist.blocks_path, ist.full_params, ist.train_outside or "never")
        else:
            extra = {"modules_to_save": list(p.modules_to_save)} if p.modules_to_save else {}
            model = apply_peft(model, p.method, r=p.r, alpha=p.alpha, dropout=p.dropout,
                               target_modules=list(p.target_modules) if p.target_modules else None, **extra)
            layer_map = discover_layers(model, ist.blocks_path)
        trainable = sum(param.numel() for layer in layer_map.layers for _, param in layer.params)
        counts = ist.resolve(layer_map.num_layers) if ist.enabled else None
    except Exception as e:  # noqa: BLE001
        report.error("peft" if ist.target != "full" else "ist", e)
        return
    what = f"{p.method} on {', '.join(p.target_modules)}" if p.target_modules and ist.target != "full" else (
        "the blocks' own weights" if ist.target == "full" else f"{p.method} on the default modules")
    line = (f"layers: {layer_map.num_layers} transformer blocks at {layer_map.blocks_path!r}, {what}: "
            f"{trainable:,} trainable parameters in the blocks, {len(layer_map.outside_params)} outside")
    if counts is not None:
        line += f"; IST trains {counts.num_train} of {counts.num_layers} per step"
    report.facts.append(line)


def _meta_model(recipe: Recipe, tokenizer, report: CheckReport):
    """The recipe's model on the meta device: its structure without memory or weights, or None."""
    m = recipe.model
    try:
        if m.gguf_file or m.path:
            found = _pretrained_config(recipe, report)
            if found is None:
                return None
            config, where, source, read = found
            if not _has_blocks(config, where, report):
                return None
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            source = f"{source} ({type(model).__name__}, {read} only)"
        else:
            from ist_ds.jobs.models import build_model

            overrides = dict(m.config)
            if tokenizer is not None:
                overrides.setdefault("vocab_size", len(tokenizer))
            with torch.device("meta"):
                model = build_model(m.arch, **overrides)
            if not _has_blocks(model.config, "model.config", report):
                return None
            source = f"{m.arch} from scratch ({type(model).__name__})"
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError, KeyError ...
        report.error("model", e)
        return None
    params = sum(p.numel() for p in model.parameters())
    report.facts.append(f"model: {source}, {params / 1e6:.1f}M parameters (built on the meta device)")
    return model


def _pretrained_config(recipe: Recipe, report: CheckReport):
    """``(config, recipe key for messages, source, what was read)`` of a local pretrained model (a GGUF
    file's header, or a Hugging Face directory's ``config.json``), or None after reporting why not."""
    from transformers import AutoConfig

    m = recipe.model
    if m.gguf_file:
        from ist_ds.jobs.pretrained import gguf_path

        source = gguf_path(m.path, m.gguf_file)
        if not os.path.isfile(source):
            report.missing("model.gguf_file", source, "a local GGUF file")
            return None
        try:
            import gguf  # noqa: F401
        except ImportError:
            report.problems.append("model.gguf_file: reading a GGUF file needs the 'gguf' package "
                                   "(pip install -r requirements-models.txt)")
            return None
        folder, name = os.path.split(os.path.abspath(source))
        config = AutoConfig.from_pretrained(folder, gguf_file=name)  # the file's header only
        return config, f"model.gguf_file {source!r}", source, "GGUF header"
    if not os.path.exists(m.path):
        report.missing("model.path", m.path, "a local model directory; nothing is downloaded")
        return None
    if not os.path.isdir(m.path):
        report.problems.append(f"model.path {m.path!r} is a file; it must be a model directory")
        return None
    if not os.path.isfile(os.path.join(m.path, "config.json")):
        report.problems.append(f"model.path {m.path!r} has no config.json: not a Hugging Face model "
                               "directory (save one with save_pretrained)")
        return None
    return AutoConfig.from_pretrained(m.path), f"model.path {m.path!r}", m.path, "config"


def _has_blocks(config, where: str, report: CheckReport) -> bool:
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 1:
        report.problems.append(f"{where}: num_hidden_layers={layers}; the model needs at least one transformer "
                               "block for IST to select")
        return False
    return True


__all__ = ["check_model"]
