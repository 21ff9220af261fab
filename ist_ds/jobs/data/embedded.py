"""The embedded default task: a small multiple-choice set generated in code.

Why: the default job must run on a fresh machine with no dataset files and no network, yet exercise
the same path as the real commonsense tasks (LLM-Adapters records, "answer1..answer4" labels,
"the correct answer is answerN" outputs). So the task is produced by a seeded generator, not
shipped as a file.

It mixes five question families of graded difficulty, so accuracy rises in steps rather than
jumping from chance (25%) at once: ``Select answer3.`` (copy the label), ``Which animal is a
bird?`` (spot the odd option by its content), ``Which number is largest?`` (compare four digits),
``What is 2 + 1?`` (single-digit sum) and ``Which option says cat?`` (match a word). Measured on
CPU with a 99k-parameter, 2-layer byte-level Llama (d=64, batch 32, AdamW lr 3e-3,
``train_on_inputs=True``): the copy family reached 80% at step 200 and 100% at step 300, the bird
family 47% at step 600; the other three need longer. With ``train_on_inputs=False`` the same model
stayed at chance for 600 steps even on the copy family (the loss then sees one informative byte per
example), so tiny from-scratch models should train on inputs, which is also LLM-Adapters' default.

Records are short: the instruction is at most ~75 bytes, so with the ~140-byte prompt template,
the 29-byte output, BOS and EOS, every example fits in the default ``cutoff_len=256`` byte tokens.
"""

from __future__ import annotations

import random
from typing import Callable

from ist_ds.core.errors import ISTDataError

EMBEDDED_TASK_NAME = "embedded"
NUM_OPTIONS = 4
MAX_EMBEDDED_RECORDS = 16_000
"""Upper bound on num_train + num_test. Families take turns and no question may repeat (so test
questions are unseen), and the smallest family has 10*9*8*7 = 5040 distinct questions."""

_WORDS = ("cat", "dog", "sun", "red", "cup", "box", "pen", "hat", "map", "egg", "owl", "fox")
_BIRDS = ("owl", "hen", "jay", "emu", "auk")
_NOT_BIRDS = ("cat", "dog", "fox", "pig", "cow", "rat", "bat", "elk", "yak", "ant", "bee", "eel")

Question = tuple[str, list[str], int]  # (question text, option strings, index of the correct option)


def _select(rng: random.Random) -> Question:
    """Easiest family: the question names the label (copying a digit)."""
    correct = rng.randrange(NUM_OPTIONS)
    return f"Select answer{correct + 1}.", rng.sample(_WORDS, NUM_OPTIONS), correct


def _bird(rng: random.Random) -> Question:
    """Category membership: the odd option out is recognisable by its content alone."""
    correct = rng.randrange(NUM_OPTIONS)
    options = rng.sample(_NOT_BIRDS, NUM_OPTIONS - 1)
    options.insert(correct, rng.choice(_BIRDS))
    return "Which animal is a bird?", options, correct


def _largest(rng: random.Random) -> Question:
    """Comparison of four distinct digits."""
    digits = rng.sample(range(10), NUM_OPTIONS)
    return "Which number is largest?", [str(d) for d in digits], digits.index(max(digits))


def _sum(rng: random.Random) -> Question:
    """Single-digit arithmetic: the option equal to a + b (a, b < 5, so the sum is one digit)."""
    a, b = rng.randrange(5), rng.randrange(5)
    distractors = rng.sample([v for v in range(10) if v != a + b], NUM_OPTIONS - 1)
    correct = rng.randrange(NUM_OPTIONS)
    options = distractors[:correct] + [a + b] + distractors[correct:]
    return f"What is {a} + {b}?", [str(v) for v in options], correct


def _word(rng: random.Random) -> Question:
    """Matching: find the option equal to a word given in the question."""
    words = rng.sample(_WORDS, NUM_OPTIONS)
    correct = rng.randrange(NUM_OPTIONS)
    return f"Which option says {words[correct]}?", list(words), correct


_FAMILIES: tuple[Callable[[random.Random], Question], ...] = (_select, _bird, _largest, _sum, _word)


def _to_record(question: Question) -> dict[str, str]:
    text, options, correct = question
    listed = " ".join(f"Answer{i + 1}: {opt}" for i, opt in enumerate(options))
    label = f"answer{correct + 1}"
    return {
        "instruction": f"{text} {listed}",
        "input": "",
        "output": f"the correct answer is {label}",
        "answer": label,
    }


def embedded_records(num_train: int = 2000, num_test: int = 200, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Generate ``(train, test)`` records of the embedded task, deterministically from ``seed``.

    The families alternate, so both splits are balanced across them; no instruction appears twice,
    so test questions are unseen in training. Same arguments, same records, on any machine (only
    :class:`random.Random` with an integer seed is used).
    """
    if num_train < 1 or num_test < 0:
        raise ISTDataError(f"embedded task needs num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    total = num_train + num_test
    if total > MAX_EMBEDDED_RECORDS:
        raise ISTDataError(
            f"embedded task has at most {MAX_EMBEDDED_RECORDS} distinct records; "
            f"asked for {num_train} + {num_test} = {total}"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    while len(records) < total:
        family = _FAMILIES[len(records) % len(_FAMILIES)]
        for _ in range(100_000):
            record = _to_record(family(rng))
            if record["instruction"] not in seen:
                break
        else:  # pragma: no cover - unreachable under MAX_EMBEDDED_RECORDS
            raise ISTDataError(f"embedded task: could not find a new {family.__name__.strip('_')} question")
        seen.add(record["instruction"])
        records.append(record)
    # Shuffle within each split so batches drawn in file order still mix the families.
    train, test = records[:num_train], records[num_train:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
