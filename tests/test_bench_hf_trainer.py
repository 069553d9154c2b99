"""benchmarks/bench_hf_trainer.py on the CPU: transformers' Trainer (and trl's SFTTrainer) on
the demo model with and without the graphed loss path or backbone (their eager emulation off a
GPU), the same losses, JSON written."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_hf_trainer  # noqa: E402

from fastqlora.demo import data_dir  # noqa: E402


@pytest.mark.parametrize("trainer", ["transformers", "trl"])
def test_both_modes_train_alike_on_the_cpu(tmp_path, trainer):
    if trainer == "trl" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("trains on the CPU, where trl's own Triton kernel needs TRITON_INTERPRET=1")
    out = tmp_path / "hf.json"
    res = bench_hf_trainer.main(["--ckpt", str(data_dir() / "demo_model"), "--device", "cpu", "--seq", "40",
                                 "--batch", "2", "--steps", "3", "--skip", "1", "--trainer", trainer,
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == res
    eager, graph = res["runs"]
    assert eager["steps"] == graph["steps"] == 3 and eager["timed_steps"] == 2 and eager["tokens_per_s"] > 0
    assert len(graph["losses"]) == 3 and graph["losses"] == pytest.approx(eager["losses"], rel=1e-4)
