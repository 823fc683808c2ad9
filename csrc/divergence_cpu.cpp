// CPU kernels of the fused softmax + divergence loss (forward, fused forward+gradient, and
// backward from saved row statistics). The math: ssld_kernels/reference.py, the executable
// specification; the parameter block: common.h.
//
// Compiled once per ISA (-DSSLD_CPU_ISA=base|avx2|avx512 with matching -m flags); everything
// here lives in namespace ssld::SSLD_CPU_ISA and a dispatcher picks the variant at run time.
//
// Layout of the work: rows are split across threads (thread_pool.h). Per row (float path):
//   pass 1  x = logits * inv_temp (converted to float into a thread-local scratch row), max
//   pass 2  e = exp(x - max), sum                        -> log_sum = log(sum)
//   pass 3  p = e / sum, q likewise, ls = log p - log X, lt = log q - log Y (stored in place)
//           A = sum p*ls, B = sum q*lt (terms with p == 0 / q == 0 are exactly 0)
//   pass 4  (fused gradient) grad_s, grad_t from p, q, ls, lt, A, B: pure arithmetic
// The backward recomputes p, q, ls, lt from the saved (max_s, log_sum_s, max_t, log_sum_t, A, B)
// in one pass.
// Inner loops are plain loops over contiguous arrays with selects instead of branches, so GCC
// vectorises them; sums use native-width generic vectors flushed into double every few terms,
// the row max an order-preserving integer max reduction (neither needs -ffast-math).
// float64 inputs take the same code with double accumulation and libm (used for gradcheck).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"
#include "cpu_scratch.h"
#include "cpu_math.h"
#include "thread_pool.h"

#ifndef SSLD_CPU_ISA
#define SSLD_CPU_ISA base
#endif

namespace ssld {
namespace SSLD_CPU_ISA {

void divergence_forward_cpu(const DivParams& p);
void divergence_backward_cpu(const DivParams& p);

namespace {

using std::int64_t;
using std::uint16_t;
namespace cm = cpu_math;

#define SSLD_NOINLINE __attribute__((noinline))

constexpr int64_t kMinWorkPerThread = 16384;  // elements (rows * cols) per thread at least
constexpr int64_t kSerialWork = 32768;      // below this many elements: one thread

// ---------------------------------------------------------------- math overloads
SSLD_ALWAYS_INLINE float m_exp(float x) { return cm::exp(x); }
SSLD_ALWAYS_INLINE double m_exp(double x) { return std::exp(x); }
SSLD_ALWAYS_INLINE float m_exp_nonpos(float x) { return cm::exp_nonpos(x); }
SSLD_ALWAYS_INLINE double m_exp_nonpos(double x) { return std::exp(x); }
// z = log1p(w * expm1(-|d|)) with 0 <= w <= 1: the arguments are known to be <= 0 and in
// [-1, 0] (or NaN), so the float versions skip the overflow / invalid-argument handling.
SSLD_ALWAYS_INLINE float m_mix_log(float w, float ad) {
  return cm::log1p_m1_0(w * cm::expm1_nonpos(-ad));
}
SSLD_ALWAYS_INLINE double m_mix_log(double w, double ad) { return std::log1p(w * std::expm1(-ad)); }
SSLD_ALWAYS_INLINE float m_abs(float x) { return cm::u2f(cm::f2u(x) & 0x7fffffffu); }
SSLD_ALWAYS_INLINE double m_abs(double x) { return std::fabs(x); }

// ---------------------------------------------------------------- element types
template <int DT> struct Elem;
template <> struct Elem<kFloat32> {
  using T = float;
  static SSLD_ALWAYS_INLINE float load(float v) { return v; }
  static SSLD_ALWAYS_INLINE float store(float v) { return v; }
};
template <> struct Elem<kFloat16> {
  using T = uint16_t;
  static SSLD_ALWAYS_INLINE float load(uint16_t v) { return cm::half_to_float(v); }
  static SSLD_ALWAYS_INLINE uint16_t store(float v) { return cm::float_to_half(v); }
};
template <> struct Elem<kBFloat16> {
  using T = uint16_t;
  static SSLD_ALWAYS_INLINE float load(uint16_t v) { return cm::bf16_to_float(v); }
  static SSLD_ALWAYS_INLINE uint16_t store(float v) { return cm::float_to_bf16(v); }
};
template <> struct Elem<kFloat64> {
  using T = double;
  static SSLD_ALWAYS_INLINE double load(double v) { return v; }
  static SSLD_ALWAYS_INLINE double store(double v) { return v; }
};

inline int64_t dtype_size(int dt) { return dt == kFloat64 ? 8 : dt == kFloat32 ? 4 : 2; }

// ---------------------------------------------------------------- thread-local scratch
using Scratch = AlignedBuf;  // csrc/cpu_scratch.h

thread_local Scratch tl_scratch;

// nbuf rows of n elements of Acc, each 64-byte aligned.
template <class Acc>
struct RowBuffers {
  Acc* buf[4];
  RowBuffers(int64_t n, int nbuf) {
    const int64_t stride = (n + 15) / 16 * 16;
    Acc* base = static_cast<Acc*>(tl_scratch.get_bytes(static_cast<std::size_t>(stride * nbuf) * sizeof(Acc)));
    for (int i = 0; i < 4; ++i) buf[i] = i < nbuf ? base + stride * i : nullptr;
  }
};

// ---------------------------------------------------------------- reductions
// Row maximum. GCC does not vectorise float max reductions without -ffast-math, so floats are
// mapped to order-preserving int32 keys (integer max reductions vectorise everywhere). A
// positive NaN sorts above +inf and comes back as NaN (the row then is NaN, as it must be);
// a negative NaN sorts below -inf and is caught later by the sum of exponentials.
SSLD_ALWAYS_INLINE std::int32_t order_key(std::int32_t b) { return b ^ ((b >> 31) & 0x7fffffff); }

SSLD_NOINLINE float row_max(const float* __restrict x, int64_t n) {
  std::int32_t m = std::numeric_limits<std::int32_t>::min();
  for (int64_t j = 0; j < n; ++j) {
    const std::int32_t key = order_key(__builtin_bit_cast(std::int32_t, x[j]));
    m = key > m ? key : m;
  }
  return __builtin_bit_cast(float, order_key(m));
}

SSLD_NOINLINE double row_max(const double* __restrict x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Float sums use GCC/Clang generic vectors of the native width (4 floats for SSE, 8 for AVX,
// 16 for AVX-512) with kAccs independent accumulators: no reassociation of a scalar loop is
// needed, and they sidestep a GCC 12 auto-vectoriser bug (wrong code for SLP reductions inside
// a blocked loop nest, seen with -mavx2 on the "lane array" formulation). The float partial
// sums are flushed into double every kFlush iterations (a few terms per lane), which keeps
// lse accurate to ~1e-9 relative even for C = 131072.
#if defined(__AVX512F__)
constexpr int kVW = 16;
#elif defined(__AVX__)
constexpr int kVW = 8;
#else
constexpr int kVW = 4;
#endif
constexpr int kAccs = 4;
constexpr int kFlush = 4;
constexpr int64_t kStep = int64_t(kVW) * kAccs;
typedef float vfloat __attribute__((vector_size(kVW * sizeof(float))));
typedef float vhalf __attribute__((vector_size(kVW / 2 * sizeof(float))));
typedef double vdouble __attribute__((vector_size(kVW / 2 * sizeof(double))));  // native width

SSLD_ALWAYS_INLINE void loadu(vfloat& v, const float* ptr) { std::memcpy(&v, ptr, sizeof(vfloat)); }

// dacc[0] += low half of v, dacc[1] += high half (in double)
SSLD_ALWAYS_INLINE void flush(vdouble* dacc, const vfloat& v) {
  vhalf lo, hi;
  std::memcpy(&lo, &v, sizeof(vhalf));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(vhalf), sizeof(vhalf));
  dacc[0] += __builtin_convertvector(lo, vdouble);
  dacc[1] += __builtin_convertvector(hi, vdouble);
}

SSLD_ALWAYS_INLINE double hsum(const vdouble* acc) {
  double t[kVW * kAccs];
  std::memcpy(t, acc, sizeof(t));
  for (int w = kVW * kAccs / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) t[k] += t[k + w];
  return t[0];
}

// sum_j term(j) with vterm(j, i, acc[i]) adding the kVW terms at j into acc[i].
template <class VTerm, class STerm>
SSLD_ALWAYS_INLINE double vsum(int64_t n, VTerm&& vterm, STerm&& sterm) {
  vdouble dacc[2 * kAccs] = {};
  const int64_t nfull = n - n % kStep;
  for (int64_t b0 = 0; b0 < nfull; b0 += kStep * kFlush) {
    const int64_t end = std::min(b0 + kStep * kFlush, nfull);
    vfloat acc[kAccs] = {};
    for (int64_t j = b0; j < end; j += kStep)
      for (int i = 0; i < kAccs; ++i) vterm(j + int64_t(i) * kVW, acc[i]);
    for (int i = 0; i < kAccs; ++i) flush(dacc + 2 * i, acc[i]);
  }
  double tail = 0.0;
  for (int64_t j = nfull; j < n; ++j) tail += static_cast<double>(sterm(j));
  return hsum(dacc) + tail;
}

// sum_j x[j]
SSLD_NOINLINE double sum_of(const float* __restrict x, int64_t n) {
  return vsum(
      n,
      [=](int64_t j, vfloat& acc) {
        vfloat v;
        loadu(v, x + j);
        acc += v;
      },
      [=](int64_t j) { return x[j]; });
}

// sum_j (w[j] == 0 ? 0 : w[j] * v[j])
SSLD_NOINLINE double masked_dot(const float* __restrict w, const float* __restrict v, int64_t n) {
  return vsum(
      n,
      [=](int64_t j, vfloat& acc) {
        const vfloat zero = {};
        vfloat a, b;
        loadu(a, w + j);
        loadu(b, v + j);
        const vfloat prod = a * b;
        acc += a == zero ? zero : prod;
      },
      [=](int64_t j) {
        const float a = w[j], b = v[j];
        return a == 0.0f ? 0.0f : a * b;
      });
}

// float64 path (gradcheck): plain sums, not meant to be fast.
SSLD_NOINLINE double sum_of(const double* __restrict x, int64_t n) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) acc += x[j];
  return acc;
}

SSLD_NOINLINE double masked_dot(const double* __restrict w, const double* __restrict v, int64_t n) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double a = w[j], b = v[j];
    acc += a == 0.0 ? 0.0 : a * b;
  }
  return acc;
}

// ---------------------------------------------------------------- element passes
// dst[j] = Acc(src[j]) * scale
template <int DT, class Acc>
SSLD_NOINLINE void load_scaled(const typename Elem<DT>::T* __restrict src, Acc* __restrict dst,
                               int64_t n, Acc scale) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<Acc>(Elem<DT>::load(src[j])) * scale;
}

template <int DT, class Acc>
SSLD_NOINLINE void load_plain(const typename Elem<DT>::T* __restrict src, Acc* __restrict dst,
                              int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<Acc>(Elem<DT>::load(src[j]));
}

template <int DT, class Acc>
SSLD_NOINLINE void store_row(const Acc* __restrict src, typename Elem<DT>::T* __restrict dst,
                             int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = Elem<DT>::store(src[j]);
}

// e[j] = exp(x[j] - m), m = max_j x[j] (so the argument is <= 0, or NaN)
template <class Acc>
SSLD_NOINLINE void exp_shifted(const Acc* __restrict x, Acc* __restrict e, int64_t n, Acc m) {
  for (int64_t j = 0; j < n; ++j) e[j] = m_exp_nonpos(x[j] - m);
}

// ---------------------------------------------------------------- per-element math
// The only place the per-element formulas are written (divergence.cu: elem_terms, elem_grad_*).
// Math: ssld_kernels/reference.py (_xlogy_terms, _rows_and_grad), the executable spec.
// Scalar inline functions of Acc (float, or double for float64 inputs), called element by
// element from the forward, fused and backward loops, which GCC vectorises.

template <class Acc>
struct ElemLogs {
  Acc ls, lt;  // log p - log X, log q - log Y
};

// From d = log q - log p. dl = lse_t - lse_s is only tested for NaN: where d is NaN but dl is
// finite, d is -inf - -inf (p = q = 0, terms masked later) and is taken as 0, as in the
// reference; a NaN logit makes dl NaN and keeps the whole row NaN. An infinite d needs no clamp.
template <int MODE, class Acc>
SSLD_ALWAYS_INLINE ElemLogs<Acc> elem_logs(Acc d, Acc dl, Acc beta, Acc omb) {
  if constexpr (MODE == 0) {
    return {-d, d};
  } else {
    const Acc dn = (d != d && dl == dl) ? Acc(0) : d;
    const Acc w = dn <= Acc(0) ? beta : omb;
    const Acc z = m_mix_log(w, m_abs(dn));
    return {-(z + (dn > Acc(0) ? dn : Acc(0))), -(z - (dn < Acc(0) ? dn : Acc(0)))};
  }
}

// Gradient of one side: own = p (student) or q (teacher), other = the other probability,
// l = ls or lt, a = A or B, c_own = coef_a or coef_b, c_other = the other coefficient (mode 0).
template <int MODE, class Acc>
SSLD_ALWAYS_INLINE Acc elem_grad(Acc own, Acc other, Acc l, Acc a, Acc g, Acc c_own,
                                 Acc c_other) {
  const Acc mp = own == Acc(0) ? Acc(0) : own * (l - a);
  const Acc own_term = c_own == Acc(0) ? Acc(0) : c_own * mp;
  if constexpr (MODE == 0) {
    return g * (own_term + c_other * (own - other));
  } else {
    return g * own_term;
  }
}

// In place: ps (= e_s on entry) -> p, qs -> q, xs (scaled student logits) -> ls, xt -> lt,
// with d = log q - log p = (xt - xs) - dl, dl = lse_t - lse_s.
template <int MODE, class Acc>
SSLD_NOINLINE void probs_and_logs(Acc* __restrict xs, Acc* __restrict xt, Acc* __restrict ps,
                                  Acc* __restrict qs, int64_t n, Acc inv_sum_s, Acc inv_sum_t,
                                  Acc dl, Acc beta, Acc omb) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc d = (xt[j] - xs[j]) - dl;
    ps[j] = ps[j] * inv_sum_s;
    qs[j] = qs[j] * inv_sum_t;
    const ElemLogs<Acc> e = elem_logs<MODE>(d, dl, beta, omb);
    xs[j] = e.ls;
    xt[j] = e.lt;
  }
}

// Gradient of one side from stored probabilities (fused forward), see elem_grad. out may alias l.
template <int MODE, class Acc>
SSLD_NOINLINE void grad_from_probs(const Acc* __restrict own, const Acc* __restrict other,
                                   const Acc* l, Acc* out, int64_t n, Acc a, Acc g, Acc c_own,
                                   Acc c_other) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc o = own[j];
    const Acc lj = l[j];
    const Acc oth = MODE == 0 ? other[j] : Acc(0);
    out[j] = elem_grad<MODE>(o, oth, lj, a, g, c_own, c_other);
  }
}

// Saved per-row statistics (DivParams::stats): log p = (x - ms) - ls_s, log q = (y - mt) - ls_t.
template <class Acc>
struct SavedStats {
  Acc ms, ls_s, mt, ls_t, a, b;
};

// Backward, one pass: recompute p, q, ls, lt from the saved statistics and write gradients.
// s, t: unscaled logits in Acc; gs / gt may be null when not wanted (template flags).
template <int MODE, bool GS, bool GT, class Acc>
SSLD_NOINLINE void backward_row(const Acc* s, const Acc* t, Acc* gs, Acc* gt, int64_t n,
                                Acc inv_temp, SavedStats<Acc> st, Acc g, Acc coef_a, Acc coef_b,
                                Acc beta, Acc omb) {
  const Acc ms = st.ms, ls_s = st.ls_s, mt = st.mt, ls_t = st.ls_t, a = st.a, b = st.b;
  const Acc dl = (mt - ms) + (ls_t - ls_s);  // log p - log q = (x - y) + dl
  for (int64_t j = 0; j < n; ++j) {
    const Acc sj = s[j], tj = t[j];
    const Acc xs = sj * inv_temp;
    const Acc xt = tj * inv_temp;
    // (tj - sj) * inv_temp rather than xt - xs: with FMA contraction (GCC's default for C++)
    // the latter may become fma(tj, inv_temp, -xs), which is not exactly 0 for tj == sj.
    const Acc d = (tj - sj) * inv_temp - dl;
    const ElemLogs<Acc> e = elem_logs<MODE>(d, dl, beta, omb);
    constexpr bool kNeedP = GS || MODE == 0;
    constexpr bool kNeedQ = GT || MODE == 0;
    Acc p = Acc(0), q = Acc(0);
    if constexpr (kNeedP) p = m_exp((xs - ms) - ls_s);
    if constexpr (kNeedQ) q = m_exp((xt - mt) - ls_t);
    if constexpr (GS) gs[j] = elem_grad<MODE>(p, q, e.ls, a, g, coef_a, coef_b);
    if constexpr (GT) gt[j] = elem_grad<MODE>(q, p, e.lt, b, g, coef_b, coef_a);
  }
}

// ---------------------------------------------------------------- row drivers
template <class Acc>
struct Common {
  const DivParams& p;
  int64_t C;
  Acc inv_temp, beta, omb, coef_a, coef_b;
  const Acc* weight;
  const std::uint8_t* mask;
  const Acc* grad_rows;
  explicit Common(const DivParams& prm)
      : p(prm),
        C(prm.n_cols),
        inv_temp(static_cast<Acc>(prm.inv_temp)),
        beta(static_cast<Acc>(prm.beta)),
        omb(static_cast<Acc>(1.0 - prm.beta)),
        coef_a(static_cast<Acc>(prm.coef_a)),
        coef_b(static_cast<Acc>(prm.coef_b)),
        weight(reinterpret_cast<const Acc*>(prm.weight)),
        mask(reinterpret_cast<const std::uint8_t*>(prm.mask)),
        grad_rows(reinterpret_cast<const Acc*>(prm.grad_rows)) {}
  bool masked(int64_t r) const { return mask != nullptr && mask[r] == 0; }
  Acc w(int64_t r) const { return weight != nullptr ? weight[r] : Acc(1); }
  Acc g(int64_t r) const {
    return static_cast<Acc>(p.grad_scale) * grad_rows[r * p.grad_rows_stride] * w(r);
  }
};

template <int DT>
void zero_row(std::uintptr_t base, int64_t stride, int64_t r, int64_t C) {
  using T = typename Elem<DT>::T;
  T* dst = reinterpret_cast<T*>(base) + r * stride;
  std::memset(static_cast<void*>(dst), 0, static_cast<std::size_t>(C) * sizeof(T));
}

template <class Acc, int DT>
void write_grad(const Common<Acc>& c, int MODE_, const Acc* own, const Acc* other, Acc* l,
                std::uintptr_t base, int64_t stride, int64_t r, Acc a, Acc g, Acc c_own,
                Acc c_other) {
  using T = typename Elem<DT>::T;
  T* dst = reinterpret_cast<T*>(base) + r * stride;
  Acc* out;
  if constexpr (std::is_same<T, Acc>::value) {
    out = dst;
  } else {
    out = l;  // in place, then converted
  }
  if (MODE_ == 0)
    grad_from_probs<0, Acc>(own, other, l, out, c.C, a, g, c_own, c_other);
  else
    grad_from_probs<1, Acc>(own, other, l, out, c.C, a, g, c_own, c_other);
  if constexpr (!std::is_same<T, Acc>::value) store_row<DT, Acc>(l, dst, c.C);
}

template <class Acc, int DTS, int DTT>
void forward_rows(const DivParams& prm, int64_t r0, int64_t r1) {
  using TS = typename Elem<DTS>::T;
  using TT = typename Elem<DTT>::T;
  const Common<Acc> c(prm);
  const int64_t C = c.C;
  const bool want_grad = prm.grad_s != 0 || prm.grad_t != 0;
  Acc* row_loss = reinterpret_cast<Acc*>(prm.row_loss);
  Acc* stats = reinterpret_cast<Acc*>(prm.stats);
  RowBuffers<Acc> bufs(C, 4);
  Acc* xs = bufs.buf[0];  // scaled logits, then ls, then grad_s (non-native dtypes)
  Acc* xt = bufs.buf[1];
  Acc* ps = bufs.buf[2];  // exp(x - max), then p
  Acc* qs = bufs.buf[3];
  for (int64_t r = r0; r < r1; ++r) {
    if (c.masked(r)) {  // exact 0 loss and gradient (even for NaN logits); stats zeros
      row_loss[r] = Acc(0);
      if (stats != nullptr)
        for (int i = 0; i < kStatsWidth; ++i) stats[kStatsWidth * r + i] = Acc(0);
      if (prm.grad_s != 0) zero_row<DTS>(prm.grad_s, prm.grad_s_stride, r, C);
      if (prm.grad_t != 0) zero_row<DTT>(prm.grad_t, prm.grad_t_stride, r, C);
      continue;
    }
    const TS* srow = reinterpret_cast<const TS*>(prm.s) + r * prm.s_stride;
    const TT* trow = reinterpret_cast<const TT*>(prm.t) + r * prm.t_stride;
    // pass 1: scaled logits and their maxima
    load_scaled<DTS, Acc>(srow, xs, C, c.inv_temp);
    load_scaled<DTT, Acc>(trow, xt, C, c.inv_temp);
    const Acc ms = row_max(xs, C);
    const Acc mt = row_max(xt, C);
    // pass 2: exp and sums (NaN logits make the sum NaN; an infinite max gives NaN too)
    exp_shifted<Acc>(xs, ps, C, ms);
    exp_shifted<Acc>(xt, qs, C, mt);
    const double sum_s = sum_of(ps, C);
    const double sum_t = sum_of(qs, C);
    const double log_sum_s = std::log(sum_s);
    const double log_sum_t = std::log(sum_t);
    // lse_t - lse_s: taken in double before any rounding (log_sum ~ log C is large, and its
    // float rounding would dominate small divergences)
    const Acc dl = static_cast<Acc>((static_cast<double>(mt) - static_cast<double>(ms)) +
                                    (log_sum_t - log_sum_s));
    // pass 3: p, q, ls, lt in place; A and B
    const Acc inv_s = static_cast<Acc>(1.0 / sum_s);
    const Acc inv_t = static_cast<Acc>(1.0 / sum_t);
    if (prm.mode == 0)
      probs_and_logs<0, Acc>(xs, xt, ps, qs, C, inv_s, inv_t, dl, c.beta, c.omb);
    else
      probs_and_logs<1, Acc>(xs, xt, ps, qs, C, inv_s, inv_t, dl, c.beta, c.omb);
    const Acc A = static_cast<Acc>(masked_dot(ps, xs, C));
    const Acc B = static_cast<Acc>(masked_dot(qs, xt, C));
    // a term whose coefficient is 0 is skipped: 0 * inf (KL with disjoint support) stays 0
    const double la = prm.coef_a == 0.0 ? 0.0 : prm.coef_a * static_cast<double>(A);
    const double lb = prm.coef_b == 0.0 ? 0.0 : prm.coef_b * static_cast<double>(B);
    row_loss[r] = static_cast<Acc>(prm.loss_scale * (la + lb) * static_cast<double>(c.w(r)));
    if (stats != nullptr) {
      Acc* st = stats + kStatsWidth * r;
      st[0] = ms;
      st[1] = static_cast<Acc>(log_sum_s);
      st[2] = mt;
      st[3] = static_cast<Acc>(log_sum_t);
      st[4] = A;
      st[5] = B;
    }
    if (!want_grad) continue;
    // pass 4: gradients
    const Acc g = c.g(r);
    if (prm.grad_s != 0)
      write_grad<Acc, DTS>(c, prm.mode, ps, qs, xs, prm.grad_s, prm.grad_s_stride, r, A, g,
                           c.coef_a, c.coef_b);
    if (prm.grad_t != 0)
      write_grad<Acc, DTT>(c, prm.mode, qs, ps, xt, prm.grad_t, prm.grad_t_stride, r, B, g,
                           c.coef_b, c.coef_a);
  }
}

template <class Acc, int MODE>
void backward_dispatch(bool gs_on, bool gt_on, const Acc* s, const Acc* t, Acc* gs, Acc* gt,
                       int64_t n, Acc it, const SavedStats<Acc>& st, Acc g, Acc ca, Acc cb,
                       Acc beta, Acc omb) {
  if (gs_on && gt_on)
    backward_row<MODE, true, true, Acc>(s, t, gs, gt, n, it, st, g, ca, cb, beta, omb);
  else if (gs_on)
    backward_row<MODE, true, false, Acc>(s, t, gs, gt, n, it, st, g, ca, cb, beta, omb);
  else if (gt_on)
    backward_row<MODE, false, true, Acc>(s, t, gs, gt, n, it, st, g, ca, cb, beta, omb);
}

template <class Acc, int DTS, int DTT>
void backward_rows(const DivParams& prm, int64_t r0, int64_t r1) {
  using TS = typename Elem<DTS>::T;
  using TT = typename Elem<DTT>::T;
  constexpr bool kNativeS = std::is_same<TS, Acc>::value;
  constexpr bool kNativeT = std::is_same<TT, Acc>::value;
  const Common<Acc> c(prm);
  const int64_t C = c.C;
  const Acc* stats = reinterpret_cast<const Acc*>(prm.stats);
  const bool gs_on = prm.grad_s != 0;
  const bool gt_on = prm.grad_t != 0;
  const int nbuf = (kNativeS ? 0 : 2) + (kNativeT ? 0 : 2);
  RowBuffers<Acc> bufs(C, std::max(nbuf, 1));
  int bi = 0;
  Acc* s_buf = kNativeS ? nullptr : bufs.buf[bi++];
  Acc* gs_buf = kNativeS ? nullptr : bufs.buf[bi++];
  Acc* t_buf = kNativeT ? nullptr : bufs.buf[bi++];
  Acc* gt_buf = kNativeT ? nullptr : bufs.buf[bi++];
  for (int64_t r = r0; r < r1; ++r) {
    TS* gs_dst = gs_on ? reinterpret_cast<TS*>(prm.grad_s) + r * prm.grad_s_stride : nullptr;
    TT* gt_dst = gt_on ? reinterpret_cast<TT*>(prm.grad_t) + r * prm.grad_t_stride : nullptr;
    if (c.masked(r)) {
      if (gs_on) zero_row<DTS>(prm.grad_s, prm.grad_s_stride, r, C);
      if (gt_on) zero_row<DTT>(prm.grad_t, prm.grad_t_stride, r, C);
      continue;
    }
    const TS* srow = reinterpret_cast<const TS*>(prm.s) + r * prm.s_stride;
    const TT* trow = reinterpret_cast<const TT*>(prm.t) + r * prm.t_stride;
    const Acc* s;
    const Acc* t;
    Acc* gs;
    Acc* gt;
    if constexpr (kNativeS) {
      s = reinterpret_cast<const Acc*>(srow);
      gs = reinterpret_cast<Acc*>(gs_dst);
    } else {
      load_plain<DTS, Acc>(srow, s_buf, C);
      s = s_buf;
      gs = gs_buf;
    }
    if constexpr (kNativeT) {
      t = reinterpret_cast<const Acc*>(trow);
      gt = reinterpret_cast<Acc*>(gt_dst);
    } else {
      load_plain<DTT, Acc>(trow, t_buf, C);
      t = t_buf;
      gt = gt_buf;
    }
    const Acc* sp = stats + kStatsWidth * r;
    const SavedStats<Acc> st{sp[0], sp[1], sp[2], sp[3], sp[4], sp[5]};
    const Acc g = c.g(r);
    if (prm.mode == 0)
      backward_dispatch<Acc, 0>(gs_on, gt_on, s, t, gs, gt, C, c.inv_temp, st, g, c.coef_a,
                                c.coef_b, c.beta, c.omb);
    else
      backward_dispatch<Acc, 1>(gs_on, gt_on, s, t, gs, gt, C, c.inv_temp, st, g, c.coef_a,
                                c.coef_b, c.beta, c.omb);
    if constexpr (!kNativeS) {
      if (gs_on) store_row<DTS, Acc>(gs_buf, gs_dst, C);
    }
    if constexpr (!kNativeT) {
      if (gt_on) store_row<DTT, Acc>(gt_buf, gt_dst, C);
    }
  }
}

// ---------------------------------------------------------------- validation and dispatch
void check_cpu_params(const DivParams& p, bool backward) {
  check_div_params(p, backward);
  if (p.n_rows == 0) return;
  const bool f64 = p.s_dtype == kFloat64;
  const std::uintptr_t acc_size = f64 ? 8 : 4;
  const std::int64_t C = p.n_cols;
  check(C <= (std::int64_t(1) << 40), "n_cols is too large for the CPU kernel");
  check(p.s_stride >= 0 && p.t_stride >= 0, "logit row strides must be >= 0");
  check(p.grad_rows_stride >= 0, "grad_rows_stride must be >= 0");
  auto aligned = [](std::uintptr_t ptr, std::uintptr_t size) { return ptr % size == 0; };
  check(aligned(p.s, dtype_size(p.s_dtype)) && aligned(p.t, dtype_size(p.t_dtype)),
        "logits pointers are not aligned to their element size");
  check(aligned(p.weight, acc_size) && aligned(p.grad_rows, acc_size) &&
            aligned(p.row_loss, acc_size) && aligned(p.stats, acc_size),
        "weight/grad_rows/row_loss/stats pointers are not aligned to the accumulation dtype ("
            + std::string(f64 ? "float64" : "float32") + ")");
  if (p.grad_s != 0) {
    check(aligned(p.grad_s, dtype_size(p.s_dtype)), "grad_s is not aligned to its element size");
    check(p.n_rows == 1 || p.grad_s_stride >= C,
          "grad_s_stride must be >= n_cols (gradient rows may not overlap)");
  }
  if (p.grad_t != 0) {
    check(aligned(p.grad_t, dtype_size(p.t_dtype)), "grad_t is not aligned to its element size");
    check(p.n_rows == 1 || p.grad_t_stride >= C,
          "grad_t_stride must be >= n_cols (gradient rows may not overlap)");
  }
  if (p.mode == 1) check(p.beta >= 0.0 && p.beta <= 1.0, "beta must be in [0, 1]");
}

// min(num_threads, work / kMinWorkPerThread, n_rows); 1 below kSerialWork elements.
int pick_threads(const DivParams& p) {
  const int64_t work = p.n_rows > std::numeric_limits<int64_t>::max() / p.n_cols
                           ? std::numeric_limits<int64_t>::max()
                           : p.n_rows * p.n_cols;
  if (p.num_threads <= 1 || work < kSerialWork) return 1;
  int64_t nt = std::min<int64_t>(p.num_threads, work / kMinWorkPerThread);
  nt = std::min<int64_t>(nt, p.n_rows);
  return static_cast<int>(std::max<int64_t>(nt, 1));
}

using RowFn = void (*)(const DivParams&, int64_t, int64_t);

template <template <class, int, int> class Sel>
RowFn select_rows(const DivParams& p) {
  if (p.s_dtype == kFloat64) return Sel<double, kFloat64, kFloat64>::fn;
#define SSLD_CASE(A, B) \
  if (p.s_dtype == A && p.t_dtype == B) return Sel<float, A, B>::fn;
  SSLD_CASE(kFloat32, kFloat32)
  SSLD_CASE(kFloat32, kFloat16)
  SSLD_CASE(kFloat32, kBFloat16)
  SSLD_CASE(kFloat16, kFloat32)
  SSLD_CASE(kFloat16, kFloat16)
  SSLD_CASE(kFloat16, kBFloat16)
  SSLD_CASE(kBFloat16, kFloat32)
  SSLD_CASE(kBFloat16, kFloat16)
  SSLD_CASE(kBFloat16, kBFloat16)
#undef SSLD_CASE
  throw std::invalid_argument(std::string("unsupported dtype combination: student ") +
                              dtype_name(p.s_dtype) + ", teacher " + dtype_name(p.t_dtype));
}

template <class Acc, int DTS, int DTT>
struct ForwardSel {
  static constexpr RowFn fn = &forward_rows<Acc, DTS, DTT>;
};
template <class Acc, int DTS, int DTT>
struct BackwardSel {
  static constexpr RowFn fn = &backward_rows<Acc, DTS, DTT>;
};

void run_rows(const DivParams& p, RowFn fn) {
  const int nt = pick_threads(p);
  if (nt <= 1) {
    fn(p, 0, p.n_rows);
    return;
  }
  // No spinning afterwards: PyTorch ops follow the loss (the sum, the gradient's scale, the
  // model's backward); workers spinning on the cores they need slowed a 256 x 1000 step 2x.
  parallel_for(p.n_rows, nt, [&](int64_t r0, int64_t r1) { fn(p, r0, r1); }, false);
}

}  // namespace

void divergence_forward_cpu(const DivParams& p) {
  check_cpu_params(p, /*backward=*/false);
  if (p.n_rows == 0) return;
  run_rows(p, select_rows<ForwardSel>(p));
}

void divergence_backward_cpu(const DivParams& p) {
  check_cpu_params(p, /*backward=*/true);
  if (p.n_rows == 0) return;
  if (p.grad_s == 0 && p.grad_t == 0) return;
  run_rows(p, select_rows<BackwardSel>(p));
}

}  // namespace SSLD_CPU_ISA
}  // namespace ssld
