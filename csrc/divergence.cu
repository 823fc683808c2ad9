// CUDA kernels of the fused softmax + divergence loss (forward, fused forward+gradient, and
// backward from saved row statistics). The executable specification is
// ssld_kernels/reference.py; the parameter block and the checks are in common.h.
//
// Math: ssld_kernels/reference.py (every formula; the terms are DivParams' in common.h). Per
// element it lives in elem_terms / elem_grad_s / elem_grad_t below and every kernel goes
// through them; their "== 0" tests (not "> 0") keep NaN propagating.
//
// Launch strategy:
//   * n_cols <= kWarpMaxCols (1024): warp-per-row kernels, kWarpRows (8) rows per 256-thread
//     block. The forward keeps the whole row in registers (NV = 1, 2, 4 steps of 8 values
//     per lane, chosen by n_cols): logits are read once, max / sum-exp / A / B are reduced
//     with warp shuffles, and the gradient (fused path) is written from the registers.
//   * larger rows: block-per-row kernels (256 / 512 / 1024 threads for n_cols <= 8192 /
//     <= 32768 / larger), chunked:
//     pass 1 online (max, sum-exp) per thread + block reduction of the pairs, pass 2 A and B,
//     pass 3 (only when writing gradients) the gradient. No limit on n_cols.
//   * row cache (DivParams.cuda_row_cache = 1, chosen per shape by the tune table): pass 1
//     also copies the row into shared memory (up to the opt-in limit, ~227 KB on an H100:
//     C <= ~28k fp32, ~56k bf16 pairs) and passes 2 and 3 read the copy, so each logit is
//     read from global memory once. Without it pass 2 runs last step first (L2 reuse).
//     DivParams.cuda_threads / cuda_blocks override the block size and cap the grid.
//   * backward: one pass over the row using the saved (m_s, l_s, m_t, l_t, A, B), warp-per-row or
//     block-per-row with the same threshold.
//   * A "step" is 8 consecutive values per thread. Vectorized variant (all row pointers and
//     row strides 16-byte aligned, checked on the host): one 16-byte access for 8 halves /
//     bfloat16s, two float4 for fp32; the partial last vector of a row goes element-wise.
//     Scalar variant: 8 coalesced scalar accesses per step (element j0 + e * group_size).
//   * Rows are visited with a grid-stride loop; every row offset is int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda_utils.cuh"

namespace ssld {
void divergence_forward_cuda(const DivParams& p);
void divergence_backward_cuda(const DivParams& p);
int cuda_device_count();
}  // namespace ssld

namespace ssld {
namespace {

constexpr int kStep = 8;             // values per thread per step
constexpr int kWarpRows = 8;         // rows (warps) per block in the warp-per-row kernels
constexpr int kWarpMaxCols = 1024;   // largest row handled by a warp (8 values x 4 steps x 32)
constexpr float kNegInf = -__builtin_huge_valf();
static_assert(kWarpMaxCols == 32 * kStep * 4, "the largest warp kernel (NV = 4) holds the row");

// Register budget of the register-cached forward kernel: resident 256-thread blocks per SM
// asked of ptxas (caps of 64, 85 and 128 registers for NV = 1, 2, 4; no spills). Measured on
// an H100: letting ptxas use ~200 registers for NV = 4 was 1.5-2x slower, and an NV = 8
// variant for 1024 < C <= 2048 (~245 registers) was 2x slower than the block kernel.
constexpr int warp_min_blocks(int nv) { return nv <= 1 ? 4 : nv <= 2 ? 3 : 2; }

// Kernel-side copy of DivParams: device pointers and fp32 coefficients.
struct KParams {
  const void* s;
  const void* t;
  std::int64_t s_stride;
  std::int64_t t_stride;
  std::int64_t n_rows;
  std::int64_t n_cols;
  int mode;
  float beta;
  float one_minus_beta;
  float coef_a;
  float coef_b;
  float inv_temp;
  float loss_scale;
  float grad_scale;
  const float* weight;
  const std::uint8_t* mask;
  const float* grad_rows;
  std::int64_t grad_rows_stride;
  float* row_loss;
  float* stats;
  void* grad_s;
  std::int64_t grad_s_stride;
  void* grad_t;
  std::int64_t grad_t_stride;
};

// ---------------------------------------------------------------------------------------
// dtype conversions and 8-wide loads / stores (fp32 math, round-to-nearest-even on store)
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float half_bits_to_float(std::uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
__device__ __forceinline__ std::uint32_t pack2(__half a, __half b) {
  return static_cast<std::uint32_t>(__half_as_ushort(a)) |
         (static_cast<std::uint32_t>(__half_as_ushort(b)) << 16);
}
__device__ __forceinline__ std::uint32_t pack2(__nv_bfloat16 a, __nv_bfloat16 b) {
  return static_cast<std::uint32_t>(__bfloat16_as_ushort(a)) |
         (static_cast<std::uint32_t>(__bfloat16_as_ushort(b)) << 16);
}

// p must be 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float (&v)[kStep]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[kStep]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = half_bits_to_float(w[i] & 0xffffu);
    v[2 * i + 1] = half_bits_to_float(w[i] >> 16);
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[kStep]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bfloat16 -> float is exact: the high half of the float
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[kStep]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[kStep]) {  // __half / bfloat16
  uint4 u;
  u.x = pack2(from_float<T>(v[0]), from_float<T>(v[1]));
  u.y = pack2(from_float<T>(v[2]), from_float<T>(v[3]));
  u.z = pack2(from_float<T>(v[4]), from_float<T>(v[5]));
  u.w = pack2(from_float<T>(v[6]), from_float<T>(v[7]));
  *reinterpret_cast<uint4*>(p) = u;
}

// ---------------------------------------------------------------------------------------
// Where a thread's step lies in a row. A group of G threads (a warp or a block) walks the
// row in steps; thread `lane` handles, at step k, the elements j0 + e * jstride, e < 8.
//   VEC:    j0 = 8 * (k * G + lane), jstride = 1 (full: the 8 values are in the row)
//   scalar: j0 = k * 8 * G + lane,   jstride = G (coalesced per e)
// Both cover [0, 8 * G * K) with K = ceil(C / (8 * G)) steps.
// ---------------------------------------------------------------------------------------
struct Pos {
  std::int64_t j0;
  std::int64_t jstride;
  bool full;
  __device__ __forceinline__ bool valid(int e, std::int64_t C) const { return j0 + e * jstride < C; }
};

template <bool VEC>
__device__ __forceinline__ Pos step_pos(std::int64_t k, int lane, int G, std::int64_t C) {
  Pos p;
  if (VEC) {
    p.j0 = kStep * (k * G + lane);
    p.jstride = 1;
    p.full = p.j0 + kStep <= C;
  } else {
    p.j0 = k * kStep * G + lane;
    p.jstride = G;
    p.full = false;
  }
  return p;
}

__device__ __forceinline__ std::int64_t num_steps(std::int64_t C, int G) {
  return (C + static_cast<std::int64_t>(kStep) * G - 1) / (static_cast<std::int64_t>(kStep) * G);
}

// Loads the step's values times `scale`; elements outside the row read as -inf.
template <bool VEC, typename T>
__device__ __forceinline__ void load_step(const T* row, const Pos& p, std::int64_t C, float scale,
                                          float (&v)[kStep]) {
  if (VEC && p.full) {
    load8(row + p.j0, v);
#pragma unroll
    for (int e = 0; e < kStep; ++e) v[e] *= scale;
  } else {
#pragma unroll
    for (int e = 0; e < kStep; ++e)
      v[e] = p.valid(e, C) ? to_float(row[p.j0 + e * p.jstride]) * scale : kNegInf;
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_step(T* row, const Pos& p, std::int64_t C,
                                           const float (&v)[kStep]) {
  if (VEC && p.full) {
    store8(row + p.j0, v);
  } else {
#pragma unroll
    for (int e = 0; e < kStep; ++e)
      if (p.valid(e, C)) row[p.j0 + e * p.jstride] = from_float<T>(v[e]);
  }
}

// ---------------------------------------------------------------------------------------
// Per-element math: the only place the formulas of the divergence are written.
// ---------------------------------------------------------------------------------------
struct Terms {
  float p, q;    // probabilities
  float ls, lt;  // log p - log X, log q - log Y
};

// Row log-sum-exp kept as (max, log of the shifted sum) for student and teacher: log p is
// (x - max) - log_sum exactly as in the forward, without rounding max + log_sum to one float
// (which would cost ulp(max) of accuracy in every log p of the backward).
struct RowStats {
  float ms, ls, mt, lt;
};

// x, y: temperature-scaled logits.
__device__ __forceinline__ Terms elem_terms(const KParams& k, float x, float y,
                                            const RowStats& rs) {
  const float logp = (x - rs.ms) - rs.ls;
  const float logq = (y - rs.mt) - rs.lt;
  Terms r;
  r.p = expf(logp);
  r.q = expf(logq);
  if (k.mode == 0) {
    r.ls = logp - logq;
    r.lt = -r.ls;
  } else {
    const float d = logq - logp;
    const float w = d <= 0.f ? k.beta : k.one_minus_beta;
    const float z = log1pf(w * expm1f(-fabsf(d)));
    r.ls = -(z + fmaxf(d, 0.f));
    r.lt = -(z - fminf(d, 0.f));
  }
  return r;
}

// prob * v with exactly 0 where prob == 0 (x log x -> 0); NaN propagates.
__device__ __forceinline__ float masked_prod(float prob, float v) {
  return prob == 0.f ? 0.f : prob * v;
}

// Row-sum contributions: A += contrib_a, B += contrib_b.
__device__ __forceinline__ float contrib_a(const Terms& e) { return masked_prod(e.p, e.ls); }
__device__ __forceinline__ float contrib_b(const Terms& e) { return masked_prod(e.q, e.lt); }

__device__ __forceinline__ float elem_grad_s(const KParams& k, const Terms& e, float A, float g) {
  // A term skipped when its coefficient is 0, so an infinite A (KL with disjoint support)
  // does not turn into 0 * inf = NaN.
  float r = k.coef_a == 0.f ? 0.f : k.coef_a * masked_prod(e.p, e.ls - A);
  if (k.mode == 0) r = r + k.coef_b * (e.p - e.q);
  return g * r;
}

__device__ __forceinline__ float elem_grad_t(const KParams& k, const Terms& e, float B, float g) {
  float r = k.coef_b == 0.f ? 0.f : k.coef_b * masked_prod(e.q, e.lt - B);
  if (k.mode == 0) r = r + k.coef_a * (e.q - e.p);
  return g * r;
}

__device__ __forceinline__ bool row_kept(const KParams& k, std::int64_t row) {
  return k.mask == nullptr || k.mask[row] != 0;
}

__device__ __forceinline__ float row_weight(const KParams& k, std::int64_t row) {
  return k.weight == nullptr ? 1.f : k.weight[row];
}

__device__ __forceinline__ float row_grad_factor(const KParams& k, std::int64_t row) {
  return k.grad_scale * k.grad_rows[row * k.grad_rows_stride] * row_weight(k, row);
}

// Writes row_loss (and stats) of one row; called by a single thread.
__device__ __forceinline__ void write_row_outputs(const KParams& k, std::int64_t row, bool kept,
                                                  const RowStats& rs, float A, float B) {
  if (!kept) {
    k.row_loss[row] = 0.f;
    if (k.stats != nullptr) {
      float* st = k.stats + kStatsWidth * row;
      for (int i = 0; i < kStatsWidth; ++i) st[i] = 0.f;
    }
    return;
  }
  const float la = k.coef_a == 0.f ? 0.f : k.coef_a * A;  // 0 * inf stays 0
  const float lb = k.coef_b == 0.f ? 0.f : k.coef_b * B;
  k.row_loss[row] = (la + lb) * k.loss_scale * row_weight(k, row);
  if (k.stats != nullptr) {
    float* st = k.stats + kStatsWidth * row;
    st[0] = rs.ms; st[1] = rs.ls; st[2] = rs.mt; st[3] = rs.lt; st[4] = A; st[5] = B;
  }
}

// ---------------------------------------------------------------------------------------
// Reductions. The (max, sum-exp) merge is written with explicit _rn operations so that it is
// commutative bit for bit (no FMA contraction): xor-butterflies then give every lane the
// same value.
// ---------------------------------------------------------------------------------------
struct MaxSum {
  float m;  // running max (-inf: nothing yet)
  float s;  // sum of exp(x - ref(m)), ref(m) = (m == -inf) ? 0 : m
};

__device__ __forceinline__ float ms_ref(float m) { return m == kNegInf ? 0.f : m; }

__device__ __forceinline__ MaxSum ms_merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  const float r = ms_ref(m);
  return {m, __fadd_rn(__fmul_rn(a.s, expf(a.m - r)), __fmul_rn(b.s, expf(b.m - r)))};
}

// Folds one step (8 values, -inf for absent ones) into a thread's running (max, sum).
__device__ __forceinline__ void ms_add_step(MaxSum& acc, const float (&x)[kStep]) {
  float m = acc.m;
#pragma unroll
  for (int e = 0; e < kStep; ++e) m = fmaxf(m, x[e]);
  const float r = ms_ref(m);
  float s = acc.s * expf(acc.m - r);
#pragma unroll
  for (int e = 0; e < kStep; ++e) s += expf(x[e] - r);
  acc = {m, s};
}


__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum u;
    u.m = __shfl_xor_sync(0xffffffffu, v.m, o);
    u.s = __shfl_xor_sync(0xffffffffu, v.s, o);
    v = ms_merge(v, u);
  }
  return v;
}

// Block reductions (blockDim.x a multiple of 32, <= 1024). Every thread gets the result.
// The leading __syncthreads protects `sh` from the previous reduction's readers.
__device__ __forceinline__ void block_merge2(MaxSum& a, MaxSum& b, float4* sh) {
  a = warp_merge(a);
  b = warp_merge(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = make_float4(a.m, a.s, b.m, b.s);
  __syncthreads();
  if (warp == 0) {
    const float4 v = lane < nw ? sh[lane] : make_float4(kNegInf, 0.f, kNegInf, 0.f);
    MaxSum x{v.x, v.y}, y{v.z, v.w};
    x = warp_merge(x);
    y = warp_merge(y);
    if (lane == 0) sh[0] = make_float4(x.m, x.s, y.m, y.s);
  }
  __syncthreads();
  const float4 v = sh[0];
  a = {v.x, v.y};
  b = {v.z, v.w};
}

__device__ __forceinline__ void block_sum2(float& a, float& b, float4* sh) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = make_float4(a, b, 0.f, 0.f);
  __syncthreads();
  if (warp == 0) {
    const float4 v = lane < nw ? sh[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
    const float x = warp_sum(v.x), y = warp_sum(v.y);
    if (lane == 0) sh[0] = make_float4(x, y, 0.f, 0.f);
  }
  __syncthreads();
  a = sh[0].x;
  b = sh[0].y;
}

// ---------------------------------------------------------------------------------------
// Row helpers shared by the kernels (a group of G threads, this thread is `lane`).
// ---------------------------------------------------------------------------------------
template <typename TS, typename TT>
struct RowPtrs {
  const TS* s;
  const TT* t;
  TS* gs;  // null: not written
  TT* gt;
  __device__ __forceinline__ RowPtrs(const KParams& k, std::int64_t row) {
    s = static_cast<const TS*>(k.s) + row * k.s_stride;
    t = static_cast<const TT*>(k.t) + row * k.t_stride;
    gs = k.grad_s == nullptr ? nullptr : static_cast<TS*>(k.grad_s) + row * k.grad_s_stride;
    gt = k.grad_t == nullptr ? nullptr : static_cast<TT*>(k.grad_t) + row * k.grad_t_stride;
  }
  // The same row read from elsewhere (the shared-memory copy), gradients unchanged.
  __device__ __forceinline__ RowPtrs reading(const TS* s2, const TT* t2) const {
    RowPtrs r = *this;
    r.s = s2;
    r.t = t2;
    return r;
  }
};

// Shared-memory row cache: the raw student row at byte 0, the teacher row at this offset.
__host__ __device__ __forceinline__ std::int64_t cache_t_offset(std::int64_t C, int s_bytes) {
  return (C * s_bytes + 15) / 16 * 16;
}

// Masked row: exact zeros in the gradients, logits never read.
template <typename TS, typename TT, bool VEC>
__device__ void zero_grad_row(const KParams& k, const RowPtrs<TS, TT>& rp, int lane, int G) {
  const std::int64_t C = k.n_cols;
  const std::int64_t K = num_steps(C, G);
  float z[kStep];
#pragma unroll
  for (int e = 0; e < kStep; ++e) z[e] = 0.f;
  for (std::int64_t st = 0; st < K; ++st) {
    const Pos pos = step_pos<VEC>(st, lane, G, C);
    if (pos.j0 >= C) continue;
    if (rp.gs != nullptr) store_step<VEC>(rp.gs, pos, C, z);
    if (rp.gt != nullptr) store_step<VEC>(rp.gt, pos, C, z);
  }
}

// One pass over a row given its statistics: writes grad_s / grad_t.
template <typename TS, typename TT, bool VEC>
__device__ void grad_row_pass(const KParams& k, const RowPtrs<TS, TT>& rp, int lane, int G,
                              const RowStats& rs, float A, float B, float g) {
  const std::int64_t C = k.n_cols;
  const std::int64_t K = num_steps(C, G);
  for (std::int64_t st = 0; st < K; ++st) {
    const Pos pos = step_pos<VEC>(st, lane, G, C);
    if (pos.j0 >= C) continue;
    float xs[kStep], xt[kStep];
    load_step<VEC>(rp.s, pos, C, k.inv_temp, xs);
    load_step<VEC>(rp.t, pos, C, k.inv_temp, xt);
    float gs[kStep], gt[kStep];
#pragma unroll
    for (int e = 0; e < kStep; ++e) {
      const Terms te = elem_terms(k, xs[e], xt[e], rs);
      gs[e] = elem_grad_s(k, te, A, g);
      gt[e] = elem_grad_t(k, te, B, g);
    }
    if (rp.gs != nullptr) store_step<VEC>(rp.gs, pos, C, gs);
    if (rp.gt != nullptr) store_step<VEC>(rp.gt, pos, C, gt);
  }
}

// ---------------------------------------------------------------------------------------
// Forward, warp per row, row in registers (n_cols <= 32 * 8 * NV).
// ---------------------------------------------------------------------------------------
template <typename TS, typename TT, int NV, bool VEC>
__global__ void __launch_bounds__(kWarpRows * 32, warp_min_blocks(NV))
    div_fwd_warp_kernel(const KParams k) {
  const int lane = threadIdx.x & 31;
  const std::int64_t C = k.n_cols;
  const bool want_grad = k.grad_s != nullptr || k.grad_t != nullptr;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarpRows + (threadIdx.x >> 5);
       row < k.n_rows; row += static_cast<std::int64_t>(gridDim.x) * kWarpRows) {
    const RowPtrs<TS, TT> rp(k, row);
    if (!row_kept(k, row)) {
      if (lane == 0) write_row_outputs(k, row, false, RowStats{0.f, 0.f, 0.f, 0.f}, 0.f, 0.f);
      if (want_grad) zero_grad_row<TS, TT, VEC>(k, rp, lane, 32);
      continue;
    }
    // Read the row once; absent elements are -inf.
    float xs[NV][kStep], xt[NV][kStep];
    float ms = kNegInf, mt = kNegInf;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const Pos pos = step_pos<VEC>(i, lane, 32, C);
      load_step<VEC>(rp.s, pos, C, k.inv_temp, xs[i]);
      load_step<VEC>(rp.t, pos, C, k.inv_temp, xt[i]);
#pragma unroll
      for (int e = 0; e < kStep; ++e) {
        ms = fmaxf(ms, xs[i][e]);
        mt = fmaxf(mt, xt[i][e]);
      }
    }
    ms = ms_ref(warp_max(ms));
    mt = ms_ref(warp_max(mt));
    float ss = 0.f, stt = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int e = 0; e < kStep; ++e) {
        ss += expf(xs[i][e] - ms);
        stt += expf(xt[i][e] - mt);
      }
    const RowStats rs{ms, logf(warp_sum(ss)), mt, logf(warp_sum(stt))};

    float A = 0.f, B = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const Pos pos = step_pos<VEC>(i, lane, 32, C);
#pragma unroll
      for (int e = 0; e < kStep; ++e) {
        if (pos.valid(e, C)) {
          const Terms te = elem_terms(k, xs[i][e], xt[i][e], rs);
          A += contrib_a(te);
          B += contrib_b(te);
        }
      }
    }
    A = warp_sum(A);
    B = warp_sum(B);
    if (lane == 0) write_row_outputs(k, row, true, rs, A, B);

    if (want_grad) {
      const float g = row_grad_factor(k, row);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const Pos pos = step_pos<VEC>(i, lane, 32, C);
        if (pos.j0 >= C) continue;
        float gs[kStep], gt[kStep];
#pragma unroll
        for (int e = 0; e < kStep; ++e) {
          const Terms te = elem_terms(k, xs[i][e], xt[i][e], rs);
          gs[e] = elem_grad_s(k, te, A, g);
          gt[e] = elem_grad_t(k, te, B, g);
        }
        if (rp.gs != nullptr) store_step<VEC>(rp.gs, pos, C, gs);
        if (rp.gt != nullptr) store_step<VEC>(rp.gt, pos, C, gt);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward, block per row, chunked (any n_cols).
// ---------------------------------------------------------------------------------------
// CACHE: pass 1 also copies the raw row into dynamic shared memory (s, then t at
// cache_t_offset) and passes 2 and 3 read that copy: one global read of each logit. Each
// thread reads back only the elements it wrote itself (the same step positions), so the
// copy needs no barrier. Without it pass 2 walks the steps last to first, starting on what
// pass 1 read last (the likeliest still in L2).
template <typename TS, typename TT, bool VEC, bool CACHE>
__global__ void __launch_bounds__(1024) div_fwd_block_kernel(const KParams k) {
  __shared__ float4 sh[32];
  extern __shared__ uint4 row_cache[];
  const int tid = threadIdx.x, G = blockDim.x;
  const std::int64_t C = k.n_cols;
  const std::int64_t K = num_steps(C, G);
  const bool want_grad = k.grad_s != nullptr || k.grad_t != nullptr;
  TS* cs = reinterpret_cast<TS*>(row_cache);
  TT* ct = reinterpret_cast<TT*>(reinterpret_cast<char*>(row_cache) +
                                 cache_t_offset(C, static_cast<int>(sizeof(TS))));
  for (std::int64_t row = blockIdx.x; row < k.n_rows; row += gridDim.x) {
    const RowPtrs<TS, TT> rp(k, row);
    if (!row_kept(k, row)) {  // block-uniform
      if (tid == 0) write_row_outputs(k, row, false, RowStats{0.f, 0.f, 0.f, 0.f}, 0.f, 0.f);
      if (want_grad) zero_grad_row<TS, TT, VEC>(k, rp, tid, G);
      continue;
    }
    // Pass 1: online (max, sum-exp).
    MaxSum as{kNegInf, 0.f}, at{kNegInf, 0.f};
    for (std::int64_t st = 0; st < K; ++st) {
      const Pos pos = step_pos<VEC>(st, tid, G, C);
      if (pos.j0 >= C) continue;
      float xs[kStep], xt[kStep];
      if (CACHE) {  // raw values to shared memory, then scaled (x * 1 * s == x * s exactly)
        load_step<VEC>(rp.s, pos, C, 1.f, xs);
        load_step<VEC>(rp.t, pos, C, 1.f, xt);
        store_step<VEC>(cs, pos, C, xs);
        store_step<VEC>(ct, pos, C, xt);
#pragma unroll
        for (int e = 0; e < kStep; ++e) {
          xs[e] *= k.inv_temp;
          xt[e] *= k.inv_temp;
        }
      } else {
        load_step<VEC>(rp.s, pos, C, k.inv_temp, xs);
        load_step<VEC>(rp.t, pos, C, k.inv_temp, xt);
      }
      ms_add_step(as, xs);
      ms_add_step(at, xt);
    }
    block_merge2(as, at, sh);
    const RowStats rs{ms_ref(as.m), logf(as.s), ms_ref(at.m), logf(at.s)};
    const RowPtrs<TS, TT> rd = CACHE ? rp.reading(cs, ct) : rp;  // where passes 2, 3 read

    // Pass 2: A and B, last step first.
    float A = 0.f, B = 0.f;
    for (std::int64_t i = 0; i < K; ++i) {
      const Pos pos = step_pos<VEC>(K - 1 - i, tid, G, C);
      if (pos.j0 >= C) continue;
      float xs[kStep], xt[kStep];
      load_step<VEC>(rd.s, pos, C, k.inv_temp, xs);
      load_step<VEC>(rd.t, pos, C, k.inv_temp, xt);
#pragma unroll
      for (int e = 0; e < kStep; ++e) {
        if (pos.valid(e, C)) {
          const Terms te = elem_terms(k, xs[e], xt[e], rs);
          A += contrib_a(te);
          B += contrib_b(te);
        }
      }
    }
    block_sum2(A, B, sh);
    if (tid == 0) write_row_outputs(k, row, true, rs, A, B);

    // Pass 3: gradients (fused path).
    if (want_grad)
      grad_row_pass<TS, TT, VEC>(k, rd, tid, G, rs, A, B, row_grad_factor(k, row));
  }
}

// ---------------------------------------------------------------------------------------
// Backward: one pass per row from the saved stats (m_s, l_s, m_t, l_t, A, B).
// ---------------------------------------------------------------------------------------
template <typename TS, typename TT, bool VEC>
__device__ __forceinline__ void backward_row(const KParams& k, std::int64_t row, int lane, int G) {
  const RowPtrs<TS, TT> rp(k, row);
  if (!row_kept(k, row)) {
    zero_grad_row<TS, TT, VEC>(k, rp, lane, G);
    return;
  }
  const float* st = k.stats + kStatsWidth * row;
  const RowStats rs{st[0], st[1], st[2], st[3]};
  grad_row_pass<TS, TT, VEC>(k, rp, lane, G, rs, st[4], st[5], row_grad_factor(k, row));
}

template <typename TS, typename TT, bool VEC>
__global__ void __launch_bounds__(kWarpRows * 32) div_bwd_warp_kernel(const KParams k) {
  const int lane = threadIdx.x & 31;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarpRows + (threadIdx.x >> 5);
       row < k.n_rows; row += static_cast<std::int64_t>(gridDim.x) * kWarpRows)
    backward_row<TS, TT, VEC>(k, row, lane, 32);
}

template <typename TS, typename TT, bool VEC>
__global__ void __launch_bounds__(1024) div_bwd_block_kernel(const KParams k) {
  for (std::int64_t row = blockIdx.x; row < k.n_rows; row += gridDim.x)
    backward_row<TS, TT, VEC>(k, row, threadIdx.x, blockDim.x);
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_one(int code, const char* who, F&& f) {
  switch (code) {
    case kFloat32: f(TypeTag<float>{}); return;
    case kFloat16: f(TypeTag<__half>{}); return;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    default:
      throw std::invalid_argument(std::string("CUDA divergence kernels: unsupported ") + who +
                                  " dtype " + dtype_name(code) +
                                  " (supported: float32, float16, bfloat16)");
  }
}

template <typename F>
void dispatch_dtypes(int s_dtype, int t_dtype, F&& f) {
  dispatch_one(s_dtype, "student", [&](auto ts) {
    dispatch_one(t_dtype, "teacher", [&](auto tt) { f(ts, tt); });
  });
}

std::size_t elem_size(int code) { return code == kFloat32 ? 4 : 2; }

bool aligned16(std::uintptr_t ptr, std::int64_t stride, std::size_t esize, std::int64_t n_rows) {
  if (ptr % 16 != 0) return false;
  return n_rows <= 1 || (stride * static_cast<std::int64_t>(esize)) % 16 == 0;
}

bool can_vectorize(const DivParams& p) {
  const std::size_t es = elem_size(p.s_dtype), et = elem_size(p.t_dtype);
  return aligned16(p.s, p.s_stride, es, p.n_rows) && aligned16(p.t, p.t_stride, et, p.n_rows) &&
         (p.grad_s == 0 || aligned16(p.grad_s, p.grad_s_stride, es, p.n_rows)) &&
         (p.grad_t == 0 || aligned16(p.grad_t, p.grad_t_stride, et, p.n_rows));
}

KParams make_kparams(const DivParams& p) {
  KParams k;
  k.s = reinterpret_cast<const void*>(p.s);
  k.t = reinterpret_cast<const void*>(p.t);
  k.s_stride = p.s_stride;
  k.t_stride = p.t_stride;
  k.n_rows = p.n_rows;
  k.n_cols = p.n_cols;
  k.mode = p.mode;
  k.beta = static_cast<float>(p.beta);
  k.one_minus_beta = static_cast<float>(1.0 - p.beta);
  k.coef_a = static_cast<float>(p.coef_a);
  k.coef_b = static_cast<float>(p.coef_b);
  k.inv_temp = static_cast<float>(p.inv_temp);
  k.loss_scale = static_cast<float>(p.loss_scale);
  k.grad_scale = static_cast<float>(p.grad_scale);
  k.weight = reinterpret_cast<const float*>(p.weight);
  k.mask = reinterpret_cast<const std::uint8_t*>(p.mask);
  k.grad_rows = reinterpret_cast<const float*>(p.grad_rows);
  k.grad_rows_stride = p.grad_rows_stride;
  k.row_loss = reinterpret_cast<float*>(p.row_loss);
  k.stats = reinterpret_cast<float*>(p.stats);
  k.grad_s = reinterpret_cast<void*>(p.grad_s);
  k.grad_s_stride = p.grad_s_stride;
  k.grad_t = reinterpret_cast<void*>(p.grad_t);
  k.grad_t_stride = p.grad_t_stride;
  return k;
}

void check_cuda(cudaError_t err, const char* what) { cuda_check(err, "divergence", what); }

constexpr std::int64_t kMaxGrid = 2147483647;  // grid.x limit; rows beyond loop in-kernel

unsigned int grid_for(std::int64_t units) {
  return static_cast<unsigned int>(units < kMaxGrid ? units : kMaxGrid);
}

int block_threads_for(const DivParams& p) {
  if (p.cuda_threads > 0) return p.cuda_threads;
  if (p.n_cols <= 8192) return 256;
  if (p.n_cols <= 32768) return 512;
  return 1024;
}

unsigned int block_grid_for(const DivParams& p) {
  const std::int64_t n = p.n_rows;
  return grid_for(p.cuda_blocks > 0 && p.cuda_blocks < n ? p.cuda_blocks : n);
}

constexpr int kMaxDevices = 64;

// Largest dynamic shared memory a block may opt in to on `device` (cached).
int max_dynamic_smem(int device) {
  static std::atomic<int> cached[kMaxDevices];  // 0: not queried yet
  if (device < 0 || device >= kMaxDevices) return 0;
  int v = cached[device].load(std::memory_order_relaxed);
  if (v == 0) {
    check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    v -= static_cast<int>(32 * sizeof(float4)) + 1024;  // the static sh[] and some slack
    cached[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Dynamic shared memory of the row cache, or 0 when it is off or the row does not fit.
std::size_t row_cache_bytes(const DivParams& p) {
  if (p.cuda_row_cache != 1 || p.n_cols <= kWarpMaxCols) return 0;
  const std::int64_t bytes = cache_t_offset(p.n_cols, static_cast<int>(elem_size(p.s_dtype))) +
                             p.n_cols * static_cast<std::int64_t>(elem_size(p.t_dtype));
  return bytes <= max_dynamic_smem(p.device) ? static_cast<std::size_t>(bytes) : 0;
}

// Lets the cached forward kernel <TS, TT, VEC> use the device's whole opt-in shared memory,
// once per instantiation and device (the once_flags live in each instantiation of this
// function: every kernel instantiation has the same function type, so the flags cannot be
// keyed on it). The attribute only permits, so launches with any smaller size stay valid.
template <typename TS, typename TT, bool VEC>
void allow_max_smem(int device) {
  static std::once_flag flags[kMaxDevices];
  std::call_once(flags[device], [device] {
    check_cuda(cudaFuncSetAttribute(div_fwd_block_kernel<TS, TT, VEC, true>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    max_dynamic_smem(device)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  });
}

template <typename TS, typename TT, bool VEC>
void launch_forward(const DivParams& p, const KParams& k, cudaStream_t stream) {
  const std::int64_t C = k.n_cols;
  if (C <= kWarpMaxCols) {
    const dim3 grid(grid_for((k.n_rows + kWarpRows - 1) / kWarpRows));
    const dim3 block(kWarpRows * 32);
    if (C <= 32 * kStep * 1)
      div_fwd_warp_kernel<TS, TT, 1, VEC><<<grid, block, 0, stream>>>(k);
    else if (C <= 32 * kStep * 2)
      div_fwd_warp_kernel<TS, TT, 2, VEC><<<grid, block, 0, stream>>>(k);
    else
      div_fwd_warp_kernel<TS, TT, 4, VEC><<<grid, block, 0, stream>>>(k);
  } else if (const std::size_t smem = row_cache_bytes(p)) {
    allow_max_smem<TS, TT, VEC>(p.device);
    div_fwd_block_kernel<TS, TT, VEC, true>
        <<<block_grid_for(p), block_threads_for(p), smem, stream>>>(k);
  } else {
    div_fwd_block_kernel<TS, TT, VEC, false>
        <<<block_grid_for(p), block_threads_for(p), 0, stream>>>(k);
  }
}

template <typename TS, typename TT, bool VEC>
void launch_backward(const DivParams& p, const KParams& k, cudaStream_t stream) {
  if (k.n_cols <= kWarpMaxCols) {
    div_bwd_warp_kernel<TS, TT, VEC>
        <<<grid_for((k.n_rows + kWarpRows - 1) / kWarpRows), kWarpRows * 32, 0, stream>>>(k);
  } else {
    div_bwd_block_kernel<TS, TT, VEC><<<block_grid_for(p), block_threads_for(p), 0, stream>>>(k);
  }
}

void check_launch_config(const DivParams& p) {
  const int th = p.cuda_threads;
  if (th != 0 && (th < 64 || th > 1024 || (th & (th - 1)) != 0))
    throw std::invalid_argument("cuda_threads must be 0 (default) or a power of two in "
                                "[64, 1024], got " + std::to_string(th));
  if (p.cuda_blocks < 0)
    throw std::invalid_argument("cuda_blocks must be >= 0, got " + std::to_string(p.cuda_blocks));
  if (p.cuda_row_cache < -1 || p.cuda_row_cache > 1)
    throw std::invalid_argument("cuda_row_cache must be -1, 0 or 1, got " +
                                std::to_string(p.cuda_row_cache));
  if (p.device < 0 || p.device >= kMaxDevices)
    throw std::invalid_argument("device index out of range: " + std::to_string(p.device));
}

void run(const DivParams& p, bool backward) {
  check_div_params(p, backward);
  check_launch_config(p);
  if (p.s_dtype == kFloat64 || p.t_dtype == kFloat64)
    throw std::invalid_argument(
        std::string("CUDA divergence kernels do not support float64 logits (student ") +
        dtype_name(p.s_dtype) + ", teacher " + dtype_name(p.t_dtype) +
        "); use float32, float16 or bfloat16");
  if (p.n_rows == 0) return;
  if (backward && p.grad_s == 0 && p.grad_t == 0) return;  // nothing to write
  const DeviceGuard guard(p.device, "divergence");
  const KParams k = make_kparams(p);
  const bool vec = can_vectorize(p);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  dispatch_dtypes(p.s_dtype, p.t_dtype, [&](auto ts, auto tt) {
    using TS = typename decltype(ts)::type;
    using TT = typename decltype(tt)::type;
    if (backward) {
      if (vec) launch_backward<TS, TT, true>(p, k, stream);
      else launch_backward<TS, TT, false>(p, k, stream);
    } else {
      if (vec) launch_forward<TS, TT, true>(p, k, stream);
      else launch_forward<TS, TT, false>(p, k, stream);
    }
  });
  check_cuda(cudaGetLastError(), backward ? "backward kernel launch" : "forward kernel launch");
}

}  // namespace

void divergence_forward_cuda(const DivParams& p) { run(p, false); }

void divergence_backward_cuda(const DivParams& p) { run(p, true); }

int cuda_device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error
    return 0;
  }
  return n;
}

}  // namespace ssld
