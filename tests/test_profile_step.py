"""benchmarks/profile_step.py on the CPU: a demo-model step profiled, its time grouped."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import profile_step  # noqa: E402

from fastqlora.demo import data_dir  # noqa: E402


def test_kernel_names_fall_in_their_groups():
    cases = {"_attn_bwd_dkdv": "attention", "k_nf4_dequant_nested": "NF4 dequantize",
             "k_nf4_gemv<__nv_bfloat16, 8, 2, true>": "NF4 fused matmul",
             "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN": "matmul", "_rms_norm_fwd": "RMSNorm",
             "_rope_qk_kernel": "RoPE", "_swiglu_fwd": "activation", "aten::mm": "matmul",
             "_cross_entropy_chunk": "cross-entropy", "Memcpy DtoD (Device -> Device)": "copies and casts",
             "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other"}
    for name, group in cases.items():
        assert profile_step.group_of(name) == group, name


def test_profile_of_a_cpu_step_adds_up(tmp_path):
    out = tmp_path / "prof.json"
    host = tmp_path / "host.txt"
    res = profile_step.main(["--ckpt", str(data_dir() / "demo_model"), "--device", "cpu", "--seq", "32",
                             "--batch", "1", "--warmup", "1", "--steps", "1", "--out", str(out),
                             "--host", str(host)])
    # the cProfile report of one step: the model's own forward among its functions
    report = host.read_text()
    assert "function calls" in report and "causal_lm.py" in report
    assert res["kernels_per_step"] >= len(res["most_launched"]) > 0
    assert json.loads(out.read_text())["total_ms"] == res["total_ms"] > 0
    assert abs(sum(g["ms"] for g in res["groups"].values()) - res["total_ms"]) < 1e-6 * res["total_ms"]
    assert res["groups"]["matmul"]["ms"] > 0 and res["groups"]["attention"]["ms"] > 0
    assert res["top"][0]["ms"] >= res["top"][-1]["ms"]
