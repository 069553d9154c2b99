"""Training data: read records (JSONL, a JSON array, Parquet, a ``datasets`` folder or hub
id), turn each into token ids and labels.

Four record forms, recognized by their fields:
- ``{"text": ...}``: plain text, every token trains.
- ``{"messages": [{"role", "content"}, ...]}``: a chat, rendered with the tokenizer's
  chat template; with ``completion_only`` only the assistant turns train.
- ``{"conversations": [{"from", "value"}, ...]}``: ShareGPT's chats (human / gpt / system),
  read as ``messages``.
- ``{"instruction", "input"?, "output"}``: an Alpaca-style prompt and its answer; with
  ``completion_only`` only the answer trains.
Labels use -100 for tokens that do not train (transformers' ignore index).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


def _hf_records(source: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The train split of a folder written by ``datasets``' ``save_to_disk``, or of a hub
    dataset id (when the network is there), as records (a row's non-null fields)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {source} needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split="train")
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset {source} is neither a file, a datasets folder, nor reachable on the hub "
                                f"(offline?)") from None
    except Exception as exc:  # noqa: BLE001 - the datasets library raises many kinds
        raise ValueError(f"dataset {source} could not be loaded: {type(exc).__name__}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"dataset {source} has no 'train' split (it has {sorted(ds)})")
        ds = ds["train"]
    return [(n, {k: v for k, v in row.items() if v is not None}) for n, row in enumerate(ds.to_list(), 1)]


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(record number, record) of a dataset: a JSONL file (one object a line: the number is
    the line), ``.json`` (an array of objects), ``.parquet`` (one record a row; needs
    pyarrow), a folder written by ``datasets``' ``save_to_disk``, or a hub dataset id
    ("owner/name", its train split; needs the network)."""
    source = str(path)
    path = Path(path)
    looks_like_hub_id = (not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~"))
                         and path.suffix not in (".jsonl", ".json", ".parquet"))
    if path.is_dir() or looks_like_hub_id:
        records = _hf_records(source, path)
    elif not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); a .json dataset is one "
                             f"array of records (use .jsonl for one record a line)") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must be an array of records, found {type(data).__name__}")
        records = list(enumerate(data, 1))
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        # a table has every column in every row: a record's fields are its non-null ones
        rows = pq.read_table(path).to_pylist()
        records = [(n, {k: v for k, v in row.items() if v is not None}) for n, row in enumerate(rows, 1)]
    else:
        return read_jsonl(path)  # checks its records as it reads them, naming the line
    for n, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: record {n} is a {type(rec).__name__}, expected an object")
        check_record(rec, f"{source}: record {n}")
    if not records:
        raise ValueError(f"dataset {source} has no records")
    return records


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line of a JSONL file; a malformed line is
    a ValueError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, found {type(rec).__name__}")
            check_record(rec, f"{path}:{lineno}")
            records.append((lineno, rec))
    if not records:
        raise ValueError(f"dataset file {path} has no records")
    return records


def sharegpt_messages(turns: Any, where: str) -> list[dict[str, str]]:
    """ShareGPT ``conversations`` as chat ``messages`` (human -> user, gpt -> assistant)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise ValueError(f"{where}: conversations[{i}] needs string fields 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"{where}: conversations[{i}] is from {t['from']!r}; expected one of "
                             f"{sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return out


def check_record(rec: dict[str, Any], where: str) -> str:
    """The record's form ("text", "messages" or "instruction"; ShareGPT ``conversations``
    are checked and read as "messages"); ValueError otherwise."""
    if "conversations" in rec and "messages" not in rec:
        rec = {**rec, "messages": sharegpt_messages(rec["conversations"], where)}
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise ValueError(f"{where}: field 'text' must be a string")
        return "text"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: field 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: 'messages' has no assistant turn to learn from")
        return "messages"
    if "instruction" in rec or "output" in rec:
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{where}: field '{key}' must be a string")
        if "input" in rec and not isinstance(rec["input"], str):
            raise ValueError(f"{where}: field 'input' must be a string")
        return "instruction"
    raise ValueError(
        f"{where}: record has none of the fields 'text', 'messages', 'conversations' or "
        f"'instruction'/'output' (found {sorted(rec)})"
    )


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_specials(tokenizer, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    """bos + prompt + answer + eos, as the ids and the answer's span."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + prompt + answer + eos
    return ids, list(range(len(bos) + len(prompt), len(ids)))


def tokenize_record(rec: dict[str, Any], tokenizer, completion_only: bool, where: str = "") -> Example:
    if "conversations" in rec and "messages" not in rec:
        rec = {**rec, "messages": sharegpt_messages(rec["conversations"], where or "record")}
    kind = check_record(rec, where or "record")
    if kind == "text":
        ids, _ = _with_specials(tokenizer, [], _ids(tokenizer, rec["text"]))
        return Example(ids, list(ids))
    if kind == "instruction":
        template = ALPACA_WITH_INPUT if rec.get("input") else ALPACA_NO_INPUT
        prompt = template.format(instruction=rec["instruction"], input=rec.get("input", ""))
        ids, answer_span = _with_specials(tokenizer, _ids(tokenizer, prompt), _ids(tokenizer, rec["output"]))
        return _labelled(ids, answer_span, completion_only)
    return _tokenize_chat(rec["messages"], tokenizer, completion_only, where)


def _labelled(ids: list[int], train_positions: list[int], completion_only: bool) -> Example:
    if not completion_only:
        return Example(ids, list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    for p in train_positions:
        labels[p] = ids[p]
    return Example(ids, labels)


def _tokenize_chat(messages: list[dict], tokenizer, completion_only: bool, where: str) -> Example:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{where}: a 'messages' record needs a tokenizer with a chat template, and this "
            "tokenizer has none; use 'text' or 'instruction'/'output' records instead"
        )

    def render(msgs, gen_prompt):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    ids = render(messages, False)
    train_positions: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The assistant turn's tokens are what its rendering adds to the prompt before it.
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        train_positions.extend(range(start, min(end, len(ids))))
    return _labelled(ids, train_positions, completion_only)


def load_dataset(
    path: str | Path, tokenizer, max_seq_length: int, completion_only: bool = False
) -> list[Example]:
    """Tokenized examples of a dataset file (see :func:`read_records`), truncated to
    ``max_seq_length``; examples with nothing left to learn from are dropped."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    out = []
    for lineno, rec in read_records(path):
        ex = tokenize_record(rec, tokenizer, completion_only, f"{path}:{lineno}")
        ex = Example(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length])
        if sum(label != IGNORE_INDEX for label in ex.labels[1:]) > 0:
            out.append(ex)
    if not out:
        raise ValueError(f"no example in {path} has a token to train on within max_seq_length={max_seq_length}")
    return out


def split_examples(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): ``share`` of the examples (at least one) drawn reproducibly by
    ``seed``; the held-out ones are never trained on."""
    if not examples:
        return examples, []
    n = min(len(examples) - 1, max(1, round(share * len(examples))))
    if n <= 0:
        raise ValueError(f"eval_split needs at least two examples to hold one out; the dataset has {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed * 7_919 + 17).shuffle(order)
    held = set(order[:n])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
