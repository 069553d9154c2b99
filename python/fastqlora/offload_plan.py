"""The plan of the activation-offload arena: how big the host slab is, where each layer's
checkpoint sits in it, and which layers keep theirs on the GPU because host memory is short.

A plan is pure arithmetic on (layers, tokens, hidden size, dtype bytes, ring, host budget), so
it is tested without any device. ``host_budget_bytes`` reads what the host can spare:
``MemAvailable`` from /proc/meminfo (psutil elsewhere), capped by a cgroup limit, less a reserve.
``FASTQLORA_OFFLOAD_HOST_BYTES`` (bytes, or with a K/M/G/T suffix, binary) overrides it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

GiB = 1 << 30
DEFAULT_ALIGNMENT = 256  # slot starts: a multiple of the DMA engines' preferred alignment
ENV_HOST_BYTES = "FASTQLORA_OFFLOAD_HOST_BYTES"


@dataclass(frozen=True)
class OffloadPlan:
    """Where every layer's checkpoint lives for batches of up to ``tokens`` tokens.

    Layers ``[0, host_layers)`` put their input into slot ``i`` of the host slab at
    ``offsets[i]``; layers ``[host_layers, num_layers)`` keep theirs on the GPU. The last
    layer always keeps its input on the GPU: backward needs it first, so a round trip
    through the host would only add a wait.
    """

    num_layers: int
    tokens: int
    hidden: int
    dtype_bytes: int
    ring: int
    alignment: int
    slot_bytes: int  # one checkpoint: tokens * hidden * dtype_bytes
    slot_stride: int  # slot_bytes rounded up to the alignment
    host_layers: int
    offsets: tuple[int, ...]
    slab_bytes: int
    budget_bytes: int | None  # host bytes the plan was allowed (None: unlimited)

    @property
    def wanted_host_layers(self) -> int:
        return max(self.num_layers - 1, 0)

    @property
    def short_of_host(self) -> bool:
        """True when host memory forced some checkpoints that would go to the host to stay on the GPU."""
        return self.host_layers < self.wanted_host_layers

    @property
    def gpu_layers(self) -> range:
        return range(self.host_layers, self.num_layers)

    @property
    def device_bytes(self) -> int:
        """GPU bytes for checkpoints: the ring of in-flight inputs plus the layers kept there."""
        return (self.ring + len(self.gpu_layers)) * self.slot_bytes

    def fits(self, num_layers: int, tokens: int, hidden: int, dtype_bytes: int) -> bool:
        """Whether a batch of this shape can reuse this plan (and its slab) as it is."""
        return (num_layers, hidden, dtype_bytes) == (self.num_layers, self.hidden, self.dtype_bytes) and (
            tokens <= self.tokens
        )

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers x {self.tokens} tokens x {self.hidden} x {self.dtype_bytes} B: "
            f"{self.host_layers} checkpoints of {fmt_bytes(self.slot_bytes)} in a {fmt_bytes(self.slab_bytes)} "
            f"host slab, {len(self.gpu_layers)} on the GPU ({fmt_bytes(self.device_bytes)} with the ring of {self.ring})"
        )


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def plan_offload(
    num_layers: int,
    tokens: int,
    hidden: int,
    dtype_bytes: int,
    ring: int = 2,
    alignment: int = DEFAULT_ALIGNMENT,
    host_budget: int | None = None,
) -> OffloadPlan:
    """Plan the slab for ``num_layers`` checkpoints of ``tokens x hidden`` elements.

    ``host_budget`` caps the slab (None: no cap); the layers that do not fit keep their
    checkpoints on the GPU, counting from the top of the stack down, since backward reaches
    those first.
    """
    for name, value, least in (("num_layers", num_layers, 1), ("tokens", tokens, 1), ("hidden", hidden, 1),
                               ("dtype_bytes", dtype_bytes, 1), ("ring", ring, 2), ("alignment", alignment, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"plan_offload: {name} must be an integer >= {least}, got {value!r}")
    if ring > 8:
        raise ValueError(f"plan_offload: ring must be 2 to 8 device buffers, got {ring}")
    if alignment & (alignment - 1):
        raise ValueError(f"plan_offload: alignment must be a power of two, got {alignment}")
    slot_bytes = tokens * hidden * dtype_bytes
    stride = _round_up(slot_bytes, alignment)
    host_layers = max(num_layers - 1, 0)
    if host_budget is not None:
        host_layers = min(host_layers, max(int(host_budget), 0) // stride)
    offsets = tuple(i * stride for i in range(host_layers))
    return OffloadPlan(num_layers=num_layers, tokens=tokens, hidden=hidden, dtype_bytes=dtype_bytes,
                       ring=ring, alignment=alignment, slot_bytes=slot_bytes, slot_stride=stride,
                       host_layers=host_layers, offsets=offsets, slab_bytes=host_layers * stride,
                       budget_bytes=None if host_budget is None else int(host_budget))


def parse_bytes(text: str) -> int:
    """'123', '64G', '1.5GiB', '512M' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{ENV_HOST_BYTES}={text!r}: expected a byte count such as 68719476736, 64G or 64GiB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), if it has one."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            return max(limit - usage, 0)
    return None


def host_memory() -> tuple[int, int]:
    """(available, total) host memory in bytes, as the kernel and the cgroup see it."""
    available = total = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        available, total = info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError):
        pass
    if available is None or total is None:
        try:
            import psutil
        except ImportError as exc:
            raise RuntimeError("cannot read the host's free memory: no /proc/meminfo and no psutil; "
                               f"set {ENV_HOST_BYTES} to the bytes offload may pin") from exc
        vm = psutil.virtual_memory()
        available, total = int(vm.available), int(vm.total)
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = min(available, headroom)
    return int(available), int(total)


def default_reserve(total: int) -> int:
    """Host memory left alone for everything else: 2 GiB or 5% of the total, whichever is more."""
    return max(2 * GiB, total // 20)


def host_budget_bytes(reserve: int | None = None) -> int:
    """Bytes of host memory that pinned checkpoints may take now (never negative)."""
    env = os.environ.get(ENV_HOST_BYTES)
    if env:
        return parse_bytes(env)
    available, total = host_memory()
    return max(available - (default_reserve(total) if reserve is None else reserve), 0)
