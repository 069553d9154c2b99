"""fastqlora's own loop: packing equivalence, exact resume, interruption, the demo, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err

from fastqlora import FastLanguageModel
from fastqlora.cli import main as cli_main
from fastqlora.demo import data_dir, run_demo
from fastqlora.train import TrainConfig, Trainer
from fastqlora.train.data import Example, load_dataset
from fastqlora.train.loop import graph_width, padded_tokens
from fastqlora.train.packing import collate, epoch_batches, pack_examples, unpacked_rows

MODEL = str(data_dir() / "demo_model")
DATA = str(data_dir() / "demo.jsonl")


def _peft(load_in_4bit=True, **kw):
    model, tok = FastLanguageModel.from_pretrained(MODEL, max_seq_length=256, load_in_4bit=load_in_4bit,
                                                   device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False, **kw)
    with torch.no_grad():  # non-zero B so every adapter gradient is exercised
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    return model, tok


def test_packed_row_equals_token_weighted_mean_of_its_sequences():
    model, tok = _peft()
    examples = load_dataset(DATA, tok, max_seq_length=256, completion_only=True)[:5]
    packed = collate(pack_examples(examples, 512), tok.pad_token_id)
    assert packed["input_ids"].shape[0] == 1
    loss = model(**packed).loss
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    packed_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    total = 0.0
    count = 0
    for row in unpacked_rows(examples, 256):
        b = collate([row], tok.pad_token_id)
        n = int((b["labels"][:, 1:] != -100).sum())
        out = model(**b, num_items_in_batch=1)  # a sum over this sequence's tokens
        out.loss.backward()
        total += out.loss.item()
        count += n
    for p in params:
        p.grad /= count
    assert abs(loss.item() - total / count) < 1e-5 * loss.item()
    for got, want in zip(packed_grads, [p.grad for p in params]):
        assert rel_err(got, want) < 1e-5


def _cfg(tmp_path, **kw):
    base = dict(model=MODEL, dataset=DATA, output_dir=str(tmp_path), max_seq_length=256, r=8, lora_alpha=16,
                batch_size=2, learning_rate=2e-3, max_steps=6, completion_only=True, use_gradient_checkpointing=False,
                progress=False, plot=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg):
    model, tok = FastLanguageModel.from_pretrained(cfg.model, max_seq_length=cfg.max_seq_length, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=cfg.r, lora_alpha=cfg.lora_alpha, random_state=cfg.seed,
                                             lora_dropout=cfg.lora_dropout, use_gradient_checkpointing=False)
    return Trainer(model, tok, cfg)


def _interrupt_at(trainer, monkeypatch, call):
    real, calls = trainer.train_step, {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trainer, "train_step", flaky)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    full = _trainer(_cfg(tmp_path / "full", lora_dropout=0.1)).train()
    cut = _trainer(_cfg(tmp_path / "cut", lora_dropout=0.1))
    _interrupt_at(cut, monkeypatch, 4)  # stopped during step 4: checkpoint-3 is on disk
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    history = _trainer(_cfg(tmp_path / "cut", lora_dropout=0.1, resume=True)).train()
    assert [h["step"] for h in history] == list(range(1, 7))
    for a, b in zip(history, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    # metrics.jsonl holds each step once, the replayed step 4 included, as the history does
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert lines == history


def test_interrupt_saves_the_adapter(tmp_path, monkeypatch):
    trainer = _trainer(_cfg(tmp_path, max_steps=5))
    _interrupt_at(trainer, monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "trainer_state.pt").is_file()


def test_demo_loss_falls(tmp_path, capsys):
    history = run_demo(steps=40, output_dir=tmp_path, device="cpu", progress=False)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 0.5
    assert (tmp_path / "loss.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out


def test_cli_train_generate_export(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {MODEL}\ndataset: {DATA}\nmax_seq_length: 256\nmax_steps: 2\nr: 4\n"
                   f"use_gradient_checkpointing: false\nprogress: false\n")
    assert cli_main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run"), "--batch-size", "1",
                     "--cuda-graph", "auto"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert cli_main(["generate", "--model", str(adapter), "--prompt", "What is", "--max-new-tokens", "3"]) == 0
    assert cli_main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert cli_main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "merged4"), "--nf4"]) == 0
    cfg4 = json.loads((tmp_path / "merged4" / "config.json").read_text())
    assert cfg4["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert cli_main(["train", "--model", MODEL, "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_eval_loss_is_the_token_mean_on_held_out_examples(tmp_path):
    """eval_split holds examples out of training; the eval loss is the mean loss a label token
    on them, computed here again row by row with the trained model."""
    from fastqlora.train.data import split_examples

    cfg = _cfg(tmp_path, eval_split=0.25, eval_steps=2, max_steps=4)
    trainer = _trainer(cfg)
    examples = load_dataset(DATA, trainer.tokenizer, 256, completion_only=True)
    train, held = split_examples(examples, 0.25, cfg.seed)
    assert len(held) == round(0.25 * len(examples)) and len(train) + len(held) == len(examples)
    assert not {tuple(e.input_ids) for e in held} & {tuple(e.input_ids) for e in train}
    # the trainer's rows are exactly those examples, packed: every token of each side once
    assert sum(len(r) for r in trainer.eval_rows) == sum(len(e.input_ids) for e in held)
    assert sum(len(r) for r in trainer.rows) == sum(len(e.input_ids) for e in train)
    history = trainer.train()
    assert [("eval_loss" in h) for h in history] == [False, True, False, True]
    total, count = 0.0, 0
    with torch.no_grad():
        trainer.model.eval()
        for row in trainer.eval_rows:
            b = collate([row], trainer.pad_id)
            total += trainer.model(**b, num_items_in_batch=1).loss.item()
            count += int((b["labels"][:, 1:] != -100).sum())
    assert history[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_eval_dataset_and_its_errors(tmp_path):
    cfg = _cfg(tmp_path, eval_dataset=DATA, max_steps=2)
    history = _trainer(cfg).train()
    assert "eval_loss" in history[-1] and "eval_loss" not in history[0]
    with pytest.raises(ValueError, match="eval_dataset or eval_split, not both"):
        _cfg(tmp_path, eval_dataset=DATA, eval_split=0.1)
    with pytest.raises(ValueError, match=r"eval_split is a share"):
        _cfg(tmp_path, eval_split=1.5)
    trainer = _trainer(_cfg(tmp_path / "none", max_steps=1))
    with pytest.raises(ValueError, match="there is no eval set"):
        trainer.evaluate()


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    _trainer(_cfg(tmp_path, max_steps=7, save_steps=2, save_total_limit=2)).train()
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-6", "checkpoint-7"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7


@pytest.mark.filterwarnings("ignore:cuda_graph=True replays:RuntimeWarning")
def test_cuda_graph_mode_trains_as_the_plain_loop(tmp_path, monkeypatch, kernel_device):
    """cuda_graph=True (on the CPU: the graphed step's eager emulation, which checks on its
    third step that nothing is read back to the host where the Triton kernels run) pads rows
    to the longest row's width, drops the mask and hands the boundaries over: the same losses
    as the plain loop, and a resumed run continues as the whole one."""
    from fastqlora.ops import backend

    short = dict(max_steps=3, max_seq_length=64)
    plain = _trainer(_cfg(tmp_path / "plain", **short)).train()
    with pytest.warns(RuntimeWarning, match="only on a CUDA device"):
        graphed = _trainer(_cfg(tmp_path / "graph", cuda_graph=True, **short))
    assert graphed.graphed is not None
    with backend("triton"):  # the kernels' path, under the interpreter: the readback check runs
        history = graphed.train()
    assert graphed.graphed.captured
    assert graphed.graphed.static["input_ids"].shape == (2, graph_width(graphed.rows, 64))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in plain], rel=1e-5)
    whole = _trainer(_cfg(tmp_path / "whole", cuda_graph=True, max_steps=4)).train()
    cut = _trainer(_cfg(tmp_path / "cut", cuda_graph=True, max_steps=4))
    _interrupt_at(cut, monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    resumed = _trainer(_cfg(tmp_path / "cut", max_steps=4, cuda_graph=True, resume=True)).train()
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in whole], rel=1e-6)


@pytest.mark.filterwarnings("ignore:cuda_graph=True replays:RuntimeWarning")
def test_cuda_graph_mode_unpacked_rows_at_the_longest_rows_width(tmp_path):
    """Unpacked rows in a graphed step are padded to the longest row, not to max_seq_length:
    the static batch has that width, and the losses are the plain loop's (which pads each
    batch to its own longest row)."""
    short = dict(max_steps=3, packing=False)
    plain = _trainer(_cfg(tmp_path / "plain", **short)).train()
    graphed = _trainer(_cfg(tmp_path / "graph", cuda_graph=True, **short))
    width = graph_width(graphed.rows, 256)
    assert graphed.graph_width == width == max(len(r) for r in graphed.rows) < 256
    history = graphed.train()
    assert graphed.graphed.static["input_ids"].shape == (2, width)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in plain], rel=1e-5)


def test_padded_tokens_counts_each_process_slice():
    """Eager steps pad each process's slice of a global batch to its own longest row; a graphed
    step runs batch_size rows of the one width in every slice, short or empty ones included."""
    rows = unpacked_rows([Example(list(range(n)), list(range(n))) for n in (3, 9, 4, 16, 5)], 64)
    assert graph_width(rows, 64) == 16 and graph_width(rows, 12) == 12 and graph_width([], 64) == 1
    eager, padded = padded_tokens(rows, 2, 1, 0, 16)
    batches = [[len(rows[i]) for i in b] for b in epoch_batches(rows, 2, 0, 0)]
    assert eager == sum(len(b) * max(b) for b in batches) and padded == 3 * 2 * 16
    eager2, padded2 = padded_tokens(rows, 2, 2, 0, 16)  # global batches of 4: two slices each, one empty
    assert padded2 == 2 * 2 * 2 * 16
    assert eager2 == sum(len(s) * max(s, default=0) for b in epoch_batches(rows, 4, 0, 0)
                         for s in ([len(rows[i]) for i in b[:2]], [len(rows[i]) for i in b[2:4]]))


def test_cuda_graph_mode_accumulates_and_fills_an_epochs_short_batch(tmp_path):
    """cuda_graph=True with gradient accumulation (the micro-batches unrolled in one step) over
    an epoch's end, whose short last batch gets rows of padding to keep the step's shape: the
    plain loop's losses (reference ops: the readback check of accumulated steps under the
    Triton kernels is test_step_graph's)."""
    probe = _trainer(_cfg(tmp_path / "probe", max_seq_length=64, max_steps=1))
    rows = len(probe.rows)
    batch = next(b for b in (3, 4, 5, 6, 7) if rows % b)
    steps = -(-rows // (2 * batch)) + 1  # past the first epoch's end
    short = dict(max_steps=steps, max_seq_length=64, batch_size=batch, gradient_accumulation_steps=2)
    plain = _trainer(_cfg(tmp_path / "plain", **short)).train()
    with pytest.warns(RuntimeWarning, match="only on a CUDA device"):
        graphed = _trainer(_cfg(tmp_path / "graph", cuda_graph=True, **short))
    history = graphed.train()
    width = graph_width(graphed.rows, 64)  # the longest packed row
    assert len(graphed.graphed.statics) == 2 and graphed.graphed.static["input_ids"].shape == (batch, width)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in plain], rel=1e-5)
    assert [h["tokens"] for h in history] == [h["tokens"] for h in plain]


def test_collate_fills_rows_to_a_height():
    rows = unpacked_rows([Example([5, 6, 7], [-100, 6, 7])], 8)
    b = collate(rows, pad_id=0, width=4, height=3)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [0] * 4, [0] * 4]
    assert (b["labels"][1:] == -100).all() and b["attention_mask"][1:].sum() == 0
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="height 0"):
        collate(rows, 0, height=0)
    empty = collate([], 0, 4, 2)  # a process with no rows this time: a batch of padding alone
    assert empty["input_ids"].shape == (2, 4) and (empty["labels"] == -100).all()
    assert empty["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="a width for a batch of padding"):
        collate([], 0)


def test_cuda_graph_mode_refuses_what_it_cannot_replay(tmp_path):
    with pytest.raises(ValueError, match="optim='adamw'"):
        _cfg(tmp_path, cuda_graph=True, optim="adamw_8bit")
    assert _cfg(tmp_path, cuda_graph=True, lora_dropout=0.1).cuda_graph is True  # dropout counts on the device


def test_cuda_graph_auto_chooses_by_device_settings_and_fill(tmp_path):
    """The default ("auto") replays a graph only on CUDA devices (one process or several), with
    settings a graph can replay and rows that padding to one width (the longest row's) grows by
    at most a third over eager steps, which pad each batch to its own longest row: packed or
    not. On the CPU it trains eagerly without a warning."""
    assert TrainConfig(model=MODEL, dataset=DATA).cuda_graph == "auto"
    assert _cfg(tmp_path, cuda_graph="False").cuda_graph is False  # a config file's string
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        _cfg(tmp_path, cuda_graph="sometimes")
    assert _cfg(tmp_path, optim="adamw_8bit", lora_dropout=0.1).graph_blockers() == ["optim"]
    assert _cfg(tmp_path, gradient_accumulation_steps=4).graph_blockers() == []
    trainer = _trainer(_cfg(tmp_path, max_seq_length=64))
    assert trainer.graphed is None and not trainer.optimizer.param_groups[0]["capturable"]
    trainer.device = torch.device("cuda")  # the choice alone, as it would be made on a GPU
    full = trainer.rows
    assert sum(len(r) for r in full) * 4 >= 3 * len(full) * 64 and trainer._step_mode(full)[0]
    examples = load_dataset(DATA, trainer.tokenizer, 64, True)
    # unpacked rows of one length: the graph, at that width (not max_seq_length)
    even = unpacked_rows([Example(e.input_ids[:20], e.labels[:20]) for e in examples if len(e) >= 20], 64)
    assert graph_width(even, 64) == 20 and trainer._step_mode(even)[0]
    # unpacked rows of many lengths: a batch of short ones would run mostly padding
    uneven = unpacked_rows([Example(e.input_ids[:n], e.labels[:n])
                            for i, e in enumerate(examples) for n in [20 if i == 0 else 2 + i % 5]], 64)
    eager, padded = padded_tokens(uneven, 2, 1, 1, graph_width(uneven, 64))
    assert padded * 3 > 4 * eager and not trainer._step_mode(uneven)[0]
    assert "x the tokens of eager steps" in trainer._step_mode(uneven)[1]
    trainer.cfg = _cfg(tmp_path, max_seq_length=64, packing=False)
    assert "packing=true packs" in trainer._step_mode(uneven)[1] and trainer._step_mode(even)[0]
    for blocked in (dict(use_gradient_checkpointing="offload"), dict(optim="adamw_8bit"), dict(cuda_graph=False)):
        trainer.cfg = _cfg(tmp_path, max_seq_length=64, **blocked)
        assert not trainer._step_mode(full)[0], blocked
    trainer.cfg = _cfg(tmp_path, max_seq_length=64, optim="adamw_8bit", packing=False)
    line = trainer._step_mode(full)[1]
    mib = 6 * sum(p.numel() for p in trainer.params) / 2**20  # two fp32 moments against two 8-bit ones
    assert "optim='adamw_8bit'" in line and f"{mib:.0f} MiB larger" in line, line
    trainer.cfg = _cfg(tmp_path, max_seq_length=64, use_gradient_checkpointing="offload")
    assert "use_gradient_checkpointing='offload'" in trainer._step_mode(full)[1]
    trainer.cfg = _cfg(tmp_path, max_seq_length=64)
    assert "CUDA graph" in trainer._step_mode(full)[1]
    trainer.group = object()  # several processes: the graphed step sums over them
    assert trainer._step_mode(full)[0]


@pytest.mark.gpu
def test_default_trainer_replays_a_graph_on_the_gpu(tmp_path):
    """On a GPU the default settings train from a CUDA graph, with the eager run's losses
    within bf16 rounding."""
    def run(out, **kw):
        cfg = _cfg(out, max_seq_length=64, max_steps=6, **kw)
        model, tok = FastLanguageModel.from_pretrained(MODEL, max_seq_length=64, device="cuda")
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=1)
        trainer = Trainer(model, tok, cfg)
        return trainer, [h["loss"] for h in trainer.train()]

    graphed, got = run(tmp_path / "auto")
    assert graphed.graphed is not None and graphed.graphed.graph is not None
    _, want = run(tmp_path / "eager", cuda_graph=False)
    assert got == pytest.approx(want, rel=2e-2)


def test_resume_takes_this_runs_optimizer_mode(tmp_path, monkeypatch):
    """A checkpoint written by a graphed run (capturable AdamW, its rate a tensor) resumes in an
    eager run: the loaded groups take this run's mode and the losses continue as the whole run's."""
    whole = _trainer(_cfg(tmp_path / "whole", max_steps=4)).train()
    cut = _trainer(_cfg(tmp_path / "cut", max_steps=4))
    _interrupt_at(cut, monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    state_file = next((tmp_path / "cut" / "checkpoint-3").glob("*.pt"))
    state = torch.load(state_file, weights_only=False)
    for group in state["optimizer"]["param_groups"]:  # as a graphed run on a GPU saves them
        group["capturable"], group["lr"] = True, torch.tensor(group["lr"])
    torch.save(state, state_file)
    resumed = _trainer(_cfg(tmp_path / "cut", max_steps=4, resume=True))
    history = resumed.train()
    assert all(not g["capturable"] for g in resumed.optimizer.param_groups)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in whole], rel=1e-6)
