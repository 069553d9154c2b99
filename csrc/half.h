// IEEE fp16 and bfloat16 <-> fp32 on the CPU, round-to-nearest-even, as torch and
// the CUDA intrinsics do (NaN stays NaN, overflow becomes inf, subnormals kept).
#pragma once
#include <cstdint>
#include <cstring>

namespace fq {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    // subnormal: value = man · 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;             // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;            // rounds to inf (>= 65520)
  if (a < 0x38800000u) {                                   // below the smallest normal 2^-14
    // subnormal or zero: round a·2^24 to the nearest integer, ties to even
    float v = bits_f32(a) * 16777216.0f;                   // exact: scaling by a power of two
    uint32_t i = static_cast<uint32_t>(v);
    float rem = v - static_cast<float>(i);
    if (rem > 0.5f || (rem == 0.5f && (i & 1u))) ++i;
    return sign | static_cast<uint16_t>(i);
  }
  // normal: drop 13 mantissa bits with round-to-nearest-even
  uint32_t r = a - 0x38000000u;                            // rebias exponent 127 -> 15
  r += 0x0fffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

}  // namespace fq
