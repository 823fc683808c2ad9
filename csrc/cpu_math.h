// Branch-free float math for the CPU kernels: exp, expm1, log, log1p and the
// fp16 / bf16 <-> fp32 conversions.
//
// Every function is a straight-line sequence of arithmetic, integer bit operations and
// selects (ternaries), so GCC vectorises the loops that call them (no libm calls, no
// branches). They are accurate to about 1-2 ulp over the whole float range and handle the
// special values like libm: NaN -> NaN, exp(-inf) = 0, exp(+inf) = inf, log(0) = -inf,
// log(x < 0) = NaN, log1p(-1) = -inf, expm1(-inf) = -1; exp/expm1 overflow to inf and exp
// underflows gradually through the subnormals to 0. They do not depend on the floating-point
// environment beyond round-to-nearest-even and never rely on -ffast-math.
// Measured max errors (all floats, stride 3; the restricted variants exhaustively on their
// domain): exp 1.01 ulp, expm1 1.75, log 0.90, log1p 0.96 (no divisions: log uses a degree-8
// minimax polynomial), exp_nonpos 1.01, expm1_nonpos 1.0, log1p_m1_0 0.97. The *_nonpos /
// log1p_m1_0 variants skip the overflow / invalid-argument selects for callers that know the
// argument range. fp16/bf16 conversions match F16C / exact RNE on every input.
//
// This header is compiled once per ISA variant (-DSSLD_CPU_ISA=base|avx2|avx512), so all of it
// lives in namespace ssld::SSLD_CPU_ISA: each variant gets its own symbols and the linker can
// never mix an AVX-512 copy into the baseline code path.
#pragma once

#include <cstdint>
#include <limits>

#ifndef SSLD_CPU_ISA
#define SSLD_CPU_ISA base
#endif

#define SSLD_ALWAYS_INLINE inline __attribute__((always_inline))

namespace ssld {
namespace SSLD_CPU_ISA {
namespace cpu_math {

SSLD_ALWAYS_INLINE std::uint32_t f2u(float x) { return __builtin_bit_cast(std::uint32_t, x); }
SSLD_ALWAYS_INLINE float u2f(std::uint32_t u) { return __builtin_bit_cast(float, u); }

// a * b + c, fused where the ISA has FMA (GCC may also contract plain a * b + c in C++).
SSLD_ALWAYS_INLINE float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: x + magic rounds x to an integer
constexpr std::uint32_t kRoundMagicBits = 0x4B400000u;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;      // Cephes split of ln 2: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpOverflow = 88.7228317f;  // largest float x with exp(x) finite
constexpr float kExpUnderflow = -103.97208f; // exp(x) rounds to 0 below this

// 2^n for integer n in [-126, 127] (as a float bit pattern).
SSLD_ALWAYS_INLINE float pow2i(std::int32_t n) {
  return u2f(static_cast<std::uint32_t>(n + 127) << 23);
}

// x = n ln2 + r with n = round(x / ln 2) and |r| <= ln2/2 (Cephes two-constant split), for
// the exp and expm1 cores below.
struct Ln2Reduced {
  float r;
  std::int32_t n;
};
SSLD_ALWAYS_INLINE Ln2Reduced reduce_ln2(float xc) {
  const float kn = fmadd(xc, kLog2e, kRoundMagic);
  const float n = kn - kRoundMagic;
  const std::int32_t ni = static_cast<std::int32_t>(f2u(kn) - kRoundMagicBits);
  float r = fmadd(n, -kLn2Hi, xc);
  r = fmadd(n, -kLn2Lo, r);
  return {r, ni};
}

// exp for x already clamped to [-104, 89] (or NaN); Cephes polynomial on [-ln2/2, ln2/2].
SSLD_ALWAYS_INLINE float exp_core(float xc) {
  const Ln2Reduced red = reduce_ln2(xc);
  const float r = red.r;
  const std::int32_t ni = red.n;
  float y = 1.9875691500E-4f;
  y = fmadd(y, r, 1.3981999507E-3f);
  y = fmadd(y, r, 8.3334519073E-3f);
  y = fmadd(y, r, 4.1665795894E-2f);
  y = fmadd(y, r, 1.6666665459E-1f);
  y = fmadd(y, r, 5.0000001201E-1f);
  y = fmadd(y, r * r, r) + 1.0f;
  // scale by 2^n in two steps so that subnormal results (n down to -150) are rounded correctly
  const std::int32_t n1 = ni >> 1;
  const std::int32_t n2 = ni - n1;
  return y * pow2i(n1) * pow2i(n2);
}

// exp(x); ~1 ulp.
SSLD_ALWAYS_INLINE float exp(float x) {
  float xc = x < -104.0f ? -104.0f : x;  // NaN passes through both clamps
  xc = xc > 89.0f ? 89.0f : xc;
  float res = exp_core(xc);
  res = x > kExpOverflow ? kInf : res;
  res = x < kExpUnderflow ? 0.0f : res;
  return res;
}

// exp(x) for x <= 0 (or NaN): skips the overflow handling.
SSLD_ALWAYS_INLINE float exp_nonpos(float x) {
  const float res = exp_core(x < -104.0f ? -104.0f : x);
  return x < kExpUnderflow ? 0.0f : res;
}

// expm1 for x already clamped to [-30, 89] (or NaN).
SSLD_ALWAYS_INLINE float expm1_core(float xc) {
  const Ln2Reduced red = reduce_ln2(xc);
  const float r = red.r;
  const std::int32_t ni = red.n;
  // expm1(r) = r + r^2 (1/2 + r/6 + ... + r^5/5040), |r| <= ln2/2: truncation < 2e-8 relative
  float q = 1.0f / 5040.0f;
  q = fmadd(q, r, 1.0f / 720.0f);
  q = fmadd(q, r, 1.0f / 120.0f);
  q = fmadd(q, r, 1.0f / 24.0f);
  q = fmadd(q, r, 1.0f / 6.0f);
  q = fmadd(q, r, 0.5f);
  const float em = fmadd(q, r * r, r);
  // expm1(x) = 2^n em + 2^n - 1 = 2 (t em + (t - 1/2)), t = 2^(n-1): no overflow at n = 128,
  // and exact (em itself) for n = 0.
  const float t = pow2i(ni - 1);
  return 2.0f * fmadd(em, t, t - 0.5f);
}

// expm1(x) = exp(x) - 1 without cancellation near 0; ~1.7 ulp.
SSLD_ALWAYS_INLINE float expm1(float x) {
  float xc = x < -30.0f ? -30.0f : x;  // expm1(-30) rounds to -1
  xc = xc > 89.0f ? 89.0f : xc;
  const float res = expm1_core(xc);
  return x > kExpOverflow ? kInf : res;
}

// expm1(x) for x <= 0 (or NaN): skips the overflow handling.
SSLD_ALWAYS_INLINE float expm1_nonpos(float x) {
  return expm1_core(x < -30.0f ? -30.0f : x);
}

// log1p(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1] (slightly padded): f + f^2 P(f), P a degree-8
// minimax fit of (log1p(f) - f) / f^2 (relative error 4e-9). Division-free.
SSLD_ALWAYS_INLINE float log1p_reduced(float f) {
  float p = -7.622954249e-02f;
  p = fmadd(p, f, 1.290561110e-01f);
  p = fmadd(p, f, -1.324309409e-01f);
  p = fmadd(p, f, 1.418164074e-01f);
  p = fmadd(p, f, -1.660904586e-01f);
  p = fmadd(p, f, 2.000198364e-01f);
  p = fmadd(p, f, -2.500158548e-01f);
  p = fmadd(p, f, 3.333332539e-01f);
  p = fmadd(p, f, -4.999998808e-01f);
  return p * (f * f);  // log1p(f) - f
}

constexpr float kLn2HiLog = 6.9313812256e-01f;  // ln 2 split for k * ln 2 (k * hi exact)
constexpr float kLn2LoLog = 9.0580006145e-06f;

// v = 2^k (1 + m1) with 1 + m1 in [sqrt(1/2), sqrt(2)) (v positive and normal): the argument
// reduction of log, log1p and log1p_m1_0.
struct Sqrt2Split {
  float m1;
  std::int32_t k;
};
SSLD_ALWAYS_INLINE Sqrt2Split split_sqrt2(float v) {
  const std::uint32_t iv = f2u(v) + (0x3f800000u - 0x3f3504f3u);
  return {u2f((iv & 0x007fffffu) + 0x3f3504f3u) - 1.0f,
          static_cast<std::int32_t>(iv >> 23) - 0x7f};
}

// log1p(x) from sp = split_sqrt2(u), u = 1 + x rounded, and err, the exact rounding error of u
// (u - (1 + x), negated), scaled here by 2^-kc (kc = sp.k, clamped where 2^-k is not normal):
// for k = 0 the reduced argument is x itself (exact), otherwise m1 plus err / u, which only
// needs a rough 1/(1 + m1) because |log1p(x)| > 0.34 there.
SSLD_ALWAYS_INLINE float log1p_from_split(float x, Sqrt2Split sp, float err, std::int32_t kc) {
  const bool k0 = sp.k == 0;
  const float f = k0 ? x : sp.m1;
  const float m1 = sp.m1;
  const float inv_m = fmadd(-m1, fmadd(-m1, fmadd(-m1, 1.0f, 1.0f), 1.0f), 1.0f);  // ~1/(1+m1)
  float c = err * pow2i(-kc) * inv_m;
  c = k0 ? 0.0f : c;
  const float dk = static_cast<float>(sp.k);
  return fmadd(dk, kLn2HiLog, f + (fmadd(dk, kLn2LoLog, c) + log1p_reduced(f)));
}

// log(x); ~1 ulp.
SSLD_ALWAYS_INLINE float log(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float xs = subnormal ? x * 33554432.0f : x;  // 2^25
  const std::int32_t kadj = subnormal ? -25 : 0;
  const Sqrt2Split sp = split_sqrt2(xs);
  const std::int32_t k = sp.k + kadj;
  const float f = sp.m1;
  const float dk = static_cast<float>(k);
  float res = fmadd(dk, kLn2HiLog, f + fmadd(dk, kLn2LoLog, log1p_reduced(f)));
  res = x < 0.0f ? kNaN : res;
  res = x == 0.0f ? -kInf : res;
  res = x == kInf ? kInf : res;
  res = x != x ? x : res;
  return res;
}

// log1p(x) = log(1 + x); ~1 ulp.
SSLD_ALWAYS_INLINE float log1p(float x) {
  const float u = 1.0f + x;
  const Sqrt2Split sp = split_sqrt2(u);
  const float err = sp.k >= 2 ? 1.0f - (u - x) : x - (u - 1.0f);  // exact rounding error of u
  float res = log1p_from_split(x, sp, err, sp.k > 126 ? 126 : sp.k);
  res = x < -1.0f ? kNaN : res;
  res = x == -1.0f ? -kInf : res;
  res = x == kInf ? kInf : res;
  res = x != x ? x : res;
  return res;
}

// log1p(x) for x in [-1, 0] (or NaN): log1p without the handling of large or invalid arguments.
SSLD_ALWAYS_INLINE float log1p_m1_0(float x) {
  const float u = 1.0f + x;
  const Sqrt2Split sp = split_sqrt2(u);  // k in [-24, 0] (u > 0)
  const float res = log1p_from_split(x, sp, x - (u - 1.0f), sp.k);
  return x == -1.0f ? -kInf : res;  // NaN propagates through the arithmetic
}

// ---- 16-bit float conversions (round to nearest even, NaN kept quiet, Inf kept) ----

SSLD_ALWAYS_INLINE float half_to_float(std::uint16_t h) {
  const std::uint32_t hu = h;
  const std::uint32_t sign = (hu & 0x8000u) << 16;
  const std::uint32_t em = hu & 0x7fffu;
  const std::uint32_t normal = (em << 13) + 0x38000000u;    // rebias exponent 15 -> 127
  const std::uint32_t quiet = em > 0x7c00u ? 0x00400000u : 0u;  // NaN: payload kept, quieted
  const std::uint32_t infnan = (em << 13) | 0x7f800000u | quiet;
  const float sub = static_cast<float>(static_cast<std::int32_t>(em)) * 5.9604644775390625e-08f;
  std::uint32_t r = em >= 0x7c00u ? infnan : normal;
  r = em < 0x0400u ? f2u(sub) : r;                          // subnormal half (and zero)
  return u2f(r | sign);
}

SSLD_ALWAYS_INLINE std::uint16_t float_to_half(float f) {
  const std::uint32_t x = f2u(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  const std::uint32_t odd = (a >> 13) & 1u;
  const std::uint32_t normal = (a - 0x38000000u + 0xfffu + odd) >> 13;
  // |f| < 2^-14: adding 0.5 puts the rounded subnormal half mantissa in the low bits
  const std::uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3f000000u;
  std::uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;                            // >= 65520 rounds to inf
  r = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;   // NaN stays (quiet) NaN
  return static_cast<std::uint16_t>(r | sign);
}

SSLD_ALWAYS_INLINE float bf16_to_float(std::uint16_t b) {
  return u2f(static_cast<std::uint32_t>(b) << 16);
}

SSLD_ALWAYS_INLINE std::uint16_t float_to_bf16(float f) {
  const std::uint32_t x = f2u(f);
  std::uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  r = (x & 0x7fffffffu) > 0x7f800000u ? ((x >> 16) | 0x40u) : r;  // quiet NaN
  return static_cast<std::uint16_t>(r);
}

}  // namespace cpu_math
}  // namespace SSLD_CPU_ISA
}  // namespace ssld
