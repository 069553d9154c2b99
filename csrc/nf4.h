// NF4 (4-bit NormalFloat) quantization in bitsandbytes' exact layout, and the 8-bit
// blockwise quantization bitsandbytes uses for double-quantized absmax values.
//
// Layout: element i of the flattened tensor goes to byte i/2, even i in the high
// nibble; one fp32 absmax per block of `blocksize` consecutive elements. Every entry
// point takes raw addresses and sizes (integers), never framework tensors.
#pragma once
#include <cstdint>
#include <tuple>

namespace fq {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// The 16 NF4 values (bitsandbytes' table), ascending.
extern const float kNF4[16];

// ---- CPU ------------------------------------------------------------------------------
// bitsandbytes' CPU rules: x·(1/absmax) (x/absmax for a partial last block) clamped to
// [-1, 1], then the code of the first midpoint not below it; odd counts pad with code 7.
void nf4_quantize_cpu(const void* src, int64_t n, int dtype, int64_t blocksize, uint8_t* packed,
                      float* absmax);
// out[i] = code[q_i]·absmax[i/blocksize] in fp32, rounded to the output dtype.
// With `qabsmax` (nested): absmax_b = code2[qabsmax_b]·absmax2[b/blocksize2] + offset.
void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                        const float* code2, const float* absmax2, float offset, int64_t blocksize2,
                        int64_t n, int64_t blocksize, void* out, int dtype);
// 8-bit blockwise quantization of fp32 with a sorted 256-entry code, bitsandbytes' CPU
// rule (a 65536-bin lookup table of nearest codes).
void quantize_blockwise8_cpu(const float* src, int64_t n, const float* code, int64_t blocksize,
                             uint8_t* out, float* absmax);

#ifdef FASTQLORA_WITH_CUDA
// ---- CUDA (on `stream`) ---------------------------------------------------------------
// bitsandbytes' CUDA rules: NF4 by its decision tree on x·(1/absmax); 8-bit by its
// binary search with midpoint ties.
void nf4_quantize_cuda(const void* src, int64_t n, int dtype, int64_t blocksize, uint8_t* packed,
                       float* absmax, int64_t stream);
void nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                         const float* code2, const float* absmax2, float offset, int64_t blocksize2,
                         int64_t n, int64_t blocksize, void* out, int dtype, int64_t stream);
void quantize_blockwise8_cuda(const float* src, int64_t n, const float* code, int64_t blocksize,
                              uint8_t* out, float* absmax, int64_t stream);
// The dequantize launch shape (code bytes per thread 4/8/16, chunks per thread 1/2/4,
// blocks per SM with 0 = one pass, evict-first stores 0/1): for the benchmark's sweep;
// every shape gives equal bits.
void nf4_dequantize_config(int bytes, int unroll, int blocks_per_sm, int streaming);
std::tuple<int, int, int, int> nf4_dequantize_get_config();
// One or two rows (decode): y[m, n] = Σ_k x[m, k]·code[q[n, k]]·absmax[n, k/64] + scale·Σ_j
// xa[m, j]·lora_b[n, j] + bias[n], x [M, K], xa [M, rank] and y [M, N] contiguous, M = 1 or 2,
// x/xa/lora_b/bias/y in `dtype` (fp16 or bf16), fp32 sums; blocksize 64, K a
// multiple of 64, packed under 2 GiB, x and packed 16-byte aligned; absmax fp32, or qabsmax with code2/absmax2/
// offset (double quantization). lora_b and bias may be null. `rows` weight rows a warp
// (1, 2, 4, 8), `warps` a block, K split over `split` warps (1, 2, 4; dividing `warps`).
void nf4_gemv_cuda(const void* x, int64_t M, int64_t K, const uint8_t* packed, const float* code, const float* absmax,
                   const uint8_t* qabsmax, const float* code2, const float* absmax2, float offset,
                   int64_t blocksize2, int64_t N, const void* xa, const void* lora_b, int rank, float scale,
                   const void* bias, void* y, int dtype, int rows, int warps, int split, int64_t stream);
// A few rows (decode, 1 <= M <= 16) on the tensor cores (nf4_decode_mma.cu): y[m, n] =
// Σ_k x[m, k]·code[q[n, k]]·absmax[n, k/64] + scale·Σ_j xa[m·xa_stride + j]·lora_b[n, j] + bias[n];
// x [M, K] contiguous, y [M, N], same dtype/absmax/alignment rules as nf4_gemv_cuda. K is split
// over `split` warps of a block (2, 4 or 8) and over `kb` blocks of the grid (1..64); kb > 1 needs
// `ws` (fp32, kb·M·N) and `counters` (int32 zeros, one per (N+15)/16 / (8/split) blocks, left at
// zero) that no other launch uses at the same time. `cols` (M <= 2 only): the column layout,
// each lane reading 16-byte chunks and the step's absmax blocks kept apart in B's columns.
// `groups` > 0 (with cols and kb = 1): blocks of 16 warps, each taking that many row groups of
// 16 weight rows and sharing their K steps evenly over its warps (split is then unused).
// `rows`: weight rows a warp, 16, or 8 with cols (and groups = 0): twice the row groups.
void nf4_decode_mma_cuda(const void* x, int64_t M, int64_t K, const uint8_t* packed, const float* code,
                         const float* absmax, const uint8_t* qabsmax, const float* code2, const float* absmax2,
                         float offset, int64_t blocksize2, int64_t N, const void* xa, int64_t xa_stride,
                         const void* lora_b, int rank, float scale, const void* bias, void* y, int dtype, int split,
                         int kb, bool cols, int groups, int rows, float* ws, int* counters, int64_t stream);
// Up to three such products of one x in one launch (q, k, v; gate, up: one launch instead of
// three, and the narrow ones no longer leave SMs idle): each weight's operands, N and output
// in a DecodeMmaPart, the same K, xa_stride and config for all; all nested or all plain; kb = 1.
struct DecodeMmaPart {
  const uint8_t* packed;
  const float* code;
  const float* absmax;
  const uint8_t* qabsmax;
  const float* code2;
  const float* absmax2;
  float offset;
  int64_t blocksize2;
  int64_t N;
  const void* xa;
  const void* lora_b;
  int rank;
  float scale;
  const void* bias;
  void* y;
};
void nf4_decode_mma_cuda_parts(const void* x, int64_t M, int64_t K, const DecodeMmaPart* parts, int count,
                               int64_t xa_stride, int dtype, int split, int kb, bool cols, int groups, int rows,
                               float* ws, int* counters, int64_t stream);
#endif

}  // namespace fq
