"""benchmarks/profile_decode.py on the CPU: the demo model's generate profiled, its ops counted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import profile_decode  # noqa: E402

from fastqlora.demo import data_dir  # noqa: E402


def test_profile_of_a_cpu_generate_adds_up(tmp_path):
    out = tmp_path / "prof.json"
    res = profile_decode.main(["--ckpt", str(data_dir() / "demo_model"), "--device", "cpu", "--prompt", "8",
                               "--new", "4", "--top", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["device"] == "cpu" and res["kernels"] > 0 and res["kernel_ms"] > 0
    assert 0 < len(res["top"]) <= 5 and res["top"][0][1] >= res["top"][-1][1]
    assert sum(count for _, _, count in res["top"]) <= res["kernels"]
    assert res["wall_ms_new"] > 0 and res["wall_ms_1"] > 0
