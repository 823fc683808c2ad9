// CPU kernel of the exact batched k-nearest-neighbour matcher (see match.h for the semantics).
//
// Compiled once per ISA (-DSSLD_CPU_ISA=base|avx2|avx512 with matching -m flags), like
// divergence_cpu.cpp; everything lives in namespace ssld::SSLD_CPU_ISA.
//
// Layout of the work (GEMM-like blocking, the distance matrix is never stored):
//   task        = (group, block of up to kMaxBlockRows consecutive queries of that group);
//                 tasks are claimed dynamically by the threads (each writes only its own
//                 output rows, so the result does not depend on the thread count or order).
//   per task    the running top-k of each query (int32 sort keys + int64 indices) sits in a
//               thread-local buffer (keys) and in out_idx (indices).
//               For each database panel of P = NR * L rows (L lanes per vector) in ascending
//               order: pack the panel dimension-major ([d][P]), then for each micro-tile of MR
//               queries run the micro-kernel: MR x NR vector accumulators, one broadcast query
//               element times NR panel vectors per step. Its epilogue turns the accumulators
//               into sort keys and compares them with each query's current k-th key; only the
//               few lanes that beat it reach the scalar insertion into the sorted top-k.
//   uint8       exact integers: |a|^2 + |b|^2 - 2 a.b with a.b from pmaddwd on 16-bit pairs
//               (a query's two consecutive elements broadcast as one 32-bit word against
//               the panel's 32-bit words of the same two elements of P rows). Everything fits
//               int32 for dim <= 33025 (the sum is computed modulo 2^32 and the true value is
//               below 2^31). Key = the distance. Where the CPU has VNNI (AVX512-VNNI for
//               the avx512 variant, AVX-VNNI for avx2; checked at run time, emitted with
//               inline asm since the variants are not compiled with -mavx*vnni) the
//               multiply-add is one vpdpwssd, about 2x faster; the result is identical.
//   float32     acc += (a - b)^2 per lane, d ascending (FMA where available): every distance
//               takes the same sequence of operations wherever it sits in the tiling.
//               Key = float bits with the sign cleared, clamped to 0x7f800001: the order of
//               non-negative floats, +inf < NaN; distances are never negative.
//   tiles       avx512: MR = 6 queries x P = 64 rows (24 zmm accumulators); avx2: 4 x 16;
//               base (SSE2): 4 x 8. A task packs each panel once for up to kMaxBlockRows
//               queries (the panel, width * 64 * 4 bytes, stays in L1/L2).
// Insertion: database rows of a query are visited in ascending index, so a candidate enters
// the top-k only if its key is strictly below the k-th key and goes after equal keys: ties
// keep the lower index. Missing slots hold key INT32_MAX (above every real key) and index -1.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu_scratch.h"
#include "match.h"
#include "thread_pool.h"

#ifndef SSLD_CPU_ISA
#define SSLD_CPU_ISA base
#endif

namespace ssld {
namespace SSLD_CPU_ISA {

void match_knn_cpu(const KnnParams& p);

namespace {

using std::int32_t;
using std::int64_t;
using std::uint32_t;
using std::uint64_t;

#define SSLD_KNN_INLINE inline __attribute__((always_inline))
#define SSLD_KNN_NOINLINE __attribute__((noinline))

constexpr int32_t kMissingKey = std::numeric_limits<int32_t>::max();
constexpr int32_t kNaNKey = 0x7f800001;         // float keys: +inf is 0x7f800000
constexpr int64_t kMaxBlockRows = 2048;         // queries per task at most
constexpr double kSerialWork = double(1 << 22); // multiply-adds below which one thread runs
constexpr int kTasksPerThread = 3;              // target tasks per thread (dynamic balance)

// ---------------------------------------------------------------- vector traits
// I: int32 lanes, F: float lanes. dot2(acc, a, b): acc + pairwise 16-bit products (pmaddwd).
// lt(a, b): bit per lane of a < b (signed). fkey(acc): sort key of float distances.
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Vec {
  using I = __m512i;
  using F = __m512;
  static constexpr int L = 16, MR = 6, NR = 4;
  static SSLD_KNN_INLINE I izero() { return _mm512_setzero_si512(); }
  static SSLD_KNN_INLINE I iload(const int32_t* p) { return _mm512_loadu_si512(p); }
  static SSLD_KNN_INLINE void istore(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static SSLD_KNN_INLINE I iset(int32_t x) { return _mm512_set1_epi32(x); }
  static SSLD_KNN_INLINE I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static SSLD_KNN_INLINE I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static SSLD_KNN_INLINE I imin(I a, I b) { return _mm512_min_epi32(a, b); }
  static SSLD_KNN_INLINE I dot2(I acc, I a, I b) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
  }
  // acc + pmaddwd(a, b) in one instruction (AVX512-VNNI vpdpwssd, exact: no saturation).
  // Inline asm: this variant is compiled without -mavx512vnni; callers check the CPU first.
  static constexpr bool kHaveVnni = true;
  static SSLD_KNN_INLINE I dot2_vnni(I acc, I a, I b) {
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
  }
  static bool vnni_supported() { return __builtin_cpu_supports("avx512vnni"); }
  static SSLD_KNN_INLINE uint64_t lt(I a, I b) { return _mm512_cmplt_epi32_mask(a, b); }
  static SSLD_KNN_INLINE F fzero() { return _mm512_setzero_ps(); }
  static SSLD_KNN_INLINE F fload(const float* p) { return _mm512_loadu_ps(p); }
  static SSLD_KNN_INLINE F fset(float x) { return _mm512_set1_ps(x); }
  static SSLD_KNN_INLINE F sqacc(F acc, F a, F b) {
    const F d = _mm512_sub_ps(a, b);
    return _mm512_fmadd_ps(d, d, acc);
  }
  static SSLD_KNN_INLINE I fkey(F acc) {
    const I bits = _mm512_and_si512(_mm512_castps_si512(acc), iset(0x7fffffff));
    return _mm512_min_epi32(bits, iset(kNaNKey));
  }
};
#elif defined(__AVX2__)
struct Vec {
  using I = __m256i;
  using F = __m256;
  static constexpr int L = 8, MR = 4, NR = 2;
  static SSLD_KNN_INLINE I izero() { return _mm256_setzero_si256(); }
  static SSLD_KNN_INLINE I iload(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static SSLD_KNN_INLINE void istore(int32_t* p, I v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  static SSLD_KNN_INLINE I iset(int32_t x) { return _mm256_set1_epi32(x); }
  static SSLD_KNN_INLINE I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static SSLD_KNN_INLINE I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static SSLD_KNN_INLINE I imin(I a, I b) { return _mm256_min_epi32(a, b); }
  static SSLD_KNN_INLINE I dot2(I acc, I a, I b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
  }
  // acc + pmaddwd(a, b) in one instruction (AVX-VNNI {vex} vpdpwssd, e.g. Alder Lake).
  static constexpr bool kHaveVnni = true;
  static SSLD_KNN_INLINE I dot2_vnni(I acc, I a, I b) {
    asm("%{vex%} vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
    return acc;
  }
  static bool vnni_supported() { return __builtin_cpu_supports("avxvnni"); }
  static SSLD_KNN_INLINE uint64_t lt(I a, I b) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b, a))));
  }
  static SSLD_KNN_INLINE F fzero() { return _mm256_setzero_ps(); }
  static SSLD_KNN_INLINE F fload(const float* p) { return _mm256_loadu_ps(p); }
  static SSLD_KNN_INLINE F fset(float x) { return _mm256_set1_ps(x); }
  static SSLD_KNN_INLINE F sqacc(F acc, F a, F b) {
    const F d = _mm256_sub_ps(a, b);
#if defined(__FMA__)
    return _mm256_fmadd_ps(d, d, acc);
#else
    return _mm256_add_ps(acc, _mm256_mul_ps(d, d));
#endif
  }
  static SSLD_KNN_INLINE I fkey(F acc) {
    const I bits = _mm256_and_si256(_mm256_castps_si256(acc), iset(0x7fffffff));
    return _mm256_min_epi32(bits, iset(kNaNKey));
  }
};
#elif defined(__SSE2__)
struct Vec {
  using I = __m128i;
  using F = __m128;
  static constexpr int L = 4, MR = 4, NR = 2;
  static SSLD_KNN_INLINE I izero() { return _mm_setzero_si128(); }
  static SSLD_KNN_INLINE I iload(const int32_t* p) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  }
  static SSLD_KNN_INLINE void istore(int32_t* p, I v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
  }
  static SSLD_KNN_INLINE I iset(int32_t x) { return _mm_set1_epi32(x); }
  static SSLD_KNN_INLINE I iadd(I a, I b) { return _mm_add_epi32(a, b); }
  static SSLD_KNN_INLINE I isub(I a, I b) { return _mm_sub_epi32(a, b); }
  static SSLD_KNN_INLINE I imin(I a, I b) {  // SSE2 has no pminsd
    const I gt = _mm_cmpgt_epi32(a, b);
    return _mm_or_si128(_mm_and_si128(gt, b), _mm_andnot_si128(gt, a));
  }
  static SSLD_KNN_INLINE I dot2(I acc, I a, I b) { return _mm_add_epi32(acc, _mm_madd_epi16(a, b)); }
  static constexpr bool kHaveVnni = false;
  static SSLD_KNN_INLINE I dot2_vnni(I acc, I a, I b) { return dot2(acc, a, b); }
  static bool vnni_supported() { return false; }
  static SSLD_KNN_INLINE uint64_t lt(I a, I b) {
    return static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmplt_epi32(a, b))));
  }
  static SSLD_KNN_INLINE F fzero() { return _mm_setzero_ps(); }
  static SSLD_KNN_INLINE F fload(const float* p) { return _mm_loadu_ps(p); }
  static SSLD_KNN_INLINE F fset(float x) { return _mm_set1_ps(x); }
  static SSLD_KNN_INLINE F sqacc(F acc, F a, F b) {
    const F d = _mm_sub_ps(a, b);
    return _mm_add_ps(acc, _mm_mul_ps(d, d));
  }
  static SSLD_KNN_INLINE I fkey(F acc) {
    const I bits = _mm_and_si128(_mm_castps_si128(acc), iset(0x7fffffff));
    const I cap = iset(kNaNKey);
    const I gt = _mm_cmpgt_epi32(bits, cap);  // both non-negative: signed == unsigned order
    return _mm_or_si128(_mm_and_si128(gt, cap), _mm_andnot_si128(gt, bits));
  }
};
#else
// Portable fallback (non-x86): one lane; the same arithmetic per distance.
struct Vec {
  using I = int32_t;
  using F = float;
  static constexpr int L = 1, MR = 4, NR = 4;
  static SSLD_KNN_INLINE I izero() { return 0; }
  static SSLD_KNN_INLINE I iload(const int32_t* p) { return *p; }
  static SSLD_KNN_INLINE void istore(int32_t* p, I v) { *p = v; }
  static SSLD_KNN_INLINE I iset(int32_t x) { return x; }
  static SSLD_KNN_INLINE I iadd(I a, I b) {
    return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
  }
  static SSLD_KNN_INLINE I isub(I a, I b) {
    return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b));
  }
  static SSLD_KNN_INLINE I imin(I a, I b) { return a < b ? a : b; }
  static SSLD_KNN_INLINE I dot2(I acc, I a, I b) {
    const int32_t lo = static_cast<int16_t>(a & 0xffff) * static_cast<int16_t>(b & 0xffff);
    const int32_t hi = static_cast<int16_t>(static_cast<uint32_t>(a) >> 16) *
                       static_cast<int16_t>(static_cast<uint32_t>(b) >> 16);
    return iadd(acc, iadd(lo, hi));
  }
  static constexpr bool kHaveVnni = false;
  static SSLD_KNN_INLINE I dot2_vnni(I acc, I a, I b) { return dot2(acc, a, b); }
  static bool vnni_supported() { return false; }
  static SSLD_KNN_INLINE uint64_t lt(I a, I b) { return a < b ? 1u : 0u; }
  static SSLD_KNN_INLINE F fzero() { return 0.0f; }
  static SSLD_KNN_INLINE F fload(const float* p) { return *p; }
  static SSLD_KNN_INLINE F fset(float x) { return x; }
  static SSLD_KNN_INLINE F sqacc(F acc, F a, F b) {
    const float d = a - b;
    return acc + d * d;
  }
  static SSLD_KNN_INLINE I fkey(F acc) {
    const int32_t bits = static_cast<int32_t>(__builtin_bit_cast(uint32_t, acc) & 0x7fffffffu);
    return bits < kNaNKey ? bits : kNaNKey;
  }
};
#endif

constexpr int MR = Vec::MR;
constexpr int NR = Vec::NR;
constexpr int L = Vec::L;
constexpr int P = NR * L;  // database rows per panel
static_assert(P <= 64, "lane masks are 64-bit");

// ---------------------------------------------------------------- micro-kernels
// Both compute the MR x P keys of one query micro-tile against one packed panel into
// keys[i * P + j] and set mask[i] bit j where keys[i*P + j] < worst[i].

// a[i]: query i as nw 32-bit words (two 16-bit elements each), anorm[i] = |a_i|^2;
// bp: panel [nw][P] words, bnorm[P].
template <bool kVnni>
SSLD_KNN_NOINLINE void kernel_u8(const int32_t* const* a, const int32_t* anorm,
                                 const int32_t* bp, const int32_t* bnorm, int64_t nw,
                                 const int32_t* worst, uint64_t* mask, int32_t* keys) {
  using I = Vec::I;
  I acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NR; ++v) acc[i][v] = Vec::izero();
  const int32_t* ar[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) ar[i] = a[i];
  for (int64_t w = 0; w < nw; ++w) {
    I b[NR];
#pragma GCC unroll 8
    for (int v = 0; v < NR; ++v) b[v] = Vec::iload(bp + w * P + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const I av = Vec::iset(ar[i][w]);
#pragma GCC unroll 8
      for (int v = 0; v < NR; ++v) acc[i][v] = kVnni ? Vec::dot2_vnni(acc[i][v], av, b[v])
                                                     : Vec::dot2(acc[i][v], av, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const I an = Vec::iset(anorm[i]);
    const I wv = Vec::iset(worst[i]);
    uint64_t m = 0;
#pragma GCC unroll 8
    for (int v = 0; v < NR; ++v) {
      const I nb = Vec::iload(bnorm + v * L);
      const I key = Vec::isub(Vec::iadd(an, nb), Vec::iadd(acc[i][v], acc[i][v]));
      Vec::istore(keys + i * P + v * L, key);
      m |= Vec::lt(key, wv) << (v * L);
    }
    mask[i] = m;
  }
}

// a[i]: query i as dim floats; bp: panel [dim][P] floats.
SSLD_KNN_NOINLINE void kernel_f32(const float* const* a, const float* bp, int64_t dim,
                                  const int32_t* worst, uint64_t* mask, int32_t* keys) {
  using F = Vec::F;
  using I = Vec::I;
  F acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NR; ++v) acc[i][v] = Vec::fzero();
  const float* ar[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) ar[i] = a[i];
  for (int64_t d = 0; d < dim; ++d) {
    F b[NR];
#pragma GCC unroll 8
    for (int v = 0; v < NR; ++v) b[v] = Vec::fload(bp + d * P + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const F av = Vec::fset(ar[i][d]);
#pragma GCC unroll 8
      for (int v = 0; v < NR; ++v) acc[i][v] = Vec::sqacc(acc[i][v], av, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const I wv = Vec::iset(worst[i]);
    uint64_t m = 0;
#pragma GCC unroll 8
    for (int v = 0; v < NR; ++v) {
      const I key = Vec::fkey(acc[i][v]);
      Vec::istore(keys + i * P + v * L, key);
      m |= Vec::lt(key, wv) << (v * L);
    }
    mask[i] = m;
  }
}

// ---------------------------------------------------------------- packing
// Query or database row of uint8 -> nw words (elements 2w, 2w+1 as 16-bit halves); the word
// stride lets the same loop write a query row (stride 1) or a panel column (stride P).
SSLD_KNN_INLINE int32_t pack_u8_row(const std::uint8_t* r, int64_t dim, int32_t* out,
                                    int64_t out_stride) {
  const int64_t half = dim / 2;
  int32_t norm = 0;
  for (int64_t w = 0; w < half; ++w) {
    const int32_t lo = r[2 * w], hi = r[2 * w + 1];
    out[w * out_stride] = lo | (hi << 16);
    norm += lo * lo + hi * hi;
  }
  if (dim & 1) {
    const int32_t lo = r[dim - 1];
    out[half * out_stride] = lo;
    norm += lo * lo;
  }
  return norm;
}

// ---------------------------------------------------------------- driver
struct Task {
  int64_t group;
  int64_t q0, q1;  // global query rows
};

// AlignedBuf: csrc/cpu_scratch.h

struct Scratch {
  AlignedBuf a, anorm, panel, pnorm, state;
};

struct Ctx {
  const KnnParams* p;
  const int64_t* q_off;
  const int64_t* db_off;
  float* out_dist;
  int64_t* out_idx;
  bool vnni;  // the CPU has the fused 16-bit dot product (see Vec::dot2_vnni)
};

// Inserts candidate (key c, local index j) into a sorted top-k (keys ks, indices is); j is
// larger than every index already there.
SSLD_KNN_INLINE void insert(int32_t* ks, int64_t* is, int k, int32_t c, int64_t j) {
  if (c >= ks[k - 1]) return;
  int pos = k - 1;
  while (pos > 0 && ks[pos - 1] > c) {
    ks[pos] = ks[pos - 1];
    is[pos] = is[pos - 1];
    --pos;
  }
  ks[pos] = c;
  is[pos] = j;
}

// Inserts the candidates of one panel row (keys[j] for the bits j of m, local index c0 + j)
// by selecting its best ones first: the k smallest (key, index) pairs of the row, extracted
// in that order, are all a sequential insertion could keep (the others have k better ones
// beside them), and inserting them in (key, index) order keeps ties exact (equal keys come
// out in ascending index, and every index of the panel is above those already in the list).
// Used when many lanes pass the stale threshold (the first panels of a query), where the
// one-candidate-at-a-time loop would branch on every lane.
constexpr int kSelectMaxK = 16;

SSLD_KNN_NOINLINE void select_insert(const int32_t* keys, uint64_t m, int32_t* ks, int64_t* is,
                                     int k, int64_t c0) {
  alignas(64) int32_t tmp[P];
  for (int j = 0; j < P; ++j)
    tmp[j] = ((m >> j) & 1) ? keys[j] : kMissingKey;  // real keys are < kMissingKey
  for (int r = 0; r < k; ++r) {
    Vec::I v = Vec::iload(tmp);
    for (int n = 1; n < NR; ++n) v = Vec::imin(v, Vec::iload(tmp + n * L));
    alignas(64) int32_t lanes[L];
    Vec::istore(lanes, v);
    int32_t best = lanes[0];
    for (int l = 1; l < L; ++l) best = std::min(best, lanes[l]);
    if (best >= ks[k - 1]) return;  // nothing left enters (also: no candidates left)
    const Vec::I above = Vec::iset(best + 1);  // best < kMissingKey: no overflow
    uint64_t at = 0;  // lanes holding best (nothing is below it)
    for (int n = 0; n < NR; ++n) at |= Vec::lt(Vec::iload(tmp + n * L), above) << (n * L);
    const int j = __builtin_ctzll(at);  // the lowest index holding it
    insert(ks, is, k, best, c0 + j);
    tmp[j] = kMissingKey;
  }
}

void run_task(const Ctx& c, const Task& t, Scratch& s) {
  const KnnParams& p = *c.p;
  const int k = p.k;
  const int64_t dim = p.dim;
  const int64_t nq = t.q1 - t.q0;
  const int64_t db0 = c.db_off[t.group];
  const int64_t ndb = c.db_off[t.group + 1] - db0;
  int32_t* state = s.state.get<int32_t>(nq * k);
  int64_t* out_idx = c.out_idx + t.q0 * k;
  std::fill(state, state + nq * k, kMissingKey);
  std::fill(out_idx, out_idx + nq * k, int64_t{-1});

  if (ndb > 0) {
    const bool u8 = p.dtype == kUInt8;
    const int64_t nw = (dim + 1) / 2;
    const int64_t width = u8 ? nw : dim;  // panel depth
    alignas(64) int32_t keys[MR * P];
    uint64_t mask[MR];
    int32_t worst[MR];
    int32_t* a_words = nullptr;
    int32_t* a_norm = nullptr;
    const float* a_f32 = nullptr;
    if (u8) {
      a_words = s.a.get<int32_t>(nq * nw);
      a_norm = s.anorm.get<int32_t>(nq);
      const auto* q = reinterpret_cast<const std::uint8_t*>(p.q);
      for (int64_t r = 0; r < nq; ++r)
        a_norm[r] = pack_u8_row(q + (t.q0 + r) * p.q_stride, dim, a_words + r * nw, 1);
    } else {
      a_f32 = reinterpret_cast<const float*>(p.q) + t.q0 * p.q_stride;
    }
    int32_t* panel = s.panel.get<int32_t>(width * P);
    int32_t* pnorm = s.pnorm.get<int32_t>(P);
    float* panel_f = reinterpret_cast<float*>(s.panel.ptr);

    for (int64_t c0 = 0; c0 < ndb; c0 += P) {
      const int ncols = static_cast<int>(std::min<int64_t>(P, ndb - c0));
      // pack the panel [width][P]; missing columns are zeros (their keys are masked off)
      if (u8) {
        const auto* db = reinterpret_cast<const std::uint8_t*>(p.db);
        for (int j = 0; j < ncols; ++j)
          pnorm[j] = pack_u8_row(db + (db0 + c0 + j) * p.db_stride, dim, panel + j, P);
        for (int j = ncols; j < P; ++j) {
          pnorm[j] = 0;
          for (int64_t w = 0; w < nw; ++w) panel[w * P + j] = 0;
        }
      } else {
        const auto* db = reinterpret_cast<const float*>(p.db);
        for (int j = 0; j < ncols; ++j) {
          const float* r = db + (db0 + c0 + j) * p.db_stride;
          for (int64_t d = 0; d < dim; ++d) panel_f[d * P + j] = r[d];
        }
        for (int j = ncols; j < P; ++j)
          for (int64_t d = 0; d < dim; ++d) panel_f[d * P + j] = 0.0f;
      }
      const uint64_t colmask = ncols >= 64 ? ~uint64_t{0} : (uint64_t{1} << ncols) - 1;

      for (int64_t r0 = 0; r0 < nq; r0 += MR) {
        const int nr = static_cast<int>(std::min<int64_t>(MR, nq - r0));
        for (int i = 0; i < MR; ++i)
          worst[i] = i < nr ? state[(r0 + i) * k + k - 1] : std::numeric_limits<int32_t>::min();
        if (u8) {
          const int32_t* rows[MR];
          int32_t norms[MR];
          for (int i = 0; i < MR; ++i) {
            const int64_t r = r0 + std::min(i, nr - 1);  // rows past the end repeat the last
            rows[i] = a_words + r * nw;
            norms[i] = a_norm[r];
          }
          (c.vnni ? kernel_u8<true> : kernel_u8<false>)(rows, norms, panel, pnorm, nw, worst,
                                                         mask, keys);
        } else {
          const float* rows[MR];
          for (int i = 0; i < MR; ++i) rows[i] = a_f32 + (r0 + std::min(i, nr - 1)) * p.q_stride;
          kernel_f32(rows, panel_f, dim, worst, mask, keys);
        }
        for (int i = 0; i < nr; ++i) {
          uint64_t m = mask[i] & colmask;
          if (m == 0) continue;
          int32_t* ks = state + (r0 + i) * k;
          int64_t* is = out_idx + (r0 + i) * k;
          if (k <= kSelectMaxK && __builtin_popcountll(m) > 2 * k) {
            select_insert(keys + i * P, m, ks, is, k, c0);
            continue;
          }
          while (m != 0) {
            const int j = __builtin_ctzll(m);
            m &= m - 1;
            insert(ks, is, k, keys[i * P + j], c0 + j);
          }
        }
      }
    }
  }

  float* out_dist = c.out_dist + t.q0 * k;
  const float inf = std::numeric_limits<float>::infinity();
  if (p.dtype == kUInt8) {
    for (int64_t e = 0; e < nq * k; ++e)
      out_dist[e] = state[e] == kMissingKey ? inf : static_cast<float>(state[e]);
  } else {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t e = 0; e < nq * k; ++e) {
      const int32_t key = state[e];
      out_dist[e] = key == kMissingKey ? inf
                    : key == kNaNKey   ? nan
                                       : __builtin_bit_cast(float, static_cast<uint32_t>(key));
    }
  }
}

}  // namespace

void match_knn_cpu(const KnnParams& p) {
  check_knn_params(p);
  if (p.nq_total == 0) return;
  const auto* q_off = reinterpret_cast<const int64_t*>(p.q_off);
  const auto* db_off = reinterpret_cast<const int64_t*>(p.db_off);

  double work = 0.0;  // multiply-adds
  for (int64_t g = 0; g < p.n_groups; ++g)
    work += double(q_off[g + 1] - q_off[g]) * double(std::max<int64_t>(db_off[g + 1] - db_off[g], 1)) *
            double(p.dim);
  int nt = std::max(p.num_threads, 1);
  if (work < kSerialWork) nt = 1;

  // Split every group's queries into blocks of near-equal size: about kTasksPerThread * nt
  // tasks of equal work overall (fewer, larger blocks pack each database panel fewer times),
  // at most kMaxBlockRows queries, a multiple of MR rows where the group allows.
  const double target = nt > 1 ? work / (double(nt) * kTasksPerThread) : work;
  std::vector<Task> tasks;
  for (int64_t g = 0; g < p.n_groups; ++g) {
    const int64_t nq = q_off[g + 1] - q_off[g];
    if (nq == 0) continue;
    const double row_work = double(std::max<int64_t>(db_off[g + 1] - db_off[g], 1)) * double(p.dim);
    int64_t rows = static_cast<int64_t>(std::min(target / row_work, double(kMaxBlockRows)));
    rows = std::max<int64_t>(rows, 8 * MR);
    const int64_t nblocks = (nq + rows - 1) / rows;
    rows = (nq + nblocks - 1) / nblocks;
    rows = std::min(nq, (rows + MR - 1) / MR * MR);
    for (int64_t q0 = q_off[g]; q0 < q_off[g + 1]; q0 += rows)
      tasks.push_back(Task{g, q0, std::min(q0 + rows, q_off[g + 1])});
  }
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  nt = static_cast<int>(std::min<int64_t>(nt, ntasks));

  static const bool vnni = Vec::kHaveVnni && Vec::vnni_supported();
  Ctx ctx{&p, q_off, db_off, reinterpret_cast<float*>(p.out_dist),
          reinterpret_cast<int64_t*>(p.out_idx), vnni};
  if (nt <= 1) {
    Scratch s;
    for (const Task& t : tasks) run_task(ctx, t, s);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for(nt, nt, [&](int64_t, int64_t) {
    Scratch s;
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks) break;
      run_task(ctx, tasks[t], s);
    }
  });
}

}  // namespace SSLD_CPU_ISA
}  // namespace ssld
