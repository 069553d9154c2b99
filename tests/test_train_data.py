"""Dataset records (JSONL, JSON, Parquet) -> token ids and labels; packing; batching; configs."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from fastqlora.demo import data_dir
from fastqlora.train.config import TrainConfig, load_config_file
from fastqlora.train.data import IGNORE_INDEX, load_dataset, read_jsonl, tokenize_record
from fastqlora.train.packing import collate, count_label_tokens, epoch_batches, iterate_batches, pack_examples


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(data_dir() / "demo_model")


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_text_record_trains_every_token(tok):
    ex = tokenize_record({"text": "hello world"}, tok, completion_only=True)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids[1:-1]) == "hello world"


def test_instruction_completion_only_masks_the_prompt(tok):
    rec = {"instruction": "What is the capital of Chile?", "output": "Santiago."}
    ex = tokenize_record(rec, tok, completion_only=True)
    trained = [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "Santiago.<|end|>"
    full = tokenize_record(rec, tok, completion_only=False)
    assert full.labels == full.input_ids


def test_chat_completion_only_trains_assistant_turns(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    ex = tokenize_record({"messages": msgs}, tok, completion_only=True)
    trained = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])
    assert trained == "Hello!<|end|>Lima.<|end|>"
    rendered = tok.decode(ex.input_ids)
    assert rendered.startswith("<|user|>Hi<|end|><|assistant|>Hello!")


def test_malformed_lines_name_file_and_line(tmp_path, tok):
    bad = _write(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    wrong = _write(tmp_path / "wrong.jsonl", [{"text": "ok"}, {}, {"prompt": "x"}])
    with pytest.raises(ValueError, match=r"wrong\.jsonl:2: .*none of the fields"):
        read_jsonl(wrong)
    noassist = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: .*no assistant turn"):
        read_jsonl(noassist)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_packing_keeps_examples_apart(tok):
    examples = load_dataset(data_dir() / "demo.jsonl", tok, max_seq_length=128, completion_only=True)
    rows = pack_examples(examples, max_seq_length=128, seed=1)
    assert all(len(r) <= 128 for r in rows)
    assert sum(len(r) for r in rows) == sum(len(e) for e in examples)
    assert len(rows) < len(examples)
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert starts[0] == 0
        # the first label of each packed example never trains (it would cross a boundary)
        assert all(r.labels[s] == IGNORE_INDEX for s in starts)
        for a, b in zip(starts, starts[1:] + [len(r)]):
            assert r.position_ids[a:b] == list(range(b - a))
    # every trainable label survives packing except the first of each example
    assert sum(sum(lab != IGNORE_INDEX for lab in r.labels) for r in rows) == sum(
        sum(lab != IGNORE_INDEX for lab in e.labels[1:]) for e in examples)


def test_collate_pads_as_its_own_sequence():
    from fastqlora.train.packing import Row

    rows = [Row([5, 6, 7], [5, 6, 7], [0, 1, 2]), Row([8], [-100], [0])]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert count_label_tokens(b) == 2


def test_packed_boundaries_from_the_position_ids():
    from fastqlora.train.packing import Row, pad_boundaries, packed_boundaries

    rows = [Row([5, 6, 7, 8, 9], [5] * 5, [0, 1, 2, 0, 1]), Row([8, 4], [-100, 4], [0, 1])]
    b = collate(rows, pad_id=0)
    cu, longest = packed_boundaries(b["position_ids"])
    # row 0: [0, 3) [3, 5); row 1: [5, 7) then its padding [7, 10)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 7, 10]
    assert longest == 3
    assert pad_boundaries(cu, 6).tolist() == [0, 3, 5, 7, 10, 10, 10]  # two empty sequences at the end
    with pytest.raises(ValueError, match="at most 3"):
        pad_boundaries(cu, 3)
    cu, longest = packed_boundaries(collate(rows[1:], pad_id=0)["position_ids"])
    assert cu.tolist() == [0, 2] and longest == 2
    with pytest.raises(ValueError, match="restart at 0"):
        packed_boundaries(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="restart at 0"):
        packed_boundaries(torch.tensor([[0, 1, 3]]))  # a jump inside a sequence
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        packed_boundaries(torch.tensor([0, 1, 2]))


def test_batch_order_is_reproducible_and_resumable():
    rows = list(range(10))
    assert epoch_batches(rows, 3, epoch=2, seed=7) == epoch_batches(rows, 3, epoch=2, seed=7)
    assert epoch_batches(rows, 3, epoch=1, seed=7) != epoch_batches(rows, 3, epoch=2, seed=7)
    it = iterate_batches(rows, 3, seed=7)
    seq = [next(it) for _ in range(9)]
    resumed = iterate_batches(rows, 3, seed=7, start_epoch=seq[5][0], start_batch=seq[5][1])
    assert [next(resumed) for _ in range(4)] == seq[5:]


def test_config_checks_and_files(tmp_path):
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(model="m", dataset="d", lr_scheduler="step")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(model="m", dataset="d", batch_size=0)
    (tmp_path / "c.yaml").write_text("model: m\ndataset: d\nr: 8\n")
    assert load_config_file(tmp_path / "c.yaml") == {"model": "m", "dataset": "d", "r": 8}
    (tmp_path / "c.toml").write_text('model = "m"\ndataset = "d"\nlearning_rate = 1e-4\n')
    assert load_config_file(tmp_path / "c.toml")["learning_rate"] == 1e-4
    (tmp_path / "bad.yaml").write_text("model: m\nlearnig_rate: 1\n")
    with pytest.raises(ValueError, match="learnig_rate"):
        load_config_file(tmp_path / "bad.yaml")


def test_sharegpt_conversations_read_as_messages(tok):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of Peru?"},
             {"from": "gpt", "value": "Lima."}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima."}]
    for completion_only in (True, False):
        got = tokenize_record({"conversations": turns}, tok, completion_only)
        want = tokenize_record({"messages": msgs}, tok, completion_only)
        assert got.input_ids == want.input_ids and got.labels == want.labels
    with pytest.raises(ValueError, match=r"conversations\[1\] is from 'robot'"):
        tokenize_record({"conversations": [turns[0], {"from": "robot", "value": "x"}]}, tok, True)
    with pytest.raises(ValueError, match=r"conversations\[0\] needs string fields 'from' and 'value'"):
        tokenize_record({"conversations": [{"role": "user"}]}, tok, True)
    with pytest.raises(ValueError, match=r"no assistant turn"):
        tokenize_record({"conversations": turns[:2]}, tok, True)


def test_json_and_parquet_datasets_equal_jsonl(tmp_path, tok):
    records = [{"text": "hello world"}, {"instruction": "Capital of Chile?", "output": "Santiago."},
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    want = load_dataset(_write(tmp_path / "d.jsonl", records), tok, 64, completion_only=True)
    (tmp_path / "d.json").write_text(json.dumps(records))
    got = load_dataset(tmp_path / "d.json", tok, 64, completion_only=True)
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # one table holds every form: each row's fields are its non-null columns
    keys = sorted({k for r in records for k in r})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), tmp_path / "d.parquet")
    got = load_dataset(tmp_path / "d.parquet", tok, 64, completion_only=True)
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    (tmp_path / "bad.json").write_text(json.dumps({"text": "not an array"}))
    with pytest.raises(ValueError, match=r"bad\.json: a \.json dataset must be an array of records"):
        load_dataset(tmp_path / "bad.json", tok, 64)


def test_datasets_folder_and_hub_id(tmp_path, tok, monkeypatch):
    """A folder written by datasets' save_to_disk reads like the same records in JSONL; a hub
    id that cannot be reached (offline here) is an error that says so."""
    datasets = pytest.importorskip("datasets")
    records = [{"text": "hello world"}, {"instruction": "Capital of Chile?", "output": "Santiago."}]
    want = load_dataset(_write(tmp_path / "d.jsonl", records), tok, 64, completion_only=True)
    keys = sorted({k for r in records for k in r})
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in records])}
                         ).save_to_disk(str(tmp_path / "ds"))
    got = load_dataset(tmp_path / "ds", tok, 64, completion_only=True)
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    # offline, as this machine's CI is (set on datasets' config: it reads the variables at import)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((FileNotFoundError, ValueError), match=r"someone/no-such-dataset"):
        load_dataset("someone/no-such-dataset", tok, 64)


def test_row_label_tokens_sum_to_the_batch_count(tok):
    from fastqlora.train.packing import row_label_tokens, unpacked_rows

    examples = load_dataset(data_dir() / "demo.jsonl", tok, 64, completion_only=True)[:7]
    for rows in (pack_examples(examples, 128), unpacked_rows(examples, 64)):
        batch = collate(rows, tok.pad_token_id)
        assert sum(row_label_tokens(r) for r in rows) == count_label_tokens(batch) > 0
        assert sum(len(r) for r in rows) == int(batch["attention_mask"].sum())
