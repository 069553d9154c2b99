"""The two ceilings of this GPU, measured: device-to-device copy bandwidth (bytes read +
written per second) and the bf16 matrix-product rate through cuBLAS, on random data.

    python benchmarks/calibrate.py --out results/calibrate.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton.testing


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibrate.json"))
    args = p.parse_args()
    n = 1 << 30  # 1 GiB each way
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    copy_gbs = 2 * n / ms / 1e6
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms_mm = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    tflops = 2 * m**3 / ms_mm / 1e9
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": tflops,
           "sm_count": torch.cuda.get_device_properties(0).multi_processor_count}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
