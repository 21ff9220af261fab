"""Data for ist_ds: the LLM-Adapters instruction format, tokenizers, and the embedded default task.

Entry point for jobs is :func:`load_task`, which turns the one string a config gives (``data:``)
into train/test records; :class:`InstructionDataset` + :class:`PadCollator` turn records into
batches. See :mod:`ist_ds.jobs.data.instructions` for why the format and template are what they are.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ist_ds.jobs.data.embedded import EMBEDDED_TASK_NAME, embedded_records
from ist_ds.jobs.data.instructions import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    InstructionDataset,
    PadCollator,
    generate_prompt,
    load_records,
    validate_records,
)
from ist_ds.jobs.data.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, encode_with, load_tokenizer
from ist_ds.core.errors import ISTDataError

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """Records of one task. ``test`` is empty when the source has no test split."""

    name: str
    train: list[dict[str, Any]]
    test: list[dict[str, Any]] = field(default_factory=list)
    train_path: str | None = None
    test_path: str | None = None


def _single_match(directory: str, pattern: str) -> str | None:
    matches = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
    if len(matches) > 1:
        names = ", ".join(os.path.basename(m) for m in matches)
        raise ISTDataError(f"{directory}: several files match {pattern!r} ({names}); pass the file path instead")
    return matches[0] if matches else None


def _find_split(directory: str, split: str) -> str | None:
    """``<dir>/<split>.json`` if present, else the single ``<dir>/*_<split>.json``, else None."""
    exact = os.path.join(directory, f"{split}.json")
    if os.path.isfile(exact):
        return exact
    return _single_match(directory, f"*_{split}.json")


def _sibling_test(train_path: str) -> str | None:
    """The test file that naming convention pairs with a train file: train.json -> test.json,
    X_train.json -> X_test.json; None when there is no such pair."""
    directory, base = os.path.split(train_path)
    if base == "train.json":
        candidate = os.path.join(directory, "test.json")
    elif base.endswith("_train.json"):
        candidate = os.path.join(directory, base[: -len("_train.json")] + "_test.json")
    else:
        return None
    return candidate if os.path.isfile(candidate) else None


def load_task(
    spec: str | os.PathLike[str] | None,
    *,
    test_path: str | os.PathLike[str] | None = None,
    num_train: int = 2000,
    num_test: int = 200,
    seed: int = 0,
) -> Task:
    """Resolve a task spec to train/test records.

    * ``None`` or ``"embedded"``: the generated embedded task
      (:func:`~ist_ds.jobs.data.embedded.embedded_records` with ``num_train``, ``num_test``, ``seed``).
    * a JSON file: its records are the train split; the test split is ``test_path`` if given, else
      the conventional sibling (``train.json`` -> ``test.json``, ``X_train.json`` -> ``X_test.json``),
      else empty. Commonsense_170k-style files with no sibling simply have no test split.
    * a directory (e.g. LLM-Adapters' ``dataset/<task>/``): train is ``train.json``, else the single
      ``*_train.json``; test is ``test.json``, else the single ``*_test.json``, else empty.
      A directory with only a test file is an error (nothing to train on).
    * a directory of such task directories (e.g. LLM-Adapters' ``dataset/``, with ``ARC-Easy/``,
      ``boolq/``, ...): a mix of all of them. Every record gets a ``task`` field (its directory's name,
      so that evaluation scores each record against its own task's labels); each task's records are
      shuffled (``seed``) and the tasks interleaved one record at a time, so any prefix of the mix is
      balanced; training takes the first ``num_train`` records (``num_train=0``: all).

    Otherwise ``num_train``/``num_test``/``seed`` only affect the embedded task; files are returned
    whole and in file order (subsampling and shuffling belong to the trainer, which knows the seed and ranks).
    """
    if spec is None or os.fspath(spec) == EMBEDDED_TASK_NAME:
        train, test = embedded_records(num_train=num_train, num_test=num_test, seed=seed)
        return Task(name=EMBEDDED_TASK_NAME, train=train, test=test)

    path = os.fspath(spec)
    if os.path.isdir(path):
        train_file = _find_split(path, "train")
        if train_file is None and test_path is None and _task_dirs(path):
            return _task_mix(path, num_train, seed)
        if train_file is None:
            found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(path), "*.json")))
            raise ISTDataError(
                f"{path}: no train.json or *_train.json in this directory (JSON files here: {found or 'none'}); "
                "pass the training file's path instead"
            )
        test_file = os.fspath(test_path) if test_path is not None else _find_split(path, "test")
        name = os.path.basename(os.path.normpath(path))
    elif os.path.exists(path) or path.endswith(".json"):
        train_file = path
        test_file = os.fspath(test_path) if test_path is not None else _sibling_test(path)
        directory, base = os.path.split(os.path.abspath(path))
        stem = os.path.splitext(base)[0]
        name = os.path.basename(directory) if stem == "train" else stem.removesuffix("_train")
    else:
        raise ISTDataError(
            f"data spec {path!r} is neither 'embedded' nor an existing JSON file or directory"
        )

    train = load_records(train_file)
    test = load_records(test_file) if test_file is not None else []
    logger.info("task %s: %d train records (%s), %d test records (%s)", name, len(train), train_file, len(test), test_file)
    return Task(name=name, train=train, test=test, train_path=train_file, test_path=test_file)


def _task_dirs(path: str) -> list[str]:
    """Subdirectories of ``path`` that hold a train split, sorted by name."""
    subs = sorted(os.path.join(path, d) for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    return [d for d in subs if _find_split(d, "train") is not None]


def _interleave(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _task_mix(path: str, num_train: int, seed: int) -> Task:
    import random

    trains, tests = [], []
    for directory in _task_dirs(path):
        task = load_task(directory)
        rng = random.Random(f"{seed}:{task.name}")
        for records, sink in ((task.train, trains), (task.test, tests)):
            records = [dict(r, task=task.name) for r in records]
            rng.shuffle(records)
            sink.append(records)
    train = _interleave(trains)
    if num_train:
        train = train[:num_train]
    test = _interleave(tests)
    name = os.path.basename(os.path.normpath(path))
    logger.info("task mix %s (%d tasks): %d train records, %d test records", name, len(trains), len(train), len(test))
    return Task(name=name, train=train, test=test, train_path=path, test_path=path)


__all__ = [
    "Task", "load_task",
    "EMBEDDED_TASK_NAME", "embedded_records",
    "IGNORE_INDEX", "PROMPT_NO_INPUT", "PROMPT_WITH_INPUT", "generate_prompt", "load_records",
    "validate_records", "InstructionDataset", "PadCollator",
    "BYTE_TOKENIZER_FILE", "ByteTokenizer", "encode_with", "load_tokenizer",
]
