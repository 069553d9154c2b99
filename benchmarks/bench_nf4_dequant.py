"""NF4 dequantize throughput on Llama-3-8B weight shapes: fastqlora's CUDA kernel
against a device-to-device copy (the ceiling) and bitsandbytes' dequantize_4bit.

Bytes moved per weight of n elements (double-quantized, bf16 out):
  read n/2 (codes) + n/64 (uint8 absmax) + small nested tables, write 2n (bf16)
  ≈ 2.52 n bytes. Floor at the measured copy bandwidth B: 2.52 n / B
  (4096×14336: 148 MB -> ~49 µs at 3.0 TB/s). Target ≥ 85% of B and faster than bnb.

    python benchmarks/bench_nf4_dequant.py --out results/nf4_dequant.json [--sweep]

Each shape is also set beside a copy of the same number of bytes (half read, half
written), since a 42 MB kernel pays launch and ramp costs that a 2 GB copy hides.
--sweep times every launch shape of the kernel (code bytes per thread, chunks per
thread, blocks per SM, evict-first stores) and keeps the table for each; the default launch in
csrc/nf4_cuda.cu is the one this sweep found fastest.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton.testing

from fastqlora.quant import NF4Tensor

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096),
          "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "nf4_dequant.json"))
    p.add_argument("--sweep", action="store_true", help="time every launch shape of the kernel too")
    args = p.parse_args()
    import fastqlora._C as C
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        bnb_f = None
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * n / bench(lambda: dst.copy_(src)) / 1e6
    del src, dst
    default_cfg = C.nf4_dequantize_get_config()
    configs = [default_cfg]
    if args.sweep:
        configs += [(b, u, s, st) for b in (4, 8, 16) for u in (1, 2) for s in (0, 8, 16) for st in (0, 1)
                    if (b, u, s, st) != tuple(default_cfg)]
    rows, sweep = [], []
    for name, shape in SHAPES.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        t = NF4Tensor.quantize(w)
        out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        nbytes = t.nbytes + out.numel() * 2
        a = torch.empty(nbytes // 2, device="cuda", dtype=torch.uint8)
        b = torch.empty_like(a)
        same_ms = bench(lambda: b.copy_(a))
        del a, b
        fill_ms = bench(lambda: out.zero_())  # the writes alone: 2n of the ~2.52n bytes
        for cfg in configs:
            C.nf4_dequantize_config(*cfg)
            ms_c = bench(lambda: t.dequantize(out=out))
            sweep.append({"shape": name, "config": list(cfg), "us": ms_c * 1e3,
                          "pct_of_copy": 100 * nbytes / ms_c / 1e6 / copy_gbs,
                          "pct_of_same_size_copy": 100 * same_ms / ms_c})
        C.nf4_dequantize_config(*default_cfg)
        ms = bench(lambda: t.dequantize(out=out))
        row = {"shape": name, "bytes": nbytes, "ours_us": ms * 1e3, "ours_GBps": nbytes / ms / 1e6,
               "same_size_copy_us": same_ms * 1e3, "write_only_us": fill_ms * 1e3}
        row["pct_of_copy"] = 100 * row["ours_GBps"] / copy_gbs
        row["pct_of_same_size_copy"] = 100 * same_ms / ms
        if bnb_f is not None:
            q, st = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            bout = torch.empty_like(out)
            ms_b = bench(lambda: bnb_f.dequantize_4bit(q, st, out=bout))
            row["bnb_us"] = ms_b * 1e3
            row["speedup_vs_bnb"] = ms_b / ms
        rows.append(row)
    # quantize cost (load time matters): one 14336x4096 bf16 weight
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    q_ms = bench(lambda: NF4Tensor.quantize(w))
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "copy_GBps": copy_gbs, "launch": list(default_cfg), "rows": rows, "sweep": sweep, "quantize_14336x4096_ms": q_ms}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{res['device']}: copy {copy_gbs:,.0f} GB/s; quantize 14336x4096 bf16 in {q_ms:.2f} ms")
    if args.sweep:
        print("launch (bytes, unroll, blocks/SM with 0 = one pass, evict-first stores): total µs over the shapes, worst % of copy")
        by_cfg: dict[tuple, list] = {}
        for s_ in sweep:
            by_cfg.setdefault(tuple(s_["config"]), []).append(s_)
        for cfg, got in sorted(by_cfg.items(), key=lambda kv: sum(g["us"] for g in kv[1])):
            print(f"  {cfg}: {sum(g['us'] for g in got):8.1f} µs, worst {min(g['pct_of_copy'] for g in got):5.1f}%")
    print(f"launch {tuple(default_cfg)}")
    print(f"{'shape':22} {'ours µs':>9} {'GB/s':>7} {'% copy':>7} {'% same-size copy':>17} {'zero-fill µs':>12} "
          f"{'bnb µs':>9} {'vs bnb':>7}")
    for r in rows:
        print(f"{r['shape']:22} {r['ours_us']:9.1f} {r['ours_GBps']:7.0f} {r['pct_of_copy']:6.1f}% "
              f"{r['pct_of_same_size_copy']:16.1f}% {r['write_only_us']:12.1f} "
              f"{r.get('bnb_us', float('nan')):9.1f} {r.get('speedup_vs_bnb', float('nan')):6.2f}x")


if __name__ == "__main__":
    main()
