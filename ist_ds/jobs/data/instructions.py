"""The LLM-Adapters instruction format: loading, prompting, tokenising and batching.

The IST paper fine-tunes on ``commonsense_170k`` and evaluates on the LLM-Adapters commonsense sets,
all JSON lists of ``{"instruction", "input", "output", "answer"}``. Reproducing its setup means the
same prompt template, the same truncation/EOS rule and the same optional prompt masking as
LLM-Adapters' ``finetune.py``; this module holds exactly that and nothing model-specific.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ist_ds.jobs.data.tokenizer import encode_with
from ist_ds.core.errors import ISTDataError

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "answer")
IGNORE_INDEX = -100
"""Label value ignored by ``torch.nn.CrossEntropyLoss`` (its default ``ignore_index``)."""

# The LLM-Adapters / IST template. Upstream's finetune.py builds it from an indented triple-quoted
# f-string, so its literal text carries 16 spaces before each line and (in finetune.py only) a stray
# "  # noqa: E501" inside the header, while commomsense_evaluate.py differs again. Those are
# formatting accidents, inconsistent between upstream's own train and eval scripts, and cost ~80
# tokens of a byte-level model's context; we keep the wording and line structure and drop them.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n{output}"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n{output}"
)


def generate_prompt(instruction: str, input: str = "", output: str = "") -> str:  # noqa: A002 (upstream name)
    """Render one record with the alpaca template; ``output=""`` gives the prompt a model completes.

    The "with input" variant is used only when ``input`` is non-empty, as upstream does.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input, output=output)
    return PROMPT_NO_INPUT.format(instruction=instruction, output=output)


def validate_records(data: Any, source: str) -> list[dict[str, Any]]:
    """Check parsed JSON against the format and return normalised copies of the records.

    Optional fields default to ``""`` (``null`` is accepted for them, since some converted datasets
    write it); extra fields are kept. ``source`` names the file in error messages.
    """
    if not isinstance(data, list):
        raise ISTDataError(
            f"{source}: expected a JSON list of records {{instruction, input, output, answer}}, "
            f"got a JSON {type(data).__name__}"
        )
    if not data:
        raise ISTDataError(f"{source}: the JSON list is empty; there are no records to train or evaluate on")
    records: list[dict[str, Any]] = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise ISTDataError(f"{source}: record {index} must be a JSON object, got {type(item).__name__}")
        record = dict(item)
        for field in REQUIRED_FIELDS:
            if field not in record:
                raise ISTDataError(f"{source}: record {index} is missing required field {field!r}")
            if not isinstance(record[field], str):
                raise ISTDataError(
                    f"{source}: record {index} field {field!r} must be a string, "
                    f"got {type(record[field]).__name__}"
                )
        for field in OPTIONAL_FIELDS:
            value = record.get(field)
            if value is None:
                record[field] = ""
            elif not isinstance(value, str):
                raise ISTDataError(
                    f"{source}: record {index} field {field!r} must be a string, got {type(value).__name__}"
                )
        records.append(record)
    return records


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate an LLM-Adapters JSON file (a list of records); see :func:`validate_records`.

    Every failure is an :class:`ISTDataError` naming the file (and, for bad records, the index and
    field), because a silent partial load would train on the wrong data.
    """
    source = os.fspath(path)
    if os.path.isdir(source):
        raise ISTDataError(f"{source}: is a directory, expected a JSON file (use load_task for a task directory)")
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ISTDataError(f"{source}: data file not found") from None
    except UnicodeDecodeError as e:
        raise ISTDataError(f"{source}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ISTDataError(f"{source}: cannot read data file ({e})") from None
    if not text.strip():
        raise ISTDataError(f"{source}: file is empty; expected a JSON list of records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            hint = " (it looks like JSON Lines; this loader expects one JSON list)"
        raise ISTDataError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
    records = validate_records(data, source)
    logger.info("loaded %d records from %s", len(records), source)
    return records


class InstructionDataset(Dataset):
    """Tokenised instruction records, one variable-length example per record.

    Follows LLM-Adapters' ``generate_and_tokenize_prompt``: tokenise prompt+output (with the
    tokenizer's own special tokens), truncate to ``cutoff_len``, append EOS only if the result is
    shorter than ``cutoff_len`` and does not already end in EOS (so a truncated example never
    claims to be complete), labels = input_ids. With ``train_on_inputs=False`` the first
    ``len(tokenise(prompt without output))`` labels become -100, so only the response (and EOS) is
    learned. For BPE tokenizers that count can be off by one where the response's first token merges
    across the boundary; upstream has the same behaviour and the byte tokenizer cannot.

    Tokenisation is eager: the datasets here are at most ~10^5 short records, and doing it once
    makes item access deterministic and cheap in every data-loader worker.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        cutoff_len: int = 256,
        train_on_inputs: bool = True,
        add_eos: bool = True,
    ) -> None:
        if cutoff_len < 1:
            raise ISTDataError(f"cutoff_len must be >= 1, got {cutoff_len}")
        eos = getattr(tokenizer, "eos_token_id", None)
        if add_eos and eos is None:
            raise ISTDataError("add_eos=True but the tokenizer has no eos_token_id")
        self.cutoff_len = cutoff_len
        self.train_on_inputs = train_on_inputs
        self.add_eos = add_eos
        self._input_ids: list[list[int]] = []
        self._labels: list[list[int]] = []
        truncated = 0
        for record in records:
            ids, labels, was_truncated = self._tokenize(record, tokenizer, eos)
            truncated += was_truncated
            self._input_ids.append(ids)
            self._labels.append(labels)
        if truncated:
            logger.warning(
                "%d of %d examples were truncated to cutoff_len=%d (no EOS appended to them)",
                truncated, len(self._input_ids), cutoff_len,
            )

    def _tokenize(self, record: Mapping[str, Any], tokenizer: Any, eos: int | None) -> tuple[list[int], list[int], bool]:
        instruction = record["instruction"]
        inp = record.get("input") or ""
        full = encode_with(tokenizer, generate_prompt(instruction, inp, record["output"]))
        was_truncated = len(full) > self.cutoff_len
        ids = full[: self.cutoff_len]
        if self.add_eos and len(ids) < self.cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)  # type: ignore[arg-type]  # eos checked in __init__
        labels = list(ids)
        if not self.train_on_inputs:
            prompt_len = len(encode_with(tokenizer, generate_prompt(instruction, inp, ""))[: self.cutoff_len])
            labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
        return ids, labels, was_truncated

    def __len__(self) -> int:
        return len(self._input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor(self._input_ids[index], dtype=torch.long),
            "labels": torch.tensor(self._labels[index], dtype=torch.long),
        }

    def lengths(self) -> list[int]:
        """Token count of every example, e.g. for length-grouped sampling or budget checks."""
        return [len(ids) for ids in self._input_ids]


class PadCollator:
    """Right-pad a list of ``{"input_ids", "labels"}`` items into a batch for a causal LM.

    Returns LongTensors ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on real
    tokens) and ``labels`` (padded with ``label_pad``, -100 by default so padding adds no loss).
    ``pad_to_multiple_of`` rounds the batch length up, which keeps tensor shapes few (fewer
    recompilations / allocator churn) as LLM-Adapters does with 8.
    """

    def __init__(self, pad_token_id: int, label_pad: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ISTDataError("PadCollator needs a pad_token_id (load_tokenizer sets pad = eos for HF tokenizers)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ISTDataError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.label_pad = int(label_pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ISTDataError("PadCollator got an empty batch")
        seqs = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]
        labs = [torch.as_tensor(item["labels"], dtype=torch.long) for item in items]
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            if s.ndim != 1 or s.shape != lab.shape:
                raise ISTDataError(
                    f"batch item {i}: input_ids {tuple(s.shape)} and labels {tuple(lab.shape)} must be equal 1-D shapes"
                )
        length = max(s.numel() for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch = len(seqs)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), self.label_pad, dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            n = s.numel()
            input_ids[i, :n] = s
            attention_mask[i, :n] = 1
            labels[i, :n] = lab
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
