// NF4 and 8-bit blockwise quantization on the CPU, bit for bit with bitsandbytes'
// CPU path (its torch "default" NF4 kernels and its C++ 8-bit blockwise kernel).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "half.h"
#include "nf4.h"

namespace fq {

const float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

namespace {

inline float load(const void* src, int dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(src)[i];
    case kF16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case kBF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
  }
  throw std::invalid_argument("unknown dtype code");
}

inline void store(void* out, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kF32: static_cast<float*>(out)[i] = v; return;
    case kF16: static_cast<uint16_t*>(out)[i] = f32_to_f16(v); return;
    case kBF16: static_cast<uint16_t*>(out)[i] = f32_to_bf16(v); return;
  }
  throw std::invalid_argument("unknown dtype code");
}

// torch.bucketize(x, midpoints) with right=False: how many midpoints lie below x.
struct NF4Bounds {
  float mid[15];
  NF4Bounds() {
    for (int i = 0; i < 15; ++i) mid[i] = (kNF4[i] + kNF4[i + 1]) / 2.0f;
  }
  inline uint8_t code(float x) const {
    uint8_t q = 0;
    for (int i = 0; i < 15; ++i) q += mid[i] < x;
    return q;
  }
};

void check_common(int64_t n, int64_t blocksize, int dtype) {
  if (n <= 0) throw std::invalid_argument("NF4: the tensor must have at least one element");
  if (blocksize <= 0) throw std::invalid_argument("NF4: blocksize must be positive");
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
    throw std::invalid_argument("NF4: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
}

}  // namespace

void nf4_quantize_cpu(const void* src, int64_t n, int dtype, int64_t blocksize, uint8_t* packed,
                      float* absmax) {
  check_common(n, blocksize, dtype);
  static const NF4Bounds bounds;
  const int64_t full = n - n % blocksize;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  std::vector<uint8_t> q(static_cast<size_t>(n + 1), 7);  // the odd pad is quantized 0.0 -> code 7
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * blocksize, hi = std::min(lo + blocksize, n);
    float m = 0.0f;
    for (int64_t i = lo; i < hi; ++i) m = std::max(m, std::fabs(load(src, dtype, i)));
    if (lo < full) {
      // full blocks: x * (1 / max(absmax, 1e-38)); the stored absmax is unclamped
      absmax[b] = m;
      const float inv = 1.0f / std::max(m, 1e-38f);
      for (int64_t i = lo; i < hi; ++i)
        q[i] = bounds.code(std::min(1.0f, std::max(-1.0f, load(src, dtype, i) * inv)));
    } else {
      // the partial last block divides, and stores the clamped absmax
      const float am = std::max(m, 1e-38f);
      absmax[b] = am;
      for (int64_t i = lo; i < hi; ++i)
        q[i] = bounds.code(std::min(1.0f, std::max(-1.0f, load(src, dtype, i) / am)));
    }
  }
  for (int64_t j = 0; j < (n + 1) / 2; ++j) packed[j] = static_cast<uint8_t>((q[2 * j] << 4) | q[2 * j + 1]);
}

void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                        const float* code2, const float* absmax2, float offset, int64_t blocksize2,
                        int64_t n, int64_t blocksize, void* out, int dtype) {
  check_common(n, blocksize, dtype);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  std::vector<float> am(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    if (qabsmax) {
      volatile float scaled = code2[qabsmax[b]] * absmax2[b / blocksize2];  // no fused multiply-add
      am[b] = scaled + offset;
    } else {
      am[b] = absmax[b];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i >> 1];
    const uint8_t code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    store(out, dtype, i, kNF4[code] * am[i / blocksize]);
  }
}

void quantize_blockwise8_cpu(const float* src, int64_t n, const float* code, int64_t blocksize,
                             uint8_t* out, float* absmax) {
  check_common(n, blocksize, kF32);
  // bitsandbytes' CPU kernel maps x·(1/absmax) onto 65536 bins over [-1, 1] and looks up
  // the nearest code of each bin's value (the code index past every midpoint below it).
  constexpr int kLUT = 65536;
  float mid[255];
  for (int i = 0; i < 255; ++i) mid[i] = 0.5f * (code[i] + code[i + 1]);
  std::vector<uint8_t> lut(kLUT);
  int idx = 0;
  for (int i = 0; i < kLUT; ++i) {
    const float val = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kLUT - 1);
    while (idx < 255 && mid[idx] < val) ++idx;
    lut[i] = static_cast<uint8_t>(idx);
  }
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * blocksize, hi = std::min(lo + blocksize, n);
    float m = 0.0f;
    for (int64_t i = lo; i < hi; ++i) m = std::max(m, std::fabs(src[i]));
    absmax[b] = m;
    if (m == 0.0f) {
      std::fill(out + lo, out + hi, uint8_t{0});
      continue;
    }
    const float inv = 1.0f / m;
    for (int64_t i = lo; i < hi; ++i) {
      const float v = std::min(1.0f, std::max(-1.0f, src[i] * inv));
      const float pos = (v + 1.0f) * 0.5f * static_cast<float>(kLUT - 1) + 0.5f;
      out[i] = lut[static_cast<uint16_t>(pos)];
    }
  }
}

}  // namespace fq
