"""The training step captured as a CUDA graph (fastqlora.train.step_graph): the eager
emulation and its check that nothing is read back to the host (on the CPU under the Triton
interpreter, or on the GPU); on the GPU, the replayed steps against eager ones."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from helpers import rel_err, tiny_lora_model

from fastqlora import FastLanguageModel
from fastqlora.ops import backend
from fastqlora.train.step_graph import GraphedTrainStep


def _model(tmp_path, device="cpu", dtype=torch.float32, checkpointing=True, dropout=0.0, family="llama"):
    return tiny_lora_model(tmp_path, device, dtype, lora_dropout=dropout, checkpointing=checkpointing, family=family)


def _batches(n, device, rows=2, seq=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 101, (rows, seq), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100  # a prompt that does not count: the mean's count changes per batch
        out.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return out


def _eager_losses(model, batches, max_grad_norm=0.0):
    """The plain loop's losses (AdamW, lr 1e-2), training ``model`` in place."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for b in batches:
        out = model(**b)
        out.loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return losses


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_emulated_steps_equal_eager_steps_and_read_nothing_back(tmp_path, kernel_device, checkpointing):
    """Without a capture the graphed step is the eager step: the same losses and adapters
    after four steps; the step where the capture would be (the third) ran under the
    readback check (Triton kernels under the interpreter, the fused loss included)."""
    model = _model(tmp_path, device=kernel_device, checkpointing=checkpointing)
    twin = copy.deepcopy(model)
    batches = _batches(4, kernel_device)
    with backend("triton"):
        want = _eager_losses(model, batches, max_grad_norm=0.5)
        opt2 = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
        step = GraphedTrainStep(twin, opt2, max_grad_norm=0.5, capture=False)
        got = [float(step(**b)) for b in batches]
    assert step.captured and step.graph is None
    assert got == pytest.approx(want, rel=_tol(kernel_device))
    a, b = _adapters(model), _adapters(twin)
    assert all(rel_err(b[k], a[k]) < _tol(kernel_device) for k in a)


def _tol(device: str) -> float:
    """The emulated and the plain step run the same kernels in the same order; on a GPU some
    (split-K sums, atomics in attention's backward) may round in a different order."""
    return 1e-6 if device == "cpu" else 1e-4


def _on(batches, device):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _packed(n, seed=1, rows=2, seq=12):
    """Packed batches: each row several sequences (positions restarting at 0, the first label
    of each -100), the last row's tail padding as its own run of positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 101, (rows, seq), generator=g)
        pos = torch.zeros(rows, seq, dtype=torch.long)
        labels = ids.clone()
        for r in range(rows):
            cuts = sorted(torch.randperm(seq - 2, generator=g)[:2].add(1).tolist())
            for a, b in zip([0] + cuts, cuts + [seq]):
                pos[r, a:b] = torch.arange(b - a)
                labels[r, a] = -100
        labels[-1, -3:] = -100  # padding: its own sequence, nothing counted
        pos[-1, -3:] = torch.arange(3)
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_given_boundaries_equal_the_ones_the_model_finds(tmp_path, kernel_device, mode):
    """cu_seq_lens_q (with trailing empty sequences) and max_length_q give the loss and
    gradients that the model computes from the same restarting position ids."""
    model = _model(tmp_path, device=kernel_device)
    b = _on(_packed(1), kernel_device)[0]
    pos = b["position_ids"]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat([first, torch.full((4,), pos.numel(), device=pos.device)]).to(torch.int32)

    def run(**kw):
        model.zero_grad(set_to_none=True)
        with backend(mode):
            loss = model(**b, **kw).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want, want_g = run()
    got, got_g = run(cu_seq_lens_q=cu, max_length_q=pos.shape[1])
    assert rel_err(got, want) < _tol(kernel_device)
    assert all(rel_err(a, b) < 10 * _tol(kernel_device) for a, b in zip(got_g, want_g))
    with pytest.raises(ValueError, match="max_length_q"):
        model(**b, cu_seq_lens_q=cu)


def test_packed_emulated_steps_equal_eager_steps(tmp_path, kernel_device):
    """Packed rows through the graphed step (boundaries computed on the host, padded to a
    fixed count) train as the eager steps that find the boundaries themselves."""
    model = _model(tmp_path, device=kernel_device)
    twin = copy.deepcopy(model)
    batches = _on(_packed(3), kernel_device)
    with backend("triton"):
        want = _eager_losses(model, batches)
        step = GraphedTrainStep(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2),
                                capture=False, max_sequences=12)
        got = [float(step(**b)) for b in batches]
    assert step.captured and step.static["cu_seq_lens_q"].shape == (13,)
    assert got == pytest.approx(want, rel=_tol(kernel_device))
    a, b = _adapters(model), _adapters(twin)
    assert all(rel_err(b[k], a[k]) < _tol(kernel_device) for k in a)
    bad = dict(batches[0], position_ids=batches[0]["position_ids"] + 1)
    with pytest.raises(ValueError, match="restart at 0"):
        step(**bad)
    small = GraphedTrainStep(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad]),
                             capture=False, max_sequences=3)
    with pytest.raises(ValueError, match="at most 3"):
        small(**batches[0])


def test_the_eager_trainers_batch_reads_nothing_back(tmp_path, kernel_device):
    """The Trainer's eager steps give the model its rows' boundaries from the host
    (cu_seq_lens_q, max_length_q) instead of the attention mask: the loss and gradients of
    the mask's batch, and a forward and backward that read nothing back to the host."""
    from fastqlora.train.loop import _to_device
    from fastqlora.train.packing import Row, collate
    from fastqlora.train.step_graph import _NoReadback

    model = _model(tmp_path, device=kernel_device)
    g = torch.Generator().manual_seed(3)
    rows = []
    for lengths in ((5, 4, 3), (7,), (2, 6)):  # rows of 12, 7 and 8 tokens: padding in two
        ids = torch.randint(0, 101, (sum(lengths),), generator=g).tolist()
        pos = [i for n in lengths for i in range(n)]
        labels = [-100 if p == 0 else t for t, p in zip(ids, pos)]
        rows.append(Row(ids, labels, pos))
    batch = collate(rows, pad_id=0)

    def run(b, check=False):
        model.zero_grad(set_to_none=True)
        with backend("triton"), _NoReadback() if check else contextlib.nullcontext():
            loss = model(**b, num_items_in_batch=torch.tensor(20.0, device=kernel_device)).loss
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want, want_g = run({k: v.to(kernel_device) for k, v in batch.items()})  # the model reads the mask
    given = _to_device(batch, torch.device(kernel_device))
    assert "attention_mask" not in given and given["max_length_q"] == 7
    got, got_g = run(given, check=True)
    assert rel_err(got, want) < _tol(kernel_device)
    assert all(rel_err(a, b) < 10 * _tol(kernel_device) for a, b in zip(got_g, want_g))


def test_dropout_emulated_steps_equal_eager_steps(tmp_path, kernel_device):
    """LoRA dropout through the graphed step (its kernel's seed counter on the device, the
    checkpointed recomputation rewinding it): the eager loop's losses and adapters from the
    same seed, the step that would be captured checked to read nothing back."""
    from fastqlora.ops import dropout as lora_dropout_state

    model = _model(tmp_path, device=kernel_device, dropout=0.2)
    twin = copy.deepcopy(model)
    batches = _batches(4, kernel_device)
    with backend("triton"), lora_dropout_state.counting():
        lora_dropout_state.manual_seed(4)
        want = _eager_losses(model, batches)
        lora_dropout_state.manual_seed(4)
        step = GraphedTrainStep(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2),
                                capture=False)
        got = [float(step(**b)) for b in batches]
    assert step.captured
    assert got == pytest.approx(want, rel=_tol(kernel_device))
    a, b = _adapters(model), _adapters(twin)
    assert all(rel_err(b[k], a[k]) < _tol(kernel_device) for k in a)


def test_a_readback_in_the_step_is_named(tmp_path, monkeypatch, kernel_device):
    """A step that reads a device value back (what a capture refuses) fails where the capture
    would be, naming the op; the warm-up steps before it run."""
    model = _model(tmp_path, device=kernel_device)
    real = type(model).forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        float(out.loss)  # a host readback, as logging inside the step would do
        return out

    monkeypatch.setattr(type(model), "forward", forward)
    step = GraphedTrainStep(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                            capture=False)
    b = _batches(1, kernel_device)[0]
    with backend("triton"):  # the check runs where the ops take the kernels a GPU runs
        step(**b)
        step(**b)
        with pytest.raises(RuntimeError, match="_local_scalar_dense"):
            step(**b)


def test_num_items_as_a_number_and_bad_batches(tmp_path):
    model = _model(tmp_path)
    step = GraphedTrainStep(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                            warmup=1, capture=False)
    b = _batches(1, "cpu")[0]
    loss = step(**b, num_items_in_batch=19)
    assert loss.shape == () and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] is \(2, 12\)"):
        step(input_ids=torch.zeros(2, 12, dtype=torch.long), labels=b["labels"], num_items_in_batch=19)
    with pytest.raises(ValueError, match="keys"):
        step(**b)
    with pytest.raises(ValueError, match="attention_mask"):
        step(**b, attention_mask=torch.ones_like(b["input_ids"]), num_items_in_batch=19)
    with pytest.raises(TypeError, match="takes tensors"):
        step(input_ids=b["input_ids"], labels=b["labels"].tolist(), num_items_in_batch=19)


def test_refuses_what_a_capture_cannot_replay(tmp_path):
    model = _model(tmp_path / "b", checkpointing="offload")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="offload"):
        GraphedTrainStep(model, torch.optim.AdamW(params), capture=False)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(model, torch.optim.AdamW(params), capture=True)
    with pytest.raises(ValueError, match="warmup"):
        GraphedTrainStep(model, torch.optim.AdamW(params), warmup=0, capture=False)
    model = _model(tmp_path / "c")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="torch.distributed initialized"):
        GraphedTrainStep(model, torch.optim.AdamW(params), capture=False, sum_across_processes=True)


def _steps(batches, micro):
    """Consecutive batches grouped ``micro`` to a step, each given the step's label count."""
    out = []
    for i in range(0, len(batches) - micro + 1, micro):
        group = batches[i:i + micro]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
        out.append([{**b, "num_items_in_batch": n} for b in group])
    return out


def test_accumulated_emulated_steps_equal_eager_steps(tmp_path, kernel_device):
    """run() over two micro-batches a step (packed rows) trains as the eager loop that
    accumulates their gradients; the would-be capture step passes the readback check; the
    micro-batch count is fixed by the first step."""
    model = _model(tmp_path, device=kernel_device)
    twin = copy.deepcopy(model)
    steps = _steps(_on(_packed(8), kernel_device), 2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    with backend("triton"):
        want = []
        for micro in steps:
            total = 0.0
            for b in micro:
                loss = model(**b).loss
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
            want.append(total)
        step = GraphedTrainStep(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2),
                                max_grad_norm=0.5, capture=False, max_sequences=12)
        got = [float(step.run(micro)) for micro in steps]
    assert step.captured and len(step.statics) == 2
    assert got == pytest.approx(want, rel=_tol(kernel_device))
    a, b = _adapters(model), _adapters(twin)
    assert all(rel_err(b[k], a[k]) < _tol(kernel_device) for k in a)
    with pytest.raises(ValueError, match="3 micro-batches; the captured step takes 2"):
        step.run(steps[0] + steps[1][:1])
    with pytest.raises(TypeError, match="each a dict"):
        step.run([steps[0][0], 7])
    with pytest.raises(ValueError, match="at least one micro-batch"):
        step.run([])


@pytest.mark.gpu
@pytest.mark.parametrize("family,packed,micro,dropout", [
    ("llama", False, 1, 0.0), ("gemma3_text", False, 1, 0.0), ("llama", True, 1, 0.0), ("llama", True, 2, 0.0),
    ("llama", True, 2, 0.1)])
def test_replayed_steps_equal_eager_steps_on_the_gpu(tmp_path, family, packed, micro, dropout):
    """A 4-bit bf16 model with LoRA on the GPU: eight steps through the graph (two warm-up,
    the capture, five replays) give the eager steps' losses and adapters within bf16
    rounding, and the learning rate set after the capture takes effect; packed rows with
    boundaries that change from batch to batch too, two micro-batches a step, and LoRA
    dropout (each replay's masks those of the eager step from the same seed)."""
    from fastqlora.ops import dropout as lora_dropout_state

    model = _model(tmp_path, device="cuda", dtype=torch.bfloat16, family=family, dropout=dropout)
    twin = copy.deepcopy(model)
    batches = ([{k: v.cuda() for k, v in b.items()} for b in _packed(8 * micro, seq=40)] if packed
               else _batches(8 * micro, "cuda"))
    steps = _steps(batches, micro)

    def optimizer(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, capturable=True)

    opt = optimizer(model)
    lora_dropout_state.manual_seed(8)
    want = []
    for i, group in enumerate(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 if i < 5 else 3e-4
        total = 0.0
        with lora_dropout_state.counting():  # the eager steps draw LoRA dropout as the graph does
            for b in group:
                out = model(**b)
                out.loss.backward()
                total += float(out.loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append(total)
    lora_dropout_state.manual_seed(8)
    step = GraphedTrainStep(twin, optimizer(twin))
    got = []
    for i, group in enumerate(steps):
        step.set_lr(1e-3 if i < 5 else 3e-4)
        got.append(float(step.run(group)))
    assert step.graph is not None
    assert got == pytest.approx(want, rel=2e-2)
    a, b = _adapters(model), _adapters(twin)
    assert max(rel_err(b[k], a[k]) for k in a) < 2e-2
    if dropout:
        with backend("reference"), pytest.raises(ValueError, match="torch's generator"):
            GraphedTrainStep(twin, optimizer(twin))


_NCCL_STEP = r"""
import copy, json, os, sys, warnings
sys.path.insert(0, sys.argv[2])
import torch
import torch.distributed as dist
from test_step_graph import _batches, _model
from fastqlora.train.step_graph import GraphedTrainStep

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1")
dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
from pathlib import Path
model = _model(Path(sys.argv[1]), device="cuda", dtype=torch.bfloat16)
twin = copy.deepcopy(model)
batches = _batches(7, "cuda")
def optimizer(m):
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, capturable=True)
out = {}
for name, m, summed in (("plain", model, False), ("summed", twin, True)):
    step = GraphedTrainStep(m, optimizer(m), max_grad_norm=1.0, sum_across_processes=summed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and goes on eagerly: fail instead
        out[name] = [float(step(**b)) for b in batches]
    assert step.graph is not None
out["adapters"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                      for a, b in zip([p for p in twin.parameters() if p.requires_grad],
                                      [p for p in model.parameters() if p.requires_grad]))
print("RESULT", json.dumps(out))
sys.stdout.flush()
os._exit(0)  # torch.distributed's teardown after a captured collective may hang (pytorch#115388)
"""


@pytest.mark.gpu
def test_the_all_reduce_is_captured_in_the_step_on_the_gpu(tmp_path):
    """With sum_across_processes the step's gradient and loss all-reduce (NCCL) is captured in
    the graph and replayed: a one-process group on this GPU trains as the step without it
    (the sum over one process is the identity; the capture must succeed, with no warning).
    Two processes on two GPUs: test_distributed.py."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "nccl_step.py"
    script.write_text(_NCCL_STEP)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(Path(__file__).parent), str(port)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-6000:]
    out = json.loads(run.stdout.split("RESULT", 1)[1])
    assert out["summed"] == pytest.approx(out["plain"], rel=1e-3)
    assert out["adapters"] < 1e-2
