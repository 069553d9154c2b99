"""The offload arena: its plan (slab size, offsets, growth, host-memory fallback), the compiled
arena's copies and checks, the order of copies in a training step, and on a GPU the side
stream and events."""
from __future__ import annotations

import warnings

import pytest
import torch
from toy_decoder import ToyModel, clone_with, micro_batch, train_steps

import fastqlora._C as C
from fastqlora import offload_plan
from fastqlora.offload import OffloadArenaCache
from fastqlora.offload_plan import GiB, parse_bytes, plan_offload

# ---------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize("layers,tokens,hidden,dtype_bytes,ring", [
    (32, 2048, 4096, 2, 2),     # Llama-3-8B, bf16: 16 MiB a checkpoint
    (16, 1000, 2048, 2, 3),     # Llama-3.2-1B, a length that is no multiple of anything
    (5, 7, 24, 4, 2),           # the toy stack in fp32: 672 B, padded to 768
    (1, 64, 64, 2, 2),          # one layer: its input stays on the GPU, no slab
])
def test_plan_sizes_and_offsets(layers, tokens, hidden, dtype_bytes, ring):
    plan = plan_offload(layers, tokens, hidden, dtype_bytes, ring=ring)
    slot = tokens * hidden * dtype_bytes
    stride = -(-slot // 256) * 256
    assert plan.slot_bytes == slot and plan.slot_stride == stride and stride % 256 == 0
    assert plan.host_layers == layers - 1  # the last layer's input stays: backward needs it first
    assert plan.offsets == tuple(i * stride for i in range(layers - 1))
    assert plan.slab_bytes == (layers - 1) * stride
    assert list(plan.gpu_layers) == [layers - 1]
    assert plan.device_bytes == (ring + 1) * slot and not plan.short_of_host
    assert plan.fits(layers, tokens, hidden, dtype_bytes) and plan.fits(layers, 1, hidden, dtype_bytes)
    assert not plan.fits(layers, tokens + 1, hidden, dtype_bytes)
    assert f"{layers - 1} checkpoints" in plan.describe()


def test_plan_budget_keeps_top_layers_on_gpu():
    plan = plan_offload(32, 8192, 4096, 2, host_budget=10 * 64 * (1 << 20) + 5)
    assert plan.host_layers == 10 and plan.short_of_host
    assert list(plan.gpu_layers) == list(range(10, 32))
    assert plan.slab_bytes == 10 * 64 * (1 << 20) <= plan.budget_bytes
    assert plan_offload(4, 8, 8, 2, host_budget=0).host_layers == 0


@pytest.mark.parametrize("kwargs", [dict(num_layers=0), dict(tokens=0), dict(ring=1), dict(ring=9),
                                    dict(alignment=100), dict(dtype_bytes=True)])
def test_plan_rejects_bad_arguments(kwargs):
    args = dict(num_layers=4, tokens=16, hidden=8, dtype_bytes=2) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        plan_offload(**args)


def test_host_budget_reading(monkeypatch):
    monkeypatch.delenv(offload_plan.ENV_HOST_BYTES, raising=False)
    available, total = offload_plan.host_memory()
    assert 0 < available <= total
    monkeypatch.setattr(offload_plan, "host_memory", lambda: (40 * GiB, 100 * GiB))
    assert offload_plan.host_budget_bytes() == 35 * GiB  # 5% reserve
    assert offload_plan.host_budget_bytes(reserve=GiB) == 39 * GiB
    monkeypatch.setattr(offload_plan, "host_memory", lambda: (GiB, 8 * GiB))
    assert offload_plan.host_budget_bytes() == 0  # never negative, never more than is there
    monkeypatch.setenv("FASTQLORA_OFFLOAD_HOST_BYTES", "1.5GiB")
    assert offload_plan.host_budget_bytes() == 3 * GiB // 2
    assert parse_bytes("64G") == 64 * GiB and parse_bytes("4096") == 4096 and parse_bytes("2m") == 2 << 20
    with pytest.raises(ValueError, match="FASTQLORA_OFFLOAD_HOST_BYTES"):
        parse_bytes("lots")


# ---------------------------------------------------------------------------------------
# the cache: growth, reuse, no allocation after the first step of a shape


def test_cache_grows_reuses_and_never_shrinks():
    cache = OffloadArenaCache(token_quantum=8, host_budget=1 << 30)
    shapes = [(1, 10), (1, 10), (2, 5), (1, 3), (3, 12), (1, 16), (2, 20), (1, 7)]
    seen = []
    for b, t in shapes:
        arena = cache.acquire(6, torch.empty(b, t, 32))
        seen.append((arena.allocations, arena.native.host_ptr, arena.native.capacity, arena.plan.tokens))
        cache.release(arena)
    assert len(cache.arenas) == 1
    allocations = [s[0] for s in seen]
    # 10 tokens -> 16 (one slab); 10, 10, 3 fit; 36 -> 40 grows; 16 fits; 40 fits; 7 fits
    assert allocations == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [s[3] for s in seen] == [16, 16, 16, 16, 40, 40, 40, 40]
    assert seen[0][1] == seen[1][1] == seen[3][1]  # the same host slab across steps
    caps = [s[2] for s in seen]
    assert caps == sorted(caps) and caps[-1] >= 5 * 40 * 32 * 4


def test_prepare_plans_before_the_first_step():
    torch.manual_seed(0)
    cache = OffloadArenaCache(token_quantum=1, host_budget=1 << 30)
    plan = cache.prepare(5, 2 * 40, 24, torch.float32, "cpu")  # batch 2 x 40 tokens
    assert plan.tokens == 80 and plan.host_layers == 4 and cache.arenas[0].allocations == 1
    model = ToyModel(mode="offload", arena_cache=cache)
    for lengths in ([[30, 10], [40]], [[17]], [[40, 40]]):
        model(*micro_batch(0, lengths)).backward()
    assert len(cache.arenas) == 1 and cache.arenas[0].allocations == 1


def test_training_allocates_only_on_first_step_of_a_shape():
    torch.manual_seed(0)
    cache = OffloadArenaCache(token_quantum=1, host_budget=1 << 30)
    model = ToyModel(mode="offload", arena_cache=cache)
    arena_log = []
    for lengths in ([[6, 6]], [[12]], [[4, 8]], [[40]], [[40]], [[9]]):  # 12 tokens: an 8 KiB slab
        model(*micro_batch(0, lengths)).backward()
        a = cache.arenas[0]
        arena_log.append((a.allocations, a.native.host_ptr, a.native.events_created))
    assert [x[0] for x in arena_log] == [1, 1, 1, 2, 2, 2]
    assert arena_log[0][1:] == arena_log[2][1:] and arena_log[3][1:] == arena_log[5][1:]


def test_host_memory_short_keeps_some_layers_on_gpu(monkeypatch):
    monkeypatch.delenv(offload_plan.ENV_HOST_BYTES, raising=False)
    torch.manual_seed(0)
    base = ToyModel(layers=6, dropout=0.2)
    steps = [[[[10]], [[4, 4]]], [[[7]]]]
    want = train_steps(clone_with(base, "off"), steps)
    slot = 10 * 24 * 4  # the first batch's checkpoint in bytes (stride: 1024)
    # the host can spare room for two checkpoints beyond the reserve
    monkeypatch.setattr(offload_plan, "host_memory", lambda: (2 * GiB + 2 * 1024 + 100, 16 * GiB))
    cache = OffloadArenaCache(token_quantum=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train_steps(clone_with(base, "offload", cache), steps)
    short = [w for w in caught if "stay on the GPU" in str(w.message)]
    assert len(short) == 1 and "layers 2..4" in str(short[0].message)
    plan = cache.arenas[0].plan
    assert plan.host_layers == 2 and plan.slot_bytes == slot and cache.arenas[0].native.num_slots == 2
    assert cache.arenas[0].native.offloads == 3 * 2  # three micro-batches, two layers on the host
    for (a, b) in ((want[0], got[0]),):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for s1, s2 in zip(want[1], got[1]) for x, y in zip(s1, s2))


# ---------------------------------------------------------------------------------------
# the compiled arena


def test_native_arena_copies_and_checks():
    a = C.OffloadArena(False)
    assert a.capacity == 0 and a.allocations == 0 and not a.use_cuda
    assert a.reserve(1000) and a.capacity == 4096 and a.host_ptr % 4096 == 0
    assert not a.reserve(4000) and a.allocations == 1  # fits: no new allocation, never shrinks
    a.set_slots([0, 1024], [1000, 1000])
    x = torch.randn(250)
    a.offload(1, x.data_ptr(), 1000, 0)
    assert a.is_done(1) and a.slot_filled(1) == 1000
    assert torch.equal(torch.frombuffer(bytearray(a.slot_memory(1)), dtype=torch.float32), x)
    y = torch.empty(250)
    a.prefetch(1, y.data_ptr(), 1000, 0)
    a.wait_ready(1, 0)
    assert torch.equal(x, y) and a.offloads == 1 and a.prefetches == 1
    with pytest.raises(IndexError, match="slot 2 is out of range"):
        a.offload(2, x.data_ptr(), 4, 0)
    with pytest.raises(ValueError, match="do not fit slot 0"):
        a.offload(0, x.data_ptr(), 1004, 0)
    with pytest.raises(ValueError, match="prefetch before offload"):
        a.prefetch(0, y.data_ptr(), 4, 0)
    with pytest.raises(ValueError, match="does not fit the slab"):
        a.set_slots([4000], [200])
    assert a.reserve(10_000) and a.allocations == 2 and a.num_slots == 0  # growing forgets the slots


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a usable GPU")
def test_native_arena_without_cuda_names_the_problem():
    with pytest.raises(RuntimeError, match="CUDA"):
        C.OffloadArena(True, 0)


class _Spy:
    """Records the compiled arena's calls (in order) next to the layers' own runs."""

    def __init__(self, native, log):
        self._native, self._log = native, log

    def __getattr__(self, name):
        attr = getattr(self._native, name)
        if name in ("offload", "prefetch", "wait_ready", "wait_done"):
            def call(slot, *args):
                self._log.append((name, slot))
                return attr(slot, *args)
            return call
        return attr


def test_copy_order_in_a_step():
    torch.manual_seed(0)
    n = 5
    cache = OffloadArenaCache(host_budget=1 << 30)
    model = ToyModel(layers=n, mode="offload", arena_cache=cache)
    ids, ctx, labels = micro_batch(0, [[6, 7]])
    model(ids, ctx, labels).backward()  # first step: makes the arena
    log = []
    cache.arenas[0].native = _Spy(cache.arenas[0].native, log)
    for layer in model.layers:
        layer.log = log
    loss = model(ids, ctx, labels)
    forward, log[:] = list(log), []
    # forward: layer i's input leaves for the host before layer i runs; the top one stays
    assert forward == [e for i in range(n) for e in ((("offload", i),) if i < n - 1 else ()) + (("run", i),)]
    loss.backward()
    pos = {e: k for k, e in enumerate(log)}
    assert ("prefetch", n - 1) not in pos and ("offload", 0) not in pos
    for i in range(n - 1):
        # layer i's input is fetched while layer i+1 recomputes, and waited for only before layer i runs
        assert pos[("prefetch", i)] < pos[("run", i + 1)] < pos[("wait_ready", i)] < pos[("run", i)]
    assert [e for e in log if e[0] == "run"] == [("run", i) for i in reversed(range(n))]


# ---------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gpu_modes_equal_bit_for_bit(dropout):
    torch.manual_seed(0)
    base = ToyModel(hidden=64, layers=6, dropout=dropout)
    steps = [[[[40, 60]], [[33]]], [[[128], [128]]], [[[7]]]]
    runs = {}
    for mode in ("off", True, "offload"):
        cache = OffloadArenaCache(token_quantum=32) if mode == "offload" else None
        runs[mode] = train_steps(clone_with(base, mode, cache).cuda(), steps)
    for mode in (True, "offload"):
        assert all(torch.equal(a, b) for a, b in zip(runs["off"][0], runs[mode][0]))
        for s1, s2 in zip(runs["off"][1], runs[mode][1]):
            assert all(torch.equal(a, b) for a, b in zip(s1, s2))


@pytest.mark.gpu
def test_gpu_bf16_autocast_modes_equal():
    torch.manual_seed(0)
    base = ToyModel(hidden=128, layers=4, dropout=0.1)
    steps = [[[[100, 156]], [[77]]]]
    runs = {}
    for mode in ("off", "offload"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs[mode] = train_steps(clone_with(base, mode, OffloadArenaCache()).cuda(), steps)
    assert all(torch.equal(a, b) for a, b in zip(runs["off"][0], runs["offload"][0]))
    assert all(torch.equal(a, b) for a, b in zip(runs["off"][1][0], runs["offload"][1][0]))


@pytest.mark.gpu
def test_gpu_forward_copies_on_side_stream():
    torch.manual_seed(0)
    cache = OffloadArenaCache()
    model = ToyModel(hidden=64, layers=4, mode="offload", arena_cache=cache).cuda()
    inputs = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone()))
    ids, ctx, labels = micro_batch(0, [[100, 28]], device="cuda")
    loss = model(ids, ctx, labels)
    arena = cache.arenas[0].native
    assert arena.use_cuda and arena.side_stream not in (0, torch.cuda.current_stream().cuda_stream)
    assert arena.events_created >= 1 + 2 * 3 and arena.offloads == 3
    arena.synchronize()
    for i in range(3):
        host = torch.frombuffer(bytearray(arena.slot_memory(i)), dtype=torch.float32)
        assert torch.equal(host, inputs[i].flatten().cpu())
    loss.backward()
    assert arena.prefetches == 3


@pytest.mark.gpu
def test_gpu_copies_wait_for_the_compute_stream_by_event():
    a = C.OffloadArena(True, torch.cuda.current_device())
    n = 1 << 22
    a.reserve(4 * n)
    a.set_slots([0], [4 * n])
    stream = torch.cuda.current_stream().cuda_stream
    x = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # keep the compute stream busy ~0.1 s
    x.fill_(7.0)  # queued behind the sleep
    a.offload(0, x.data_ptr(), 4 * n, stream)
    assert not a.is_done(0)  # the copy waits for the fill on the GPU; the host did not block
    a.wait_done(0, stream)
    torch.cuda.current_stream().synchronize()
    assert a.is_done(0)
    assert torch.equal(torch.frombuffer(bytearray(a.slot_memory(0)), dtype=torch.float32), torch.full((n,), 7.0))
    y = torch.empty(n, device="cuda")
    torch.cuda._sleep(200_000_000)
    y.fill_(3.0)  # an earlier user of the destination: the prefetch must land after it
    a.prefetch(0, y.data_ptr(), 4 * n, stream)
    assert not a.is_ready(0)
    a.wait_ready(0, stream)
    z = y * 1  # on the compute stream, after the wait
    assert torch.equal(z, torch.full((n,), 7.0, device="cuda"))
