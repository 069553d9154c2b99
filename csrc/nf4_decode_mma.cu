// The few-row NF4 product for decoding on the tensor cores: for x [M, K] with M <= 16,
//     y = x·dequant(W)ᵀ + s·xa·Bᵀ + bias.
//
// Why the tensor cores at a few rows: the one-row gemv (nf4_gemv.cu) spends ~3
// instructions a weight on the multiply-adds alone; its cost grows with M. An mma
// m16n8k16 does a 16-row x 16-k block of weights against 8 columns of x in one
// instruction, so up to 16 rows of x cost what one costs, and what is left a weight is its
// decode: one shared-memory load turns a packed byte into the two codes the mma takes.
//
// Layout (mma A = weights, B = xᵀ, D = yᵀ): a warp owns 16 weight rows (A's rows g and
// g+8 in lane g·4+t) and walks K one 64-weight absmax block at a time. In a block, lane t
// of a row takes the row's packed bytes 8t..8t+7 (weights 16t..16t+15); the four lanes of
// a row thus cover the whole block, so an mma never mixes two blocks and the block's
// absmax can scale that mma's fresh fp32 result:
//     y[m, n] = Σ_b absmax[n, b] · Σ_{k ∈ b} code[q[n, k]] · x[m, k].
// K inside a block is permuted to suit the fragments: byte 2j of lane t (weights
// 16t+4j, +1) fills A's k slots 2t, 2t+1 of mma j, byte 2j+1 (16t+4j+2, +3) slots 2t+8,
// 2t+9; lane t's B registers are x[m, 16t+4j .. +3] (16 contiguous bytes, one load) for
// x row m = g, which puts the same k in the same slots. Any permutation of k that A and
// B share leaves the sum unchanged.
//
// The decode table: entry b (a packed byte) is the pair (code[b >> 4], code[b & 15]) in
// the element type, stored once for each lane (a column a lane: 32 lanes read 32 banks,
// never a conflict) at byte b·256 + lane·4, so a lane's address is one byte permute of
// the packed word and its lane offset. 64 KiB a block; thread b fills entry b (its pair
// from two shuffles of the 16 codes, then 16-byte stores).
// The table is the first thing in the block's shared memory (no static shared arrays: the
// nested code, the counter flag and the warps' partials follow it in the dynamic buffer).
// On sm_90 a shared address as the compiler forms it carries the block's rank in its
// cluster, unknown at compile time, so each lookup cost an integer add of its own (64 of
// the 429 instructions of a step at M <= 8; SASS) unless the load takes the table's
// window address as an immediate, `[perm + kTableAddr]` (kTableAddr: see below). On sm_80-89
// shared memory starts at address 0, so the permute's result is the address (SASS: `LDS [R]`).
//
// At one or two rows of x a second layout (COLS, cols_loop below) reads the weights in
// 16-byte chunks that span two blocks and keeps the blocks apart in B's columns instead, with
// 16 or 8 weight rows a warp, in 8-warp blocks or in 16-warp blocks that share their row
// groups' steps evenly (FLAT).
//
// Latency: each step takes U = 4 blocks; the next step's weight and absmax loads are
// issued before this step's decode (a register double buffer), the first step's before the
// table fill. K is split over S warps
// of a block (S = 2, 4 or 8; summed through shared memory in a fixed order) and over the
// grid's y (KB blocks of a row group; each writes fp32 partials, and the last to finish,
// told by a per-group counter it then resets, sums them in order and writes y), so
// few-row, narrow products still fill the GPU.
//
// Rounding: the codes are exact in bf16/fp16 only to their precision (the NF4 table
// rounded once), products and sums are fp32; the result is rounded once. This differs
// from "dequantize to bf16, then matmul" by the rounding of code·absmax, within the
// tolerance the dispatch checks (relative 1e-2 in bf16; measured ~2e-3).
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

constexpr unsigned kAll = 0xffffffffu;
constexpr int kU = 4;                 // 64-weight blocks a step
// Weight rows a warp's group: the column layout with one tile (COLS = 1) takes 8, else 16.
template <int COLS> constexpr int kGroupRows = COLS == 1 ? 8 : 16;
constexpr int kWarps = 8;             // warps a block
constexpr int kTableBytes = 256 * 256;
// sm_90's shared window starts with 1 KiB the driver reserves (the compiler's own shared
// addresses start at 0x400 there; on sm_80-89 at 0), then the static and the dynamic shared
// memory; with no static shared memory the table starts at 0x400. The kernel checks that
// address at its start: on a GPU where it differs (a later architecture running this PTX)
// it writes NaN instead of a result, which the dispatch's check refuses, so the config is
// never used there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FQ_TABLE_IMMEDIATE 1
constexpr uint32_t kTableAddr = 0x400;
#else
#define FQ_TABLE_IMMEDIATE 0
#endif
constexpr int kFlagOffset = kTableBytes + 256 * 4;        // the grid split's "last block" flag
constexpr int kPartialOffset = kFlagOffset + 16;          // the warps' partials, kWarps x 32 x 4·NT floats
template <int NT> constexpr int smem_bytes() { return kPartialOffset + kWarps * 32 * 4 * NT * 4; }

// A 32-bit shared-memory load at the window address off + IMM (IMM a compile-time constant,
// folded into the instruction). The "memory" clobber keeps it after the barrier that
// publishes the table.
template <uint32_t IMM>
__device__ __forceinline__ uint32_t lds_at(uint32_t off) {
  uint32_t v;
  asm("ld.shared.b32 %0, [%1+%2];" : "=r"(v) : "r"(off), "n"(IMM) : "memory");
  return v;
}

// NaN into y's columns n0 .. n0 + count - 1 (all M rows), by the grid's first row of blocks:
// what a block writes when the table is not where the immediate loads look for it.
// Out of line, so that it leaves the kernel's register allocation alone.
template <typename T>
__device__ __noinline__ void poison_rows(T* y, int M, int N, int n0, int count) {
  if (blockIdx.y != 0) return;
  const int rows = min(count, N - n0);
  for (int e = threadIdx.x; e < M * rows; e += blockDim.x) {
    y[static_cast<int64_t>(e / rows) * N + n0 + e % rows] = from_f32<T>(__int_as_float(0x7fc00000));
  }
}

// The table's entry at byte offset `off`, and the nested code's entry `idx`.
__device__ __forceinline__ uint32_t table_at(const unsigned char* table, uint32_t off) {
#if FQ_TABLE_IMMEDIATE
  return lds_at<kTableAddr>(off);
#else
  return *reinterpret_cast<const uint32_t*>(table + off);
#endif
}
__device__ __forceinline__ float code2_at(const float* code2_s, uint32_t idx) {
#if FQ_TABLE_IMMEDIATE
  return __uint_as_float(lds_at<kTableAddr + kTableBytes>(idx * 4));  // right behind the table
#else
  return code2_s[idx];
#endif
}

template <typename T> __device__ __forceinline__ uint32_t pair_bits(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pair_bits<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <> __device__ __forceinline__ uint32_t pair_bits<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// D += A·B for one m16n8k16 (A 16x16 row-major, B 16x8 column-major), fp32 accumulate.
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One step's loads for the lane's two weight rows (a: g, b: g+8) in the row layout.
struct StepLoads {
  uint2 qa[kU], qb[kU];    // 8 packed bytes a block
  uint32_t ia[kU], ib[kU]; // the blocks' 8-bit absmax indices (nested)
  float sa[kU], sb[kU];    // nested: the nested scale (entry 0 when vectorized); plain: the absmax
};

struct Operands {
  const uint8_t* packed;
  const float* absmax;   // plain fp32 absmax, or null
  const uint8_t* qabsmax;
  const float* code2;
  const float* absmax2;
  float offset;
  int shift2;
};

// The step's absmax (or nested indices and scales) for both rows. V: the U blocks share one
// nested scale and sit 4-aligned in the row's block list (the row's block count and the
// nested block size are multiples of 4), so their absmax come in one load. Past `end`,
// blocks are re-read (clamped) and weighed by zero later.
template <bool Q, bool V>
__device__ __forceinline__ void issue_absmax(StepLoads& s, uint32_t base, uint32_t end, uint32_t ra_b,
                                             uint32_t rb_b, const Operands& op) {
  if (V) {
    if (Q) {
      const uint32_t va = __ldg(reinterpret_cast<const uint32_t*>(op.qabsmax + ra_b + base));
      const uint32_t vb = __ldg(reinterpret_cast<const uint32_t*>(op.qabsmax + rb_b + base));
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        s.ia[u] = (va >> (8 * u)) & 0xffu;
        s.ib[u] = (vb >> (8 * u)) & 0xffu;
      }
      s.sa[0] = __ldg(op.absmax2 + ((ra_b + base) >> op.shift2));
      s.sb[0] = __ldg(op.absmax2 + ((rb_b + base) >> op.shift2));
    } else {
      const float4 fa = __ldg(reinterpret_cast<const float4*>(op.absmax + ra_b + base));
      const float4 fb = __ldg(reinterpret_cast<const float4*>(op.absmax + rb_b + base));
      s.sa[0] = fa.x; s.sa[1] = fa.y; s.sa[2] = fa.z; s.sa[3] = fa.w;
      s.sb[0] = fb.x; s.sb[1] = fb.y; s.sb[2] = fb.z; s.sb[3] = fb.w;
    }
  } else {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const uint32_t blk = min(base + u, end - 1);
      if (Q) {
        s.ia[u] = __ldg(op.qabsmax + ra_b + blk);
        s.ib[u] = __ldg(op.qabsmax + rb_b + blk);
        s.sa[u] = __ldg(op.absmax2 + ((ra_b + blk) >> op.shift2));
        s.sb[u] = __ldg(op.absmax2 + ((rb_b + blk) >> op.shift2));
      } else {
        s.sa[u] = __ldg(op.absmax + ra_b + blk);
        s.sb[u] = __ldg(op.absmax + rb_b + blk);
      }
    }
  }
}

// The row layout's step at block `base`: 8 bytes of each block of both rows, then the absmax.
template <bool Q, bool V>
__device__ __forceinline__ void issue(StepLoads& s, uint32_t base, uint32_t end, const uint8_t* wa,
                                      const uint8_t* wb, uint32_t ra_b, uint32_t rb_b, const Operands& op) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const uint32_t blk = min(base + u, end - 1);
    s.qa[u] = __ldg(reinterpret_cast<const uint2*>(wa + 32 * blk));
    s.qb[u] = __ldg(reinterpret_cast<const uint2*>(wb + 32 * blk));
  }
  issue_absmax<Q, V>(s, base, end, ra_b, rb_b, op);
}

// The block's absmax of step slot u: nested, code2[index]·absmax2 + offset (bitsandbytes'
// order: multiply, then add), as the dequantize kernels compute it.
template <bool Q, bool V>
__device__ __forceinline__ float block_absmax(const float* code2_s, uint32_t idx, const float (&sc)[kU], int u,
                                              float offset) {
  if (!Q) return sc[u];
  const float c2 = code2_at(code2_s, idx);
  return __fadd_rn(__fmul_rn(c2, sc[V ? 0 : u]), offset);
}

// Two elements of a 16-bit row as an mma register pair: row[j], row[j + 1], zero past `len`.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* row, int j, int len, bool ok) {
  const uint16_t* r = reinterpret_cast<const uint16_t*>(row);
  const uint32_t lo = ok && j < len ? __ldg(r + j) : 0u;
  const uint32_t hi = ok && j + 1 < len ? __ldg(r + j + 1) : 0u;
  return lo | (hi << 16);
}

struct Epilogue {
  const void* xa;
  int xa_stride;
  const void* lora_b;
  int rank;
  float scale;
  const void* bias;
};

// Several products of one x in one launch (q, k, v; gate, up): each a run of whole blocks of
// the grid, from block0 on, so a block's warps all read one weight and the block is what a
// launch of that product alone would run (bx = blockIdx.x - block0). Parts past `count` have
// block0 = INT_MAX. A __grid_constant__ parameter, so the block's part is read in place
// (constant bank, indexed by a block-uniform value) instead of copied to local memory.
constexpr int kMaxParts = 3;
struct Part {
  Operands op;
  const float* code;  // the 16 NF4 code values
  Epilogue ep;
  void* y;
  int N;
  int block0;
};
struct Parts {
  Part p[kMaxParts];
};

__device__ __forceinline__ int part_of(const Parts& parts) {
  int p = 0;
#pragma unroll
  for (int i = 1; i < kMaxParts; ++i) p += static_cast<int>(blockIdx.x) >= parts.p[i].block0;
  return p;
}

// acc (the warp's 16 rows x 8·NT x rows, in D's layout) += scale·(B·xaᵀ), then + bias, then
// stored. The LoRA term is itself an m16n8k16 per 16 of the rank: B's rows n0.. as A, xa's
// rows as B's columns, in their natural k order (no permutation needed: both index j the
// same), so the loads are 16-bit pairs straight from memory. Warp-uniform: every lane runs it.
template <typename T, int NT, int GR = 16>
__device__ __forceinline__ void finish(float (&acc)[NT][4], int n0, int M, int N, const Epilogue& ep, T* y) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int r0 = n0 + g, r1 = n0 + g + 8;
  if (ep.lora_b != nullptr) {
    const T* lb = static_cast<const T*>(ep.lora_b);
    const T* xa = static_cast<const T*>(ep.xa);
    const T* ba = lb + static_cast<int64_t>(min(r0, N - 1)) * ep.rank;
    const T* bb = lb + static_cast<int64_t>(min(r1, N - 1)) * ep.rank;
    float lo[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) lo[nt][i] = 0.0f;
    for (int c = 0; c < ep.rank; c += 16) {
      const int j = c + 2 * t;
      const uint32_t a[4] = {load_pair(ba, j, ep.rank, r0 < N), load_pair(bb, j, ep.rank, r1 < N),
                             load_pair(ba, j + 8, ep.rank, r0 < N), load_pair(bb, j + 8, ep.rank, r1 < N)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int m = nt * 8 + g;
        const T* xr = xa + static_cast<int64_t>(min(m, M - 1)) * ep.xa_stride;
        mma16816<T>(lo[nt], a, load_pair(xr, j, ep.rank, m < M), load_pair(xr, j + 8, ep.rank, m < M));
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = __fmaf_rn(ep.scale, lo[nt][i], acc[nt][i]);
  }
  const T* bias = static_cast<const T*>(ep.bias);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = nt * 8 + 2 * t + (i & 1), n = i < 2 ? r0 : r1;
      if (m < M && n < N && (GR == 16 || i < 2)) {  // GR = 8: the group has no rows g + 8
        const float v = bias != nullptr ? acc[nt][i] + to_f32(bias[n]) : acc[nt][i];
        y[static_cast<int64_t>(m) * N + n] = from_f32<T>(v);
      }
    }
  }
}

// One output's LoRA term and bias, for the grid split's last block (a thread an output):
// acc + scale·Σ_j xa[m, j]·B[n, j] + bias[n], the same sum the mma in finish() forms.
template <typename T>
__device__ __forceinline__ float epilogue_one(float acc, int m, int n, const Epilogue& ep) {
  if (ep.lora_b != nullptr) {
    const T* xr = static_cast<const T*>(ep.xa) + static_cast<int64_t>(m) * ep.xa_stride;
    const T* br = static_cast<const T*>(ep.lora_b) + static_cast<int64_t>(n) * ep.rank;
    float lo = 0.0f;
#pragma unroll 8
    for (int j = 0; j < ep.rank; ++j) lo = __fmaf_rn(to_f32(xr[j]), to_f32(br[j]), lo);
    acc = __fmaf_rn(ep.scale, lo, acc);
  }
  if (ep.bias != nullptr) acc += to_f32(static_cast<const T*>(ep.bias)[n]);
  return acc;
}

// The decode table (thread b fills entry b; see the header) and, nested, the nested code;
// the caller's __syncthreads() publishes them. Called after the first step's loads are
// issued, so the code's load and the weights' are in flight together.
template <typename T, bool Q, bool WIDE = false>
__device__ __forceinline__ void fill_tables(unsigned char* table, float* code2_s, const float* code,
                                            const Operands& op) {
  if (WIDE && threadIdx.x >= 256) return;  // a block of more than 256 threads: whole warps sit out
  const int lane = threadIdx.x & 31;
  // Thread b fills entry b: its pair once, stored to the 32 lane columns as 8 16-byte
  // stores, each thread starting at its own chunk (a quarter-warp's 8 stores then hit 8
  // different bank groups). A warp an entry, a lane a column, took ~7 instructions per
  // thread and entry (32 entries a thread).
  static_assert(kWarps * 32 == 256, "one thread per table entry");
  const float c = __ldg(code + (lane & 15));  // lane holds code[lane mod 16]
  const int b = threadIdx.x;
  const float c2 = Q ? __ldg(op.code2 + b) : 0.0f;  // the nested code: 256 entries, one a thread
  const float hi = __shfl_sync(kAll, c, b >> 4), lo = __shfl_sync(kAll, c, b & 15);
  // the high nibble is the earlier weight: the pair's low half
  const uint32_t v = pair_bits<T>(hi, lo);
  uint4* row = reinterpret_cast<uint4*>(table + b * 256);
#pragma unroll
  for (int j = 0; j < 8; ++j) row[(j + lane) & 7] = make_uint4(v, v, v, v);
  if (Q) code2_s[b] = c2;
}

// ---- The column layout (COLS, M <= 2) ----
// In the row layout, one 8-byte load a lane reads 32 bytes of each of 16 rows: 16 cache
// lines for 512 bytes, and at one or two rows of x the L1's data pipe (those lines plus the
// table lookups) is what the kernel waits on (ncu, H200, 14336 x 4096 at M = 1: its
// wavefronts busy 76% of the active cycles, the issue slots 33%). Here a lane reads 16-byte
// chunks and the 8 lanes of a weight row read its step's whole 128-byte line: 4 lines a load.
// The mma's A rows are (weight row, half of its step) pairs: in tile τ (two a step), A row
// g is the first half (g even) or the second (g odd) of weight row n0 + 8τ + g/2, and A
// row g+8 the same half of row n0 + 8τ + 4 + g/2; lane (g, t) reads bytes 64(g&1) + 16t.. of
// both. Its k slots then lie in block 2(g&1) + t/2 of the step (a half spans two absmax
// blocks), and one slot is a different k in the two halves. So B gets a column per (half,
// block, x row), which keeps each block's sum apart for its absmax: column j is x row j&1
// restricted to block j/2 of the step (block j/2 lies in half j/4), nonzero only in the k
// slots of the lanes whose chunk is in that block (t/2 == (j/2)&1), and
//     D[(row, half), j] = Σ_{k ∈ block j/2} code[q[row, k]]·x[j&1, k]   when half == j/4;
// the entries of a row's half and the other half's columns are dropped. Lane (g, t) holds
// D's columns 2t, 2t+1, block t of its rows for x rows 0 and 1, kept when t/2 == g&1 (its
// rows' half holds block t), each scaled by that block's absmax. The x loads do not depend on
// the weight row, so the two tiles share them. An earlier column layout (16 rows a tile, a
// lane's chunks 16t.. and 64+16t.. of each row, 8 lines a load; 290 SASS instructions a
// step against 260 here) was 8-15% slower at M = 1 and 2 (H200, benchmarks/NOTES.md).
struct ColLoads {
  uint4 q[4];       // row i = 2τ + β (n0 + 8τ + 4β + g/2): bytes 64(g&1) + 16t.. of the step
  uint32_t ia[4];   // nested: block t's 8-bit absmax index in row i
  float sa[4];      // nested: its nested scale; plain: its absmax
};

template <bool Q, bool V, int TL>
__device__ __forceinline__ void issue_cols(ColLoads& s, uint32_t base, uint32_t end, const uint8_t* const (&w)[4],
                                            const uint32_t (&rblk)[4], uint32_t wblk, uint32_t t,
                                            const Operands& op) {
  const uint32_t qb = V ? base + wblk : min(base + wblk, end - 1);  // the block of the lane's chunk
  const uint32_t ab = V ? base + t : min(base + t, end - 1);         // the block of its D entries
#pragma unroll
  for (int i = 0; i < 2 * TL; ++i) {
    s.q[i] = __ldg(reinterpret_cast<const uint4*>(w[i] + 32 * qb));
    if (Q) {
      s.ia[i] = __ldg(op.qabsmax + rblk[i] + ab);
      s.sa[i] = __ldg(op.absmax2 + ((rblk[i] + ab) >> op.shift2));
    } else {
      s.sa[i] = __ldg(op.absmax + rblk[i] + ab);
    }
  }
}

// The rows of a lane in a row group from n0 (clamped to N - 1): row i = 2τ + β is
// n0 + 8τ + 4β + g/2; its packed bytes from the lane's chunk offset 16(t&1), and its first
// absmax block. TL (here and below): 8-row tiles a warp, 2 (a group of 16 weight rows) or 1
// (8 rows: twice the groups, for narrow weights; each step then decodes half as much for the
// same x loads).
template <int TL>
__device__ __forceinline__ void cols_rows(const uint8_t* (&w)[4], uint32_t (&rblk)[4], int n0, int N,
                                          const Operands& op, uint32_t row_bytes, uint32_t row_blocks) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2 * TL; ++i) {
    const uint32_t r = min(n0 + 8 * (i >> 1) + 4 * (i & 1) + (g >> 1), N - 1);
    w[i] = op.packed + r * row_bytes + 16 * (t & 1);
    rblk[i] = r * row_blocks;
  }
}

// One step of the column layout: x's chunk from p (the lane's column, 32 elements; zeros where
// it holds none), both tiles' decode and mmas, each D entry scaled by its block's absmax (zero
// where !ok: block t past the row's end) into sum.
template <typename T, bool Q, int TL>
__device__ __forceinline__ void cols_step(float (&sum)[2][4], const ColLoads& cur, const uint4* p, bool xload, bool ok,
                                          const unsigned char* table, const float* code2_s, uint32_t lane_col,
                                          float offset) {
  uint4 xv[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) xv[q] = xload ? __ldg(p + q) : make_uint4(0, 0, 0, 0);
  const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                           xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
#pragma unroll
  for (int tau = 0; tau < TL; ++tau) {
    const uint32_t wa4[4] = {cur.q[2 * tau].x, cur.q[2 * tau].y, cur.q[2 * tau].z, cur.q[2 * tau].w};
    const uint32_t wb4[4] = {cur.q[2 * tau + 1].x, cur.q[2 * tau + 1].y, cur.q[2 * tau + 1].z,
                             cur.q[2 * tau + 1].w};
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      // bytes 2jj and 2jj+1 of the chunk fill A's k slots 2t, 2t+1 and 2t+8, 2t+9
      uint32_t a[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * jj + h;
        const uint32_t sel = 0x5504u | ((i & 3) << 4);  // bytes [lane column, byte i, 0, 0]
        a[2 * h] = table_at(table, __byte_perm(wa4[i >> 2], lane_col, sel));
        a[2 * h + 1] = table_at(table, __byte_perm(wb4[i >> 2], lane_col, sel));
      }
      mma16816<T>(d, a, xw[2 * jj], xw[2 * jj + 1]);
    }
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int i = 2 * tau + b;
      const float am = !ok ? 0.0f
                       : Q ? __fadd_rn(__fmul_rn(code2_at(code2_s, cur.ia[i]), cur.sa[i]), offset)
                           : cur.sa[i];
      sum[tau][2 * b] = __fmaf_rn(d[2 * b], am, sum[tau][2 * b]);
      sum[tau][2 * b + 1] = __fmaf_rn(d[2 * b + 1], am, sum[tau][2 * b + 1]);
    }
  }
}

// The sums of a row group in the row layout's D order (lane (g, 0): x rows 0 and 1 of weight
// rows g and g+8; the other lanes zero). A weight row's four blocks sit in lanes
// 8r + {0, 1, 6, 7} of tile row r (r = g/2): the kept lanes' sums over the 8-lane group, then
// lane (g, 0) takes warp rows g and g+8 (tile 0 and 1, row a when g < 4, else b) from lane 8(g&3).
template <int TL>
__device__ __forceinline__ void cols_reduce(const float (&sum)[2][4], float (&acc)[1][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool kept = (t >> 1) == (g & 1);
  float v[2][4];
#pragma unroll
  for (int tau = 0; tau < TL; ++tau)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float s = kept ? sum[tau][i] : 0.0f;
      s += __shfl_xor_sync(kAll, s, 1);
      s += __shfl_xor_sync(kAll, s, 2);
      s += __shfl_xor_sync(kAll, s, 4);
      v[tau][i] = s;
    }
  const int src = 8 * (g & 3);
  const bool first = t == 0, b = g >= 4;
#pragma unroll
  for (int tau = 0; tau < TL; ++tau) {
    const float a0 = __shfl_sync(kAll, v[tau][0], src), a1 = __shfl_sync(kAll, v[tau][1], src);
    const float b0 = __shfl_sync(kAll, v[tau][2], src), b1 = __shfl_sync(kAll, v[tau][3], src);
    acc[0][2 * tau] = first ? (b ? b0 : a0) : 0.0f;
    acc[0][2 * tau + 1] = first ? (b ? b1 : a1) : 0.0f;
  }
  if (TL == 1) acc[0][2] = acc[0][3] = 0.0f;  // 8-row groups: no rows g + 8
}

__device__ __forceinline__ void zero_sums(float (&sum)[2][4]) {
#pragma unroll
  for (int tau = 0; tau < 2; ++tau)
#pragma unroll
    for (int i = 0; i < 4; ++i) sum[tau][i] = 0.0f;
}

// B: lane (g, t) holds column g, x row g&1 in block g/2 of the step, weights 32(t&1)..; the
// lanes whose chunk is in the other block of that half hold zeros. Returns whether the lane
// loads x, and its element offset in x (row and in-block part).
__device__ __forceinline__ bool cols_x(uint32_t& xoff, int M, int K) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int xrow = g & 1;
  xoff = static_cast<uint32_t>(xrow < M ? xrow : 0) * K + 32 * (t & 1);
  return xrow < M && (t >> 1) == ((g >> 1) & 1);
}

// The column layout's main loop over the warp's steps from `base` (every S·4-th block) to
// `kend` of row group n0; returns the sums in the row layout's D order (cols_reduce), so the
// split sums and the epilogue are the row layout's.
template <typename T, int S, bool Q, bool V, int TL>
__device__ __forceinline__ void cols_loop(float (&acc)[1][4], const T* x, int M, int K, const Operands& op,
                                          const float* code, unsigned char* table, float* code2_s, uint32_t base,
                                          uint32_t kend, int n0, int N, uint32_t row_bytes, uint32_t row_blocks) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint8_t* w[4];
  uint32_t rblk[4];
  cols_rows<TL>(w, rblk, n0, N, op, row_bytes, row_blocks);
  const uint32_t wblk = 2 * (g & 1) + (t >> 1);
  const uint32_t lane_col = lane * 4;
  uint32_t xoff;
  const bool xload = cols_x(xoff, M, K);
  const T* xs = x + xoff + 64 * (base + (g >> 1));  // V: this step's x (whole steps, no clamp)
  float sum[2][4];  // tile τ: (row a, x rows 0, 1), (row b, x rows 0, 1), block t (kept when t/2 == g&1)
  zero_sums(sum);
  ColLoads cur;
  if (base < kend) issue_cols<Q, V, TL>(cur, base, kend, w, rblk, wblk, t, op);
  fill_tables<T, Q>(table, code2_s, code, op);
  __syncthreads();  // the tables
  for (; base < kend; base += S * kU) {
    ColLoads nxt;
    issue_cols<Q, V, TL>(nxt, base + S * kU < kend ? base + S * kU : base, kend, w, rblk, wblk, t, op);
    const uint4* p = reinterpret_cast<const uint4*>(V ? xs : x + (xoff + 64 * min(base + (g >> 1), kend - 1)));
    cols_step<T, Q, TL>(sum, cur, p, xload, V || base + t < kend, table, code2_s, lane_col, op.offset);
    cur = nxt;
    xs += 64 * S * kU;
  }
  cols_reduce<TL>(sum, acc);
}

// The 16-warp blocks' loop (FLAT below): the warp's steps [u0, u1) of the block's row groups,
// numbered group by group (U a group), s0 = u0's step in its group, n0 its group's first row.
// One pipeline across a group boundary: at the last step of a group the next step's loads are
// already the next group's (P <= U: at most one boundary). acc0: the first group's sums, acc1
// the second's (zero when there is none). Every warp of the block calls it (it fills the tables).
template <typename T, bool Q, bool V>
__device__ __forceinline__ void flat_loop(float (&acc0)[1][4], float (&acc1)[1][4], const T* x, int M, int K,
                                          const Operands& op, const float* code, unsigned char* table,
                                          float* code2_s, uint32_t u0, uint32_t u1, uint32_t U, uint32_t s0, int n0,
                                          int N, uint32_t row_bytes, uint32_t row_blocks) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint8_t* w[4];
  uint32_t rblk[4];
  cols_rows<2>(w, rblk, n0, N, op, row_bytes, row_blocks);
  const uint32_t wblk = 2 * (g & 1) + (t >> 1);
  const uint32_t lane_col = lane * 4;
  uint32_t xoff;
  const bool xload = cols_x(xoff, M, K);
  float sum[2][4];
  zero_sums(sum);
  ColLoads cur;
  if (u0 < u1) issue_cols<Q, V, 2>(cur, s0 * kU, row_blocks, w, rblk, wblk, t, op);
  fill_tables<T, Q, true>(table, code2_s, code, op);
  __syncthreads();  // the tables
  const uint32_t na = u0 < u1 ? min(u1 - u0, U - s0) : 0, nb = u0 < u1 ? u1 - u0 - na : 0;  // steps a segment
  // the first group's steps s0 .. s0 + na - 1; the last one (peeled, so that the loop keeps
  // its registers) prefetches the second group's first step
  const auto step = [&](uint32_t s, uint32_t next) {
    const uint32_t base = s * kU;
    ColLoads nxt;
    issue_cols<Q, V, 2>(nxt, next, row_blocks, w, rblk, wblk, t, op);
    const uint4* p = reinterpret_cast<const uint4*>(x + (xoff + 64 * (V ? base + (g >> 1)
                                                                        : min(base + (g >> 1), row_blocks - 1))));
    cols_step<T, Q, 2>(sum, cur, p, xload, V || base + t < row_blocks, table, code2_s, lane_col, op.offset);
    cur = nxt;
  };
  for (uint32_t s = s0; s + 1 < s0 + na; ++s) step(s, (s + 1) * kU);
  if (na > 0) {
    if (nb > 0) cols_rows<2>(w, rblk, n0 + 16, N, op, row_bytes, row_blocks);
    step(s0 + na - 1, nb > 0 ? 0 : (s0 + na - 1) * kU);
  }
  cols_reduce<2>(sum, acc0);
  zero_sums(sum);
  // the second group's steps 0 .. nb - 1
  for (uint32_t s = 0; s < nb; ++s) step(s, s + 1 < nb ? (s + 1) * kU : s * kU);
  cols_reduce<2>(sum, acc1);
}

// NT: 8-row tiles of x (M <= 8·NT), S: warps a row group splits K over, Q: nested absmax,
// V: vectorized absmax loads (see issue()). Two blocks an SM (128 registers): the loop
// hides its latency with warps, and at 138-140 registers (what the compiler takes
// unbounded at NT = 2) one block an SM made 14336 x 4096 at M = 16 27.5 -> 32.4 µs.
// The body of both kernels below; block0: where its product's blocks start in the grid (0 for
// one product), so blockIdx.x - block0 is the block in that product's own grid.
template <typename T, int NT, int S, bool Q, bool V, bool XZ, int COLS>
__device__ __forceinline__ void decode_mma(const T* __restrict__ x, int M, int K, const Operands& op,
                                           const float* __restrict__ code, int N, int chunk, float* __restrict__ ws,
                                           int* __restrict__ counters, const Epilogue& ep, T* __restrict__ y,
                                           unsigned block0) {
  extern __shared__ __align__(16) unsigned char table[];  // smem_bytes<NT>(): see kTableAddr
  float* const code2_s = reinterpret_cast<float*>(table + kTableBytes);
  int& is_last = *reinterpret_cast<int*>(table + kFlagOffset);
  auto partial = reinterpret_cast<float (*)[32][4 * NT]>(table + kPartialOffset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int per_block = kWarps / S;  // row groups a block
  constexpr int GR = kGroupRows<COLS>;
#if FQ_TABLE_IMMEDIATE
  if (static_cast<uint32_t>(__cvta_generic_to_shared(table)) != kTableAddr) {  // see kTableAddr
    poison_rows<T>(y, M, N, (blockIdx.x - block0) * per_block * GR, per_block * GR);
    return;
  }
#endif
  const int g = lane >> 2, t = lane & 3;
  const int part = warp % S;
  const int groups = (N + GR - 1) / GR;
  const int group = (blockIdx.x - block0) * per_block + warp / S;
  const bool live = group < groups;  // a spare warp repeats the last group, unstored
  const int n0 = (live ? group : groups - 1) * GR;
  const int ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);
  const uint32_t row_bytes = K / 2, row_blocks = K / 64;
  const uint32_t kbeg = blockIdx.y * chunk, kend = min(kbeg + chunk, row_blocks);
  float acc[NT][4];
  if constexpr (COLS > 0) {
    static_assert(NT == 1, "the column layout takes one or two rows of x");
    cols_loop<T, S, Q, V, COLS>(acc, x, M, K, op, code, table, code2_s, kbeg + part * kU, kend, n0, N, row_bytes,
                          row_blocks);
  } else {
    const uint8_t* wa = op.packed + ra * row_bytes + 8 * t;
    const uint8_t* wb = op.packed + rb * row_bytes + 8 * t;
    const uint32_t ra_b = ra * row_blocks, rb_b = rb * row_blocks;
    const uint32_t lane_col = lane * 4;
    const T* xr[NT];
    bool xok[NT];  // this lane's row of x exists (see the x loads below)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = nt * 8 + g;
      xok[nt] = m < M;
      xr[nt] = x + static_cast<int64_t>(xok[nt] ? m : 0) * K + 16 * t;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

    StepLoads cur;
    uint32_t base = kbeg + part * kU;
    if (base < kend) issue<Q, V>(cur, base, kend, wa, wb, ra_b, rb_b, op);
    fill_tables<T, Q>(table, code2_s, code, op);
    __syncthreads();  // the tables
    for (; base < kend; base += S * kU) {
      StepLoads nxt;
      issue<Q, V>(nxt, base + S * kU < kend ? base + S * kU : base, kend, wa, wb, ra_b, rb_b, op);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const bool ok = base + u < kend;  // no branch: the U blocks interleave
        const uint32_t blk = ok ? base + u : kend - 1;
        uint4 xv[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4* p = reinterpret_cast<const uint4*>(xr[nt] + 64 * blk);
          // XZ (some rows of x past M): those lanes load nothing and hold zeros; predicated
          // off, they add nothing to the L1's work. Otherwise (every row there) the loads are
          // unconditional and nothing is zeroed (two CS2R a load).
          if (XZ) {
            xv[nt][0] = xok[nt] ? __ldg(p) : make_uint4(0, 0, 0, 0);
            xv[nt][1] = xok[nt] ? __ldg(p + 1) : make_uint4(0, 0, 0, 0);
          } else {
            xv[nt][0] = __ldg(p);
            xv[nt][1] = __ldg(p + 1);
          }
        }
        uint32_t fa[8], fb[8];  // byte i of the lane's 8 -> its code pair
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t wa_ = i < 4 ? cur.qa[u].x : cur.qa[u].y, wb_ = i < 4 ? cur.qb[u].x : cur.qb[u].y;
          const uint32_t sel = 0x5504u | ((i & 3) << 4);  // bytes [lane column, byte i, 0, 0]
          fa[i] = table_at(table, __byte_perm(wa_, lane_col, sel));
          fb[i] = table_at(table, __byte_perm(wb_, lane_col, sel));
        }
        const float ama = ok ? block_absmax<Q, V>(code2_s, cur.ia[u], cur.sa, u, op.offset) : 0.0f;
        const float amb = ok ? block_absmax<Q, V>(code2_s, cur.ib[u], cur.sb, u, op.offset) : 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint32_t xw[8] = {xv[nt][0].x, xv[nt][0].y, xv[nt][0].z, xv[nt][0].w,
                                  xv[nt][1].x, xv[nt][1].y, xv[nt][1].z, xv[nt][1].w};
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t a[4] = {fa[2 * j], fb[2 * j], fa[2 * j + 1], fb[2 * j + 1]};
            mma16816<T>(d, a, xw[2 * j], xw[2 * j + 1]);
          }
          // D: (row g, x rows 2t, 2t+1), (row g+8, the same)
          acc[nt][0] = __fmaf_rn(d[0], ama, acc[nt][0]);
          acc[nt][1] = __fmaf_rn(d[1], ama, acc[nt][1]);
          acc[nt][2] = __fmaf_rn(d[2], amb, acc[nt][2]);
          acc[nt][3] = __fmaf_rn(d[3], amb, acc[nt][3]);
        }
      }
      cur = nxt;
    }
  }
  if (S > 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][lane][4 * nt + i] = acc[nt][i];
    __syncthreads();
    if (part == 0) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float v = acc[nt][i];
          for (int p = 1; p < S; ++p) v += partial[warp + p][lane][4 * nt + i];
          acc[nt][i] = v;
        }
    }
  }
  const int r0 = n0 + g, r1 = n0 + g + 8;
  if (gridDim.y == 1) {
    if (part == 0 && live) finish<T, NT, GR>(acc, n0, M, N, ep, y);
    return;
  }
  // K split over the grid: fp32 partials to ws[blockIdx.y][m][n] (L2, not L1: another SM reads them)
  float* wk = ws + static_cast<int64_t>(blockIdx.y) * M * N;
  if (part == 0 && live) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = nt * 8 + 2 * t + (i & 1), n = i < 2 ? r0 : r1;
        if (m < M && n < N && (GR == 16 || i < 2)) __stcg(wk + static_cast<int64_t>(m) * N + n, acc[nt][i]);
      }
    }
  }
  __threadfence();  // the partials are visible before the counter says so
  __syncthreads();
  if (threadIdx.x == 0) {
    // a K split over the grid is one product's (the host checks): block0 = 0
    const int done = atomicAdd(counters + (blockIdx.x - block0), 1);
    is_last = done == static_cast<int>(gridDim.y) - 1;
    if (is_last) counters[(blockIdx.x - block0)] = 0;  // left at zero for the next launch (and graph replays)
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // the last block: all its threads sum the partials of its rows, each output in grid order
  // (one output a thread: the L2 reads of many outputs are in flight together)
  const int nb = (blockIdx.x - block0) * per_block * GR, rows = min(per_block * GR, N - nb);
  for (int e = threadIdx.x; e < M * rows; e += blockDim.x) {
    const int m = e / rows, n = nb + e % rows;
    float v = 0.0f;
    for (int ky = 0; ky < static_cast<int>(gridDim.y); ++ky) {
      v += __ldcg(ws + (static_cast<int64_t>(ky) * M + m) * N + n);
    }
    y[static_cast<int64_t>(m) * N + n] = from_f32<T>(epilogue_one<T>(v, m, n, ep));
  }
}

// One product: its operands are the kernel's own parameters (read from the constant bank at
// fixed offsets).
template <typename T, int NT, int S, bool Q, bool V, bool XZ, int COLS>
__global__ void __launch_bounds__(kWarps * 32, 2) k_nf4_decode_mma(const T* __restrict__ x, int M, int K, Operands op,
                                                                const float* __restrict__ code, int N, int chunk,
                                                                float* __restrict__ ws, int* __restrict__ counters,
                                                                Epilogue ep, T* __restrict__ y) {
  decode_mma<T, NT, S, Q, V, XZ, COLS>(x, M, K, op, code, N, chunk, ws, counters, ep, y, 0u);
}

// Several products of one x (Parts): each block computes its part's. A kernel of its own, so
// that the one-product kernel keeps its code: indexing the parts with the block's part cost
// 2-4% at one and two rows when both used it (more registers: 78 -> 96 in the 8-row column
// layout; H200, single-weight launches, one build against the other).
template <typename T, int NT, int S, bool Q, bool V, bool XZ, int COLS>
__global__ void __launch_bounds__(kWarps * 32, 2) k_nf4_decode_mma_parts(const T* __restrict__ x, int M, int K,
                                                                      const __grid_constant__ Parts parts, int chunk,
                                                                      float* __restrict__ ws,
                                                                      int* __restrict__ counters) {
  const Part& job = parts.p[part_of(parts)];
  decode_mma<T, NT, S, Q, V, XZ, COLS>(x, M, K, job.op, job.code, job.N, chunk, ws, counters, job.ep,
                                       static_cast<T*>(job.y), job.block0);
}

// ---- Row groups' steps shared evenly by a block's warps (FLAT, the column layout) ----
// With 8 warps a block and S of them a row group, every warp walks the same number of steps
// and a block's work is fixed, so the grid fills the GPU only when the blocks come out to a
// whole number of waves: 14336 x 4096 (896 row groups of 16 weight rows) runs 224 s2 blocks
// on 264 slots, and the SMs given one block idle half the time (ncu, H200, M = 1: SM active
// cycles 11.3 k on the least busy SM, 20.3 k on the busiest). Here a block of 16 warps (one
// an SM: 128 registers) takes G row groups, numbers their steps group by group
// (U = K/256 a group) and gives each warp P = ceil(G·U/16) consecutive ones, so a warp may end
// one group and start the next (P <= U: at most two segments). G = ceil(groups / SMs) makes
// one wave of nearly equal blocks (14336 x 4096: G = 7, 128 blocks, 7 steps a warp). Each
// warp leaves its segments' sums in shared memory; warp j then sums group j's in warp order
// (deterministic) and writes it. The table is filled once for 16 warps instead of 8.
// Measured (H200, M = 1): 14336 x 4096 12.2 µs against 12.6 for s2; on the narrow shapes, where
// a warp gets one or two steps, it loses (1024 x 4096 G = 1: 5.8 against 3.7 for s8: ncu counts
// 1.7x the instructions, each warp's setup, prefetch and reduction paid for half the steps),
// so the dispatch times it beside the 8-warp blocks.
constexpr int kFlatWarps = 16;
constexpr int kFlatMaxGroups = 16;
constexpr int kFlatSmemBytes = kPartialOffset + kFlatWarps * 2 * 32 * 4 * 4;  // partials [warp][segment][lane][4]

template <typename T, bool Q, bool V>
__device__ __forceinline__ void decode_mma_flat(const T* __restrict__ x, int M, int K, const Operands& op,
                                                const float* __restrict__ code, int N, int G, const Epilogue& ep,
                                                T* __restrict__ y, unsigned block0) {
  extern __shared__ __align__(16) unsigned char table[];  // kFlatSmemBytes: see kTableAddr
  float* const code2_s = reinterpret_cast<float*>(table + kTableBytes);
  auto partial = reinterpret_cast<float (*)[2][32][4]>(table + kPartialOffset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#if FQ_TABLE_IMMEDIATE
  if (static_cast<uint32_t>(__cvta_generic_to_shared(table)) != kTableAddr) {  // see kTableAddr
    poison_rows<T>(y, M, N, (blockIdx.x - block0) * G * 16, G * 16);
    return;
  }
#endif
  const uint32_t groups = (N + 15) / 16, g0 = (blockIdx.x - block0) * G;
  const uint32_t live = min(static_cast<uint32_t>(G), groups - g0);  // the grid is ceil(groups / G)
  const uint32_t row_bytes = K / 2, row_blocks = K / 64;
  const uint32_t U = (row_blocks + kU - 1) / kU;  // steps a row group
  const uint32_t total = live * U, P = (total + kFlatWarps - 1) / kFlatWarps;
  const uint32_t u0 = min(warp * P, total), u1 = min(u0 + P, total);  // this warp's steps [u0, u1)
  const uint32_t ja = u0 < u1 ? u0 / U : 0;  // the group of the warp's first step
  float acc0[1][4], acc1[1][4];
  flat_loop<T, Q, V>(acc0, acc1, x, M, K, op, code, table, code2_s, u0, u1, U, u0 - ja * U, (g0 + ja) * 16, N,
                     row_bytes, row_blocks);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    partial[warp][0][lane][i] = acc0[0][i];
    partial[warp][1][lane][i] = acc1[0][i];
  }
  __syncthreads();
  if (static_cast<uint32_t>(warp) >= live) return;
  // group j = warp: the warps holding its steps, in order (its first step's warp may hold it
  // as segment 1, after the end of group j - 1)
  const uint32_t j = warp, wl = j * U / P, wh = ((j + 1) * U - 1) / P;
  float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
  for (uint32_t w = wl; w <= wh; ++w) {
    const int seg = w * P / U == j ? 0 : 1;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[0][i] += partial[w][seg][lane][i];
  }
  finish<T, 1>(acc, (g0 + j) * 16, M, N, ep, y);
}

template <typename T, bool Q, bool V>
__global__ void __launch_bounds__(kFlatWarps * 32, 1) k_nf4_decode_mma_flat(const T* __restrict__ x, int M, int K,
                                                                             Operands op,
                                                                             const float* __restrict__ code, int N,
                                                                             int G, Epilogue ep, T* __restrict__ y) {
  decode_mma_flat<T, Q, V>(x, M, K, op, code, N, G, ep, y, 0u);
}

template <typename T, bool Q, bool V>
__global__ void __launch_bounds__(kFlatWarps * 32, 1) k_nf4_decode_mma_flat_parts(const T* __restrict__ x, int M,
                                                                                   int K,
                                                                                   const __grid_constant__ Parts parts,
                                                                                   int G) {
  const Part& job = parts.p[part_of(parts)];
  decode_mma_flat<T, Q, V>(x, M, K, job.op, job.code, job.N, G, job.ep, static_cast<T*>(job.y), job.block0);
}

// The 64 KiB table is above the default dynamic shared memory: a kernel opts in once per
// device (the attribute belongs to the device's context; a race between threads only repeats
// the call). A template on the kernel itself, so each kernel has its own flags.
template <auto KERNEL>
void opt_in_smem(int bytes) {
  int dev = 0;
  FQ_CUDA_CHECK(cudaGetDevice(&dev));
  static bool opted_in[64] = {};
  if (dev >= 64 || !opted_in[dev]) {
    FQ_CUDA_CHECK(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    if (dev < 64) opted_in[dev] = true;
  }
}

// A launch of KERNEL (opted in to `bytes` of dynamic shared memory first).
template <auto KERNEL, typename... Args>
void launch_kernel(dim3 grid, int threads, int bytes, cudaStream_t s, Args... args) {
  opt_in_smem<KERNEL>(bytes);
  KERNEL<<<grid, threads, bytes, s>>>(args...);
  FQ_CUDA_CHECK_LAUNCH("nf4_decode_mma");
}

// Each part's run of blocks: `blocks_of(N)` of them from the previous part's end; the parts
// past `count` start at INT_MAX (part_of never picks them). Returns the grid's width.
template <typename BlocksOf>
int place_parts(Parts& parts, int count, const BlocksOf& blocks_of) {
  int total = 0;
  for (int i = 0; i < kMaxParts; ++i) {
    parts.p[i].block0 = i < count ? total : INT32_MAX;
    if (i < count) total += blocks_of(parts.p[i].N);
  }
  return total;
}

template <typename T, bool Q, bool V>
void launch_flat(int G, const void* x, int M, int K, Parts parts, int count, cudaStream_t s) {
  const int blocks = place_parts(parts, count, [G](int N) { return ((N + 15) / 16 + G - 1) / G; });
  const auto* xt = static_cast<const T*>(x);
  if (count > 1) {
    return launch_kernel<k_nf4_decode_mma_flat_parts<T, Q, V>>(blocks, kFlatWarps * 32, kFlatSmemBytes, s, xt, M, K,
                                                                parts, G);
  }
  const Part& p = parts.p[0];
  launch_kernel<k_nf4_decode_mma_flat<T, Q, V>>(blocks, kFlatWarps * 32, kFlatSmemBytes, s, xt, M, K, p.op, p.code, p.N,
                                                G, p.ep, static_cast<T*>(p.y));
}

template <typename T, int NT, int S, bool Q, bool V, bool XZ, int COLS>
void launch_xz(const void* x, int M, int K, Parts parts, int count, int kb, float* ws, int* counters,
               cudaStream_t s) {
  constexpr int per_block = kWarps / S, GR = kGroupRows<COLS>;
  const int blocks = place_parts(parts, count, [](int N) { return ((N + GR - 1) / GR + per_block - 1) / per_block; });
  const int row_blocks = K / 64;
  int chunk = (row_blocks + kb - 1) / kb;
  chunk = (chunk + kU - 1) / kU * kU;  // a whole number of steps (keeps V's alignment)
  const int ky = (row_blocks + chunk - 1) / chunk;
  constexpr int bytes = smem_bytes<NT>();
  const dim3 grid(blocks, ky);
  const auto* xt = static_cast<const T*>(x);
  if (count > 1) {
    return launch_kernel<k_nf4_decode_mma_parts<T, NT, S, Q, V, XZ, COLS>>(grid, kWarps * 32, bytes, s, xt, M, K, parts,
                                                                            chunk, ws, counters);
  }
  const Part& p = parts.p[0];
  launch_kernel<k_nf4_decode_mma<T, NT, S, Q, V, XZ, COLS>>(grid, kWarps * 32, bytes, s, xt, M, K, p.op, p.code, p.N,
                                                             chunk, ws, counters, p.ep, static_cast<T*>(p.y));
}

// cols: 0 the row layout, 1 the column layout with 8 weight rows a warp, 2 with 16.
template <typename T, int NT, int S, bool Q, bool V>
void launch(int cols, const void* x, int M, int K, const Parts& parts, int count, int kb, float* ws, int* counters,
            cudaStream_t s) {
  // Zero-filled x loads at M <= 4 (a lane group without a row of x loads nothing); at more
  // rows every lane loads and nothing is zeroed. H200, graph-timed, the same build: at
  // M = 1-4 the zero-filled loads were 0.5-0.9 µs faster on 14336 x 4096 and 4096 x 14336
  // (0.2-0.3 slower on 4096 x 4096); at M = 8-16 the unconditional loads were faster on
  // every shape (gate/up M = 16: 26.1 against 27.6 µs).
  if constexpr (NT == 1) {
    if (cols == 2) return launch_xz<T, NT, S, Q, V, true, 2>(x, M, K, parts, count, kb, ws, counters, s);
    if (cols == 1) return launch_xz<T, NT, S, Q, V, true, 1>(x, M, K, parts, count, kb, ws, counters, s);
    if (M <= 4) return launch_xz<T, NT, S, Q, V, true, 0>(x, M, K, parts, count, kb, ws, counters, s);
  }
  return launch_xz<T, NT, S, Q, V, false, 0>(x, M, K, parts, count, kb, ws, counters, s);
}

template <typename T, int NT, bool Q, bool V>
void launch_split(int split, int cols, const void* x, int M, int K, const Parts& parts, int count, int kb, float* ws,
                  int* counters, cudaStream_t s) {
  if (split == 2) return launch<T, NT, 2, Q, V>(cols, x, M, K, parts, count, kb, ws, counters, s);
  if (split == 4) return launch<T, NT, 4, Q, V>(cols, x, M, K, parts, count, kb, ws, counters, s);
  if (split == 8) return launch<T, NT, 8, Q, V>(cols, x, M, K, parts, count, kb, ws, counters, s);
  throw std::invalid_argument("nf4_decode_mma_cuda: the in-block K split must be 2, 4 or 8, got " + std::to_string(split));
}

template <typename T>
void launch_dtype(bool two_tiles, bool nested, bool vec, int split, int cols, int groups, const void* x, int M, int K,
                  const Parts& parts, int count, int kb, float* ws, int* counters, cudaStream_t s) {
  if (groups > 0) {
    if (nested) return vec ? launch_flat<T, true, true>(groups, x, M, K, parts, count, s)
                           : launch_flat<T, true, false>(groups, x, M, K, parts, count, s);
    return vec ? launch_flat<T, false, true>(groups, x, M, K, parts, count, s)
               : launch_flat<T, false, false>(groups, x, M, K, parts, count, s);
  }
#define FQ_MMA_ARGS split, cols, x, M, K, parts, count, kb, ws, counters, s
  if (two_tiles) {
    if (nested) return vec ? launch_split<T, 2, true, true>(FQ_MMA_ARGS) : launch_split<T, 2, true, false>(FQ_MMA_ARGS);
    return vec ? launch_split<T, 2, false, true>(FQ_MMA_ARGS) : launch_split<T, 2, false, false>(FQ_MMA_ARGS);
  }
  if (nested) return vec ? launch_split<T, 1, true, true>(FQ_MMA_ARGS) : launch_split<T, 1, true, false>(FQ_MMA_ARGS);
  return vec ? launch_split<T, 1, false, true>(FQ_MMA_ARGS) : launch_split<T, 1, false, false>(FQ_MMA_ARGS);
#undef FQ_MMA_ARGS
}

}  // namespace

void nf4_decode_mma_cuda_parts(const void* x, int64_t M, int64_t K, const DecodeMmaPart* parts, int count,
                               int64_t xa_stride, int dtype, int split, int kb, bool cols, int groups, int rows,
                               float* ws, int* counters, int64_t stream) {
  if (count < 1 || count > kMaxParts) {
    throw std::invalid_argument("nf4_decode_mma_cuda: one launch takes 1 to " + std::to_string(kMaxParts) +
                                " weights, got " + std::to_string(count));
  }
  if (count > 1 && kb != 1) {
    throw std::invalid_argument("nf4_decode_mma_cuda: several weights in one launch need kb = 1 (the K split over "
                                "the grid keeps one weight's partials), got kb=" + std::to_string(kb));
  }
  if (M < 1 || M > 16) throw std::invalid_argument("nf4_decode_mma_cuda: x must have 1 to 16 rows, got " + std::to_string(M));
  if (cols && M > 2) {
    throw std::invalid_argument("nf4_decode_mma_cuda: the column layout takes 1 or 2 rows of x, got " + std::to_string(M));
  }
  if ((rows != 16 && rows != 8) || (rows == 8 && (!cols || groups != 0))) {
    throw std::invalid_argument("nf4_decode_mma_cuda: rows (weight rows a warp) must be 16, or 8 with the column layout "
                                "and groups = 0; got rows=" + std::to_string(rows) + ", cols=" + std::to_string(cols) +
                                ", groups=" + std::to_string(groups));
  }
  if (groups < 0 || groups > kFlatMaxGroups || (groups > 0 && (!cols || kb != 1))) {
    throw std::invalid_argument("nf4_decode_mma_cuda: groups (row groups a 16-warp block) must be 0, or 1.." +
                                std::to_string(kFlatMaxGroups) + " with the column layout and kb = 1; got groups=" +
                                std::to_string(groups) + ", cols=" + std::to_string(cols) + ", kb=" + std::to_string(kb));
  }
  if (K % 64 != 0 || K <= 0) {
    throw std::invalid_argument("nf4_decode_mma_cuda: K must be a positive multiple of 64, got K=" + std::to_string(K));
  }
  if (kb < 1 || kb > 64) throw std::invalid_argument("nf4_decode_mma_cuda: the grid's K split must be 1..64");
  if (kb > 1 && (ws == nullptr || counters == nullptr)) {
    throw std::invalid_argument("nf4_decode_mma_cuda: a K split over the grid needs the fp32 workspace and the counters");
  }
  if (reinterpret_cast<uintptr_t>(x) % 16) throw std::invalid_argument("nf4_decode_mma_cuda: x must be 16-byte aligned");
  const int64_t row_blocks = K / 64;
  const bool nested = parts[0].qabsmax != nullptr;
  bool vec = row_blocks % kU == 0;
  Parts kp{};
  for (int i = 0; i < count; ++i) {
    const DecodeMmaPart& w = parts[i];
    // names the weight in an error (built only when one is thrown)
    const auto which = [&] {
      return count > 1 ? " (weight " + std::to_string(i) + " of the launch)" : std::string();
    };
    if (w.N <= 0) {
      throw std::invalid_argument("nf4_decode_mma_cuda: N must be positive, got " + std::to_string(w.N) + which());
    }
    if (reinterpret_cast<uintptr_t>(w.packed) % 16) {
      throw std::invalid_argument("nf4_decode_mma_cuda: the packed weight must be 16-byte aligned" + which());
    }
    if (w.N > int64_t{INT32_MAX} / (K / 2)) {
      throw std::invalid_argument("nf4_decode_mma_cuda: the packed weight (N=" + std::to_string(w.N) + ", K=" +
                                  std::to_string(K) + ") must be under 2 GiB (the kernel's offsets are 32-bit)" + which());
    }
    if ((w.qabsmax != nullptr) != nested) {
      throw std::invalid_argument("nf4_decode_mma_cuda: the weights of one launch must all have nested absmax or "
                                  "all plain" + which());
    }
    int shift2 = 0;
    while ((int64_t{1} << shift2) < w.blocksize2) ++shift2;
    if (nested && (int64_t{1} << shift2) != w.blocksize2) {
      throw std::invalid_argument("nf4_decode_mma_cuda: the nested absmax block size must be a power of two, got " +
                                  std::to_string(w.blocksize2) + which());
    }
    const void* abs_base = nested ? static_cast<const void*>(w.qabsmax) : static_cast<const void*>(w.absmax);
    vec = vec && (!nested || w.blocksize2 % kU == 0) && reinterpret_cast<uintptr_t>(abs_base) % (nested ? 4 : 16) == 0;
    kp.p[i].op = Operands{w.packed, w.absmax, w.qabsmax, w.code2, w.absmax2, w.offset, shift2};
    kp.p[i].code = w.code;
    kp.p[i].ep = Epilogue{w.xa, static_cast<int>(xa_stride), w.lora_b, w.rank, w.scale, w.bias};
    kp.p[i].y = w.y;
    kp.p[i].N = static_cast<int>(w.N);
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool two = M > 8;
  const int lay = !cols ? 0 : rows == 8 ? 1 : 2;
  switch (dtype) {
    case kF16:
      return launch_dtype<__half>(two, nested, vec, split, lay, groups, x, M, K, kp, count, kb, ws, counters, s);
    case kBF16:
      return launch_dtype<__nv_bfloat16>(two, nested, vec, split, lay, groups, x, M, K, kp, count, kb, ws, counters, s);
    default:
      throw std::invalid_argument("nf4_decode_mma_cuda: x must be fp16 or bf16 (the tensor cores' input types)");
  }
}

void nf4_decode_mma_cuda(const void* x, int64_t M, int64_t K, const uint8_t* packed, const float* code,
                         const float* absmax, const uint8_t* qabsmax, const float* code2, const float* absmax2,
                         float offset, int64_t blocksize2, int64_t N, const void* xa, int64_t xa_stride,
                         const void* lora_b, int rank, float scale, const void* bias, void* y, int dtype, int split,
                         int kb, bool cols, int groups, int rows, float* ws, int* counters, int64_t stream) {
  const DecodeMmaPart part{packed, code, absmax, qabsmax, code2, absmax2, offset, blocksize2, N, xa, lora_b, rank,
                           scale, bias, y};
  nf4_decode_mma_cuda_parts(x, M, K, &part, 1, xa_stride, dtype, split, kb, cols, groups, rows, ws, counters, stream);
}

}  // namespace fq
