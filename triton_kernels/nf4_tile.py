"""Dequantizing one tile of an NF4 weight inside a Triton kernel (bitsandbytes' layout).

The weight W [N, K] is stored row-major as 4-bit codes, two per byte, the even index in
the high nibble; one absmax per 64 consecutive weights, so with K a multiple of 64 a
block never crosses a row and W[n, k] uses absmax[n·K/64 + k/64]. With double
quantization the absmax is one byte: ``absmax = nested_code[a8]·nested_absmax[b/256] +
offset``. A tile covers rows ``n`` and 64-aligned columns ``k0 .. k0+BC``; the matmul
kernels call this once per step of their loop, so no 16-bit copy of W is ever written.

Every value is ``code[q]·absmax`` in fp32, rounded once to the output dtype: the same
numbers bitsandbytes' dequantize writes. Two ways to get there:

* ``ASM`` (bf16/fp16 on a GPU): one inline-PTX block per 4 packed bytes (8 weights)
  extracts each nibble with a byte permute, forms the table address with one wide
  multiply-add, reads the fp32 code with a non-coherent load (the 64-byte table stays
  in L1), multiplies by the absmax and packs pairs with one convert: about 4.5
  instructions a weight. Plain ``tl.load`` lookups cost ~12: Triton forms 64-bit
  addresses with two instructions each, and its pipeliner stages the dependent table
  loads through shared memory with asynchronous copies, one per weight.
* the portable form (the interpreter, fp32): the same lookups as ``tl.load``.

The high-nibble and low-nibble values come out as two [BR, BC/2] tensors that
``tl.join`` + reshape interleave in registers (pairs held by one thread: no shuffle).
"""
from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

from ..quant import NF4_CODE


def use_asm(t: torch.Tensor) -> bool:
    """Whether kernels on ``t`` may use inline PTX: a CUDA tensor, not under the
    interpreter (which cannot run PTX). ``FASTQLORA_NF4_PTX=0`` forces the portable
    decode (for A/B timing; on Hopper only the W_AS_A tiles compile that way)."""
    return (t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("FASTQLORA_NF4_PTX", "1") != "0")

# Outputs: $0-$1 the four high-nibble values (bf16x2 each), $2-$3 the four low-nibble
# values; inputs: $4 four packed bytes, $5-$8 their absmax, $9-$12 the table address.
# In a bf16x2 register the lower half is the element at the lower index.
_DECODE_PTX = """
{
.reg .b32 h, l, i<8>;
.reg .b64 a<8>;
.reg .f32 v<8>;
shr.b32 h, $4, 4;
and.b32 h, h, 0x0F0F0F0F;
and.b32 l, $4, 0x0F0F0F0F;
prmt.b32 i0, h, 0, 0x4440;
prmt.b32 i1, h, 0, 0x4441;
prmt.b32 i2, h, 0, 0x4442;
prmt.b32 i3, h, 0, 0x4443;
prmt.b32 i4, l, 0, 0x4440;
prmt.b32 i5, l, 0, 0x4441;
prmt.b32 i6, l, 0, 0x4442;
prmt.b32 i7, l, 0, 0x4443;
mad.wide.u32 a0, i0, 4, $9;
mad.wide.u32 a1, i1, 4, $9;
mad.wide.u32 a2, i2, 4, $9;
mad.wide.u32 a3, i3, 4, $9;
mad.wide.u32 a4, i4, 4, $9;
mad.wide.u32 a5, i5, 4, $9;
mad.wide.u32 a6, i6, 4, $9;
mad.wide.u32 a7, i7, 4, $9;
ld.global.nc.f32 v0, [a0];
ld.global.nc.f32 v1, [a1];
ld.global.nc.f32 v2, [a2];
ld.global.nc.f32 v3, [a3];
ld.global.nc.f32 v4, [a4];
ld.global.nc.f32 v5, [a5];
ld.global.nc.f32 v6, [a6];
ld.global.nc.f32 v7, [a7];
mul.f32 v0, v0, $5;
mul.f32 v1, v1, $6;
mul.f32 v2, v2, $7;
mul.f32 v3, v3, $8;
mul.f32 v4, v4, $5;
mul.f32 v5, v5, $6;
mul.f32 v6, v6, $7;
mul.f32 v7, v7, $8;
cvt.rn.CVT.f32 $0, v1, v0;
cvt.rn.CVT.f32 $1, v3, v2;
cvt.rn.CVT.f32 $2, v5, v4;
cvt.rn.CVT.f32 $3, v7, v6;
}
"""
_DECODE_BF16: tl.constexpr = tl.constexpr(_DECODE_PTX.replace("CVT", "bf16x2"))
_DECODE_F16: tl.constexpr = tl.constexpr(_DECODE_PTX.replace("CVT", "f16x2"))
_DECODE_CONS: tl.constexpr = tl.constexpr("=r,=r,=r,=r,r,r,r,r,r,l,l,l,l")


# bitsandbytes' NF4 code values (fp32), written into the register-table PTX as immediates.
NF4_VALUES = tuple(NF4_CODE.tolist())


def _f32_hex(v: float) -> str:
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", v))[0]


def _lut_ptx(words: int, cvt: str) -> str:
    """Register-table decode of ``words`` 32-bit words (4·words packed bytes of one row
    and one absmax block) into 16-bit values, no memory reads.

    The 16 values a block can take, ``T[c] = cvt(code[c]·absmax)``, are built once per
    call (16 multiplies, 8 packing converts) and split into a low-byte plane and a
    high-byte plane of four registers each. ``prmt`` picks four bytes out of a register
    pair by four 3-bit selectors, so for four codes at once: one ``prmt`` over entries
    0-7, one over 8-15, a ``lop3`` that keeps the second where the code's bit 3 is set
    (the mask itself comes from one ``prmt`` over 0x0000FF00), per plane; two more
    ``prmt`` put the planes' bytes together as bf16x2 pairs. About 3 instructions a
    weight plus 32 a call. Operand order: the high-nibble values (words·2 registers),
    the low-nibble values (words·2), then the words, then one absmax per byte.
    """
    n_out = 4 * words
    w0 = n_out
    am = n_out + words
    lines = ["{", ".reg .b32 t<8>, pl<4>, ph<4>, s, sh, k, kh, m, a, b, rl, rh, ff;", ".reg .f32 f<16>;",
             "mov.b32 ff, 0x0000FF00;"]
    for c, v in enumerate(NF4_VALUES):
        lines.append(f"mul.rn.f32 f{c}, ${am}, {_f32_hex(v)};")
    for i in range(8):
        lines.append(f"cvt.rn.{cvt}.f32 t{i}, f{2 * i + 1}, f{2 * i};")
    for i in range(4):  # plane register i holds entries 4i .. 4i+3
        lines.append(f"prmt.b32 pl{i}, t{2 * i}, t{2 * i + 1}, 0x6420;")
        lines.append(f"prmt.b32 ph{i}, t{2 * i}, t{2 * i + 1}, 0x7531;")
    for j in range(words):
        w = f"${w0 + j}"
        lines += [f"and.b32 s, {w}, 0x77777777;", "shr.b32 sh, s, 16;",
                  f"shr.b32 k, {w}, 3;", "and.b32 k, k, 0x11111111;", "shr.b32 kh, k, 16;"]
        for half, (sel, msel) in enumerate((("s", "k"), ("sh", "kh"))):
            # nibbles of this half, low first: byte0.lo, byte0.hi, byte1.lo, byte1.hi
            lines += [f"prmt.b32 m, ff, 0, {msel};",
                      f"prmt.b32 a, pl0, pl1, {sel};", f"prmt.b32 b, pl2, pl3, {sel};",
                      "lop3.b32 rl, a, b, m, 0xD8;",
                      f"prmt.b32 a, ph0, ph1, {sel};", f"prmt.b32 b, ph2, ph3, {sel};",
                      "lop3.b32 rh, a, b, m, 0xD8;"]
            reg = 2 * j + half  # output register index within each of the two outputs
            lines.append(f"prmt.b32 ${reg}, rl, rh, 0x7351;")  # high-nibble values (bytes 2i, 2i+1)
            lines.append(f"prmt.b32 ${2 * words + reg}, rl, rh, 0x6240;")  # low-nibble values
    lines.append("}")
    return "\n".join(lines)


_LUT8_BF16: tl.constexpr = tl.constexpr(_lut_ptx(2, "bf16x2"))
_LUT8_F16: tl.constexpr = tl.constexpr(_lut_ptx(2, "f16x2"))
_LUT8_CONS: tl.constexpr = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 2 + ["r"] * 8))


def lut_pack(rows: int, cols: int, num_warps: int) -> int:
    """The register-table decode's group: 8 bytes (16 weights of one row and one absmax
    block) when each thread of a [rows, cols] weight tile holds at least 8 bytes, else 0
    (the table-read decode). Triton gives a thread its bytes in aligned runs of 8 or 16
    (16-byte-aligned rows), so a group of 8 never straddles a row or a block; groups of
    16 did straddle on the H200 (a [64, 128] tile held runs of 8), so 16 is not used."""
    per_thread = rows * cols // 2 // (32 * num_warps)
    return 8 if per_thread >= 8 else 0


_standard_code: dict[tuple[int, int], bool] = {}


def lut_for(w, t: torch.Tensor, rows: int, cols: int, num_warps: int, w_as_a: bool = False) -> int:
    """The ``LUT`` argument of nf4_tile for weight ``w`` in a kernel on ``t``'s dtype and
    device: the register-table group size when PTX may be used, the output is 16-bit, the
    weight's code is NF4's (checked once per code tensor) and the tile gives each thread
    at least 8 bytes; else 0 (the table-read decode). ``FASTQLORA_NF4_LUT=0`` turns it off.

    Not for W_AS_A tiles: there Triton lays the bytes out for the dot's register operand,
    and a group of 8 straddled rows on the H200 (wrong values, caught by the GPU tests).
    Which registers a group gets is not specified by Triton, so the dispatch also checks
    each configuration's result against the plain path before it uses it."""
    if w_as_a or not use_asm(t) or t.dtype not in (torch.bfloat16, torch.float16):
        return 0
    if os.environ.get("FASTQLORA_NF4_LUT", "1") == "0":
        return 0
    key = (w.code.data_ptr(), w.code.numel())
    if key not in _standard_code:
        _standard_code[key] = w.code.numel() == 16 and torch.equal(w.code.detach().float().cpu(), NF4_CODE)
    return lut_pack(rows, cols, num_warps) if _standard_code[key] else 0


@triton.jit
def _widen(a, BR: tl.constexpr, BH: tl.constexpr):
    """[BR, BH/32] per-block values -> [BR, BH] (each repeated over its 32 bytes)."""
    if BH == 32:
        out = tl.broadcast_to(a, (BR, BH))
    else:
        out = tl.reshape(tl.broadcast_to(a[:, :, None], (BR, BH // 32, 32)), (BR, BH))
    return out


@triton.jit
def _scale(v, amax, BR: tl.constexpr, BH: tl.constexpr):
    """v [BR, BH] (every other weight of the tile) times its block's absmax [BR, BH/32]."""
    if BH == 32:
        v = v * amax
    else:
        v = tl.reshape(tl.reshape(v, (BR, BH // 32, 32)) * amax[:, :, None], (BR, BH))
    return v


@triton.jit
def nf4_absmax(absmax_ptr, blk, nested_absmax_ptr, nested_code_ptr, nested_offset,
               DOUBLE_QUANT: tl.constexpr, NESTED_BLOCK: tl.constexpr, PTX: tl.constexpr = False):
    """The fp32 absmax of blocks ``blk`` (any shape).

    bitsandbytes rounds the product and then the sum (two torch ops); the compiler would
    fuse them into one FMA, which differs in the last bit now and then, so on a GPU
    (``PTX``) they are written as two round-to-nearest instructions it may not fuse.
    """
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + blk).to(tl.int32)
        c = tl.load(nested_code_ptr + a8)
        s = tl.load(nested_absmax_ptr + blk // NESTED_BLOCK)
        if PTX:
            amax = tl.inline_asm_elementwise(
                "mul.rn.f32 $0, $1, $2; add.rn.f32 $0, $0, $3;", "=r,r,r,r",
                [c, s, tl.full(c.shape, 0, tl.float32) + nested_offset],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            amax = c * s + nested_offset
    else:
        amax = tl.load(absmax_ptr + blk)
    return amax


@triton.jit
def nf4_tile(
    w_ptrs,
    blk,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    code_ptr,
    nested_offset,
    BR: tl.constexpr,
    BC: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    OUT: tl.constexpr,
    ASM: tl.constexpr = False,
    LUT: tl.constexpr = 0,
):
    """The [BR, BC] tile in dtype ``OUT``, each value ``code[q]·absmax`` computed in fp32.

    ``w_ptrs`` [BR, BC/2] points at the packed bytes of the tile; ``blk`` [BR, BC/64]
    holds the absmax block index of each 64-wide piece of each row. ``ASM``: running on a
    GPU (not the interpreter), so inline PTX may be used (the decode for bf16/fp16).
    """
    b = tl.load(w_ptrs)
    amax = nf4_absmax(absmax_ptr, blk, nested_absmax_ptr, nested_code_ptr, nested_offset,
                      DOUBLE_QUANT, NESTED_BLOCK, ASM)
    if ASM and OUT != tl.float32 and LUT != 0:
        amw = _widen(amax, BR, BC // 2)
        tl.static_assert(LUT == 8, "the register-table decode takes groups of 8 bytes")
        if OUT == tl.bfloat16:
            hi, lo = tl.inline_asm_elementwise(_LUT8_BF16, _LUT8_CONS, [b, amw], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=8)
        else:
            hi, lo = tl.inline_asm_elementwise(_LUT8_F16, _LUT8_CONS, [b, amw], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=8)
    elif ASM and OUT != tl.float32:
        base = tl.full((BR, BC // 2), 0, tl.int64) + code_ptr.to(tl.int64)
        amw = _widen(amax, BR, BC // 2)
        if OUT == tl.bfloat16:
            hi, lo = tl.inline_asm_elementwise(_DECODE_BF16, _DECODE_CONS, [b, amw, base],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            hi, lo = tl.inline_asm_elementwise(_DECODE_F16, _DECODE_CONS, [b, amw, base],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        b = b.to(tl.int32)
        hi = _scale(tl.load(code_ptr + (b >> 4)), amax, BR, BC // 2).to(OUT)
        lo = _scale(tl.load(code_ptr + (b & 15)), amax, BR, BC // 2).to(OUT)
    # Byte j holds weight 2j (high nibble) and 2j+1 (low): pair them in registers.
    return tl.reshape(tl.join(hi, lo), (BR, BC))
