"""Data parallelism for the training loop across the processes ``torchrun`` starts.

Each process holds the whole (4-bit) model on its own GPU (``cuda:LOCAL_RANK``; gloo on the
CPU) and trains on its slice of every global micro-batch. The loss of a step is each token's
loss summed over all processes' rows and divided by the label tokens of the whole global
step, so the gradients that the processes sum are those of one process training the global
batch (the same math, summed in another order). The summation is one ``all_reduce`` of the
trainable parameters' gradients per optimizer step, after the last micro-batch: LoRA
gradients are small (~160 MB in fp32 for an 8B model at r = 16), so overlapping it with the
backward (what DDP's hooks do) would save little, and doing it once keeps the model's own
checkpointing and autograd Functions free of communication hooks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place among ``world`` data-parallel processes."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None) -> tuple[Group | None, str | None]:
    """(the group, this process's device) under torchrun; (None, ``device``) otherwise.

    Joins the default process group once (NCCL for CUDA devices, gloo on the CPU). With
    several processes the device is ``cuda:LOCAL_RANK`` unless ``device`` says cpu."""
    if not launched():
        return None, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or not str(device).startswith("cpu"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                             f"start at most that many processes a node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), local_rank), device


def current() -> Group | None:
    """The group this process already joined, if any (several processes only)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over the processes: one all_reduce of
    one flat buffer (a parameter without a gradient here counts as zeros)."""
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def sum_value(value: float, device: torch.device) -> float:
    """A number summed over the processes."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_parameters(params: list[torch.nn.Parameter], src: int = 0) -> None:
    """Every process starts from process ``src``'s trainable parameters."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src)


def barrier() -> None:
    dist.barrier()
