// Picks the CPU kernel variant for the running processor. csrc/divergence_cpu.cpp and
// csrc/match_cpu.cpp are compiled once per instruction set (see CMakeLists.txt) into
// namespaces ssld::base / avx2 / avx512.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

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

namespace {
bool supported(const std::string& isa) {
#ifdef SSLD_HAVE_ISA_AVX512
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#ifdef SSLD_HAVE_ISA_AVX2
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return isa == "base";
}

// The best compiled variant this CPU runs, or the one SSLD_KERNELS_CPU_ISA names (for tests
// of the other variants and for comparisons; refused if not compiled in or not supported).
const char* pick_isa() {
  static const char* const kOrder[] = {"avx512", "avx2", "base"};
  if (const char* want = std::getenv("SSLD_KERNELS_CPU_ISA"); want != nullptr && *want) {
    for (const char* isa : kOrder)
      if (std::strcmp(want, isa) == 0 && supported(isa)) return isa;
    std::string ok;
    for (const char* isa : kOrder)
      if (supported(isa)) ok += std::string(ok.empty() ? "" : ", ") + isa;
    throw std::invalid_argument(std::string("SSLD_KERNELS_CPU_ISA=") + want +
                                ": not a CPU kernel variant this build and CPU can run (" + ok +
                                ")");
  }
  for (const char* isa : kOrder)
    if (supported(isa)) return isa;
  return "base";
}
}  // namespace

const char* cpu_isa() {
  static const char* const isa = pick_isa();
  return isa;
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

// Gradients are usually freshly allocated (torch.empty) buffers that the kernel touches first.
// On Linux with transparent huge pages in "madvise" mode, a large fresh buffer is faulted in
// 4 KB pages: 131 MB (1024 x 32000 fp32) took 131 ms to first-touch on a 2-core EPYC VM
// against 25 ms with huge pages and 9.5 ms warm, more than the kernel itself. With
// SSLD_KERNELS_HUGEPAGES=1 the 2 MB aligned interior of a large gradient is marked
// MADV_HUGEPAGE before the kernel writes it. Off by default: alone the fused call was faster
// with it (130 vs 185 ms), but in bench_divergence.py's run beside eager and torch.compile
// (which allocate GBs between the kernel's calls) it took 249 ms, against 179 ms without it
// in a run of the kernel alone (bench/results/divergence-AMD_EPYC_x2-066756a*.json); with THP
// defrag "madvise" a huge-page fault may compact memory first. A hint only: ignored where
// THP is off, harmless on memory already populated.
namespace {
constexpr std::uintptr_t kHugePage = std::uintptr_t(1) << 21;

bool hugepages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("SSLD_KERNELS_HUGEPAGES");  // read once
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

void advise_huge(std::uintptr_t ptr, std::int64_t rows, std::int64_t stride, int dtype) {
#ifdef __linux__
  if (ptr == 0 || rows <= 0 || stride <= 0 || !hugepages_enabled()) return;
  const std::uintptr_t elem = dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
  const std::uintptr_t end = ptr + static_cast<std::uintptr_t>(rows) * stride * elem;
  const std::uintptr_t a = (ptr + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t b = end & ~(kHugePage - 1);
  if (b >= a + 2 * kHugePage) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#else
  (void)ptr, (void)rows, (void)stride, (void)dtype;
#endif
}

void advise_grads(const DivParams& p) {
  advise_huge(p.grad_s, p.n_rows, p.grad_s_stride, p.s_dtype);
  advise_huge(p.grad_t, p.n_rows, p.grad_t_stride, p.t_dtype);
}
}  // namespace

void divergence_forward_cpu(const DivParams& p) {
  advise_grads(p);
  table().forward(p);
}
void divergence_backward_cpu(const DivParams& p) {
  advise_grads(p);
  table().backward(p);
}
void match_knn_cpu(const KnnParams& p) { table().knn(p); }

}  // namespace ssld
