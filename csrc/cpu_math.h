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

// a * b + c, fused where the ISA has FMA (the build uses -ffp-contract=off via -std=c++17).
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

// exp(x), Cephes polynomial on [-ln2/2, ln2/2]; ~1 ulp.
SSLD_ALWAYS_INLINE float exp(float x) {
  float xc = x < -104.0f ? -104.0f : x;  // NaN passes through both clamps
  xc = xc > 89.0f ? 89.0f : xc;
  const float kn = fmadd(xc, kLog2e, kRoundMagic);
  const float n = kn - kRoundMagic;
  const std::int32_t ni = static_cast<std::int32_t>(f2u(kn) - kRoundMagicBits);
  float r = fmadd(n, -kLn2Hi, xc);
  r = fmadd(n, -kLn2Lo, r);
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
  float res = y * pow2i(n1) * pow2i(n2);
  res = x > kExpOverflow ? kInf : res;
  res = x < kExpUnderflow ? 0.0f : res;
  return res;
}

// expm1(x) = exp(x) - 1 without cancellation near 0; ~1 ulp.
SSLD_ALWAYS_INLINE float expm1(float x) {
  float xc = x < -30.0f ? -30.0f : x;  // expm1(-30) rounds to -1
  xc = xc > 89.0f ? 89.0f : xc;
  const float kn = fmadd(xc, kLog2e, kRoundMagic);
  const float n = kn - kRoundMagic;
  const std::int32_t ni = static_cast<std::int32_t>(f2u(kn) - kRoundMagicBits);
  float r = fmadd(n, -kLn2Hi, xc);
  r = fmadd(n, -kLn2Lo, r);
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
  float res = 2.0f * fmadd(em, t, t - 0.5f);
  res = x > kExpOverflow ? kInf : res;
  return res;
}

// log(x), musl/FreeBSD logf; ~1 ulp.
SSLD_ALWAYS_INLINE float log(float x) {
  const float ln2_hi = 6.9313812256e-01f, ln2_lo = 9.0580006145e-06f;
  const float Lg1 = 0.66666662693f, Lg2 = 0.40000972152f, Lg3 = 0.28498786688f,
              Lg4 = 0.24279078841f;
  const bool subnormal = x < 1.17549435e-38f;
  const float xs = subnormal ? x * 33554432.0f : x;  // 2^25
  const std::int32_t kadj = subnormal ? -25 : 0;
  std::uint32_t ix = f2u(xs);
  ix += 0x3f800000u - 0x3f3504f3u;  // reduce the mantissa into [sqrt(2)/2, sqrt(2))
  const std::int32_t k = static_cast<std::int32_t>(ix >> 23) - 0x7f + kadj;
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = u2f(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (Lg2 + w * Lg4);
  const float t2 = z * (Lg1 + w * Lg3);
  const float R = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  float res = s * (hfsq + R) + dk * ln2_lo - hfsq + f + dk * ln2_hi;
  res = x < 0.0f ? kNaN : res;
  res = x == 0.0f ? -kInf : res;
  res = x == kInf ? kInf : res;
  res = x != x ? x : res;
  return res;
}

// log1p(x) = log(1 + x) with the rounding error of 1 + x corrected; ~1-2 ulp.
SSLD_ALWAYS_INLINE float log1p(float x) {
  const float u = 1.0f + x;
  float c = (x - (u - 1.0f)) / u;
  c = ((u == 0.0f) | (u == kInf)) ? 0.0f : c;
  return log(u) + c;
}

// ---- 16-bit float conversions (round to nearest even, NaN kept quiet, Inf kept) ----

SSLD_ALWAYS_INLINE float half_to_float(std::uint16_t h) {
  const std::uint32_t hu = h;
  const std::uint32_t sign = (hu & 0x8000u) << 16;
  const std::uint32_t em = hu & 0x7fffu;
  const std::uint32_t normal = (em << 13) + 0x38000000u;    // rebias exponent 15 -> 127
  const std::uint32_t infnan = (em << 13) | 0x7f800000u;    // keeps the NaN payload
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
