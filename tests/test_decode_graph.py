"""The device-indexed decode step (what generation captures as a CUDA graph) against the
eager decode step, and the graph itself on the GPU."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model

from fastqlora import FastLanguageModel
from fastqlora.decode_graph import DecodeGraph

FAMILIES = [("llama", {}), ("mistral", {"sliding_window": 5}), ("gemma2", {"num_hidden_layers": 3}),
            ("gemma3_text", {"num_hidden_layers": 3}), ("qwen2", {}), ("qwen3", {}), ("phi3", {"sliding_window": 5}),
            ("granite", {}), ("olmo2", {})]


def _model(tmp_path, family="llama", **overrides):
    write_hf_model(tmp_path, family, **overrides)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                 device="cpu")
    return FastLanguageModel.for_inference(model)


def _prompt(B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 211, (B, S), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: holes at the start of the cache
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask, torch.randint(3, 211, (6, B, 1), generator=g)


@pytest.mark.parametrize("family,overrides", FAMILIES)
@torch.no_grad()
def test_device_indexed_steps_equal_eager_steps(tmp_path, family, overrides):
    """Prefill, one eager step, then five steps written at a device index over the whole
    capacity (unwritten positions masked; from the second on with the host length held as a
    replay sees it): the logits, the cache and the positions are the eager steps' (the sliding
    windows of 5-6 are crossed, the left padding's holes kept)."""
    model = _model(tmp_path, family, **overrides)
    ids, mask, steps = _prompt()

    def run(static):
        cache = model.allocate_cache(3, 20)
        out = [model.prefill(ids, mask, cache), model.decode(steps[0], cache)]
        step = DecodeGraph(model, cache, capture=False) if static else (lambda t: model.decode(t, cache))
        out += [step(t) for t in steps[1:]]
        return torch.stack(out), cache

    want, eager = run(False)
    got, static = run(True)
    assert rel_err(got, want) < 1e-5
    assert static.length == eager.length == 9 + 6 and int(static.index) == 15
    assert torch.equal(static.valid, eager.valid) and torch.equal(static.positions, eager.positions)
    for a, b in zip(static.keys + static.values, eager.keys + eager.values):
        assert rel_err(a, b) < 1e-5


def test_generate_steps_through_the_graph(tmp_path, monkeypatch):
    """generate() asks the model for its graph right after the prefill and takes every decode
    step through it (the graph's first call is its eager warm-up); the tokens are the eager
    loop's. With fewer than 8 new tokens it never asks."""
    model = _model(tmp_path, "llama")
    ids, mask, _ = _prompt()
    monkeypatch.setattr(type(model), "decode_graph", lambda self, cache: None)  # eager throughout
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    eager_steps, graph_steps = [], []
    real_decode = type(model).decode

    class Counting(DecodeGraph):
        def __call__(self, tokens):
            graph_steps.append(tokens)
            return super().__call__(tokens)

    monkeypatch.setattr(type(model), "decode", lambda self, t, c: eager_steps.append(t) or real_decode(self, t, c))
    monkeypatch.setattr(type(model), "decode_graph", lambda self, cache: Counting(self, cache, capture=False))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)
    # 12 tokens: the prefill's logits give the first, 11 steps the rest (none after the last)
    assert not eager_steps and len(graph_steps) == 11
    graph_steps.clear()
    model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=None)
    assert len(eager_steps) == 6 and not graph_steps


def test_decode_graph_applies_only_where_it_can(tmp_path, monkeypatch):
    model = _model(tmp_path, "llama")
    cache = model.allocate_cache(1, 8)
    assert model.static_rope and model.decode_graph(cache) is None  # a CPU cache: no CUDA graph
    monkeypatch.setenv("FASTQLORA_DECODE_GRAPH", "yes")
    from fastqlora.ops.dispatch import decode_graph_enabled

    with pytest.raises(ValueError, match="FASTQLORA_DECODE_GRAPH"):
        decode_graph_enabled()
    phi = _model(tmp_path / "phi", "phi3", max_position_embeddings=64, original_max_position_embeddings=16,
                 rope_scaling={"rope_type": "longrope", "long_factor": [2.0] * 6, "short_factor": [1.0] * 6})
    assert not phi.static_rope  # longrope's tables change with the length: its steps stay eager


@torch.no_grad()
def test_failed_capture_warns_and_the_steps_go_on_eagerly(tmp_path):
    """The second call captures; a capture that fails (here: no CUDA at all) warns once, and
    the steps go on eagerly through the device index, to the eager decode's logits."""
    if torch.cuda.is_available():
        pytest.skip("here a CPU cache's capture fails for want of CUDA")
    model = _model(tmp_path, "llama")
    ids, mask, steps = _prompt()
    caches = [model.allocate_cache(3, 12) for _ in range(2)]
    for c in caches:
        model.prefill(ids, mask, c)
    step = DecodeGraph(model, caches[0])
    got = [step(steps[0])]
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got.append(step(steps[1]))
    got.append(step(steps[2]))
    assert step.graph is None
    want = [model.decode(t, caches[1]) for t in steps[:3]]
    assert rel_err(torch.stack(got), torch.stack(want)) < 1e-5


@torch.no_grad()
def test_decode_graph_refuses_bad_calls(tmp_path):
    model = _model(tmp_path, "llama")
    cache = model.allocate_cache(2, 4)
    model.prefill(torch.randint(3, 211, (2, 3)), None, cache)
    step = DecodeGraph(model, cache, capture=False)
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        step(torch.zeros(2, 2, dtype=torch.long))
    step(torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="holds 4 positions"):
        step(torch.ones(2, 1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
@torch.no_grad()
def test_cuda_graph_steps_equal_eager_steps(tmp_path, family):
    """A 4-bit bf16 model with LoRA on the GPU: steps replayed from the captured graph give
    the eager steps' logits for the same tokens."""
    write_hf_model(tmp_path, family, hidden_size=128, intermediate_size=192, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, num_hidden_layers=3, vocab_size=211)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, dtype=torch.bfloat16,
                                                 device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            p.normal_(0, 0.05)
    model.eval()
    ids, mask, steps = _prompt()
    ids, mask, steps = ids.cuda(), mask.cuda(), steps.cuda()

    def run(graphed):
        cache = model.allocate_cache(3, 24)
        out = [model.prefill(ids, mask, cache)]
        step = model.decode_graph(cache) if graphed else (lambda t: model.decode(t, cache))
        out += [step(t).clone() for t in steps]  # the graph's output is overwritten by the next replay
        assert not graphed or step.graph is not None  # captured on the second call, replayed since
        return torch.stack(out).float()

    want, got = run(False), run(True)
    assert rel_err(got, want) < 2e-2
    # generate() with the graph (the default): each greedy token is, within bf16 rounding, the
    # argmax of the eager model's logits on the sequence so far (the graph's attention sums over
    # the whole capacity, so a near-tie may break the other way and the sequences part)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    full_mask = torch.cat([mask, torch.ones_like(gen[:, 9:])], dim=1)
    logits = model(input_ids=gen, attention_mask=full_mask).logits.float()[:, 8:-1]
    chosen = logits.gather(-1, gen[:, 9:, None]).squeeze(-1)
    assert (logits.amax(-1) - chosen).max() < 0.02 * logits.abs().amax()


@torch.no_grad()
def test_graph_steps_take_the_decode_kernels_from_their_warm_up(tmp_path, kernel_device, monkeypatch):
    """By default the NF4 decode kernels serve the graph's steps and not eager ones; the
    graph's first (eager) call already takes them, so the dispatch times and checks its
    kernels there, outside any capture."""
    import fastqlora.ops.nf4_linear as nl
    from fastqlora.ops import backend

    monkeypatch.delenv("FASTQLORA_DECODE_KERNELS", raising=False)
    calls = []
    real = nl.frozen_matmul
    monkeypatch.setattr(nl, "frozen_matmul", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    write_hf_model(tmp_path, "llama", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=101, head_dim=16)
    dtype = torch.float32 if kernel_device == "cpu" else torch.bfloat16
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, dtype=dtype, device=kernel_device)
    model.eval()
    ids = torch.randint(0, 101, (1, 5), device=kernel_device)
    with backend("triton"):
        cache = model.allocate_cache(1, 10)
        model.prefill(ids, None, cache)
        model.decode(ids[:, :1], cache)
        assert not calls  # eager steps: dequantize + cuBLAS
        DecodeGraph(model, cache, capture=False)(ids[:, 1:2])
    assert calls == [1] * 14  # 7 projections x 2 layers, one row each
