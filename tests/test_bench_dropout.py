"""benchmarks/bench_dropout.py on the CPU under the interpreter: it runs both dropouts, keeps
about 1 − p of the elements and writes its JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_dropout  # noqa: E402


def test_smoke_on_the_cpu(tmp_path, kernel_device):
    out = tmp_path / "dropout.json"
    res = bench_dropout.main(["--device", kernel_device, "--shapes", "3x700", "--dtype", "float32", "--p", "0.5",
                              "--out", str(out)])
    assert json.loads(out.read_text()) == res
    (row,) = res["rows"]
    assert row["shape"] == [3, 700] and row["torch_ms"] > 0 and row["counted_ms"] > 0
    assert abs(row["kept_share"] - 0.5) < 0.1
