// Picks the CPU kernel variant for the running processor. csrc/divergence_cpu.cpp and
// csrc/match_cpu.cpp are compiled once per instruction set (see CMakeLists.txt) into
// namespaces ssld::base / avx2 / avx512.
#include "common.h"
#include "match.h"

namespace ssld {
#define SSLD_DECLARE_ISA(ns)                          \
  namespace ns {                                      \
  void divergence_forward_cpu(const DivParams& p);    \
  void divergence_backward_cpu(const DivParams& p);   \
  void match_knn_cpu(const KnnParams& p);             \
  }
SSLD_DECLARE_ISA(base)
#ifdef SSLD_HAVE_ISA_AVX2
SSLD_DECLARE_ISA(avx2)
#endif
#ifdef SSLD_HAVE_ISA_AVX512
SSLD_DECLARE_ISA(avx512)
#endif
#undef SSLD_DECLARE_ISA

const char* cpu_isa() {
#ifdef SSLD_HAVE_ISA_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return "avx512";
#endif
#ifdef SSLD_HAVE_ISA_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return "avx2";
#endif
  return "base";
}

namespace {
using Fn = void (*)(const DivParams&);
using KnnFn = void (*)(const KnnParams&);
struct Table { Fn forward; Fn backward; KnnFn knn; };

Table pick() {
  const std::string isa = cpu_isa();
#ifdef SSLD_HAVE_ISA_AVX512
  if (isa == "avx512") return {avx512::divergence_forward_cpu, avx512::divergence_backward_cpu,
                               avx512::match_knn_cpu};
#endif
#ifdef SSLD_HAVE_ISA_AVX2
  if (isa == "avx2") return {avx2::divergence_forward_cpu, avx2::divergence_backward_cpu,
                             avx2::match_knn_cpu};
#endif
  return {base::divergence_forward_cpu, base::divergence_backward_cpu, base::match_knn_cpu};
}

const Table& table() {
  static const Table t = pick();
  return t;
}
}  // namespace

void divergence_forward_cpu(const DivParams& p) { table().forward(p); }
void divergence_backward_cpu(const DivParams& p) { table().backward(p); }
void match_knn_cpu(const KnnParams& p) { table().knn(p); }

}  // namespace ssld
