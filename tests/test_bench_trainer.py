"""benchmarks/bench_trainer.py on the CPU: the demo model trained by the Trainer in both modes
(the graphed one runs its steps eagerly off a GPU), the same losses, the JSON written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_trainer  # noqa: E402

from fastqlora.demo import data_dir  # noqa: E402


def test_eager_and_graph_modes_train_alike_on_the_cpu(tmp_path):
    out = tmp_path / "trainer.json"
    with pytest.warns(RuntimeWarning, match="only on a CUDA device"):
        res = bench_trainer.main(["--ckpt", str(data_dir() / "demo_model"), "--device", "cpu", "--seq", "48",
                                  "--batch", "2", "--steps", "3", "--skip", "1", "--lengths", "5-30",
                                  "--accumulation", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == res and res["accumulation"] == 2
    eager, graph = res["runs"]
    assert eager["steps"] == graph["steps"] == 3 and eager["timed_steps"] == 2
    assert eager["tokens_per_s"] > 0 and not graph["graph_replayed"]
    # padding every row to max_seq_length adds only ignored tokens: the same loss a step
    assert graph["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert res["graph_speedup"] > 0
    total = sum(len(e) for e in bench_trainer.examples(500, 50, 5, 30, seed=1))
    assert total >= 500


def test_examples_are_reproducible_and_within_their_lengths():
    a = bench_trainer.examples(300, 20, 3, 9, seed=2)
    assert [e.input_ids for e in a] == [e.input_ids for e in bench_trainer.examples(300, 20, 3, 9, seed=2)]
    assert all(3 <= len(e) <= 9 and e.labels[0] == -100 and e.labels[1:] == e.input_ids[1:] for e in a)
    assert all(0 <= t < 20 for e in a for t in e.input_ids)


def test_unpacked_rows_train_alike_at_the_longest_rows_width(tmp_path):
    """--unpacked: one example a row (packing=false); the graphed mode pads them to the longest
    row's width (not --seq) and trains as the eager one does."""
    out = tmp_path / "trainer.json"
    with pytest.warns(RuntimeWarning, match="only on a CUDA device"):
        res = bench_trainer.main(["--ckpt", str(data_dir() / "demo_model"), "--device", "cpu", "--seq", "48",
                                  "--batch", "2", "--steps", "3", "--skip", "1", "--lengths", "5-30", "--unpacked",
                                  "--out", str(out)])
    eager, graph = res["runs"]
    assert res["unpacked"] and 5 <= graph["graph_width"] <= 30 < 48
    assert graph["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert "eager" in eager["step_mode"]
