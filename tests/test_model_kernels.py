"""A whole model with every kernel on gives the loss and LoRA gradients of the same model
on the reference ops, 4-bit base, packed rows included: on the GPU in bf16, and a tiny
model in fp32 on the CPU under the Triton interpreter (CI)."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model

from fastqlora import FastLanguageModel
from fastqlora.ops import backend


def _lora_model(path, family, dtype, device, r, checkpointing, **config):
    """A random HF checkpoint of ``family`` loaded in 4-bit with LoRA (B made non-zero)."""
    write_hf_model(path, family, **config)
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_4bit=True, dtype=dtype, device=device)
    model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=2 * r, use_gradient_checkpointing=checkpointing)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model


def _loss_and_grads(model, **batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_kernels_against_reference(model, loss_tol: float, grad_tol: float, **batch) -> None:
    """Loss and every LoRA gradient with the Triton kernels against the reference ops."""
    with backend("reference"):
        l_ref, g_ref = _loss_and_grads(model, **batch)
    with backend("triton"):
        l_k, g_k = _loss_and_grads(model, **batch)
    assert abs(l_k - l_ref) < loss_tol * abs(l_ref)
    worst = max(rel_err(g_k[n], g_ref[n]) for n in g_ref)
    assert worst < grad_tol, worst


@pytest.mark.parametrize("family,checkpointing", [("llama", False), ("llama", True), ("gemma2", True),
                                                  ("gemma3_text", True), ("qwen3", True), ("qwen2", False),
                                                  ("phi3", True), ("phi3-partial", True), ("phi3-head24", True),
                                                  ("granite", True), ("smollm3", True), ("olmo2", True)])
def test_tiny_model_kernels_match_reference_ops_fp32(tmp_path, kernel_device, family, checkpointing):
    # gemma2: sandwich norms, soft-capped attention and logits, a sliding layer; qwen3: q and k
    # normalized per head before the in-place RoPE; qwen2: q, k, v biases
    extra = dict(num_hidden_layers=3, sliding_window=7) if family.startswith("gemma") else {}
    if family == "phi3-partial":  # RoPE on the first 3/4 of each head, in place on the fused qkv
        family, extra = "phi3", dict(partial_rotary_factor=0.75)
    if family == "smollm3":  # layer 3 without RoPE
        extra = dict(num_hidden_layers=4)
    sizes = dict(hidden_size=64, head_dim=16)
    if family == "phi3-head24":  # a head dim between the kernels' widths: attention zero-pads it to 32
        family, sizes = "phi3", dict(hidden_size=96, head_dim=24)
    model = _lora_model(tmp_path, family, torch.float32, kernel_device, 4, checkpointing, max_position_embeddings=64,
                        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                        **sizes, **extra)
    ids = torch.randint(0, 101, (2, 21), generator=torch.Generator().manual_seed(1)).to(kernel_device)
    pos = torch.cat([torch.arange(12), torch.arange(9)]).expand(2, -1).to(kernel_device)  # two sequences a row
    _check_kernels_against_reference(model, 1e-5, 1e-4, input_ids=ids, position_ids=pos, labels=ids)


@pytest.mark.gpu
@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, vocab_size=1003)),
    ("gemma", dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=128, vocab_size=1003)),
    ("mistral", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=1,
                     head_dim=64, vocab_size=1003, sliding_window=100)),
    ("gemma2", dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=128, vocab_size=1003, num_hidden_layers=3, sliding_window=100,
                    query_pre_attn_scalar=128, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    ("qwen2", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1003)),
    ("qwen3", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, vocab_size=1003)),
    ("gemma3_text", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, vocab_size=1003, num_hidden_layers=3, sliding_window=100,
                         query_pre_attn_scalar=64)),
    ("phi3", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1003, sliding_window=100)),
    # Phi-3.5-mini's head dim, 96: flash attention at width 128, zero-padded
    ("phi3", dict(hidden_size=384, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1003)),
    ("granite", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=1003)),
    ("smollm3", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=1003, num_hidden_layers=4)),
    ("olmo2", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1003)),
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_kernels_match_reference_ops(tmp_path, family, overrides, checkpointing):
    model = _lora_model(tmp_path, family, torch.bfloat16, "cuda", 8, checkpointing, max_position_embeddings=512,
                        **overrides)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1003, (2, 333), generator=g).cuda()
    pos = torch.cat([torch.arange(200), torch.arange(133)]).expand(2, -1).cuda()  # two sequences a row
    labels = ids.clone()
    labels[:, :10] = -100
    _check_kernels_against_reference(model, 1e-2, 3e-2, input_ids=ids, position_ids=pos, labels=labels)


@pytest.mark.gpu
def test_fused_nf4_projections_match_the_plain_path(tmp_path, monkeypatch):
    model = _lora_model(tmp_path, "llama", torch.bfloat16, "cuda", 8, True, max_position_embeddings=512,
                        hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, vocab_size=1003)
    ids = torch.randint(0, 1003, (2, 333), generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("FASTQLORA_NF4_FUSED", fused)
        results[fused] = _loss_and_grads(model, input_ids=ids, labels=ids)
    (l0, g0), (l1, g1) = results["0"], results["1"]
    assert abs(l1 - l0) < 1e-2 * abs(l0)
    assert max(rel_err(g1[n], g0[n]) for n in g0) < 3e-2
