// Host-side CUDA helpers shared by the CUDA sources (divergence.cu, match.cu).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ssld {

// Throws std::runtime_error "ssld CUDA <who>: <what>: <CUDA message>" on error. The error is
// consumed first (cudaGetLastError), so a later launch check cannot report it again.
inline void cuda_check(cudaError_t err, const char* who, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("ssld CUDA ") + who + ": " + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the call and restores the caller's device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* who) {
    cuda_check(cudaGetDevice(&prev_), who, "cudaGetDevice");
    if (prev_ != device) cuda_check(cudaSetDevice(device), who, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

}  // namespace ssld
