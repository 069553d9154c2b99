"""Data-parallel training under torchrun (two processes, gloo on the CPU): the adapter, the
loss curve and the eval loss equal one process training the same global batches; files are
written once; a checkpoint resumes only with the number of processes that wrote it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file

from fastqlora.cli import main as cli_main
from fastqlora.demo import data_dir

MODEL = str(data_dir() / "demo_model")
DATA = str(data_dir() / "demo.jsonl")


def _args(out, batch_size: int, steps: int = 3, resume: bool = False, graph: bool = False,
          seq: int = 128, device: str = "cpu") -> list[str]:
    return ["train", "--model", MODEL, "--dataset", DATA, "--output-dir", str(out), "--max-seq-length", str(seq),
            "--max-steps", str(steps), "--batch-size", str(batch_size), "--lora-r", "4", "--learning-rate", "2e-3",
            "--gradient-accumulation-steps", "2", "--use-gradient-checkpointing", "true", "--progress", "false",
            "--plot", "false", "--device", device, "--load-in-4bit", "false", "--completion-only", "true",
            "--save-steps", "2", "--resume", "true" if resume else "false", "--eval-split", "0.25",
            "--cuda-graph", "true" if graph else "false"]


def _torchrun(out, batch_size: int, steps: int = 3, resume: bool = False, graph: bool = False,
              seq: int = 128, device: str = "cpu") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "fastqlora.cli", *_args(out, batch_size, steps, resume, graph, seq, device)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_train_what_one_trains_on_the_global_batch(tmp_path):
    run = _torchrun(tmp_path / "two", batch_size=1)
    assert run.returncode == 0, f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-8000:]}"
    assert run.stdout.count("trained 3 steps") == 1  # only rank 0 reports
    assert cli_main(_args(tmp_path / "one", batch_size=2)) == 0
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert two.keys() == one.keys()
    for k in one:
        assert rel_err(two[k], one[k]) < 1e-4, k
    h_two = torch.load(tmp_path / "two" / "checkpoint-3" / "trainer_state.pt", weights_only=False)["history"]
    h_one = torch.load(tmp_path / "one" / "checkpoint-3" / "trainer_state.pt", weights_only=False)["history"]
    for a, b in zip(h_two, h_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens"] == b["tokens"]
    # the eval set split over the two processes gives the one-process eval loss
    assert h_two[-1]["eval_loss"] == pytest.approx(h_one[-1]["eval_loss"], rel=1e-4)
    # a checkpoint written by two processes resumes with two, not one
    assert cli_main(_args(tmp_path / "two", batch_size=2, steps=4, resume=True)) == 2


def test_the_graphed_step_sums_over_processes(tmp_path):
    """The graphed step's path (on the CPU its eager emulation, GraphedTrainStep with the
    all-reduce inside the step; rows padded to max_seq_length, a process without rows in a
    micro-batch training a batch of padding) under two processes: the adapter and the losses
    of one eager process on the global batches. At 320 tokens the demo packs 9 rows: the
    epoch's last global micro-batch has one row, so the second process trains padding then."""
    run = _torchrun(tmp_path / "two", batch_size=1, steps=4, graph=True, seq=320)
    assert run.returncode == 0, f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-8000:]}"
    assert "cuda_graph=True replays steps from a CUDA graph only on a CUDA device" in run.stderr
    assert cli_main(_args(tmp_path / "one", batch_size=2, steps=4, seq=320)) == 0
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    for k in one:
        assert rel_err(two[k], one[k]) < 1e-4, k
    h_two = torch.load(tmp_path / "two" / "checkpoint-4" / "trainer_state.pt", weights_only=False)["history"]
    h_one = torch.load(tmp_path / "one" / "checkpoint-4" / "trainer_state.pt", weights_only=False)["history"]
    assert [a["loss"] for a in h_two] == pytest.approx([b["loss"] for b in h_one], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphed_steps_on_two_gpus(tmp_path):
    """Two processes on two GPUs replaying the step from a CUDA graph (NCCL's all-reduce
    captured in it) train as two eager processes, within bf16 rounding."""
    runs = {}
    for graph in (True, False):
        out = tmp_path / ("graph" if graph else "eager")
        run = _torchrun(out, batch_size=1, steps=4, graph=graph, seq=320, device="cuda")
        assert run.returncode == 0, f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-8000:]}"
        assert "failed" not in run.stderr  # a capture that fails warns and goes on eagerly
        runs[graph] = (load_file(str(out / "adapter" / "adapter_model.safetensors")),
                       torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=False)["history"])
    (a, ha), (b, hb) = runs[True], runs[False]
    assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], rel=2e-2)
    assert max(rel_err(a[k].float(), b[k].float()) for k in b) < 3e-2


_HF_TRAINER = r"""
import os, sys, torch
from fastqlora import FastLanguageModel
from transformers import Trainer, TrainingArguments
model, _ = FastLanguageModel.from_pretrained(sys.argv[1], load_in_4bit=False, device="cpu", dtype=torch.float32)
model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
g = torch.Generator().manual_seed(0)
data = [{"input_ids": torch.randint(3, 200, (20,), generator=g)} for _ in range(8)]
for d in data:
    d["labels"] = d["input_ids"].clone()
args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=2, max_steps=3, use_cpu=True,
                         ddp_backend="gloo", report_to=[], save_strategy="no", learning_rate=1e-3)
Trainer(model=model, args=args, train_dataset=data).train()
torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
           os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
torch.distributed.barrier()
sys.stdout.flush()
os._exit(0)  # as fastqlora's CLI ends under torchrun: no teardown of torch.distributed's C++ state
"""


def test_transformers_trainer_under_torchrun(tmp_path):
    """transformers' Trainer wraps the model in DDP itself: its gradient hooks work through
    the model's own checkpointing, and the ranks' adapters stay equal."""
    script = tmp_path / "hf_trainer.py"
    script.write_text(_HF_TRAINER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), MODEL, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-8000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if k.endswith("lora_B"))  # it trained
