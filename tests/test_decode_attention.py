"""The decode-step attention kernel (one query a row over the KV cache) against float64
attention, and in a model's decode steps against the torch path."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model


def _oracle(q, k, v, valid, start, scale, window, softcap):
    """float64: causal at cache position ``start``, holes masked, window, soft-cap."""
    B, _, Hq, D = q.shape
    T, Hk = k.shape[1], k.shape[2]
    qd = q.double()[:, 0]  # [B, Hq, D]
    kd = k.double().repeat_interleave(Hq // Hk, 2)  # [B, T, Hq, D]
    vd = v.double().repeat_interleave(Hq // Hk, 2)
    s = torch.einsum("bhd,bthd->bht", qd, kd) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    t = torch.arange(T, device=q.device)
    keep = (t <= start)[None, None] & valid[:, None, :T].to(q.device)
    if window is not None:
        keep = keep & ((start - t) < window)[None, None]
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bht,bthd->bhd", p, vd)[:, None]


CASES = [  # Hq, Hk, D, T, start, window, softcap
    (6, 2, 24, 37, 30, None, None),
    (6, 3, 16, 70, 69, 5, None),  # the window crosses a block edge
    (4, 4, 40, 130, 77, None, 2.0),  # rows past start are not attended
    (8, 1, 32, 19, 18, 7, 3.0),
]


@pytest.mark.parametrize("Hq,Hk,D,T,start,window,softcap", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_t,max_splits", [(32, 16), (16, 3)])  # one block a split; several
def test_kernel_matches_float64_attention(kernel_device, Hq, Hk, D, T, start, window, softcap, dtype, block_t,
                                          max_splits):
    from fastqlora.triton_kernels.decode_attention import decode_attention_fwd

    g = torch.Generator().manual_seed(Hq * 100 + T)
    B = 3
    q = torch.randn(B, 1, Hq, D, generator=g).to(kernel_device, dtype)
    k = torch.randn(B, T + 5, Hk, D, generator=g).to(kernel_device, dtype)[:, :T]  # a prefix view of a cache
    v = torch.randn(B, T + 5, Hk, D, generator=g).to(kernel_device, dtype)[:, :T]
    valid = torch.ones(B, T + 5, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[2] = False  # nothing to attend: zeros
    valid = valid.to(kernel_device)
    scale = D ** -0.5
    got = decode_attention_fwd(q, k, v, valid, torch.tensor([start], device=kernel_device), scale, window, softcap,
                               block_t=block_t, max_splits=max_splits)
    want = _oracle(q, k, v, valid, start, scale, window, softcap)
    assert got.shape == q.shape and got.dtype == dtype
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hk,D,T,start,window,softcap", CASES + [(32, 8, 128, 2051, 2050, None, None),
                                                                      (16, 8, 256, 1500, 1400, 1024, 50.0)])
def test_kernel_bf16_on_the_gpu(Hq, Hk, D, T, start, window, softcap):
    from fastqlora.triton_kernels.decode_attention import decode_attention_fwd

    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(2, 1, Hq, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, T, Hk, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(2, T, Hk, D, device="cuda", generator=g).bfloat16()
    valid = torch.ones(2, T, dtype=torch.bool, device="cuda")
    valid[1, :9] = False
    got = decode_attention_fwd(q, k, v, valid, torch.tensor([start], device="cuda"), D ** -0.5, window, softcap)
    assert rel_err(got, _oracle(q, k, v, valid, start, D ** -0.5, window, softcap)) < 1e-2


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("gemma2", {"num_hidden_layers": 3})])
@torch.no_grad()
def test_decode_steps_with_the_kernel_equal_the_torch_path(tmp_path, kernel_device, monkeypatch, family, overrides):
    """A model's eager and device-indexed decode steps (Gemma 2: soft-cap and a window of 6
    crossed) give the same logits with the kernel as with the torch path."""
    from fastqlora import FastLanguageModel
    from fastqlora.decode_graph import DecodeGraph
    from fastqlora.ops import backend

    write_hf_model(tmp_path, family, **overrides)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                 device=kernel_device)
    model.eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 211, (2, 7), generator=g).to(kernel_device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    steps = torch.randint(3, 211, (5, 2, 1), generator=g).to(kernel_device)

    import fastqlora.triton_kernels.decode_attention as da

    calls = []
    real = da.decode_attention_fwd
    monkeypatch.setattr(da, "decode_attention_fwd", lambda *a, **k: calls.append(a[1].shape[1]) or real(*a, **k))

    def logits(kernel):
        monkeypatch.setenv("FASTQLORA_DECODE_ATTENTION", "1" if kernel else "0")
        with backend("triton"):
            cache = model.allocate_cache(2, 14)
            out = [model.prefill(ids, mask, cache), model.decode(steps[0], cache), model.decode(steps[1], cache)]
            step = DecodeGraph(model, cache, capture=False)
            out += [step(t) for t in steps[2:]]
        return torch.stack(out)

    assert rel_err(logits(True), logits(False)) < 1e-5
    layers = model.cfg.num_layers
    # the prefill's 7 queries stay on the torch path; eager steps read the prefix, device-indexed
    # ones the whole capacity
    assert calls == [8] * layers + [9] * layers + [14] * (3 * layers)


def test_split_plan_bounds_the_splits():
    from fastqlora.triton_kernels.decode_attention import split_plan

    assert split_plan(37, 32) == (32, 2)
    assert split_plan(256, 32) == (32, 8)
    chunk, n = split_plan(8193, 32)
    assert n <= 16 and chunk * n >= 8193 and chunk & (chunk - 1) == 0
    assert split_plan(130, 16, 3) == (64, 3)


def test_switch_refuses_bad_values(monkeypatch):
    from fastqlora.ops.dispatch import decode_attention_enabled

    monkeypatch.setenv("FASTQLORA_DECODE_ATTENTION", "true")
    with pytest.raises(ValueError, match="FASTQLORA_DECODE_ATTENTION"):
        decode_attention_enabled()


def test_an_eager_step_makes_its_position_tensor_once():
    """The layers of one eager step share the position the kernels read (one host-to-device
    copy a step, not one a layer); the next step's position is a new tensor."""
    from fastqlora.generation import _position_tensor

    first = _position_tensor(7, torch.device("cpu"))
    assert _position_tensor(7, torch.device("cpu")) is first and first.tolist() == [7]
    nxt = _position_tensor(8, torch.device("cpu"))
    assert nxt is not first and nxt.tolist() == [8] and first.tolist() == [7]
