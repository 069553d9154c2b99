"""NF4 against bitsandbytes 0.50.2, byte for byte and value for value."""
from __future__ import annotations

import json

import pytest
import torch

from fastqlora.quant import NF4Tensor, dequantize_nf4_reference, dynamic_map, quantize_nf4

bnb_f = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# sizes that are not multiples of 64 or 256, odd ones, and a 2-D weight
SHAPES = [(1,), (63,), (65,), (257 * 3 + 1,), (4097 * 3,), (130, 77), (64 * 256 * 2 + 5,)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _random(shape, dtype, seed, zero_block=False):
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand((), generator=g) * 6 - 3)
    x = torch.randn(shape, generator=g) * scale
    if zero_block:
        x.view(-1)[: min(x.numel(), 140)] = 0.0
    return x.to(dtype)


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_quantize_and_dequantize_bit_for_bit(shape, dtype, nested):
    for seed, zeros in ((hash((shape, str(dtype), nested)) % 10_000, False), (7, True)):
        x = _random(shape, dtype, seed, zero_block=zeros)
        q_ref, st = bnb_f.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
        t = NF4Tensor.quantize(x, blocksize=64, compress_statistics=nested)
        assert torch.equal(t.packed, q_ref.reshape(-1))
        assert torch.equal(t.absmax, st.absmax)
        if nested:
            assert torch.equal(t.nested_absmax, st.state2.absmax)
            assert torch.equal(t.nested_code, st.state2.code)
            assert t.nested_offset == float(st.offset)
        ours = t.dequantize()
        ref = bnb_f.dequantize_4bit(q_ref, st)
        assert ours.shape == x.shape and ours.dtype == dtype
        assert torch.equal(_bits(ours.reshape(-1)), _bits(ref.reshape(-1)))
        assert torch.equal(_bits(dequantize_nf4_reference(t).reshape(-1)), _bits(ours.reshape(-1)))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_to_another_dtype_and_into_out(out_dtype):
    x = _random((333, 64), torch.bfloat16, 3)
    t = NF4Tensor.quantize(x)
    expected = dequantize_nf4_reference(t, out_dtype)
    out = torch.empty(t.numel, dtype=out_dtype)
    got = t.dequantize(out_dtype, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(_bits(got.reshape(-1)), _bits(expected.reshape(-1)))


def test_checkpoint_round_trip_matches_bitsandbytes_state():
    x = _random((96, 200), torch.bfloat16, 11)
    q_ref, st = bnb_f.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    t = NF4Tensor.quantize(x)
    ours = t.to_checkpoint("model.layers.0.mlp.up_proj")
    theirs = {f"model.layers.0.mlp.up_proj.weight.{k}": v for k, v in st.as_dict(packed=True).items()}
    theirs["model.layers.0.mlp.up_proj.weight"] = q_ref
    assert set(ours) == set(theirs)
    for k in ours:
        if k.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(ours[k].tolist())) == json.loads(bytes(theirs[k].tolist()))
        else:
            assert torch.equal(ours[k], theirs[k]), k
    back = NF4Tensor.from_checkpoint(theirs, "model.layers.0.mlp.up_proj", source="x.safetensors")
    assert torch.equal(_bits(back.dequantize().reshape(-1)), _bits(t.dequantize().reshape(-1)))
    # and bitsandbytes reads what we write
    qs = bnb_f.QuantState.from_dict({k.split("up_proj.weight.")[-1]: v for k, v in ours.items()
                                     if "up_proj.weight." in k}, device=torch.device("cpu"))
    assert torch.equal(_bits(bnb_f.dequantize_4bit(ours["model.layers.0.mlp.up_proj.weight"], qs).reshape(-1)),
                       _bits(t.dequantize().reshape(-1)))


def test_bad_input_is_explained():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        NF4Tensor.quantize(torch.ones(10, dtype=torch.float64))
    with pytest.raises(TypeError, match="int64"):
        quantize_nf4(torch.ones(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        NF4Tensor.quantize(torch.ones(0))
    with pytest.raises(ValueError, match="blocksize 48"):
        quantize_nf4(torch.ones(10), blocksize=48)
    t = NF4Tensor.quantize(torch.randn(100))
    with pytest.raises(ValueError, match="absmax must have"):
        NF4Tensor(t.packed, t.absmax[:1], t.shape, t.dtype, nested_absmax=t.nested_absmax,
                  nested_code=t.nested_code, nested_offset=t.nested_offset)
    with pytest.raises(ValueError, match="packed codes"):
        NF4Tensor(t.packed[:3], t.absmax, t.shape, t.dtype)
    ckpt = t.to_checkpoint("w")
    truncated = dict(ckpt)
    truncated["w.weight.quant_state.bitsandbytes__nf4"] = ckpt["w.weight.quant_state.bitsandbytes__nf4"][:20]
    with pytest.raises(ValueError, match=r"w\.weight\.quant_state.*model\.safetensors.*truncated"):
        NF4Tensor.from_checkpoint(truncated, "w", source="model.safetensors")
    missing = {k: v for k, v in ckpt.items() if not k.endswith("nested_absmax")}
    with pytest.raises(ValueError, match=r"w\.weight\.nested_absmax is missing in model\.safetensors"):
        NF4Tensor.from_checkpoint(missing, "w", source="model.safetensors")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4096), (1024, 4096)], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_cuda_matches_bitsandbytes_cuda(shape, dtype, nested):
    x = _random(shape, dtype, 5, zero_block=True).cuda()
    q_ref, st = bnb_f.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
    t = NF4Tensor.quantize(x, blocksize=64, compress_statistics=nested)
    assert torch.equal(t.packed, q_ref.reshape(-1))
    assert torch.equal(t.absmax, st.absmax)
    if nested:
        assert torch.equal(t.nested_absmax, st.state2.absmax)
        assert t.nested_offset == float(st.offset)
    ref = bnb_f.dequantize_4bit(q_ref, st)
    assert torch.equal(_bits(t.dequantize().reshape(-1)), _bits(ref.reshape(-1)))
    # our CUDA dequantize equals our reference on the same codes
    assert torch.equal(_bits(t.dequantize().reshape(-1)), _bits(dequantize_nf4_reference(t).reshape(-1)))
    # and our CPU dequantize of the CUDA codes
    assert torch.equal(_bits(t.to("cpu").dequantize().reshape(-1)), _bits(t.dequantize().cpu().reshape(-1)))


@pytest.mark.gpu
def test_cuda_dequantize_on_a_side_stream():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    t = NF4Tensor.quantize(x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = t.dequantize()
    s.synchronize()
    assert torch.equal(out, dequantize_nf4_reference(t))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_cuda_every_dequantize_launch_shape_gives_the_same_bits(dtype, nested):
    """The benchmark sweeps the launch (bytes per thread, unroll, grid); each must equal bnb."""
    import fastqlora._C as C

    before = C.nf4_dequantize_get_config()
    x = _random((64 * 1021 + 37,), dtype, 11, zero_block=True).cuda()
    q_ref, st = bnb_f.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
    ref = _bits(bnb_f.dequantize_4bit(q_ref, st).reshape(-1))
    t = NF4Tensor.quantize(x, blocksize=64, compress_statistics=nested)
    try:
        for nbytes in (4, 8, 16):
            for unroll in (1, 2, 4):
                for per_sm in (0, 1, 16):
                    for streaming in (0, 1):
                        C.nf4_dequantize_config(nbytes, unroll, per_sm, streaming)
                        got = _bits(t.dequantize().reshape(-1))
                        assert torch.equal(got, ref), (nbytes, unroll, per_sm, streaming)
    finally:
        C.nf4_dequantize_config(*before)
