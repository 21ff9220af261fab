"""Local pretrained models: a Hugging Face directory, or a GGUF file converted once into one.

Users have models in many forms; what every backend needs is a directory that
``AutoModelForCausalLM.from_pretrained`` reads in a fraction of a second on every rank. A Hugging
Face directory (``config.json`` + weights) is used as it is. A GGUF file (llama.cpp's format, often
quantized) is loaded through transformers (which dequantizes it; this needs the ``gguf`` package)
and written, once, as a plain safetensors directory with its tokenizer into a cache: loading a GGUF
file takes tens of seconds and ``save_pretrained`` refuses a GGUF-loaded model, so the weights are
copied into a model built from the same config, and the conversion is only published after the
reloaded copy's logits match the GGUF-loaded model's.

Concurrent ranks (one node, or nodes sharing the cache directory) take a file lock: the first
converts, the others wait and then read the result. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile

from ist_ds.compat import transformers as hf_compat
from ist_ds.core.errors import ISTModelError

logger = logging.getLogger(__name__)

#: Written into a converted directory: where it came from (also marks a finished conversion).
SOURCE_FILE = "ist_ds_source.json"


def default_cache_dir() -> str:
    """``$IST_DS_CACHE``, else ``$XDG_CACHE_HOME/ist_ds`` (``~/.cache/ist_ds``)."""
    if os.environ.get("IST_DS_CACHE"):
        return os.environ["IST_DS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ist_ds")


def gguf_path(path: str | None, gguf_file: str) -> str:
    """The GGUF file a recipe names: ``gguf_file`` inside ``path``, or ``gguf_file`` itself without ``path``."""
    return os.path.join(path, gguf_file) if path else gguf_file


def model_directory(path: str | None, gguf_file: str | None = None, cache_dir: str | None = None) -> str:
    """A local directory ``from_pretrained`` can read for this model, converting a GGUF file once.

    Raises :class:`ISTModelError` for a missing directory or file, a directory without
    ``config.json`` (and no ``gguf_file``), or a GGUF file transformers cannot load.
    """
    if gguf_file is None:
        if path is None:
            raise ISTModelError("no model given: set model.path (a local Hugging Face directory) or model.gguf_file")
        if not os.path.isdir(path):
            raise ISTModelError(f"model.path {path!r} is not a local directory (nothing is downloaded)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            found = sorted(os.listdir(path))[:8]
            gguf = [f for f in os.listdir(path) if f.endswith(".gguf")]
            hint = f"; it holds GGUF file(s) {gguf}: set model.gguf_file to one of them" if gguf else ""
            raise ISTModelError(f"model.path {path!r} has no config.json, so it is not a Hugging Face model "
                                f"directory (files there: {found}){hint}")
        return path
    source = gguf_path(path, gguf_file)
    if path is not None and not os.path.isdir(path):
        raise ISTModelError(f"model.path {path!r} is not a local directory (nothing is downloaded)")
    if not os.path.isfile(source):
        where = f"in model.path {path!r}" if path else "(set model.path to the directory that holds it)"
        raise ISTModelError(f"model.gguf_file {gguf_file!r} not found {where}")
    target = _cache_entry(source, cache_dir or default_cache_dir())
    if os.path.isfile(os.path.join(target, SOURCE_FILE)):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another rank is converting the same file right now
            logger.info("another process is converting %s into %s; waiting for it", source, target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(target, SOURCE_FILE)):
            convert_gguf(source, target)
    return target


def _cache_entry(source: str, cache_dir: str) -> str:
    """One cache directory per GGUF file content version (path, size, modification time)."""
    real = os.path.realpath(source)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(real))[0]
    return os.path.join(cache_dir, "gguf", f"{stem}-{key}")


def convert_gguf(source: str, target: str, atol: float = 0.0) -> None:
    """Write the GGUF model at ``source`` as a Hugging Face directory at ``target`` (atomically).

    The saved copy is reloaded and its logits on a fixed input must match the GGUF-loaded model's
    within ``atol`` (the copy is exact: fp32 weights copied as they are), else nothing is published.
    """
    import torch

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; say so plainly)
    except ImportError:
        raise ISTModelError("reading a GGUF file needs the 'gguf' package: pip install -r requirements-models.txt") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(source))
    logger.info("converting %s into a Hugging Face directory (once; cached at %s)", source, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ISTModelError(f"transformers cannot load the GGUF file {source}: {e}") from e
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    hf_compat.drop_config_source(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)

    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=os.path.dirname(target))
    try:
        # Not model.save_pretrained: under torch.distributed it writes on rank 0 only, and any rank may
        # be the one converting. save_model drops the tied copy (lm_head), as save_pretrained would.
        from safetensors.torch import save_model

        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if getattr(loaded, "generation_config", None) is not None:
            loaded.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        ids = torch.arange(1, 17).remainder(config.vocab_size).unsqueeze(0)
        with torch.no_grad():
            want, got = loaded(input_ids=ids).logits, reloaded(input_ids=ids).logits
        diff = float((want - got).abs().max())
        if not diff <= atol:
            raise ISTModelError(f"converting {source}: the saved model's logits differ from the GGUF model's by {diff}")
        with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
            json.dump({"gguf_file": os.path.realpath(source), "size": os.path.getsize(source),
                       "logits_max_abs_diff": diff}, f, indent=2)
        if os.path.isdir(target):  # an unfinished earlier attempt (no SOURCE_FILE)
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s: %d layers, %d parameters, logits identical (max diff %g)", name,
                config.num_hidden_layers, sum(p.numel() for p in model.parameters()), diff)


def has_tokenizer(directory: str) -> bool:
    """Whether a model directory carries a Hugging Face tokenizer."""
    return any(os.path.isfile(os.path.join(directory, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


__all__ = ["SOURCE_FILE", "convert_gguf", "default_cache_dir", "gguf_path", "has_tokenizer", "model_directory"]
