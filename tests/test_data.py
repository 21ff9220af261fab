"""Tests for ist_ds.jobs.data: format validation, prompt template, tokenisation, batching, embedded task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ist_ds.jobs.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    InstructionDataset,
    PadCollator,
    embedded_records,
    encode_with,
    generate_prompt,
    load_records,
    load_task,
    load_tokenizer,
)
from ist_ds.core.errors import ISTDataError

# The shared data lives next to the checkout (<repo>/../shared), only on CI / development machines.
COMMONSENSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"

RECORD = {
    "instruction": "Which number is largest? Answer1: 3 Answer2: 7",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}


def _write(path: Path, payload: object) -> Path:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload), encoding="utf-8")
    return path


# --- template ---------------------------------------------------------------------------------

def test_template_no_input_exact() -> None:
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nWhich number is largest? Answer1: 3 Answer2: 7\n\n"
        "### Response:\nthe correct answer is answer2"
    )
    assert generate_prompt(RECORD["instruction"], RECORD["input"], RECORD["output"]) == expected


def test_template_with_input_exact() -> None:
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n2 3\n\n### Response:\n5"
    )
    assert generate_prompt("Add.", "2 3", "5") == expected
    assert generate_prompt("Add.", "2 3").endswith("### Response:\n")


# --- tokenizer --------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld ✓\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 257
    assert all(0 <= i < 256 for i in ids[1:])
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.vocab_size, len(tok)) == (256, 258, 259, 259)
    assert encode_with(tok, "ab") == [257, 97, 98]
    with pytest.raises(ValueError):
        tok.decode([259])


def test_byte_tokenizer_save_load(tmp_path: Path) -> None:
    path = ByteTokenizer().save_pretrained(tmp_path / "run")
    assert os.path.isfile(path)
    assert ByteTokenizer.from_pretrained(tmp_path / "run") == ByteTokenizer()
    assert isinstance(load_tokenizer(str(tmp_path / "run")), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    payload = json.loads(Path(path).read_text())
    payload["eos_token_id"] = 2
    Path(path).write_text(json.dumps(payload))
    with pytest.raises(ISTDataError, match="eos_token_id"):
        ByteTokenizer.from_pretrained(tmp_path / "run")
    with pytest.raises(ISTDataError):
        ByteTokenizer.from_pretrained(tmp_path / "nowhere")


def test_load_hf_tokenizer_sets_pad_to_eos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A locally built HF tokenizer (no download) without pad token gets pad = eos."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    hf.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(str(tmp_path / "hf"))
    assert not isinstance(tok, ByteTokenizer)
    assert tok.pad_token_id == tok.eos_token_id == 1
    assert encode_with(tok, "hello world") == [2, 3]
    ds = InstructionDataset([RECORD], tok, cutoff_len=64)
    assert ds[0]["input_ids"][-1].item() == 1  # EOS appended
    with pytest.raises(ISTDataError):
        load_tokenizer(str(tmp_path / "missing-tokenizer-dir"))


# --- dataset ----------------------------------------------------------------------------------

def test_dataset_labels_masked_when_not_training_on_inputs() -> None:
    tok = ByteTokenizer()
    ds = InstructionDataset([RECORD], tok, cutoff_len=512, train_on_inputs=False)
    item = ds[0]
    ids, labels = item["input_ids"], item["labels"]
    assert ids.dtype == labels.dtype == torch.long
    prompt_len = len(tok.encode(generate_prompt(RECORD["instruction"])))
    full = tok.encode(generate_prompt(RECORD["instruction"], "", RECORD["output"]))
    assert ids.tolist() == full + [tok.eos_token_id]
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    assert labels[prompt_len:].tolist() == ids[prompt_len:].tolist()
    assert tok.decode(labels[prompt_len:]) == RECORD["output"]
    assert labels[-1].item() == tok.eos_token_id


def test_dataset_train_on_inputs_labels_equal_ids() -> None:
    ds = InstructionDataset([RECORD], ByteTokenizer(), cutoff_len=512, train_on_inputs=True)
    assert torch.equal(ds[0]["input_ids"], ds[0]["labels"])
    no_eos = InstructionDataset([RECORD], ByteTokenizer(), cutoff_len=512, add_eos=False)
    assert no_eos[0]["input_ids"][-1].item() != ByteTokenizer.eos_token_id
    assert len(no_eos[0]["input_ids"]) == len(ds[0]["input_ids"]) - 1


def test_dataset_truncates_to_cutoff_without_eos() -> None:
    tok = ByteTokenizer()
    full_len = len(tok.encode(generate_prompt(RECORD["instruction"], "", RECORD["output"])))
    ds = InstructionDataset([RECORD], tok, cutoff_len=50, train_on_inputs=False)
    assert len(ds[0]["input_ids"]) == 50 and ds.lengths() == [50]
    assert tok.eos_token_id not in ds[0]["input_ids"].tolist()
    assert (ds[0]["labels"] == IGNORE_INDEX).all()  # the cut falls inside the prompt
    # Exactly cutoff_len long: no room for EOS, so none is appended (LLM-Adapters' rule).
    exact = InstructionDataset([RECORD], tok, cutoff_len=full_len)
    assert len(exact[0]["input_ids"]) == full_len
    assert exact[0]["input_ids"][-1].item() != tok.eos_token_id
    one_more = InstructionDataset([RECORD], tok, cutoff_len=full_len + 1)
    assert one_more[0]["input_ids"][-1].item() == tok.eos_token_id


def test_collator_pads_and_masks() -> None:
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": [9], "labels": [9]},
    ]
    batch = PadCollator(pad_token_id=256)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    padded = PadCollator(pad_token_id=0, label_pad=-1, pad_to_multiple_of=8)(items)
    assert padded["input_ids"].shape == (2, 8)
    assert padded["attention_mask"].sum().item() == 4
    assert padded["labels"][1].tolist() == [9] + [-1] * 7
    with pytest.raises(ISTDataError):
        PadCollator(pad_token_id=0)([])


def test_dataset_with_collator_end_to_end() -> None:
    train, _ = embedded_records(num_train=8, num_test=0, seed=3)
    ds = InstructionDataset(train, ByteTokenizer(), train_on_inputs=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=PadCollator(ByteTokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()


# --- embedded task ----------------------------------------------------------------------------

def test_embedded_deterministic_and_valid(tmp_path: Path) -> None:
    train, test = embedded_records(num_train=400, num_test=40, seed=7)
    assert (train, test) == embedded_records(num_train=400, num_test=40, seed=7)
    assert train != embedded_records(num_train=400, num_test=40, seed=8)[0]
    assert len(train) == 400 and len(test) == 40
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    # Dumped to JSON, the records pass the same validation as real data files.
    assert load_records(_write(tmp_path / "train.json", train)) == train
    tok = ByteTokenizer()
    labels = set()
    for r in train + test:
        assert r["answer"] in {"answer1", "answer2", "answer3", "answer4"}
        assert r["output"] == f"the correct answer is {r['answer']}"
        assert r["input"] == ""
        n = r["answer"][-1]
        assert f"Answer{n}: " in r["instruction"]
        # Fits the default cutoff with BOS and EOS, so nothing is truncated.
        assert len(tok.encode(generate_prompt(r["instruction"], "", r["output"]))) + 1 <= 256
        labels.add(r["answer"])
    assert labels == {"answer1", "answer2", "answer3", "answer4"}


def test_embedded_answers_are_correct() -> None:
    from ist_ds.jobs.data.embedded import _BIRDS

    train, _ = embedded_records(num_train=300, num_test=0, seed=1)
    seen = set()
    for r in train:
        question, rest = r["instruction"].split("Answer1: ", 1)
        question = question.strip()
        options = [part.split(": ", 1)[-1].strip() for part in ("Answer1: " + rest).split("Answer")[1:]]
        assert len(options) == 4 and len(set(options)) == 4
        index = int(r["answer"][-1]) - 1
        chosen = options[index]
        if question == "Which number is largest?":
            assert int(chosen) == max(map(int, options))
        elif question == "Which animal is a bird?":
            assert [o in _BIRDS for o in options] == [i == index for i in range(4)]
        elif question.startswith("Select answer"):
            assert question == f"Select answer{index + 1}."
        elif question.startswith("What is "):
            a, b = question.removeprefix("What is ").rstrip("?").split(" + ")
            assert int(chosen) == int(a) + int(b)
        else:
            assert question == f"Which option says {chosen}?"
        seen.add(question[:8])
    assert len(seen) == 5  # every family is present


def test_embedded_rejects_bad_sizes() -> None:
    with pytest.raises(ISTDataError):
        embedded_records(num_train=0)
    with pytest.raises(ISTDataError):
        embedded_records(num_train=100_000)


# --- load_records errors ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "payload, needles",
    [
        ("", ["empty"]),
        ("   \n", ["empty"]),
        ("[{\"instruction\": \"x\",", ["invalid JSON", "line 1"]),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', ["invalid JSON", "JSON Lines"]),
        ({"instruction": "a", "output": "b"}, ["JSON list", "dict"]),
        ([], ["empty"]),
        ([RECORD, "not a record"], ["record 1", "str"]),
        ([RECORD, RECORD, {"instruction": "a", "input": ""}], ["record 2", "'output'", "missing"]),
        ([{"output": "b"}], ["record 0", "'instruction'", "missing"]),
        ([RECORD, {"instruction": 5, "output": "b"}], ["record 1", "'instruction'", "int"]),
        ([{"instruction": "a", "output": "b", "input": ["x"]}], ["record 0", "'input'", "list"]),
        ([{"instruction": "a", "output": "b", "answer": 2}], ["record 0", "'answer'", "int"]),
    ],
)
def test_load_records_bad_files(tmp_path: Path, payload: object, needles: list[str]) -> None:
    path = _write(tmp_path / "bad.json", payload)
    with pytest.raises(ISTDataError) as info:
        load_records(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_load_records_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ISTDataError, match="not found"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(ISTDataError, match="directory"):
        load_records(tmp_path)


def test_load_records_defaults_optional_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.json", [{"instruction": "a", "output": "b", "input": None, "extra": 1}])
    assert load_records(path) == [{"instruction": "a", "output": "b", "input": "", "answer": "", "extra": 1}]


# --- load_task --------------------------------------------------------------------------------

def test_load_task_embedded() -> None:
    task = load_task(None, num_train=20, num_test=4, seed=2)
    assert task.name == "embedded" and len(task.train) == 20 and len(task.test) == 4
    assert load_task("embedded", num_train=20, num_test=4, seed=2) == task


def test_load_task_files_and_directories(tmp_path: Path) -> None:
    d = tmp_path / "mytask"
    d.mkdir()
    _write(d / "train.json", [RECORD] * 3)
    _write(d / "test.json", [RECORD])
    by_dir = load_task(str(d))
    assert (by_dir.name, len(by_dir.train), len(by_dir.test)) == ("mytask", 3, 1)
    by_file = load_task(str(d / "train.json"))
    assert (by_file.name, len(by_file.train), len(by_file.test)) == ("mytask", 3, 1)

    e = tmp_path / "other"
    e.mkdir()
    _write(e / "arith_train.json", [RECORD] * 2)
    _write(e / "arith_test.json", [RECORD] * 5)
    assert len(load_task(str(e)).test) == 5
    assert load_task(str(e / "arith_train.json")).name == "arith"
    single = load_task(str(e / "arith_test.json"))  # any file is usable as a train split
    assert len(single.train) == 5 and single.test == []
    explicit = load_task(str(e / "arith_train.json"), test_path=str(d / "test.json"))
    assert len(explicit.test) == 1

    _write(e / "more_train.json", [RECORD])
    with pytest.raises(ISTDataError, match="several files"):
        load_task(str(e))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ISTDataError, match="no train.json"):
        load_task(str(empty))
    with pytest.raises(ISTDataError, match="neither"):
        load_task(str(tmp_path / "nope"))
    with pytest.raises(ISTDataError, match="not found"):
        load_task(str(tmp_path / "nope.json"))


# --- real data --------------------------------------------------------------------------------

@pytest.mark.skipif(not COMMONSENSE.is_dir(), reason="shared commonsense data not present")
def test_real_commonsense_task() -> None:
    task = load_task(str(COMMONSENSE / "ARC-Easy"))
    assert task.name == "ARC-Easy"
    assert len(task.train) == 2251 and len(task.test) == 2376
    assert all(r["output"].startswith("the correct answer is ") for r in task.train)
    assert {r["answer"] for r in task.train} >= {"answer1", "answer2", "answer3", "answer4"}
    boolq = load_records(COMMONSENSE / "boolq" / "test.json")
    assert {r["answer"] for r in boolq} == {"true", "false"}
    tok = ByteTokenizer()
    ds = InstructionDataset(task.train[:64], tok, cutoff_len=256, train_on_inputs=False)
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["input_ids"]) <= 256
        kept = item["labels"][item["labels"] != IGNORE_INDEX]
        if len(item["input_ids"]) < 256:  # not truncated: the answer is the supervised part
            assert tok.decode(kept) == task.train[i]["output"]


def test_directory_of_tasks_is_a_balanced_mix_scored_per_task(tmp_path: Path) -> None:
    """A directory of task directories: records tagged with their task, tasks interleaved (any prefix is
    balanced), num_train applied to the mix, and multiple-choice accuracy scoring each record only against
    its own task's labels."""
    from ist_ds.runtime.collectives import LocalCollectives
    from ist_ds.jobs.evaluation import choice_accuracy, labels_by_task
    from ist_ds.jobs.models import build_model

    def records(labels, n):
        return [{"instruction": f"q{i}", "input": "", "output": f"the correct answer is {labels[i % len(labels)]}",
                 "answer": labels[i % len(labels)]} for i in range(n)]

    for name, labels, n in (("boolq", ["true", "false"], 6), ("arc", ["answer1", "answer2", "answer3"], 9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.json").write_text(json.dumps(records(labels, n)))
        (tmp_path / name / "test.json").write_text(json.dumps(records(labels, n)))
    task = load_task(tmp_path, num_train=8, seed=3)
    assert [r["task"] for r in task.train] == ["arc", "boolq"] * 4
    assert len(task.test) == 15 and [r["task"] for r in task.test[:4]] == ["arc", "boolq"] * 2
    assert load_task(tmp_path, num_train=8, seed=3).train == task.train  # seeded
    assert labels_by_task(task.test) == {"arc": ["answer1", "answer2", "answer3"], "boolq": ["false", "true"]}

    rows = []

    def forward(model, batch):
        rows.append(batch["input_ids"].shape[0])  # one row per candidate label
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    acc = choice_accuracy(build_model("llama", seed=0), task.test, ByteTokenizer(), "cpu", LocalCollectives(),
                          forward)
    assert 0.0 <= acc <= 1.0 and rows[:4] == [3, 2, 3, 2] and sorted(rows) == [2] * 6 + [3] * 9
