"""Generation with the KV cache against transformers' generate, and the sampling rules."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model

from fastqlora import FastLanguageModel
from fastqlora.generation import filter_logits


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mistral", {"sliding_window": 5}),
                                              ("gemma", {}), ("gemma2", {"num_hidden_layers": 3}),
                                              ("gemma3_text", {"num_hidden_layers": 3}), ("qwen2", {}),
                                              ("qwen3", {}), ("phi3", {"sliding_window": 5}), ("granite", {}),
                                              ("smollm3", {"num_hidden_layers": 4}), ("olmo2", {})])
def test_greedy_equals_transformers(tmp_path, family, overrides):
    hf = write_hf_model(tmp_path, family, **overrides)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                device="cpu")
    FastLanguageModel.for_inference(ours)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 211, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    ids[mask == 0] = 0
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                        eos_token_id=None)
    assert torch.equal(got, want)


def test_longrope_generation_crossing_the_original_context(tmp_path):
    """9 + 12 tokens cross Phi-3's original context (16 here), where longrope switches to its
    long factors: the cache is recomputed there, and the tokens are those of transformers'
    model run on the whole sequence at every step (its cached generate, 5.17, departs from
    that model at the switch, so the uncached greedy loop is the reference)."""
    g = torch.Generator().manual_seed(5)
    hf = write_hf_model(tmp_path, "phi3", head_dim=16, hidden_size=96, max_position_embeddings=64,
                        original_max_position_embeddings=16,
                        rope_scaling={"rope_type": "longrope", "long_factor": (1 + torch.rand(8, generator=g) * 3).tolist(),
                                      "short_factor": (1 + torch.rand(8, generator=g) * 0.5).tolist()})
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                device="cpu")
    FastLanguageModel.for_inference(ours)
    ids = torch.randint(3, 211, (3, 9), generator=torch.Generator().manual_seed(0))
    want = ids
    with torch.no_grad():
        for _ in range(12):
            want = torch.cat([want, hf(want).logits[:, -1].argmax(-1)[:, None]], dim=1)
    got = ours.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, want)


def test_stops_at_eos_and_pads_finished_rows(tmp_path):
    write_hf_model(tmp_path, "llama")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                device="cpu")
    ids = torch.randint(3, 211, (2, 5), generator=torch.Generator().manual_seed(1))
    free = ours.generate(ids, max_new_tokens=6, eos_token_id=None)
    eos = int(free[0, 7])  # make row 0's third new token the end of sequence
    out = ours.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    row0 = out[0, 5:].tolist()
    stop = row0.index(eos)
    assert all(t == 1 for t in row0[stop + 1:])
    assert torch.equal(out[:, :5], ids)


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    k2 = filter_logits(logits, 1.0, top_k=2, top_p=1.0)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    probs = torch.softmax(logits, -1)[0]
    p = filter_logits(logits, 1.0, top_k=0, top_p=float(probs[0]) + 1e-4)
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    only = filter_logits(logits, 1.0, top_k=0, top_p=0.01)
    assert torch.isfinite(only[0, 0]) and torch.isinf(only[0, 1:]).all()
    hot = filter_logits(logits, 0.5, 0, 1.0)
    assert torch.allclose(hot, logits / 0.5)
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, 0.0, 0, 1.0)


def test_sampled_generation_is_reproducible(tmp_path):
    write_hf_model(tmp_path, "llama")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                device="cpu")
    ids = torch.randint(3, 211, (2, 4), generator=torch.Generator().manual_seed(2))
    a = ours.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9,
                      generator=torch.Generator().manual_seed(5))
    b = ours.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9,
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 12)


def test_generation_config_stop_tokens(tmp_path):
    """An instruct model's end of turn lives in generation_config.json (Gemma's <end_of_turn>,
    Llama 3's <|eot_id|>), not in config.json: generation stops there too."""
    import json

    write_hf_model(tmp_path, "llama", eos_token_id=None)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 211, (1, 7), generator=torch.Generator().manual_seed(1))
    free = ours.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert free.shape[1] == 12
    first = int(free[0, 7])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [209, first]}))
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    assert ours.stop_ids() == [209, first] and ours.stop_ids([5]) == [209, first, 5]
    stopped = ours.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert stopped.tolist() == free[:, :8].tolist()  # the stop token itself, then nothing


def test_streamer_gets_the_prompt_then_each_token(tmp_path):
    """transformers' streamer protocol: the prompt, then every new token as it is chosen, then end()."""
    write_hf_model(tmp_path, "llama")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    FastLanguageModel.for_inference(ours)
    ids = torch.randint(3, 211, (1, 5), generator=torch.Generator().manual_seed(3))

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            assert not self.ended
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    c = Collect()
    out = ours.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, streamer=c)
    assert torch.equal(c.puts[0], ids) and c.ended
    assert torch.equal(torch.cat(c.puts[1:]), out[0, 5:]) and len(c.puts) == 1 + 9


def test_cli_generate_prints_the_text_as_generated(capsys):
    """``fastqlora generate`` streams through transformers' TextStreamer: what it prints is the
    decoded continuation that generate() returns."""
    from importlib.resources import files

    from transformers import AutoTokenizer

    from fastqlora.cli import main as cli_main

    model_dir = str(files("fastqlora") / "data" / "demo_model")
    assert cli_main(["generate", "--model", model_dir, "--prompt", "What is", "--max-new-tokens", "12",
                     "--device", "cpu", "--repetition-penalty", "1.2"]) == 0
    printed = capsys.readouterr().out.strip()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True, device="cpu")
    FastLanguageModel.for_inference(model)
    ids = tok("What is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=model.stop_ids([tok.eos_token_id]),
                         repetition_penalty=1.2)
    assert printed and printed == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("window,softcap", [(None, None), (5, 2.0)])
def test_long_prompt_attention_in_chunks_equals_whole(monkeypatch, window, softcap):
    """A prefill's cached attention split into query chunks (each reading the keys up to its
    last position) gives the unsplit result, holes and window included."""
    import fastqlora.generation as gen

    g = torch.Generator().manual_seed(7)
    B, S, Hq, Hk, D = 2, 23, 6, 2, 8
    q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (Hq, Hk, Hk))
    valid = torch.ones(B, S + 4, dtype=torch.bool)
    valid[1, :5] = False
    kc, vc = (torch.cat([t, torch.zeros(B, 4, Hk, D)], 1) for t in (k, v))  # a cache with room left
    whole = gen.cached_attention(q, kc[:, :S], vc[:, :S], valid, start=0, scale=0.3, sliding_window=window,
                                 softcap=softcap)
    monkeypatch.setattr(gen, "SCORES_BYTES", 4 * B * Hq * S * 5)  # 5 queries a chunk
    calls = []
    real = gen._attend
    monkeypatch.setattr(gen, "_attend", lambda q, *a: calls.append(q.shape[1]) or real(q, *a))
    chunked = gen.cached_attention(q, kc[:, :S], vc[:, :S], valid, start=0, scale=0.3, sliding_window=window,
                                   softcap=softcap)
    assert calls == [5, 5, 5, 5, 3]
    assert rel_err(chunked, whole) < 1e-6


def test_generation_with_a_chunked_prefill_equals_transformers(tmp_path, monkeypatch):
    """The same greedy tokens as transformers when the prefill's attention runs in chunks of
    4 queries (left padding included)."""
    import fastqlora.generation as gen

    hf = write_hf_model(tmp_path, "llama")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    FastLanguageModel.for_inference(ours)
    ids = torch.randint(3, 211, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[mask == 0] = 0
    monkeypatch.setattr(gen, "SCORES_BYTES", 4 * 2 * 6 * 11 * 4)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mistral", {"sliding_window": 5}),
                                              ("gemma2", {"num_hidden_layers": 3}), ("phi3", {"sliding_window": 5}),
                                              ("gemma3_text", {"num_hidden_layers": 3})])
def test_prompt_without_holes_attends_as_in_training(tmp_path, monkeypatch, family, overrides):
    """A prompt without padding holes attends to itself through ops.attention (the training
    forward's flash kernels on a GPU), once a layer in the prefill and never in a decode step;
    the tokens are transformers'."""
    from fastqlora import ops

    hf = write_hf_model(tmp_path, family, **overrides)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    FastLanguageModel.for_inference(ours)
    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda q, *a, **k: calls.append(q.shape[1]) or real(q, *a, **k))
    ids = torch.randint(3, 211, (2, 9), generator=torch.Generator().manual_seed(6))
    want = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, want)
    assert calls == [9] * ours.cfg.num_layers


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_transformers(tmp_path, penalty):
    """Greedy with a repetition penalty (above and below 1; left padding, whose pad ids count
    as seen, as in transformers) gives transformers' tokens."""
    hf = write_hf_model(tmp_path, "llama")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 211, (2, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None,
              repetition_penalty=penalty)
    want = hf.generate(ids, **kw)
    got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=None)
    assert not torch.equal(got, plain)  # the penalty changed something


def test_min_new_tokens_equals_transformers(tmp_path):
    """The stop id that greedy decoding picks first is barred until min_new_tokens are out."""
    hf = write_hf_model(tmp_path, "llama")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 211, (1, 6), generator=torch.Generator().manual_seed(9))
    eos = int(ours.generate(ids, max_new_tokens=2, eos_token_id=None)[0, 7])  # the second new token
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert ours.generate(ids, **kw).shape[1] == 6 + 2  # stops there without the floor
    want = hf.generate(ids, min_new_tokens=5, **kw)
    got = ours.generate(ids, min_new_tokens=5, **kw)
    assert torch.equal(got, want) and got.shape[1] >= 6 + 5


def test_generate_names_what_it_does_not_take(tmp_path):
    write_hf_model(tmp_path, "llama")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 211, (1, 4))
    with pytest.raises(TypeError, match="num_beams.*no beam search.*repetition_penalty"):
        ours.generate(ids, num_beams=4)
    with pytest.raises(ValueError, match="repetition_penalty"):
        ours.generate(ids, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        ours.generate(ids, min_new_tokens=-1)
