// The one- and two-row NF4 products for decoding: y = x·dequant(W)ᵀ + s·xa·Bᵀ + bias, x [M, K],
// M = 1 or 2.
//
// At one token the product reads each 4-bit weight once and does one multiply-add with
// it, so it is bound by the weight's bytes and by the instructions a weight costs. Two
// choices keep that cost at ~3 instructions (a shift, a shuffle, a fused multiply-add;
// at two rows one more multiply-add, the decoded code serving both):
//
// * the absmax is factored out of each 64-weight block,
//       y[n] = Σ_b absmax[n, b] · Σ_{k ∈ b} code[q[n, k]] · x[k],
//   so the inner sum multiplies x by the exact fp32 code, and the absmax (decoded from
//   its 8-bit double quantization) is applied once per 32 weights;
// * the 16-entry code table lives in registers across the warp: lane l holds
//   code[l mod 16], and `__shfl_sync(table, i)` reads entry i mod 32 — lanes 16-31
//   repeat 0-15, so the nibble needs no masking, only a shift into the low bits.
//   (A table of fp16 codes in byte permutes, which spares the shuffle pipe, and tables
//   in shared memory indexed by a whole byte (both codes in one load) measured no faster
//   on any Llama-3-8B shape: benchmarks/NOTES.md.)
//
// Layout: a warp owns R consecutive weight rows; each step its 32 lanes read 16
// contiguous bytes (32 weights) each of every row, 512 bytes a row, so every load is
// coalesced and the R loads of a lane are in flight together. x's 32 values of a lane
// (of each of x's MR rows) are loaded once a step and reused for the R weight rows; each
// row of x keeps its own sums, in the order a one-row product sums them, so a two-row
// product's rows are bit for bit two one-row products. Lanes past the row's end (K not a
// multiple of 1024) re-read the step's first bytes and weigh them by zero, so every lane
// takes part in the shuffles. With K split over S warps of a block, each takes every
// S-th step of the same rows and the first sums their totals in a fixed order.
// Sums are in fp32; the result is rounded once to the output dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "cuda_convert.cuh"
#include "nf4.h"

namespace fq {
namespace {

constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ void unpack2(uint32_t u, float& a, float& b);
template <> __device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t u, float& a, float& b) {
  a = __uint_as_float(u << 16);  // the lower half is the element at the lower index
  b = __uint_as_float(u & 0xffff0000u);
}
template <> __device__ __forceinline__ void unpack2<__half>(uint32_t u, float& a, float& b) {
  __half2 h;
  memcpy(&h, &u, 4);
  const float2 f = __half22float2(h);
  a = f.x;
  b = f.y;
}

// Σ code[q_j]·x[m][j] over the 32 weights of 16 packed bytes (byte i: weight 2i in the
// high nibble, 2i+1 in the low), for each of the MR rows of x; `table` is this lane's
// code[lane mod 16]. Each code is looked up once and used for every row.
template <int MR>
__device__ __forceinline__ void dot32(uint4 w, const float (&x)[MR][32], float table, float (&out)[MR]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float even[MR], odd[MR];  // two chains a row: more independent FMAs in flight
#pragma unroll
  for (int m = 0; m < MR; ++m) even[m] = odd[m] = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float ce = __shfl_sync(kFull, table, static_cast<int>(words[q] >> (8 * i + 4)));
      const float co = __shfl_sync(kFull, table, static_cast<int>(words[q] >> (8 * i)));
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        even[m] = __fmaf_rn(ce, x[m][8 * q + 2 * i], even[m]);
        odd[m] = __fmaf_rn(co, x[m][8 * q + 2 * i + 1], odd[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) out[m] = __fadd_rn(even[m], odd[m]);
}

// Q (double quantization): a block's absmax is code2[qabsmax[b]]·absmax2[b >> shift2] +
// offset, rounded as bitsandbytes rounds it (product, then sum, each rounded: the extension
// is built without FMA contraction). The nested block size is a power of two (2^shift2): a
// 64-bit division per row and step cost more than the row's 32 weights (measured in the
// SASS: a call to the s64 division routine).

template <typename T, int MR, int R, int S, bool Q>
__global__ void __launch_bounds__(256) k_nf4_gemv(
    const T* __restrict__ x, int64_t K, const uint8_t* __restrict__ packed, const float* __restrict__ code,
    const float* __restrict__ absmax, const uint8_t* __restrict__ qabsmax, const float* __restrict__ code2,
    const float* __restrict__ absmax2, float offset, int shift2, int64_t N, const T* __restrict__ xa,
    const T* __restrict__ lora_b, int rank, float scale, const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float partial[8][MR * R];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int part = wib % S;
  const float table = __ldg(code + (lane & 15));
  // 32-bit offsets (the host refuses a packed weight of 2 GiB or more): with 64-bit row
  // pointers the compiler rebuilt each row's addresses every step (~45 instructions a row
  // and step, against 96 for its 32 weights; SASS, offline sm_90).
  const uint32_t row_bytes = static_cast<uint32_t>(K / 2);
  const uint32_t row_blocks = static_cast<uint32_t>(K / 64);
  const int rows_n = static_cast<int>(N);
  const int per_block = (blockDim.x >> 5) / S;  // row groups a block
  const int groups = (rows_n + R - 1) / R;
  for (int gb = blockIdx.x; gb * per_block < groups; gb += gridDim.x) {
    const int g_raw = gb * per_block + wib / S;
    const bool live = g_raw < groups;  // a spare warp of the last block repeats a group, unstored
    const int n0 = (live ? g_raw : groups - 1) * R;
    // Rows past N (the last group) repeat row N-1; their sums are never stored. Every
    // load below is unconditional, so the warp never diverges around the shuffles.
    uint32_t wofs[R], bofs[R];
    float acc[MR][R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t n = static_cast<uint32_t>(n0 + r < rows_n ? n0 + r : rows_n - 1);
      wofs[r] = n * row_bytes;
      bofs[r] = n * row_blocks;
#pragma unroll
      for (int m = 0; m < MR; ++m) acc[m][r] = 0.0f;
    }
    if (lora_b != nullptr && part == 0 && lane < R) {
      // the epilogue's LoRA row into L2 while the weights stream
      const int64_t n = n0 + lane < rows_n ? n0 + lane : rows_n - 1;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(lora_b + n * rank));
    }
    for (uint32_t step = 512 * part; step < row_bytes; step += 512 * S) {
      // this lane's 16 bytes; past the row's end (K not a multiple of 1024) it re-reads
      // the step's first bytes and weighs them by zero
      const uint32_t c0 = step + 16 * lane;
      const bool in_row = c0 < row_bytes;
      const uint32_t c = in_row ? c0 : step;
      const uint32_t cb = c >> 5;  // the lane's absmax block within the row
      // Every row's independent loads (weights; the absmax, or its 8-bit index and the
      // nested absmax) go out together, then the code2 lookups that wait on the indices.
      // Interleaved row by row, each lookup held back the next row's loads: 20.2 -> 16.6 µs
      // for 14336 x 4096 on the H200 (benchmarks/NOTES.md).
      uint4 w[R];
      float a_raw[R];
      uint32_t q_raw[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[r] = __ldg(reinterpret_cast<const uint4*>(packed + (wofs[r] + c)));
        const uint32_t b = bofs[r] + cb;
        if constexpr (Q) {
          q_raw[r] = __ldg(qabsmax + b);
          a_raw[r] = __ldg(absmax2 + (b >> shift2));
        } else {
          a_raw[r] = __ldg(absmax + b);
        }
      }
      float amax[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float a = a_raw[r];
        if constexpr (Q) a = __fadd_rn(__fmul_rn(__ldg(code2 + q_raw[r]), a_raw[r]), offset);
        amax[r] = in_row ? a : 0.0f;
      }
      float xv[MR][32];
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + (m * 2 * row_bytes + 2 * c));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint4 v = __ldg(xp + j);
          unpack2<T>(v.x, xv[m][8 * j + 0], xv[m][8 * j + 1]);
          unpack2<T>(v.y, xv[m][8 * j + 2], xv[m][8 * j + 3]);
          unpack2<T>(v.z, xv[m][8 * j + 4], xv[m][8 * j + 5]);
          unpack2<T>(v.w, xv[m][8 * j + 6], xv[m][8 * j + 7]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float d[MR];
        dot32<MR>(w[r], xv, table, d);
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[m][r] = __fmaf_rn(d[m], amax[r], acc[m][r]);
      }
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        for (int o = 16; o > 0; o >>= 1) acc[m][r] += __shfl_xor_sync(kFull, acc[m][r], o);
      }
    }
    if (S > 1) {
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < MR; ++m) {
#pragma unroll
          for (int r = 0; r < R; ++r) partial[wib][m * R + r] = acc[m][r];
        }
      }
      __syncthreads();
      if (part == 0) {
#pragma unroll
        for (int m = 0; m < MR; ++m) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float v = partial[wib][m * R + r];
            for (int p = 1; p < S; ++p) v += partial[wib + p][m * R + r];
            acc[m][r] = v;
          }
        }
      }
      __syncthreads();  // the next group's totals overwrite `partial`
    }
    if (part != 0 || !live) continue;
    // LoRA: s·Σ_j xa[m, j]·B[n, j], lanes splitting j; then bias; one lane stores. Every
    // row's loads are issued before any row's sum: row by row, each waited on the last
    // (R dependent round trips at the kernel's end).
    float lo[MR][R];
    float bv[R];
    if (lora_b != nullptr && rank <= 32) {
      // one term a lane: the loads carry no loop, so all R are in flight together
      const bool has = lane < rank;
      float xj[MR];
#pragma unroll
      for (int m = 0; m < MR; ++m) xj[m] = has ? to_f32(xa[m * rank + lane]) : 0.0f;
      T braw[R];
#pragma unroll
      for (int r = 0; r < R; ++r) braw[r] = has && n0 + r < rows_n ? lora_b[int64_t{n0 + r} * rank + lane] : from_f32<T>(0.0f);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
#pragma unroll
        for (int r = 0; r < R; ++r) lo[m][r] = xj[m] * to_f32(braw[r]);
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < MR; ++m) lo[m][r] = 0.0f;
        if (lora_b != nullptr && n0 + r < rows_n) {
          for (int j = lane; j < rank; j += 32) {
#pragma unroll
            for (int m = 0; m < MR; ++m) {
              lo[m][r] = __fmaf_rn(to_f32(xa[m * rank + j]), to_f32(lora_b[int64_t{n0 + r} * rank + j]), lo[m][r]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) bv[r] = bias != nullptr && n0 + r < rows_n && lane == 0 ? to_f32(bias[n0 + r]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int n = n0 + r;
        float v = acc[m][r];
        if (lora_b != nullptr) {
          float l = lo[m][r];
          for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(kFull, l, o);
          v = __fmaf_rn(scale, l, v);
        }
        if (lane == 0 && n < rows_n) y[int64_t{m} * rows_n + n] = from_f32<T>(bias != nullptr ? v + bv[r] : v);
      }
    }
  }
}

template <typename T, int MR, int R, int S, bool Q>
void launch(const void* x, int64_t K, const uint8_t* packed, const float* code, const float* absmax,
            const uint8_t* qabsmax, const float* code2, const float* absmax2, float offset, int shift2,
            int64_t N, const void* xa, const void* lora_b, int rank, float scale, const void* bias, void* y,
            int warps, cudaStream_t s) {
  const int64_t groups = (N + R - 1) / R;
  const int64_t per_block = warps / S;
  const int64_t blocks = (groups + per_block - 1) / per_block;
  k_nf4_gemv<T, MR, R, S, Q><<<static_cast<unsigned>(blocks), 32 * warps, 0, s>>>(
      static_cast<const T*>(x), K, packed, code, absmax, qabsmax, code2, absmax2, offset, shift2, N,
      static_cast<const T*>(xa), static_cast<const T*>(lora_b), rank, scale, static_cast<const T*>(bias),
      static_cast<T*>(y));
  FQ_CUDA_CHECK_LAUNCH("k_nf4_gemv");
}

// Args after the config: x, K, packed, code, absmax, qabsmax, code2, absmax2, offset, shift2,
// N, xa, lora_b, rank, scale, bias, y, warps, stream.
#define FQ_GEMV_ARGS x, K, packed, code, absmax, qabsmax, code2, absmax2, offset, shift2, N, xa, lora_b, rank, scale, bias, y, warps, s

template <typename T, bool Q>
void launch_config(int m, int rows, int split, const void* x, int64_t K, const uint8_t* packed, const float* code,
                   const float* absmax, const uint8_t* qabsmax, const float* code2, const float* absmax2,
                   float offset, int shift2, int64_t N, const void* xa, const void* lora_b, int rank, float scale,
                   const void* bias, void* y, int warps, cudaStream_t s) {
  switch (m * 256 + rows * 16 + split) {
    case 256 + 1 * 16 + 1: return launch<T, 1, 1, 1, Q>(FQ_GEMV_ARGS);
    case 256 + 2 * 16 + 1: return launch<T, 1, 2, 1, Q>(FQ_GEMV_ARGS);
    case 256 + 4 * 16 + 1: return launch<T, 1, 4, 1, Q>(FQ_GEMV_ARGS);
    case 256 + 8 * 16 + 1: return launch<T, 1, 8, 1, Q>(FQ_GEMV_ARGS);
    case 256 + 2 * 16 + 2: return launch<T, 1, 2, 2, Q>(FQ_GEMV_ARGS);
    case 256 + 4 * 16 + 2: return launch<T, 1, 4, 2, Q>(FQ_GEMV_ARGS);
    case 256 + 8 * 16 + 2: return launch<T, 1, 8, 2, Q>(FQ_GEMV_ARGS);
    case 256 + 2 * 16 + 4: return launch<T, 1, 2, 4, Q>(FQ_GEMV_ARGS);
    case 256 + 4 * 16 + 4: return launch<T, 1, 4, 4, Q>(FQ_GEMV_ARGS);
    case 256 + 8 * 16 + 4: return launch<T, 1, 8, 4, Q>(FQ_GEMV_ARGS);
    // two rows of x: no one-row-a-warp kernel (each warp's x loads then serve one weight row)
    case 512 + 2 * 16 + 1: return launch<T, 2, 2, 1, Q>(FQ_GEMV_ARGS);
    case 512 + 4 * 16 + 1: return launch<T, 2, 4, 1, Q>(FQ_GEMV_ARGS);
    case 512 + 8 * 16 + 1: return launch<T, 2, 8, 1, Q>(FQ_GEMV_ARGS);
    case 512 + 2 * 16 + 2: return launch<T, 2, 2, 2, Q>(FQ_GEMV_ARGS);
    case 512 + 4 * 16 + 2: return launch<T, 2, 4, 2, Q>(FQ_GEMV_ARGS);
    case 512 + 8 * 16 + 2: return launch<T, 2, 8, 2, Q>(FQ_GEMV_ARGS);
    case 512 + 2 * 16 + 4: return launch<T, 2, 2, 4, Q>(FQ_GEMV_ARGS);
    case 512 + 4 * 16 + 4: return launch<T, 2, 4, 4, Q>(FQ_GEMV_ARGS);
    case 512 + 8 * 16 + 4: return launch<T, 2, 8, 4, Q>(FQ_GEMV_ARGS);
    default:
      throw std::invalid_argument("nf4_gemv_cuda: no kernel for " + std::to_string(m) + " rows of x, " +
                                  std::to_string(rows) + " weight rows a warp and K split " + std::to_string(split) +
                                  "; one row of x: weight rows 1/2/4/8 with split 1, 2/4/8 with split 2 or 4; "
                                  "two rows of x: weight rows 2/4/8 with split 1, 2 or 4");
  }
}
#undef FQ_GEMV_ARGS

}  // namespace

void nf4_gemv_cuda(const void* x, int64_t M, int64_t K, const uint8_t* packed, const float* code, const float* absmax,
                   const uint8_t* qabsmax, const float* code2, const float* absmax2, float offset,
                   int64_t blocksize2, int64_t N, const void* xa, const void* lora_b, int rank, float scale,
                   const void* bias, void* y, int dtype, int rows, int warps, int split, int64_t stream) {
  if (K % 64 != 0 || K <= 0 || N <= 0) {
    throw std::invalid_argument("nf4_gemv_cuda: K must be a positive multiple of 64 and N positive, got K=" +
                                std::to_string(K) + ", N=" + std::to_string(N));
  }
  if (M < 1 || M > 2) throw std::invalid_argument("nf4_gemv_cuda: x must have 1 or 2 rows, got " + std::to_string(M));
  if (warps < 1 || warps > 8) throw std::invalid_argument("nf4_gemv_cuda: warps per block must be 1..8");
  if (split < 1 || warps % split != 0) {
    throw std::invalid_argument("nf4_gemv_cuda: the K split (" + std::to_string(split) +
                                ") must divide the warps per block (" + std::to_string(warps) + ")");
  }
  if (reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(packed) % 16) {
    throw std::invalid_argument("nf4_gemv_cuda: x and the packed weight must be 16-byte aligned");
  }
  int shift2 = 0;
  while ((int64_t{1} << shift2) < blocksize2) ++shift2;
  if (qabsmax != nullptr && (int64_t{1} << shift2) != blocksize2) {
    throw std::invalid_argument("nf4_gemv_cuda: the nested absmax block size must be a power of two, got " +
                                std::to_string(blocksize2));
  }
  if (N > int64_t{INT32_MAX} / (K / 2)) {
    throw std::invalid_argument("nf4_gemv_cuda: the packed weight (N=" + std::to_string(N) + ", K=" +
                                std::to_string(K) + ") must be under 2 GiB (the kernel's offsets are 32-bit)");
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
#define FQ_GEMV_CALL(T, Q)                                                                                   \
  return launch_config<T, Q>(static_cast<int>(M), rows, split, x, K, packed, code, absmax, qabsmax, code2, absmax2, offset, shift2, \
                             N, xa, lora_b, rank, scale, bias, y, warps, s)
  const bool nested = qabsmax != nullptr;
  switch (dtype) {
    case kF16:
      if (nested) FQ_GEMV_CALL(__half, true);
      FQ_GEMV_CALL(__half, false);
    case kBF16:
      if (nested) FQ_GEMV_CALL(__nv_bfloat16, true);
      FQ_GEMV_CALL(__nv_bfloat16, false);
    default: throw std::invalid_argument("nf4_gemv_cuda: x must be float16 or bfloat16");
  }
#undef FQ_GEMV_CALL
}

}  // namespace fq
