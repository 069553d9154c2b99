"""Load + quantize a random-weight checkpoint in 4-bit: fastqlora vs transformers + bitsandbytes.

Each loader runs in its own process on the same folder (written first, by
random_checkpoint.py, unless --ckpt names one): wall time of the load call (imports and
CUDA start-up excluded, reported apart), peak GPU memory (max_memory_allocated and
max_memory_reserved), the memory the loaded model holds, and, as a check that both
loaded the same weights, the relative difference of their logits on one short input.

Floor (Llama-3-8B, bf16): 16.06 GB of tensors must leave the page cache (a multi-threaded
memcpy at ~10 GB/s: ~1.6 s; from a cold NVMe at ~3 GB/s: ~5 s) and cross PCIe (~25 GB/s
pinned: ~0.65 s); NF4 quantization reads 15 GB and writes ~4 GB of GPU memory
(~3.35 TB/s on an H100: ~6 ms). So ~2 s warm. Peak GPU memory floor: the final model
(~5.7 GB: 4.5 GB of NF4 projections with double-quantized statistics + 2.1 GB of
16-bit embeddings and lm_head) plus one 16-bit projection (117 MB for gate/up/down).

    python benchmarks/bench_load.py --shape llama-3-8b --out benchmarks/results/load_llama-3-8b.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 1 << 30


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def worker(which: str, ckpt: str, result: str) -> None:
    """Load the folder with one library; write the measurements (and logits) to ``result``."""
    t_import = time.perf_counter()
    import torch

    if which == "fastqlora":
        from fastqlora import FastLanguageModel
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    torch.cuda.init()
    torch.empty(1, device="cuda")
    import_s = time.perf_counter() - t_import
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    start = time.perf_counter()
    if which == "fastqlora":
        model, _ = FastLanguageModel.from_pretrained(ckpt, dtype=torch.bfloat16, load_in_4bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    out = {
        "load_s": load_s,
        "import_and_cuda_init_s": import_s,
        "peak_allocated_gib": (torch.cuda.max_memory_allocated() - base) / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "final_allocated_gib": (torch.cuda.memory_allocated() - base) / GiB,
        "model_bytes_gib": _model_bytes(model) / GiB,
    }
    ids = torch.arange(1, 17, device="cuda")[None] * 997 % 32000
    try:
        with torch.no_grad():
            logits = model(ids).logits.float().cpu()
        torch.save(logits, result + ".logits.pt")
    except Exception as exc:  # the load numbers stand even if a forward fails
        out["forward_error"] = f"{type(exc).__name__}: {exc}"
    Path(result).write_text(json.dumps(out))


def _run_worker(which: str, ckpt: str, tmp: str) -> dict:
    result = os.path.join(tmp, f"{which}.json")
    proc = subprocess.run([sys.executable, __file__, "--worker", which, "--ckpt", ckpt, "--result", result],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(result):
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(Path(result).read_text())


def _versions() -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "bitsandbytes", "fastqlora", "safetensors"):
        try:
            v[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            v[name] = None
    if torch.cuda.is_available():
        v["device"] = torch.cuda.get_device_name()
    return v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--ckpt", help="existing checkpoint folder (default: write one under --tmp)")
    parser.add_argument("--tmp", default="/tmp/fastqlora_bench_ckpt")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/load_<shape>.json)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--worker", choices=["fastqlora", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.ckpt, args.result)
        return

    import torch

    sys.path.insert(0, str(HERE))
    from random_checkpoint import SHAPES, tensor_shapes, write_random_checkpoint

    ckpt = args.ckpt
    write_s = None
    if ckpt is None:
        ckpt = os.path.join(args.tmp, args.shape)
        start = time.perf_counter()
        write_random_checkpoint(ckpt, args.shape, device="cuda")
        write_s = time.perf_counter() - start
        torch.cuda.empty_cache()
    cfg = SHAPES.get(args.shape, {})
    largest_proj = max((s[0] * s[1] * 2 for n, s in tensor_shapes(cfg) if "proj" in n), default=0) if cfg else 0

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("fastqlora",) + (() if args.skip_baseline else ("transformers",)):
            results[which] = _run_worker(which, ckpt, tmp)
        logits = {w: torch.load(os.path.join(tmp, f"{w}.json.logits.pt")) for w in results
                  if os.path.exists(os.path.join(tmp, f"{w}.json.logits.pt"))}
    agree = None
    if len(logits) == 2:
        a, b = logits["fastqlora"].double(), logits["transformers"].double()
        agree = float((a - b).norm() / b.norm())

    ours, base = results.get("fastqlora", {}), results.get("transformers", {})
    report = {
        "benchmark": "load + quantize (NF4, double quant, bf16)",
        "shape": args.shape, "checkpoint": ckpt, "write_checkpoint_s": write_s,
        "largest_16bit_projection_gib": largest_proj / GiB,
        "results": results, "logits_rel_diff_fastqlora_vs_transformers": agree,
        "versions": _versions(), "command": " ".join(sys.argv),
    }
    if "load_s" in ours and "load_s" in base:
        report["speedup_load"] = base["load_s"] / ours["load_s"]
        report["peak_ratio"] = ours["peak_allocated_gib"] / base["peak_allocated_gib"]
    if "load_s" in ours:
        report["fastqlora_peak_over_final_gib"] = ours["peak_allocated_gib"] - ours["final_allocated_gib"]

    print(f"\nload + quantize {args.shape} on {report['versions'].get('device')}  (checkpoint {ckpt})")
    print(f"{'library':<14}{'load s':>9}{'peak alloc GiB':>16}{'peak resv GiB':>15}{'final GiB':>11}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14} FAILED: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        print(f"{name:<14}{r['load_s']:>9.2f}{r['peak_allocated_gib']:>16.2f}{r['peak_reserved_gib']:>15.2f}"
              f"{r['final_allocated_gib']:>11.2f}")
    if "speedup_load" in report:
        print(f"fastqlora loads {report['speedup_load']:.2f}x faster, peak {report['peak_ratio']:.2f}x of baseline")
    if "fastqlora_peak_over_final_gib" in report:
        print(f"fastqlora peak - final = {report['fastqlora_peak_over_final_gib']:.3f} GiB "
              f"(largest 16-bit projection: {largest_proj / GiB:.3f} GiB); target load <= 15 s")
    if agree is not None:
        print(f"logits relative difference fastqlora vs transformers: {agree:.2e}")
    out = Path(args.out or HERE / "results" / f"load_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
