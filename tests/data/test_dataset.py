"""Instruction data: reading every supported format, record checks, tokenisation, splits, batching."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perft.data.collate import PaddingCollator, epoch_order, global_batches, micro_batches_for_rank
from perft.data.dataset import (
    IGNORE_INDEX,
    load_records,
    prepare_data,
    split_records,
    tokenize_examples,
    validate_records,
)
from perft.data.prompts import build_prompt
from perft.errors import PerftError
from tests.helpers.training import COLOURS, TEMPLATE_WORDS, make_records


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from perft.testing import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path, [" ".join(COLOURS + TEMPLATE_WORDS + ["what", "colour", "is", "the", "quick", "fox",
                                                                    "dog", "cat", "cow", "owl", "bee", "ant", "elk"])])
    return AutoTokenizer.from_pretrained(str(path))


RECORDS = make_records(12)


def test_every_format_reads_the_same_records(tmp_path):
    import pandas as pd

    (tmp_path / "a.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in RECORDS), encoding="utf-8")  # JSONL named .json
    (tmp_path / "d.json").write_text(json.dumps({"train": RECORDS}), encoding="utf-8")
    pd.DataFrame(RECORDS).to_csv(tmp_path / "e.csv", index=False)
    pd.DataFrame(RECORDS).to_parquet(tmp_path / "f.parquet")
    expected = validate_records(RECORDS)
    for name in ("a.json", "b.jsonl", "c.json", "d.json", "e.csv", "f.parquet"):
        assert validate_records(load_records(tmp_path / name)) == expected, name


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not valid JSON"),
        (b'[{"instruction": "a", "output": "b"},', "not valid JSON (line 1"),
        (b"[]", "no records"),
        (b'[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "record 1 of"),
        (b'[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "has no 'output' field"),
        (b'[{"input": "x", "output": "b"}]', "record 0 of"),
        (b'[{"instruction": "a", "output": 3}]', "'output' must be text"),
        (b'[{"instruction": " ", "output": "b"}]', "empty 'instruction'"),
        (b'[["a", "b"]]', "is a list, not an object"),
        (b'{"x": 1}', "not a list of records"),
        (b'[{"instruction": "caf\xe9", "output": "b"}]', "not UTF-8"),
    ],
)
def test_bad_data_files_are_named_clearly(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(PerftError, match=message.replace("(", r"\(")):
        validate_records(load_records(path), source=str(path))


def test_missing_file_directory_and_unknown_format(tmp_path):
    with pytest.raises(PerftError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(PerftError, match="is a directory"):
        load_records(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(PerftError, match="unknown data format"):
        load_records(tmp_path / "x.txt")
    (tmp_path / "y.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops}\n')
    with pytest.raises(PerftError, match="line 2 is not valid JSON"):
        load_records(tmp_path / "y.jsonl")


def test_response_only_labels_and_eos(tokenizer):
    records = validate_records(RECORDS[:4])
    batch = {k: [r[k] for r in records] for k in records[0]}
    out = tokenize_examples(batch, tokenizer, cutoff_len=200, train_on_inputs=False)
    for i, record in enumerate(records):
        ids, labels = out["input_ids"][i], out["labels"][i]
        prompt_len = len(tokenizer(build_prompt(record["instruction"], record["input"]))["input_ids"])
        assert ids[-1] == tokenizer.eos_token_id
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:]
        assert out["num_targets"][i] == len(ids) - prompt_len
        assert tokenizer.decode(ids[prompt_len:-1]) == record["output"]
    full = tokenize_examples(batch, tokenizer, cutoff_len=200, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]


def test_cutoff_truncates_without_eos(tokenizer):
    records = validate_records(RECORDS[:3])
    batch = {k: [r[k] for r in records] for k in records[0]}
    out = tokenize_examples(batch, tokenizer, cutoff_len=10, train_on_inputs=True)
    assert all(len(ids) == 10 and ids[-1] != tokenizer.eos_token_id for ids in out["input_ids"])


def test_split_is_seeded_disjoint_and_sized():
    records = validate_records(make_records(50))
    train_a, val_a = split_records(records, 8, seed=42)
    train_b, val_b = split_records(records, 8, seed=42)
    _, val_c = split_records(records, 8, seed=1)
    assert len(val_a) == 8 and len(train_a) == 42
    assert val_a.to_list() == val_b.to_list() and train_a.to_list() == train_b.to_list()
    assert val_a.to_list() != val_c.to_list()
    with pytest.raises(PerftError, match="leaves no training data"):
        split_records(records, 50, seed=42)
    train, val = split_records(records, 0, seed=42)
    assert val is None and len(train) == 50


def test_prepare_data_reports_prompts_that_fill_the_cutoff(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(make_records(10)), encoding="utf-8")
    with pytest.raises(PerftError, match="no training example has a response token"):
        prepare_data(path, tokenizer, cutoff_len=8, val_set_size=2, split_seed=0, train_on_inputs=False)
    data = prepare_data(path, tokenizer, cutoff_len=8, val_set_size=2, split_seed=0, train_on_inputs=True)
    assert data.truncated == 10 and len(data.train) == 8 and len(data.data_hash) == 64


def test_collator_pads_right_and_masks_labels():
    collate = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_epoch_order_is_a_seeded_permutation_and_grouping_cuts_padding():
    lengths = [(i * 37) % 50 + 1 for i in range(64)]
    a = epoch_order(64, seed=3, epoch=0)
    assert sorted(a) == list(range(64)) and a == epoch_order(64, seed=3, epoch=0)
    assert a != epoch_order(64, seed=3, epoch=1)
    grouped = epoch_order(64, seed=3, epoch=0, lengths=lengths, group_size=32)
    assert sorted(grouped) == list(range(64))

    def padding(order):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in global_batches(order, 4))

    assert padding(grouped) < padding(a)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 40), micro=st.integers(1, 8), world=st.integers(1, 4))
def test_micro_batches_do_not_depend_on_the_process_count(batch, micro, world):
    examples = list(range(batch))
    alone = micro_batches_for_rank(examples, micro, 0, 1)
    dealt = [micro_batches_for_rank(examples, micro, r, world) for r in range(world)]
    assert sorted(sum(dealt, [])) == sorted(alone)
    assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


def test_collator_feeds_a_model_batch():
    batch = PaddingCollator(pad_token_id=1)([{"input_ids": [3, 4]}])
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [[3, 4]]
