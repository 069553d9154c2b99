"""The offload arenas of one model, planned from the batch shape and reused every step.

An :class:`OffloadArenaCache` belongs to one model (one layer stack). Each training pass
(forward, then its backward) leases one arena: normally the same one every step, so after the
first step of a shape nothing is allocated on the host. A longer batch re-plans and grows the
slab (it never shrinks); a shorter one reuses it. A second forward started before the first
one's backward (two live graphs) leases a second arena. Host memory is checked at each
(re)plan: checkpoints that would not fit stay on the GPU, with one warning per cache.
"""
from __future__ import annotations

import threading
import warnings
import weakref

import torch

from . import offload_plan
from ._ext import ext, require_cuda
from .offload_plan import OffloadPlan, plan_offload

DEFAULT_TOKEN_QUANTUM = 128  # capacity grows in steps of this many tokens, to re-plan rarely


class Arena:
    """One compiled arena (``fastqlora._C.OffloadArena``) with the plan its slots follow."""

    def __init__(self, device: torch.device):
        self.device = device
        use_cuda = device.type == "cuda"
        if use_cuda:
            require_cuda("activation offload of CUDA tensors")
        self.native = ext().OffloadArena(use_cuda, (device.index or 0) if use_cuda else 0)
        self.plan: OffloadPlan | None = None
        self.leased = False

    @property
    def allocations(self) -> int:
        """Host slab allocations so far (the first plan, then one per growth)."""
        return int(self.native.allocations)


class OffloadArenaCache:
    """Arenas for one model's layer stack. Pass one per model to ``run_layers``.

    ``ring`` is how many device buffers of layer inputs may have copies in flight in the
    forward, and how many layer inputs are fetched ahead (ring - 1) in the backward.
    ``host_budget`` (bytes) fixes the host memory the slab may take; None reads it from the
    host at each plan (see :func:`fastqlora.offload_plan.host_budget_bytes`).
    """

    def __init__(self, ring: int = 2, alignment: int = offload_plan.DEFAULT_ALIGNMENT,
                 token_quantum: int = DEFAULT_TOKEN_QUANTUM, host_budget: int | None = None,
                 host_reserve: int | None = None):
        if token_quantum < 1:
            raise ValueError(f"token_quantum must be >= 1, got {token_quantum}")
        self.ring = ring
        self.alignment = alignment
        self.token_quantum = token_quantum
        self.host_budget = host_budget
        self.host_reserve = host_reserve
        self.arenas: list[Arena] = []
        self.warnings = 0
        self._lock = threading.Lock()

    def acquire(self, num_layers: int, hidden: torch.Tensor) -> Arena:
        """Lease an arena whose plan holds ``num_layers`` checkpoints shaped like ``hidden``."""
        width = int(hidden.shape[-1])
        tokens = hidden.numel() // max(width, 1)
        return self._acquire(num_layers, max(tokens, 1), width, hidden.element_size(), hidden.device)

    def prepare(self, num_layers: int, tokens: int, hidden: int, dtype: torch.dtype,
                device: torch.device | str) -> OffloadPlan:
        """Plan (and pin) the slab before the first step, for batches of up to ``tokens``
        tokens (batch x sequence), so that training never grows it. Returns the plan."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        arena = self._acquire(num_layers, tokens, hidden, itemsize, torch.device(device))
        self.release(arena)
        return arena.plan

    def _acquire(self, num_layers: int, tokens: int, width: int, dtype_bytes: int,
                 device: torch.device) -> Arena:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with self._lock:
            free = [a for a in self.arenas if not a.leased and a.device == device]
            # Prefer an arena that fits without growing, then the biggest (the cheapest to grow).
            free.sort(key=lambda a: (not (a.plan and a.plan.fits(num_layers, tokens, width, dtype_bytes)),
                                     -a.native.capacity))
            arena = free[0] if free else None
            if arena is None:
                arena = Arena(device)
                self.arenas.append(arena)
            arena.leased = True
        try:
            self._fit(arena, num_layers, tokens, width, dtype_bytes)
        except BaseException:
            self.release(arena)
            raise
        return arena

    def release(self, arena: Arena) -> None:
        with self._lock:
            arena.leased = False

    def _fit(self, arena: Arena, num_layers: int, tokens: int, width: int, dtype_bytes: int) -> None:
        old = arena.plan
        if old is not None and old.fits(num_layers, tokens, width, dtype_bytes):
            return  # the same or a shorter batch: same slab, same slots, no allocation
        same_geometry = old is not None and (old.num_layers, old.hidden, old.dtype_bytes) == (
            num_layers, width, dtype_bytes)
        capacity = max(tokens, old.tokens if same_geometry else 0)
        capacity = -(-capacity // self.token_quantum) * self.token_quantum
        budget = self.host_budget
        if budget is None:
            # The slab we hold now is freed before a bigger one is allocated: count it as free.
            budget = offload_plan.host_budget_bytes(self.host_reserve) + int(arena.native.capacity)
        plan = plan_offload(num_layers, capacity, width, dtype_bytes, self.ring, self.alignment, budget)
        try:
            arena.native.reserve(plan.slab_bytes)
        except RuntimeError as exc:  # pinning failed although the budget allowed it
            self._warn(f"fastqlora offload: could not pin {plan.slab_bytes} bytes of host memory ({exc}); "
                       "every layer's checkpoint stays on the GPU for this batch shape.")
            plan = plan_offload(num_layers, capacity, width, dtype_bytes, self.ring, self.alignment, 0)
        arena.native.set_slots(list(plan.offsets), [plan.slot_bytes] * plan.host_layers)
        arena.plan = plan
        if plan.short_of_host:
            want = plan.wanted_host_layers * plan.slot_stride
            self._warn(
                f"fastqlora offload: the checkpoints of {plan.wanted_host_layers} layers need "
                f"{offload_plan.fmt_bytes(want)} of pinned host memory but only "
                f"{offload_plan.fmt_bytes(max(budget, 0))} can be spared; the checkpoints of layers "
                f"{plan.host_layers}..{num_layers - 2} stay on the GPU "
                f"(+{offload_plan.fmt_bytes((plan.wanted_host_layers - plan.host_layers) * plan.slot_bytes)} "
                f"of GPU memory). Set {offload_plan.ENV_HOST_BYTES} to change the budget.")

    def _warn(self, message: str) -> None:
        if self.warnings == 0:  # say it once per model, not once per step
            warnings.warn(message, RuntimeWarning, stacklevel=5)  # points at run_layers' caller
        self.warnings += 1


_default_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_cache(owner: object) -> OffloadArenaCache:
    """The cache of a layer stack when the caller passes none (kept as long as ``owner`` lives)."""
    cache = _default_caches.get(owner)
    if cache is None:
        cache = _default_caches[owner] = OffloadArenaCache()
    return cache
