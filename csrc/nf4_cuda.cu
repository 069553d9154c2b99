// NF4 and 8-bit blockwise quantization on CUDA, bit for bit with bitsandbytes' CUDA
// kernels, and a dequantize that runs near memory bandwidth: coalesced 4-byte code
// loads and 16-byte stores, with the double-quantized absmax decoded in the same pass.
// Built with --fmad=false: every multiply and add rounds on its own, as bitsandbytes'
// separate kernels do.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <tuple>

#include "cuda_check.h"
#include "cuda_convert.cuh"
#include "nf4.h"

namespace fq {
namespace {

__constant__ float c_nf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

inline cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

// bitsandbytes' NF4 decision tree (its thresholds, which differ from the fp32 midpoints
// in the last bits); a NaN falls through to code 0 as there.
__device__ __forceinline__ uint8_t nf4_code(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

// bitsandbytes builds with --use_fast_math, so its 1.0f / absmax is the approximate
// reciprocal; the codes match only if ours is the same instruction.
__device__ __forceinline__ float rcp_approx(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per absmax block (blocksize <= 32·VALS); each lane handles VALS consecutive
// values, VALS even so that lanes own whole bytes.
template <typename T, int VALS>
__global__ void k_nf4_quantize(const T* __restrict__ src, int64_t n, int64_t blocksize, uint8_t* __restrict__ packed,
                               float* __restrict__ absmax, int64_t nblocks) {
  const int lane = threadIdx.x & 31;
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (block >= nblocks) return;
  const int64_t base = block * blocksize;
  float v[VALS];
  float m = -FLT_MAX;
#pragma unroll
  for (int j = 0; j < VALS; ++j) {
    const int64_t k = lane * VALS + j;
    const int64_t i = base + k;
    v[j] = (k < blocksize && i < n) ? to_f32(src[i]) : 0.0f;
    if (k < blocksize && i < n) m = fmaxf(m, fabsf(v[j]));
  }
  m = warp_max(m);
  const float inv = rcp_approx(m);
  if (lane == 0) absmax[block] = m;
#pragma unroll
  for (int j = 0; j < VALS; j += 2) {
    const int64_t k = lane * VALS + j;
    const int64_t i = base + k;
    if (k < blocksize && i < n) {
      const uint8_t hi = nf4_code(v[j] * inv);
      const uint8_t lo = nf4_code(v[j + 1] * inv);  // a pad past the end is 0·inv, as in bitsandbytes
      packed[i >> 1] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

// bitsandbytes' dQuantize<0>: binary search over the sorted 256-entry code, then the
// nearer neighbour by midpoint.
__device__ __forceinline__ uint8_t quantize8(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return x > midpoint ? upper_pivot : pivot;
  }
  const float midpoint = (lower + val) * 0.5f;
  return x < midpoint ? lower_pivot : pivot;
}

__global__ void k_quantize8(const float* __restrict__ src, int64_t n, const float* __restrict__ code_g,
                            int64_t blocksize, uint8_t* __restrict__ out, float* __restrict__ absmax) {
  __shared__ float code[256];
  __shared__ float red[32];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code_g[i];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blocksize;
  float m = -FLT_MAX;
  for (int64_t k = threadIdx.x; k < blocksize && base + k < n; k += blockDim.x) m = fmaxf(m, fabsf(src[base + k]));
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    float r = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : -FLT_MAX;
    r = warp_max(r);
    if (threadIdx.x == 0) red[0] = r;
  }
  __syncthreads();
  const float am = red[0];
  const float inv = rcp_approx(am);
  if (threadIdx.x == 0) absmax[blockIdx.x] = am;
  for (int64_t k = threadIdx.x; k < blocksize && base + k < n; k += blockDim.x)
    out[base + k] = quantize8(code, src[base + k] * inv);
}

// Decode the absmax of block b, plain or double-quantized.
__device__ __forceinline__ float block_absmax(const float* absmax, const uint8_t* qabsmax, const float* code2,
                                              const float* absmax2, float offset, int64_t blocksize2, int64_t b) {
  if (qabsmax == nullptr) return absmax[b];
  return code2[qabsmax[b]] * absmax2[b / blocksize2] + offset;  // two roundings (--fmad=false)
}

template <typename T>
struct alignas(16) Pack8 {  // eight outputs: 16 bytes for 16-bit types, 32 for fp32
  T v[8];
};

// A 16- or 32-byte pack to global memory; STREAM marks it evict-first (st.global.cs): the
// output is read by the next kernel at the earliest, so it need not displace the L2's lines.
template <bool STREAM, typename T>
__device__ __forceinline__ void store_pack(Pack8<T>* dst, const Pack8<T>& p) {
  static_assert(sizeof(Pack8<T>) % 16 == 0, "packs are whole 16-byte vectors");
  const uint4* src = reinterpret_cast<const uint4*>(&p);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Pack8<T>) / 16); ++i) {
    if constexpr (STREAM) __stcs(d + i, src[i]); else d[i] = src[i];
  }
}

template <int BYTES>
struct alignas(BYTES) Codes {  // BYTES bytes of packed codes: 2·BYTES values
  uint32_t w[BYTES / 4];
};

// Each thread loads BYTES bytes of codes in one vector load (2·BYTES values, all in one
// absmax block because blocksize % (2·BYTES) == 0) and writes them as BYTES/4 16-byte
// stores (fp32: 32-byte). UNROLL chunks per thread keep several loads in flight; the
// grid is either capped at a few blocks per SM (grid-stride loop) or covers the tensor
// once. Which of these runs fastest is measured by benchmarks/bench_nf4_dequant.py
// (--sweep); see DequantConfig below for the default. The double-quant table (256
// floats) is staged in shared memory so the absmax decode is one byte load, one shared
// load, one cached float load. The n % (2·BYTES) tail is done element by element.
template <typename T, int BYTES, int UNROLL, bool STREAM>
__global__ void __launch_bounds__(256) k_nf4_dequantize(const uint8_t* __restrict__ packed,
                                                        const float* __restrict__ absmax,
                                                        const uint8_t* __restrict__ qabsmax,
                                                        const float* __restrict__ code2,
                                                        const float* __restrict__ absmax2, float offset,
                                                        int64_t blocksize2, int64_t n, int64_t blocksize,
                                                        T* __restrict__ out) {
  __shared__ float table[16];
  __shared__ float code2_s[256];
  if (threadIdx.x < 16) table[threadIdx.x] = c_nf4[threadIdx.x];
  if (qabsmax != nullptr) code2_s[threadIdx.x] = code2[threadIdx.x];  // blockDim.x == 256
  __syncthreads();
  constexpr int VALS = 2 * BYTES;
  const int64_t chunks = n / VALS;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const Codes<BYTES>* src = reinterpret_cast<const Codes<BYTES>*>(packed);
  Pack8<T>* dst = reinterpret_cast<Pack8<T>*>(out);
  for (int64_t base = tid; base < chunks; base += threads * UNROLL) {
    Codes<BYTES> c[UNROLL];
    float am[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t g = base + u * threads;
      if (g < chunks) {
        c[u] = src[g];
        const int64_t b = (g * VALS) / blocksize;
        // two roundings, as bitsandbytes' separate kernels (--fmad=false)
        am[u] = qabsmax == nullptr ? absmax[b] : code2_s[qabsmax[b]] * absmax2[b / blocksize2] + offset;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t g = base + u * threads;
      if (g < chunks) {
#pragma unroll
        for (int i = 0; i < BYTES / 4; ++i) {
          Pack8<T> p;
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const uint32_t byte = (c[u].w[i] >> (8 * b)) & 0xffu;
            p.v[2 * b] = from_f32<T>(table[byte >> 4] * am[u]);
            p.v[2 * b + 1] = from_f32<T>(table[byte & 0xf] * am[u]);
          }
          store_pack<STREAM>(dst + g * (BYTES / 4) + i, p);
        }
      }
    }
  }
  if (tid == 0) {
    for (int64_t i = chunks * VALS; i < n; ++i) {
      const uint8_t byte = packed[i >> 1];
      const uint8_t q = (i & 1) ? (byte & 0xf) : (byte >> 4);
      const float a = block_absmax(absmax, qabsmax, code2, absmax2, offset, blocksize2, i / blocksize);
      out[i] = from_f32<T>(table[q] * a);
    }
  }
}

// Slow path for block sizes that are not multiples of 32 (not used by real models).
template <typename T>
__global__ void k_nf4_dequantize_scalar(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                                        const float* code2, const float* absmax2, float offset,
                                        int64_t blocksize2, int64_t n, int64_t blocksize, T* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint8_t byte = packed[i >> 1];
    const uint8_t q = (i & 1) ? (byte & 0xf) : (byte >> 4);
    out[i] = from_f32<T>(c_nf4[q] * block_absmax(absmax, qabsmax, code2, absmax2, offset, blocksize2, i / blocksize));
  }
}

int sm_count() {
  int dev = 0, sms = 0;
  FQ_CUDA_CHECK(cudaGetDevice(&dev));
  FQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

int grid_for(int64_t work, int threads) {
  const int64_t want = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sm_count()) * 16)));
}

template <typename T>
void launch_quantize(const void* src, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                     cudaStream_t s) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int threads = 256;
  const int64_t grid = (nblocks * 32 + threads - 1) / threads;
  const T* x = static_cast<const T*>(src);
  switch (blocksize) {
    case 32: k_nf4_quantize<T, 2><<<grid, threads, 0, s>>>(x, n, blocksize, packed, absmax, nblocks); break;
    case 64: k_nf4_quantize<T, 2><<<grid, threads, 0, s>>>(x, n, blocksize, packed, absmax, nblocks); break;
    case 128: k_nf4_quantize<T, 4><<<grid, threads, 0, s>>>(x, n, blocksize, packed, absmax, nblocks); break;
    case 256: k_nf4_quantize<T, 8><<<grid, threads, 0, s>>>(x, n, blocksize, packed, absmax, nblocks); break;
    case 512: k_nf4_quantize<T, 16><<<grid, threads, 0, s>>>(x, n, blocksize, packed, absmax, nblocks); break;
    default: throw std::invalid_argument("NF4 quantize on CUDA supports blocksize 32, 64, 128, 256 or 512");
  }
  FQ_CUDA_CHECK_LAUNCH("nf4_quantize");
}

// The dequantize launch: code bytes per thread, chunks per thread, blocks per SM (0: a
// grid that covers the tensor once). Set from Python only by the benchmark's sweep.
struct DequantConfig {
  // fastest overall in bench_nf4_dequant.py --sweep on an H200 (2026-12-01): 4-byte code
  // loads, one chunk a thread, 8 blocks per SM
  int bytes = 4, unroll = 1, blocks_per_sm = 8, streaming = 0;
};
DequantConfig g_dequant;

template <typename T, int BYTES, int UNROLL>
void launch_dequantize_vec(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* code2,
                           const float* absmax2, float offset, int64_t blocksize2, int64_t n, int64_t blocksize,
                           T* out, cudaStream_t s) {
  const int64_t want = std::max<int64_t>(1, (n / (2 * BYTES) + 256 * UNROLL - 1) / (256 * UNROLL));
  int64_t grid = want;
  if (g_dequant.blocks_per_sm > 0) grid = std::min<int64_t>(want, static_cast<int64_t>(sm_count()) * g_dequant.blocks_per_sm);
  grid = std::min<int64_t>(grid, 0x7fffffff);
  if (g_dequant.streaming)
    k_nf4_dequantize<T, BYTES, UNROLL, true><<<static_cast<unsigned>(grid), 256, 0, s>>>(
        packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out);
  else
    k_nf4_dequantize<T, BYTES, UNROLL, false><<<static_cast<unsigned>(grid), 256, 0, s>>>(
        packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out);
}

template <typename T, int BYTES>
void launch_dequantize_bytes(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* code2,
                             const float* absmax2, float offset, int64_t blocksize2, int64_t n, int64_t blocksize,
                             T* out, cudaStream_t s, int unroll) {
  switch (unroll) {
    case 1: return launch_dequantize_vec<T, BYTES, 1>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out, s);
    case 2: return launch_dequantize_vec<T, BYTES, 2>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out, s);
    default: return launch_dequantize_vec<T, BYTES, 4>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out, s);
  }
}

template <typename T>
void launch_dequantize(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* code2,
                       const float* absmax2, float offset, int64_t blocksize2, int64_t n, int64_t blocksize,
                       void* out, cudaStream_t s) {
  T* o = static_cast<T*>(out);
  const auto addr_p = reinterpret_cast<uintptr_t>(packed);
  const bool out_ok = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  // the widest code load the config allows and the block size and alignment permit
  int bytes = g_dequant.bytes;
  while (bytes > 4 && (blocksize % (2 * bytes) != 0 || addr_p % bytes != 0)) bytes /= 2;
  if (blocksize % 8 == 0 && addr_p % 4 == 0 && out_ok) {
    const int u = g_dequant.unroll;
    if (bytes == 16) launch_dequantize_bytes<T, 16>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, o, s, u);
    else if (bytes == 8) launch_dequantize_bytes<T, 8>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, o, s, u);
    else launch_dequantize_bytes<T, 4>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, o, s, u);
  } else {
    k_nf4_dequantize_scalar<T><<<grid_for(n, 256), 256, 0, s>>>(packed, absmax, qabsmax, code2, absmax2, offset,
                                                              blocksize2, n, blocksize, o);
  }
  FQ_CUDA_CHECK_LAUNCH("nf4_dequantize");
}

}  // namespace

void nf4_quantize_cuda(const void* src, int64_t n, int dtype, int64_t blocksize, uint8_t* packed, float* absmax,
                       int64_t stream) {
  if (n <= 0) throw std::invalid_argument("NF4: the tensor must have at least one element");
  switch (dtype) {
    case kF32: return launch_quantize<float>(src, n, blocksize, packed, absmax, as_stream(stream));
    case kF16: return launch_quantize<__half>(src, n, blocksize, packed, absmax, as_stream(stream));
    case kBF16: return launch_quantize<__nv_bfloat16>(src, n, blocksize, packed, absmax, as_stream(stream));
  }
  throw std::invalid_argument("NF4: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
}

void nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* code2,
                         const float* absmax2, float offset, int64_t blocksize2, int64_t n, int64_t blocksize,
                         void* out, int dtype, int64_t stream) {
  if (n <= 0) throw std::invalid_argument("NF4: the tensor must have at least one element");
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case kF32: return launch_dequantize<float>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out, s);
    case kF16: return launch_dequantize<__half>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out, s);
    case kBF16: return launch_dequantize<__nv_bfloat16>(packed, absmax, qabsmax, code2, absmax2, offset, blocksize2, n, blocksize, out, s);
  }
  throw std::invalid_argument("NF4: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
}

void nf4_dequantize_config(int bytes, int unroll, int blocks_per_sm, int streaming) {
  if (bytes != 4 && bytes != 8 && bytes != 16) throw std::invalid_argument("NF4 dequantize: bytes must be 4, 8 or 16");
  if (unroll != 1 && unroll != 2 && unroll != 4) throw std::invalid_argument("NF4 dequantize: unroll must be 1, 2 or 4");
  if (blocks_per_sm < 0) throw std::invalid_argument("NF4 dequantize: blocks_per_sm must be >= 0");
  g_dequant = DequantConfig{bytes, unroll, blocks_per_sm, streaming ? 1 : 0};
}

std::tuple<int, int, int, int> nf4_dequantize_get_config() {
  return {g_dequant.bytes, g_dequant.unroll, g_dequant.blocks_per_sm, g_dequant.streaming};
}

void quantize_blockwise8_cuda(const float* src, int64_t n, const float* code, int64_t blocksize, uint8_t* out,
                              float* absmax, int64_t stream) {
  if (n <= 0 || blocksize <= 0) throw std::invalid_argument("quantize_blockwise8: empty input or bad blocksize");
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  k_quantize8<<<static_cast<unsigned>(blocks), 256, 0, as_stream(stream)>>>(src, n, code, blocksize, out, absmax);
  FQ_CUDA_CHECK_LAUNCH("quantize_blockwise8");
}

}  // namespace fq
