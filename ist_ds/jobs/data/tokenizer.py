"""Tokenizers for ist_ds: a dependency-free byte tokenizer and a loader for Hugging Face ones.

Why a byte tokenizer: the default job trains a tiny model from scratch on a user's machine that has
no network and no downloaded tokenizer. Bytes need no vocabulary file, cover every input, and keep
the vocabulary (259 ids) small enough for a ~100k-parameter model. Its ids are fixed by definition,
so :meth:`ByteTokenizer.save_pretrained` only records *which* tokenizer a run used.

Everything else in :mod:`ist_ds.jobs.data` talks to tokenizers through :func:`encode_with` plus the
``pad_token_id`` / ``eos_token_id`` attributes, which both kinds have.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

from ist_ds.core.errors import ISTDataError

logger = logging.getLogger(__name__)

BYTE_TOKENIZER_FILE = "ist_byte_tokenizer.json"
"""File name :meth:`ByteTokenizer.save_pretrained` writes; chosen so it never collides with the
``tokenizer_config.json`` / ``tokenizer.json`` of a Hugging Face tokenizer saved to the same run
directory."""

_FORMAT_VERSION = 1


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then pad (256), bos (257), eos (258).

    ``encode`` prepends BOS by default so that, like most HF causal-LM tokenizers, the first real
    token is predicted from something. ``decode`` drops special ids and replaces invalid UTF-8
    (a model can emit half a multi-byte character) instead of raising.
    """

    pad_token_id: int = 256
    bos_token_id: int = 257
    eos_token_id: int = 258
    vocab_size: int = 259
    pad_token: str = "<pad>"
    bos_token: str = "<s>"
    eos_token: str = "</s>"

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as ids, with BOS first when ``add_bos``."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[Any]) -> str:
        """Turn ids (ints, or anything ``int()`` accepts such as 0-d tensors) back into text.

        Special ids are skipped; an id outside the vocabulary is a bug upstream, so it raises.
        """
        out = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                out.append(i)
            elif not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the ByteTokenizer vocabulary [0, {self.vocab_size})")
        return out.decode("utf-8", errors="replace")

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> str:
        """Write ``ist_byte_tokenizer.json`` into ``save_directory`` (created if needed); return its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, BYTE_TOKENIZER_FILE)
        payload = {
            "tokenizer_class": "ByteTokenizer",
            "format_version": _FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> "ByteTokenizer":
        """Load from a directory written by :meth:`save_pretrained`.

        The ids are fixed, so this only checks that the file really describes this tokenizer; a
        mismatch means the run was made by a different (incompatible) version and must not be
        silently reused with the wrong ids.
        """
        path = os.path.join(directory, BYTE_TOKENIZER_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except FileNotFoundError:
            raise ISTDataError(f"{path}: no ByteTokenizer file here (expected {BYTE_TOKENIZER_FILE})") from None
        except json.JSONDecodeError as e:
            raise ISTDataError(f"{path}: not valid JSON ({e})") from None
        tok = cls()
        expected = {
            "tokenizer_class": "ByteTokenizer",
            "vocab_size": tok.vocab_size,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        if not isinstance(payload, dict):
            raise ISTDataError(f"{path}: expected a JSON object, got {type(payload).__name__}")
        for key, value in expected.items():
            if payload.get(key) != value:
                raise ISTDataError(f"{path}: field {key!r} is {payload.get(key)!r}, expected {value!r}")
        return tok


def encode_with(tokenizer: Any, text: str) -> list[int]:
    """Encode ``text`` with special tokens, for a :class:`ByteTokenizer` or a Hugging Face tokenizer.

    HF tokenizers add whatever their own convention says (BOS for Llama, nothing for GPT-2); the
    byte tokenizer adds BOS. Callers append EOS themselves (see ``InstructionDataset``).
    """
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text, add_bos=True)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def load_tokenizer(name_or_path: str | os.PathLike[str] | None) -> Any:
    """Return the tokenizer a job asked for.

    * ``None`` or ``"byte"``: a :class:`ByteTokenizer`.
    * a directory holding ``ist_byte_tokenizer.json`` (a run directory): a :class:`ByteTokenizer`.
    * anything else: ``transformers.AutoTokenizer.from_pretrained(name_or_path)``; a tokenizer
      without a pad token gets ``pad = eos`` (padding positions are masked by ``attention_mask`` and
      labels ``-100``, so the pad id value never reaches the loss).

    Meant for local directories; with ``HF_HUB_OFFLINE=1`` a hub id only works if it is cached.
    """
    if name_or_path is None or str(name_or_path) == "byte":
        return ByteTokenizer()
    path = os.fspath(name_or_path)
    if os.path.isfile(os.path.join(path, BYTE_TOKENIZER_FILE)):
        return ByteTokenizer.from_pretrained(path)

    from transformers import AutoTokenizer  # deferred: the byte path must not need transformers

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ISTDataError(
            f"cannot load tokenizer {path!r}: {e}. Pass a local directory with a saved tokenizer, "
            "or 'byte' for the built-in byte tokenizer."
        ) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ISTDataError(f"tokenizer {path!r} has neither a pad nor an eos token; cannot pad batches")
        tok.pad_token = tok.eos_token
        logger.info("tokenizer %s has no pad token; using eos (%r) for padding", path, tok.eos_token)
    return tok
