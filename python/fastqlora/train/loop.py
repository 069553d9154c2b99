"""fastqlora's own training loop (used by ``fastqlora train`` and the demo).

One optimizer step = ``gradient_accumulation_steps`` micro-batches whose losses are
sums divided by the label-token count of the whole step (``num_items_in_batch``), so
accumulation gives the loss and gradients of one large batch. Under torchrun each of the
``world`` processes trains ``batch_size`` rows of every global micro-batch of
``world · batch_size`` rows and the gradients are summed once a step (``distributed.py``):
again the loss and gradients of the whole global batch. Checkpoints resume exactly (the
same number of processes); Ctrl-C saves the adapter before leaving.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..ops import dropout as lora_dropout_state
from . import distributed
from .checkpoint import latest_checkpoint, load_trainer_state, prune_checkpoints, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import load_dataset, split_examples
from .packing import (collate, count_label_tokens, epoch_batches, iterate_batches, pack_examples, packed_boundaries,
                      row_label_tokens, unpacked_rows)
from .progress import Progress


METRICS_FILE = "metrics.jsonl"  # under output_dir: each step's record, appended as it finishes


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def graph_width(rows, max_seq_length: int) -> int:
    """The one width of a graphed step's batches: the longest row (no batch needs more; the
    kernels take any length), at most ``max_seq_length``."""
    return min(max_seq_length, max((len(r) for r in rows), default=1))


def padded_tokens(rows, batch_size: int, world: int, seed: int, width: int) -> tuple[int, int]:
    """(tokens eager steps run, tokens graphed steps run) over an epoch of ``rows``: each
    process's slice of a global batch padded to its own longest row, against every slice
    ``batch_size`` rows of ``width`` (a graphed step fills short and empty slices with padding)."""
    eager = padded = 0
    for batch in epoch_batches(rows, batch_size * world, 0, seed):
        for rank in range(world):
            mine = batch[rank * batch_size:(rank + 1) * batch_size]
            eager += len(mine) * max((len(rows[i]) for i in mine), default=0)
            padded += batch_size * width
    return eager, padded


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device,
                    capturable: bool = False):
    if cfg.optim == "adamw_8bit":
        if device.type != "cuda":
            raise ValueError("optim='adamw_8bit' needs a CUDA device (bitsandbytes' 8-bit AdamW); use optim='adamw'")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("optim='adamw_8bit' needs bitsandbytes: pip install bitsandbytes") from exc
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # a captured step keeps AdamW's step counts on the device (no readback)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             capturable=capturable and device.type == "cuda")


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """A collated batch on ``device``, its rows' sequence boundaries computed here on the host
    (``cu_seq_lens_q``, ``max_length_q``) instead of its attention mask: from the mask the
    model would find them on the device and read them back, several syncs a forward. The
    padding is a run of positions of its own (collate), so it attends only to itself."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "attention_mask"}
    if "position_ids" in batch:
        cu, longest = packed_boundaries(batch["position_ids"])
        out["cu_seq_lens_q"] = cu.to(device, non_blocking=True)
        out["max_length_q"] = longest
    elif "attention_mask" in batch:
        out["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    return out


class Trainer:
    """Holds a model with adapters, its data and optimizer; ``train()`` runs the steps."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, rows=None) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = next(p.device for p in model.parameters())
        self.group = distributed.current()  # None: this process trains alone
        self.world = self.group.world if self.group is not None else 1
        self.eval_rows = None
        if rows is None:
            examples = load_dataset(cfg.dataset, tokenizer, cfg.max_seq_length, cfg.completion_only)
            held_out = []
            if cfg.eval_dataset:
                held_out = load_dataset(cfg.eval_dataset, tokenizer, cfg.max_seq_length, cfg.completion_only)
            elif cfg.eval_split:
                examples, held_out = split_examples(examples, cfg.eval_split, cfg.seed)
            rows = self._rows(examples)
            if held_out:
                self.eval_rows = self._rows(held_out)
        self.rows = rows
        self.pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None
                       else 0)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call FastLanguageModel.get_peft_model first")
        if self.group is not None:
            distributed.broadcast_parameters(self.params)
        # a graphed step's one width: the longest row's, not max_seq_length
        self.graph_width = graph_width(rows, cfg.max_seq_length)
        graph, self.step_mode = self._step_mode(rows)
        self.optimizer = build_optimizer(self.params, cfg, self.device, capturable=graph)
        self.graphed = None
        if graph:
            if self.device.type != "cuda":
                warnings.warn("cuda_graph=True replays steps from a CUDA graph only on a CUDA device; on "
                              f"{self.device.type} the steps run eagerly", RuntimeWarning, stacklevel=2)
            from .step_graph import GraphedTrainStep

            # every row of a batch padded to graph_width: one shape, and at most one more
            # sequence a row (the padding's own run of positions)
            most = max((r.position_ids.count(0) for r in rows), default=1) + 1
            self.graphed = GraphedTrainStep(model, self.optimizer, max_grad_norm=cfg.max_grad_norm,
                                            max_sequences=cfg.batch_size * most,
                                            sum_across_processes=self.group is not None)
        steps_per_epoch = math.ceil(len(rows) / (cfg.batch_size * self.world * cfg.gradient_accumulation_steps))
        self.total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_epochs))
        self.step = 0
        self.position = (0, 0)  # (epoch, batch index) of the next micro-batch
        self.history: list[dict[str, float]] = []

    def _step_mode(self, rows) -> tuple[bool, str]:
        """Whether the steps replay a CUDA graph, and a line saying so (or why not).
        cuda_graph=True: always (checked by the config); "auto": on CUDA devices (one process
        or several), with settings a graph can replay and rows that padding to one width (the
        longest row's) grows by at most a third over what eager steps run, each batch padded
        to its own longest row (the graph's step costs what a full-width step does)."""
        cfg = self.cfg
        graphed = "training steps replayed from a CUDA graph (cuda_graph=false turns it off)"
        if cfg.cuda_graph is False:  # the config holds True, False or "auto"
            return False, "eager training steps (cuda_graph=false)"
        if cfg.cuda_graph is True:
            return True, graphed
        if self.device.type != "cuda":
            return False, f"eager training steps (on {self.device.type}; a CUDA graph needs a CUDA device)"
        blockers = cfg.graph_blockers()
        if blockers:
            why = "; ".join(self._blocker_reason(b) for b in blockers)
            return False, f"eager training steps (a CUDA graph cannot replay them with {why})"
        width = graph_width(rows, cfg.max_seq_length)
        eager, padded = padded_tokens(rows, cfg.batch_size, self.world, cfg.seed, width)
        if padded * 3 > 4 * eager:
            return False, (f"eager training steps (padded to one width for a CUDA graph, {width} tokens, "
                           f"the batches would run {padded / max(eager, 1):.1f}x the tokens of eager steps, which pad "
                           f"each batch to its own longest row; "
                           + ("packing=true packs short examples, " if not cfg.packing else "")
                           + "cuda_graph=true insists)")
        return True, graphed

    def _blocker_reason(self, key: str) -> str:
        """One setting that keeps the steps eager: its value, why, and what a graph replays."""
        cfg = self.cfg
        if key == "optim":
            # AdamW's two fp32 moments against bitsandbytes' two 8-bit ones: 6 bytes a parameter
            extra = 6 * sum(p.numel() for p in self.params) / 2**20
            return (f"optim={cfg.optim!r}: bitsandbytes' 8-bit step takes its step count and rate from the host; "
                    f"optim='adamw' replays, its state {extra:.0f} MiB larger for these adapters")
        return (f"use_gradient_checkpointing={cfg.use_gradient_checkpointing!r}: the offloaded activations' "
                "pinned host buffers are allocated during the step; True replays")

    # -- state -------------------------------------------------------------------------
    def _rows(self, examples) -> list:
        cfg = self.cfg
        return (pack_examples(examples, cfg.max_seq_length, cfg.seed) if cfg.packing
                else unpacked_rows(examples, cfg.max_seq_length))

    @torch.no_grad()
    def evaluate(self, rows=None) -> float:
        """The mean loss a label token on ``rows`` (default: the eval set): every token weighs
        the same however the rows are packed or split over processes."""
        rows = self.eval_rows if rows is None else rows
        if not rows:
            raise ValueError("there is no eval set: give eval_dataset or eval_split")
        was_training = self.model.training
        self.model.eval()
        rank = self.group.rank if self.group is not None else 0
        total, count = 0.0, 0
        try:
            for start in range(rank * self.cfg.batch_size, len(rows), self.cfg.batch_size * self.world):
                batch = collate(rows[start:start + self.cfg.batch_size], self.pad_id)
                n = count_label_tokens(batch)
                if n:  # num_items_in_batch=1: the loss is the sum over this batch's tokens
                    total += float(self.model(**_to_device(batch, self.device), num_items_in_batch=1).loss)
                    count += n
        finally:
            self.model.train(was_training)
        if self.group is not None:
            total = distributed.sum_value(total, self.device)
            count = int(distributed.sum_value(float(count), self.device))
        return total / max(count, 1)

    @property
    def main(self) -> bool:
        """Whether this process writes files and shows progress (the only one, or rank 0)."""
        return self.group is None or self.group.main

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "position": self.position,
                "history": self.history, "config": asdict(self.cfg), "world_size": self.world}

    def resume_from(self, checkpoint: str | Path) -> None:
        from ..api import load_adapter_weights

        state = load_trainer_state(checkpoint)
        if state.get("world_size", 1) != self.world:
            raise ValueError(f"{checkpoint} was written by {state.get('world_size', 1)} training processes and "
                             f"this run has {self.world}: resume with the same number (its data position counts "
                             f"global batches of that many processes' rows)")
        load_adapter_weights(self.model, checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        # the checkpoint may come from a run in the other mode (eager or graphed): the loaded
        # groups take this run's choice, and AdamW's step counts live where that choice keeps
        # them (on the device for a captured step, on the CPU otherwise)
        capturable = self.graphed is not None and self.device.type == "cuda"
        for group in self.optimizer.param_groups:  # a graphed run saves its rate as a tensor
            group["lr"] = float(group["lr"])
            if "capturable" in group:
                group["capturable"] = capturable
        for st in self.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(self.device if capturable else "cpu", torch.float32)
        if self.graphed is not None:  # the captured step reads the rate from the device
            self.graphed.device_lr()
        self.step, self.position = state["step"], tuple(state["position"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])

    def save(self) -> Path:
        path = Path(self.cfg.output_dir) / f"checkpoint-{self.step}"
        if self.main:
            path = save_checkpoint(self.cfg.output_dir, self.step, self.model, self.state())
            prune_checkpoints(self.cfg.output_dir, self.cfg.save_total_limit)
        if self.group is not None:
            distributed.barrier()  # the checkpoint is complete before any process goes on
        return path

    def _save_adapter(self) -> None:
        if self.main:
            self.model.save_pretrained(Path(self.cfg.output_dir) / "adapter")
        if self.group is not None:
            distributed.barrier()

    # -- the loop ----------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = self.cfg.learning_rate * lr_factor(self.step, self.total_steps, self.cfg.warmup_steps,
                                                self.cfg.lr_scheduler)
        if self.graphed is not None:  # a device tensor the captured step reads
            self.graphed.set_lr(lr)
            return lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, micro_batches: list[dict[str, torch.Tensor] | None], num_items: int | None = None) -> float:
        """One optimizer step over this process's micro-batches (None: no rows here this
        time). ``num_items``: the label tokens of the whole (global) step; by default those of
        ``micro_batches``."""
        if num_items is None:
            num_items = sum(count_label_tokens(b) for b in micro_batches if b is not None)
        if self.graphed is not None:  # micro-batches padded to one shape, no mask, none None
            # CPU tensors: the step copies them in and reads the packed rows' boundaries here
            batches = [{**{k: v for k, v in mb.items() if k != "attention_mask"},
                        "num_items_in_batch": max(num_items, 1)} for mb in micro_batches]
            return float(self.graphed.run(batches))
        self.model.train()
        total = 0.0
        for mb in micro_batches:
            if mb is None:
                continue
            out = self.model(**_to_device(mb, self.device), num_items_in_batch=max(num_items, 1))
            out.loss.backward()
            total += float(out.loss.detach())
        if self.group is not None:
            distributed.sum_gradients(self.params)
            total = distributed.sum_value(total, self.device)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def train(self) -> list[dict[str, float]]:
        cfg = self.cfg
        if cfg.resume and (ckpt := latest_checkpoint(cfg.output_dir)) is not None:
            self.resume_from(ckpt)  # restores the RNG state saved with the checkpoint
        elif self.step == 0:
            random.seed(cfg.seed)  # dropout and sampling replay the same way run after run
            torch.manual_seed(cfg.seed)
            lora_dropout_state.manual_seed(cfg.seed)
        rank = self.group.rank if self.group is not None else 0
        if self.main:  # the metrics file starts as the history so far (empty, or the resumed one)
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.history),
                                                            encoding="utf-8")
        batches = iterate_batches(self.rows, cfg.batch_size * self.world, cfg.seed, *self.position)
        progress = Progress(self.total_steps, self.step, enabled=cfg.progress and self.main, device=self.device)
        if self.device.type == "cuda" and self.main and cfg.progress:  # where the choice matters, say it
            progress.write(self.step_mode)
        try:
            while self.step < self.total_steps:
                lr = self._set_lr()
                micro, tokens, num_items, position = [], 0, 0, self.position
                for _ in range(cfg.gradient_accumulation_steps):
                    epoch, index, rows = next(batches)
                    # every process counts the whole global micro-batch's tokens (from its rows:
                    # the same count everywhere, no communication) and trains its own slice of it
                    tokens += sum(len(self.rows[i]) for i in rows)
                    num_items += sum(row_label_tokens(self.rows[i]) for i in rows)
                    mine = rows[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                    # a graphed step takes one shape: full width, and an epoch's short last
                    # batch filled with rows of padding (no label counts in them); one process's
                    # batch, and a process whose slice is empty a batch of padding alone (it
                    # still takes part in the step's all-reduce)
                    if self.graphed is not None:
                        micro.append(collate([self.rows[i] for i in mine], self.pad_id, self.graph_width,
                                             cfg.batch_size))
                    else:
                        micro.append(collate([self.rows[i] for i in mine], self.pad_id) if mine else None)
                    position = (epoch, index + 1)
                t0 = time.perf_counter()
                loss = self.train_step(micro, num_items)
                dt = time.perf_counter() - t0
                # only a finished step moves the data position (a checkpoint taken on
                # interruption then replays the unfinished step)
                self.step, self.position = self.step + 1, position
                record = {"step": self.step, "loss": loss, "lr": lr, "tokens": tokens, "seconds": dt}
                last = self.step == self.total_steps
                if self.eval_rows and ((cfg.eval_steps and self.step % cfg.eval_steps == 0) or last):
                    record["eval_loss"] = self.evaluate()
                    if self.main:
                        progress.write(f"step {self.step}: eval loss {record['eval_loss']:.4f}")
                self.history.append(record)
                progress.update(record)
                if self.main:  # one JSON line a step, for watching a run from outside
                    with open(Path(cfg.output_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save()
        except KeyboardInterrupt:
            progress.close()
            if self.main:  # the others may be gone already: no barrier
                path = save_checkpoint(cfg.output_dir, self.step, self.model, self.state())
                self.model.save_pretrained(Path(cfg.output_dir) / "adapter")
                print(f"\ninterrupted at step {self.step}: adapter saved to {Path(cfg.output_dir) / 'adapter'}, "
                      f"resumable checkpoint at {path} (rerun with --resume)")
            raise
        progress.close()
        self.save()
        self._save_adapter()
        if cfg.plot and self.main:
            from .plot import plot_loss

            plot_loss(self.history, Path(cfg.output_dir) / "loss.png")
        return self.history
