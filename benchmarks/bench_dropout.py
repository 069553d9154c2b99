"""LoRA dropout's counted kernel (ops/dropout.py inside counting(): the mask drawn from a
device seed, drawn again in the backward) against torch's dropout (a stored byte mask), forward
and backward on activation shapes of a training step, bf16, GPU time (timing.gpu_ms).

Floor: the forward reads x and writes y, the backward reads dy and writes dx: 8 bytes an
element in bf16 for the counted kernel (torch's also writes and reads a 1-byte mask: 10),
over the measured copy bandwidth (a bf16 clone: 4 bytes an element).

    python benchmarks/bench_dropout.py --out results/dropout_h200.json
    python benchmarks/bench_dropout.py --device cpu --shapes 3x700 --dtype float32   # smoke run (interpreter)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_SHAPES = "4096x2048,4096x4096,4096x11008,4096x14336"  # tokens x features (hidden, intermediate)


def _wall_ms(fn, reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def run(shapes: list[tuple[int, int]], device: str, dtype: torch.dtype, p: float) -> list[dict]:
    from fastqlora.ops import backend
    from fastqlora.ops import dropout as lora_dropout_state
    from fastqlora.ops.dropout import lora_dropout

    timer = _wall_ms
    if device == "cuda":
        sys.path.insert(0, str(HERE))
        from timing import gpu_ms as timer
    rows = []
    for m, k in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, k, device=device, dtype=dtype)

        def torch_step():
            y = F.dropout(x, p)
            y.backward(dy)

        def counted_step():
            with backend("triton"), lora_dropout_state.counting():
                y = lora_dropout(x, p)
            y.backward(dy)

        copy_ms = timer(lambda: x.detach().clone())
        t_ms, c_ms = timer(torch_step), timer(counted_step)
        n = m * k
        gbps = 4 * n * x.element_size() / 2 / (copy_ms * 1e-3) / 1e9  # clone: read + write
        floor_ms = 4 * n * x.element_size() / (gbps * 1e9) * 1e3
        with backend("triton"), lora_dropout_state.counting():
            kept = float((lora_dropout(x.detach(), p) != 0).float().mean())
        rows.append({"shape": [m, k], "torch_ms": t_ms, "counted_ms": c_ms, "copy_ms": copy_ms, "copy_gbps": gbps,
                     "floor_ms": floor_ms, "counted_over_torch": c_ms / t_ms, "kept_share": kept})
        print(f"{m:6d} x {k:6d}  torch {t_ms:8.3f} ms  counted {c_ms:8.3f} ms  ({c_ms / t_ms:4.2f}x)  "
              f"floor {floor_ms:7.3f} ms  kept {kept:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="MxK,... (tokens x features)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--out", default=str(HERE / "results" / "dropout.json"))
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    res = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
           "torch": torch.__version__, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
           "dtype": args.dtype, "p": args.p,
           "rows": run(shapes, args.device, getattr(torch, args.dtype), args.p)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
