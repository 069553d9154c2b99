"""Activation offload against plain gradient checkpointing: step time, peak GPU memory, GPU
bytes per token of sequence, and the longest sequence that trains.

Three parts (sub-commands), each printing a table and writing JSON (--out):

* ``synthetic`` (runs now): a stack of big matmul layers (hidden 4096, the Llama-3-8B MLP:
  frozen bf16 gate/up/down, a trainable rank-16 adapter) at 8192 and 32768 tokens, modes off /
  checkpoint / offload / offload with the MLP tiled. Shows whether the copies hide behind
  compute, and measures the two rates that decide it.
* ``model`` (needs FastLanguageModel.get_peft_model and benchmarks/random_checkpoint.py):
  Llama-3-8B shape in 4-bit, batch 1, step time (forward + backward + AdamW step) of offload
  against checkpoint at 2048, 8192 and 32768 tokens (target: offload <= 1.03x), peak GPU
  memory of each, and GPU bytes per token (the slope of peak memory against length).
* ``longest``: the longest sequence that trains one step, per mode (fastqlora "checkpoint",
  "offload", and "hf" = transformers + PEFT + bitsandbytes), by doubling then bisecting, each
  trial in a subprocess with a time cap.

Floors (H100 SXM: ~790 TFLOP/s bf16 measured on 8192^3; pinned PCIe gen5 x16 copies: ~50 GB/s
at best, measured by the synthetic part). A checkpoint is T x 4096 x 2 B = 8 KiB a token; one
layer's forward is 2 x T x P FLOPs (P = 176M weights in the synthetic layer, 218M in a Llama-3-8B
layer, plus attention). Per layer and token: copy 8 KiB / 50 GB/s = 0.16 ns, forward
2 x 218M / 790 TFLOP/s = 0.55 ns. So a copy needs ~30% of a forward layer's time and ~10% of
a recompute + backward layer's: offload can hide entirely (floor: 1.00x of checkpoint). At
~25 GB/s (gen4, or a VM) it is still ~60% of a forward layer. The host slab holds
(layers - 1) x 8 KiB a token: 248 KiB a token for 32 layers, ~95 GiB at 393,216 tokens.

Commands (GPU; each fits one 10-minute call; ``model`` and ``longest`` write the random
checkpoint first when --ckpt holds none, ~1 min):
    python benchmarks/bench_offload.py synthetic --out $OUT/offload_synthetic.json      # ~1-2 min
    python benchmarks/bench_offload.py model --out $OUT/offload_model.json              # ~4-5 min
    # the target alone: one trial at 393,216 tokens, ~6-8 min of attention-bound compute
    python benchmarks/bench_offload.py --gpu-gib 79 longest --modes offload --start 393216 --max 393216 \
        --bisect 0 --trial-timeout 1500 --out $OUT/offload_longest.json
    (one step there takes longer than a 10-minute device call: scripts/long_context.sh starts it
    detached and polls it over two calls)
    # a search (doubling from 16k, then bisection), stopped cleanly after --budget-s
    python benchmarks/bench_offload.py longest --modes checkpoint --budget-s 480 --out $OUT/ckpt_longest.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Same allocator settings for every mode and the baseline; set before torch touches CUDA.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
MiB, GiB = 1 << 20, 1 << 30
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OOM_EXIT = 3


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "host": platform.node()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def timed(fn, iters: int, warmup: int, cuda: bool = True) -> list[float]:
    """Milliseconds of each call, by CUDA events (wall clock on the CPU), after warm-up calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if not cuda:  # the CPU smoke run of the synthetic part
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares bytes per token of (tokens, peak bytes) points."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    den = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else None


# ---------------------------------------------------------------------------------------
# synthetic: big matmul layers


class MatmulLayer(nn.Module):
    """A decoder layer stand-in with the Llama-3-8B MLP's compute: frozen bf16 gate/up/down
    behind an RMSNorm, and a trainable rank-16 adapter beside them."""

    def __init__(self, hidden: int, inner: int, rank: int, tile: int | None, dev: str):
        super().__init__()
        dt = torch.bfloat16
        self.register_buffer("norm_w", torch.ones(hidden, device=dev, dtype=dt))
        self.register_buffer("w_gu", torch.randn(2 * inner, hidden, device=dev, dtype=dt) / hidden**0.5)
        self.register_buffer("w_down", torch.randn(hidden, inner, device=dev, dtype=dt) / inner**0.5)
        self.lora_a = nn.Parameter(torch.randn(rank, hidden, device=dev, dtype=dt) / hidden**0.5)
        self.lora_b = nn.Parameter(torch.randn(hidden, rank, device=dev, dtype=dt) * 0.01)
        self.tile = tile

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        g, u = (h @ self.w_gu.t()).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self.w_down.t()

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        from fastqlora.tiling import tiled_apply

        h = F.rms_norm(x, (x.shape[-1],), self.norm_w, 1e-5)
        y = tiled_apply(self.mlp, h, self.tile) if self.tile else self.mlp(h)
        return x + 0.5 * (y + (h @ self.lora_a.t()) @ self.lora_b.t())


def measure_rates(hidden: int, inner: int, tokens: int, cuda: bool) -> dict:
    """The matmul rate on the layer's shape and the pinned copy rates on a checkpoint."""
    if not cuda:
        return {"matmul_tflops": float("nan"), "d2h_gbps": float("nan"), "h2d_gbps": float("nan")}
    a = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * inner, hidden, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(timed(lambda: a @ w.t(), 10, 3))
    host = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
    d2h = statistics.median(timed(lambda: host.copy_(a, non_blocking=True), 10, 3))
    h2d = statistics.median(timed(lambda: a.copy_(host, non_blocking=True), 10, 3))
    nbytes = a.numel() * a.element_size()
    return {"matmul_tflops": 2 * tokens * hidden * 2 * inner / ms / 1e9, "d2h_gbps": nbytes / d2h / 1e6,
            "h2d_gbps": nbytes / h2d / 1e6}


def synthetic(args) -> None:
    from fastqlora.checkpointing import run_layers
    from fastqlora.offload import OffloadArenaCache

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    mem = torch.cuda if cuda else None
    rates = measure_rates(args.hidden, args.inner, min(8192, max(args.tokens)), cuda)
    print(f"matmul {rates['matmul_tflops']:.0f} TFLOP/s, pinned D2H {rates['d2h_gbps']:.1f} GB/s, "
          f"H2D {rates['h2d_gbps']:.1f} GB/s")
    rows = []
    for tile in (None, args.tile):
        if tile is not None and tile <= 0:
            continue
        layers = nn.ModuleList(MatmulLayer(args.hidden, args.inner, 16, tile, args.device)
                               for _ in range(args.layers))
        params = [p for p in layers.parameters() if p.requires_grad]
        modes = args.modes if tile is None else ["offload"]
        for tokens in args.tokens:
            x = torch.randn(1, tokens, args.hidden, device=args.device, dtype=torch.bfloat16)
            for mode in modes:
                cache = OffloadArenaCache(ring=args.ring)

                def step():
                    out = run_layers(layers, x, None, mode, arena_cache=cache)
                    out.float().square().mean().backward()
                    for p in params:
                        p.grad = None

                name = mode if tile is None else f"offload+tile{tile}"
                row = {"mode": name, "tokens": tokens, "layers": args.layers}
                try:
                    if cuda:
                        mem.empty_cache()
                    step()  # first step: plans the arena, warms the allocator
                    base = 0
                    if cuda:
                        mem.synchronize()
                        base = mem.memory_allocated()
                        mem.reset_peak_memory_stats()
                    ms = timed(step, args.iters, 1, cuda)
                    peak = mem.max_memory_allocated() if cuda else 0
                    row.update(ms=statistics.median(ms), ms_all=ms, peak_bytes=peak, peak_over_base=peak - base)
                    if cache.arenas:
                        row["host_slab_bytes"] = cache.arenas[0].native.capacity
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ms_all"}))
            del x
        del layers, params
        if cuda:
            mem.empty_cache()
    # ratios against plain checkpointing, and the compute floor of a checkpointed step
    for r in rows:
        ref = next((c for c in rows if c["mode"] == "checkpoint" and c["tokens"] == r["tokens"]), None)
        if ref and "ms" in r and "ms" in ref:
            r["vs_checkpoint"] = r["ms"] / ref["ms"]
        flops = 2 * r["tokens"] * 3 * args.hidden * args.inner * r["layers"]  # one forward
        r["floor_ms_checkpointed"] = 3 * flops / (rates["matmul_tflops"] * 1e9)  # fwd + recompute + dX
        r["copy_ms_per_layer"] = r["tokens"] * args.hidden * 2 / (min(rates["d2h_gbps"], rates["h2d_gbps"]) * 1e6)
        r["forward_ms_per_layer"] = flops / r["layers"] / (rates["matmul_tflops"] * 1e9)
    per_token = {}
    for mode in {r["mode"] for r in rows}:
        pts = [(r["tokens"], r["peak_over_base"]) for r in rows if r["mode"] == mode and "peak_over_base" in r]
        per_token[mode] = slope(pts)
    print(f"\n{'mode':>18} {'tokens':>7} {'ms':>9} {'vs ckpt':>8} {'peak GiB':>9} {'copy/fwd layer':>15}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['mode']:>18} {r['tokens']:>7} {'OOM':>9}")
            continue
        print(f"{r['mode']:>18} {r['tokens']:>7} {r['ms']:9.1f} {r.get('vs_checkpoint', float('nan')):8.3f} "
              f"{r['peak_bytes'] / GiB:9.2f} {r['copy_ms_per_layer'] / r['forward_ms_per_layer']:15.2f}")
    print("GPU bytes per token (peak above weights):",
          {m: (None if v is None else round(v)) for m, v in per_token.items()})
    write_json(args.out, {"part": "synthetic", "env": environment(), "rates": rates, "rows": rows,
                          "bytes_per_token": per_token, "hidden": args.hidden, "inner": args.inner})


# ---------------------------------------------------------------------------------------
# the model: Llama-3-8B shape in 4-bit (needs the model API and random_checkpoint.py)


def ensure_checkpoint(path: str, shape: str) -> str:
    if (Path(path) / "config.json").is_file():
        return path
    sys.path.insert(0, str(HERE))
    from random_checkpoint import write_random_checkpoint

    t = time.perf_counter()
    write_random_checkpoint(path, shape=shape)
    print(f"wrote a random {shape} checkpoint to {path} in {time.perf_counter() - t:.0f} s")
    return path


def load(ckpt: str, mode: str, max_seq: int):
    """(model, optimizer) for one mode: fastqlora with use_gradient_checkpointing=mode, or
    'hf': transformers + PEFT + bitsandbytes, the canonical QLoRA recipe."""
    if mode == "hf":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=q, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ,
                                                 task_type="CAUSAL_LM"))
        model.train()  # transformers checkpoints layers only in training mode
    else:
        from fastqlora import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(ckpt, max_seq_length=max_seq, load_in_4bit=True)
        gc = {"checkpoint": True, "off": False}.get(mode, mode)  # the public values: True, False, "offload"
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=PROJ, use_gradient_checkpointing=gc)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt


def train_step(model, opt, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def steps_worker(args) -> None:
    """In a subprocess: one mode, each length: step time and peak memory, one JSON line each."""
    cap_gpu_memory()
    model, opt = load(args.ckpt, args.mode, max(args.seqs))
    vocab = model.config.vocab_size
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for seq in args.seqs:
        ids = torch.randint(0, vocab, (1, seq), device="cuda")
        row = {"mode": args.mode, "seq": seq, "weights_bytes": base}
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ms = timed(lambda: train_step(model, opt, ids), args.iters, 1)
            row.update(ms=statistics.median(ms), ms_all=ms, tokens_per_s=seq / statistics.median(ms) * 1e3,
                       peak_bytes=torch.cuda.max_memory_allocated(),
                       peak_reserved=torch.cuda.max_memory_reserved())
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
            opt.zero_grad(set_to_none=True)
        print("ROW " + json.dumps(row), flush=True)


def cap_gpu_memory() -> None:
    """Honour FQ_BENCH_GPU_GIB (set by --gpu-gib): a GPU larger than the target (an H200 standing
    in for an 80 GB H100) allocates no more than that many GiB in this process."""
    gib = float(os.environ.get("FQ_BENCH_GPU_GIB", "0") or 0)
    if gib > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total))


def trial_worker(args) -> None:
    """In a subprocess: does one training step at this length fit? Exit 0, or OOM_EXIT."""
    cap_gpu_memory()
    model, opt = load(args.ckpt, args.mode, args.seq)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    try:
        t = time.perf_counter()
        train_step(model, opt, ids)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        print("RESULT " + json.dumps({"ok": False, "error": "OOM"}), flush=True)
        sys.exit(OOM_EXIT)
    print("RESULT " + json.dumps({"ok": True, "step_s": time.perf_counter() - t,
                                  "peak_bytes": torch.cuda.max_memory_allocated(),
                                  "gpu_cap_gib": float(os.environ.get("FQ_BENCH_GPU_GIB", "0") or 0),
                                  "device": torch.cuda.get_device_name(0)}), flush=True)


def _child(argv: list[str], timeout: float) -> tuple[int | None, list[str], str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out.splitlines(), "timeout"
    return p.returncode, p.stdout.splitlines(), p.stderr[-3000:]


def model_part(args) -> None:
    ckpt = ensure_checkpoint(args.ckpt, args.shape)
    rows = []
    for mode in args.modes:
        rc, lines, err = _child(["_steps", "--ckpt", ckpt, "--mode", mode, "--iters", str(args.iters),
                                 "--seqs", *map(str, args.seqs)], args.timeout)
        got = [json.loads(s[4:]) for s in lines if s.startswith("ROW ")]
        if rc != 0:
            print(f"{mode}: worker exited {rc}: {err}")
        rows += got or [{"mode": mode, "error": f"worker exited {rc}"}]
    for r in rows:
        ref = next((c for c in rows if c["mode"] == "checkpoint" and c.get("seq") == r.get("seq")), None)
        if ref and "ms" in r and "ms" in ref:
            r["vs_checkpoint"] = r["ms"] / ref["ms"]
    per_token = {m: slope([(r["seq"], r["peak_bytes"]) for r in rows if r["mode"] == m and "peak_bytes" in r])
                 for m in args.modes}
    print(f"\n{'mode':>11} {'seq':>7} {'ms':>9} {'tok/s':>8} {'vs ckpt':>8} {'peak GiB':>9}")
    for r in rows:
        if "ms" in r:
            print(f"{r['mode']:>11} {r['seq']:>7} {r['ms']:9.1f} {r['tokens_per_s']:8.0f} "
                  f"{r.get('vs_checkpoint', float('nan')):8.3f} {r['peak_bytes'] / GiB:9.2f}")
        else:
            print(f"{r['mode']:>11} {r.get('seq', '-'):>7} {r.get('error')}")
    print("GPU bytes per token (slope of peak memory):",
          {m: (None if v is None else round(v)) for m, v in per_token.items()})
    write_json(args.out, {"part": "model", "env": environment(), "shape": args.shape, "rows": rows,
                          "bytes_per_token": per_token, "target_vs_checkpoint": 1.03})


def search(fits, start: int, maximum: int, step: int, bisect: int) -> tuple[int, int | None]:
    """(longest length that fits, shortest that failed or None): double from ``start`` while
    it fits (halve if the start fails), then bisect ``bisect`` times to ``step`` tokens."""
    lo, hi, n = 0, None, start
    while n <= maximum:
        if fits(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    while lo == 0 and hi is not None and hi > step:
        n = max(hi // 2 // step * step, step)
        if fits(n):
            lo = n
        else:
            hi = n
    for _ in range(bisect):
        if hi is None or lo == 0 or hi - lo <= step:
            break
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


class _OutOfTime(Exception):
    pass


def longest_part(args) -> None:
    started = time.perf_counter()
    ckpt = ensure_checkpoint(args.ckpt, args.shape)
    results = {}
    for mode in args.modes:
        trials = []

        def fits(seq: int) -> bool:
            if time.perf_counter() - started > args.budget_s:
                raise _OutOfTime
            t = time.perf_counter()
            rc, lines, err = _child(["_trial", "--ckpt", ckpt, "--mode", mode, "--seq", str(seq)], args.trial_timeout)
            res = next((json.loads(s[7:]) for s in lines if s.startswith("RESULT ")), {})
            ok = rc == 0 and res.get("ok", False)
            why = "ok" if ok else ("timeout" if rc is None else res.get("error") or f"exit {rc}: {err[-300:]}")
            trials.append({"seq": seq, "ok": ok, "why": why, "wall_s": time.perf_counter() - t, **res})
            print(f"{mode} seq {seq}: {why} ({time.perf_counter() - t:.0f} s)", flush=True)
            return ok

        complete = True
        try:
            lo, hi = search(fits, args.start, args.max, args.step, args.bisect)
        except _OutOfTime:  # report what the trials so far show
            complete = False
            lo = max((t["seq"] for t in trials if t["ok"]), default=0)
            hi = min((t["seq"] for t in trials if not t["ok"] and t["seq"] > lo), default=None)
            print(f"{mode}: out of time (--budget-s {args.budget_s:.0f}); the search is incomplete")
        pts = [(t["seq"], t["peak_bytes"]) for t in trials if t["ok"] and "peak_bytes" in t]
        results[mode] = {"longest": lo, "first_failure": hi, "complete": complete, "trials": trials,
                         "bytes_per_token": slope(pts)}
    print(f"\n{'mode':>11} {'trains':>9} {'fails at':>9} {'GPU B/token':>12}")
    for mode, r in results.items():
        bpt = r["bytes_per_token"]
        print(f"{mode:>11} {r['longest']:>9} {str(r['first_failure']):>9} {'-' if bpt is None else round(bpt):>12}")
    write_json(args.out, {"part": "longest", "env": environment(), "shape": args.shape, "results": results,
                          "target_tokens": 393216})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("synthetic", help="big matmul layers: do the copies hide behind compute?")
    s.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    s.add_argument("--layers", type=int, default=8)
    s.add_argument("--hidden", type=int, default=4096)
    s.add_argument("--inner", type=int, default=14336)
    s.add_argument("--modes", nargs="+", default=["off", "checkpoint", "offload"],
                   choices=["off", "checkpoint", "offload"])
    s.add_argument("--tile", type=int, default=4096, help="MLP tile for the offload+tile rows (0: none)")
    s.add_argument("--ring", type=int, default=2)
    s.add_argument("--iters", type=int, default=5)
    s.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of tiny shapes")
    s.add_argument("--out", default=str(HERE / "results" / "offload_synthetic.json"))
    for name, help_ in (("model", "Llama-3-8B 4-bit: step time and memory per mode"),
                        ("longest", "Llama-3-8B 4-bit: longest sequence that trains, per mode")):
        m = sub.add_parser(name, help=help_)
        m.add_argument("--ckpt", default="/tmp/fastqlora-random-llama-3-8b")
        m.add_argument("--shape", default="llama-3-8b")
        m.add_argument("--out", default=str(HERE / "results" / f"offload_{name}.json"))
        if name == "model":
            m.add_argument("--modes", nargs="+", default=["checkpoint", "offload"])
            m.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
            m.add_argument("--iters", type=int, default=5)
            m.add_argument("--timeout", type=float, default=900)
        else:
            m.add_argument("--modes", nargs="+", default=["offload", "checkpoint"],
                           help="fastqlora modes, and 'hf' for transformers + PEFT + bitsandbytes")
            m.add_argument("--start", type=int, default=16384)
            m.add_argument("--max", type=int, default=1 << 20)
            m.add_argument("--bisect", type=int, default=3)
            m.add_argument("--step", type=int, default=8192, help="resolution of the bisection, tokens")
            m.add_argument("--trial-timeout", type=float, default=420)
            m.add_argument("--budget-s", type=float, default=float("inf"),
                           help="start no trial after this many seconds (the search is then incomplete)")
    w = sub.add_parser("_steps")
    w.add_argument("--ckpt"), w.add_argument("--mode"), w.add_argument("--iters", type=int)
    w.add_argument("--seqs", type=int, nargs="+")
    t = sub.add_parser("_trial")
    t.add_argument("--ckpt"), t.add_argument("--mode"), t.add_argument("--seq", type=int)
    p.add_argument("--gpu-gib", type=float, default=0,
                   help="cap each worker's GPU memory at this many GiB (79 stands in for an 80 GB H100)")
    args = p.parse_args()
    if args.gpu_gib:
        os.environ["FQ_BENCH_GPU_GIB"] = str(args.gpu_gib)
    if getattr(args, "device", "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_offload.py needs a CUDA GPU (the synthetic part takes --device cpu for a smoke run)")
    {"synthetic": synthetic, "model": model_part, "longest": longest_part,
     "_steps": steps_worker, "_trial": trial_worker}[args.part](args)


if __name__ == "__main__":
    main()
