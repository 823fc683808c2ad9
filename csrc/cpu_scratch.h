// A growable, 64-byte aligned scratch buffer for the CPU kernels (thread-local row buffers,
// packed panels). It is defined inside the per-ISA namespace ssld::SSLD_CPU_ISA, so each
// instruction-set variant keeps its own copy (no COMDAT shared between AVX and baseline code).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#ifndef SSLD_CPU_ISA
#error "cpu_scratch.h is for the per-ISA CPU kernels (compile with -DSSLD_CPU_ISA=...)"
#endif

namespace ssld {
namespace SSLD_CPU_ISA {

struct AlignedBuf {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  ~AlignedBuf() { std::free(ptr); }

  // At least `need` bytes; the contents are not kept when the buffer grows.
  void* get_bytes(std::size_t need) {
    if (need > bytes) {
      std::free(ptr);
      ptr = nullptr;
      bytes = 0;
      const std::size_t rounded = (std::max<std::size_t>(need, 1) + 63) / 64 * 64;
      ptr = std::aligned_alloc(64, rounded);
      if (ptr == nullptr) throw std::bad_alloc();
      bytes = rounded;
    }
    return ptr;
  }

  template <class T>
  T* get(std::int64_t n) {
    return static_cast<T*>(get_bytes(static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(T)));
  }
};

}  // namespace SSLD_CPU_ISA
}  // namespace ssld
