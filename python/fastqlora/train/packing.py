"""Rows and batches: padding-free packing, or one example per row with padding.

Packing puts several examples into one row of at most ``max_seq_length`` tokens with
position ids restarting at 0 for each; the model turns the restarts into sequence
boundaries so that attention stays inside each example. The first label of each
example is set to -100: after the model's one-token label shift that is the
prediction that would cross a boundary, and it is not a prediction of the example
itself, so a packed row's loss is exactly the token-weighted mean of its examples'.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Example


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(examples: Sequence[Example], max_seq_length: int, seed: int = 0) -> list[Row]:
    """First-fit-decreasing packing of shuffled examples into rows of ``max_seq_length``."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(examples[i]))  # stable: ties keep the shuffled order
    rows: list[Row] = []
    free: list[int] = []
    for i in order:
        ex = examples[i]
        n = min(len(ex), max_seq_length)
        slot = next((r for r, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append(Row([], [], []))
            free.append(max_seq_length)
            slot = len(rows) - 1
        row = rows[slot]
        row.input_ids += ex.input_ids[:n]
        row.labels += [IGNORE_INDEX] + ex.labels[1:n]
        row.position_ids += list(range(n))
        free[slot] -= n
    return rows


def unpacked_rows(examples: Sequence[Example], max_seq_length: int) -> list[Row]:
    return [
        Row(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length], list(range(min(len(ex), max_seq_length))))
        for ex in examples
    ]


def collate(rows: Sequence[Row], pad_id: int, width: int | None = None,
            height: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest (or to ``width``: one shape for every batch); padding
    gets label -100, mask 0, and its own position run so it forms a separate sequence.
    ``height``: that many rows, the missing ones all padding (an epoch's short last batch
    in the shape of the others; with ``width``, ``rows`` may be empty: a batch of padding)."""
    if not rows and width is None:
        raise ValueError("collate needs rows, or a width for a batch of padding alone")
    longest = max((len(r) for r in rows), default=0)
    if width is not None and width < longest:
        raise ValueError(f"a row holds {longest} tokens, more than the batch width {width}")
    if height is not None and height < len(rows):
        raise ValueError(f"{len(rows)} rows do not fit a batch of height {height}")
    width = longest if width is None else width
    height = len(rows) if height is None else height
    ids = torch.full((height, width), pad_id, dtype=torch.long)
    labels = torch.full((height, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.arange(width).repeat(height, 1)  # the padding rows' own run
    mask = torch.zeros((height, width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r.input_ids)
        labels[b, :n] = torch.tensor(r.labels)
        pos[b, :n] = torch.tensor(r.position_ids)
        pos[b, n:] = torch.arange(width - n)
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}


def packed_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens_q, the longest sequence's length) of packed rows, read from the position
    ids' CPU copy, so that the model's forward never reads its batch's layout back from the
    device (a sync a forward, and what a CUDA graph cannot hold).

    A sequence starts at every 0 of ``position_ids`` ``[B, S]`` and at each row's start; the
    ids count up by one inside a sequence (as :func:`collate` makes them: the padding at a
    row's end is a run of its own). ``cu_seq_lens_q`` is int32: the sequences' starts over
    the flattened B·S tokens, then B·S."""
    pos = position_ids.detach().to("cpu", torch.int64)
    if pos.dim() != 2:
        raise ValueError(f"position_ids must be [batch, seq], got shape {tuple(pos.shape)}")
    B, S = pos.shape
    starts = torch.ones(B, S, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if bool((pos[starts] != 0).any()) or int(pos.max()) >= S:
        raise ValueError("position_ids must restart at 0 for each sequence (as packing makes them), count up by "
                         f"one inside it and stay below the row length {S}")
    cu = torch.cat([starts.reshape(-1).nonzero().flatten(), torch.tensor([B * S])])
    return cu.to(torch.int32), int(torch.diff(cu).max())


def pad_boundaries(cu: torch.Tensor, slots: int) -> torch.Tensor:
    """``cu`` (from :func:`packed_boundaries`) extended to ``slots`` + 1 entries by repeating
    its total: empty sequences, which the attention kernels skip, so that batches packing
    different numbers of sequences give a captured CUDA graph one shape."""
    count = cu.numel() - 1
    if count > slots:
        raise ValueError(f"this batch packs {count} sequences; at most {slots} fit")
    out = torch.full((slots + 1,), int(cu[-1]), dtype=torch.int32)
    out[:count] = cu[:count]
    return out


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that count in the loss after the model's one-token label shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def row_label_tokens(row: Row) -> int:
    """The tokens of one row that count in the loss: :func:`count_label_tokens` of a batch is
    the sum of its rows' (padding is ignored), so a step's count needs no batch built."""
    return sum(label != IGNORE_INDEX for label in row.labels[1:])


def epoch_batches(rows: Sequence[Row], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Row indices of each batch of one epoch, shuffled reproducibly by (seed, epoch)."""
    order = list(range(len(rows)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def iterate_batches(
    rows: Sequence[Row], batch_size: int, seed: int, start_epoch: int = 0, start_batch: int = 0
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, row indices) forever, from a resume point."""
    epoch, first = start_epoch, start_batch
    while True:
        batches = epoch_batches(rows, batch_size, epoch, seed)
        for b in range(first, len(batches)):
            yield epoch, b, batches[b]
        epoch, first = epoch + 1, 0
