// Shared definitions for the ssld_kernels._C extension: the parameter block every
// divergence kernel takes, dtype codes, and checks with readable messages.
//
// The extension never links libtorch. Python passes raw pointers (as integers), sizes,
// strides, dtype codes and, for CUDA, a stream handle and a device index. Validation of
// shapes and dtypes happens in Python; the kernels re-check what would otherwise turn into
// an out-of-bounds access.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ssld {

// The ABI constants below are mirrored in Python by ssld_kernels/_abi.py (STATS_WIDTH,
// DTYPE_CODES), exported by bindings.cpp and compared by tests/test_abi.py.

// Floats saved per row by the forward for the backward (see DivParams::stats).
constexpr int kStatsWidth = 6;

// dtype codes of DivParams::s_dtype / t_dtype and KnnParams::dtype.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kUInt8 = 4 };

inline const char* dtype_name(int d) {
  switch (d) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    case kUInt8: return "uint8";
    default: return "unknown";
  }
}

// Math: ssld_kernels/reference.py, the executable spec (its docstring has every formula). In
// its terms, with P = softmax(s / T), Q = softmax(t / T): mode 1 is the JSD mixture
// (X = Y = M), mode 0 the KL family (X = Q, Y = P); A = KL(P || X), B = KL(Q || Y);
//   row loss = loss_scale * (coef_a * A + coef_b * B) * weight[row]   (0 where mask[row] == 0)
//   g = grad_scale * grad_rows[row * grad_rows_stride] * weight[row]   (gradient row factor)
// Per element the formulas are written once per backend: elem_terms / elem_grad_s /
// elem_grad_t in divergence.cu, elem_logs / elem_grad in divergence_cpu.cpp.
// log p = (s_j * inv_temp - max_s) - log_sum_s: max and log-sum are kept apart in the stats
// (folding them into one float would round log p to ulp(max)).
struct DivParams {
  // inputs: 2-D row views, last-dim stride 1, row strides in elements
  std::uintptr_t s = 0;
  int s_dtype = kFloat32;
  std::int64_t s_stride = 0;
  std::uintptr_t t = 0;
  int t_dtype = kFloat32;
  std::int64_t t_stride = 0;
  std::int64_t n_rows = 0;
  std::int64_t n_cols = 0;

  int mode = 1;            // 0: KL family, 1: JSD mixture
  double beta = 0.5;       // teacher weight inside M (mode 1)
  double coef_a = 0.5;     // loss = coef_a * A + coef_b * B
  double coef_b = 0.5;
  double inv_temp = 1.0;   // 1 / T
  double loss_scale = 1.0; // T^2
  double grad_scale = 1.0; // T  (= T^2 * d(s/T)/ds)

  // Auxiliary per-row arrays: "acc" dtype = float64 when both inputs are float64, else float32.
  std::uintptr_t weight = 0;     // nullable, [n_rows] acc dtype, contiguous
  std::uintptr_t mask = 0;       // nullable, [n_rows] uint8 (bool), contiguous
  std::uintptr_t grad_rows = 0;  // nullable, acc dtype, element r at grad_rows[r * grad_rows_stride]
  std::int64_t grad_rows_stride = 0;

  // outputs
  std::uintptr_t row_loss = 0;   // forward: [n_rows] acc dtype (required for forward)
  std::uintptr_t stats = 0;      // forward: nullable out; backward: required in.
                                 //   [n_rows, kStatsWidth] acc dtype, contiguous, per row
                                 //   (max_s, log_sum_s, max_t, log_sum_t, A, B); masked rows: zeros
  std::uintptr_t grad_s = 0;     // nullable, dtype s_dtype, row stride grad_s_stride, last-dim stride 1
  std::int64_t grad_s_stride = 0;
  std::uintptr_t grad_t = 0;     // nullable, dtype t_dtype
  std::int64_t grad_t_stride = 0;

  int num_threads = 1;           // CPU: threads to use (torch.get_num_threads())
  std::uintptr_t stream = 0;     // CUDA: cudaStream_t
  int device = 0;                // CUDA: device index of every pointer

  // CUDA launch config of the block-per-row kernels (rows over 1024 classes); 0 = default.
  int cuda_threads = 0;          // threads per block: a power of two in [64, 1024]
  std::int64_t cuda_blocks = 0;  // grid size limit (blocks loop over rows); 0: one per row
  int cuda_row_cache = 0;        // forward: 1 = keep the row in shared memory between passes
                                 // when it fits (one read of each logit), 0 / -1 = do not
};

inline void check(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument(msg);
}

// Checks shared by every backend; called at the top of each entry point.
inline void check_div_params(const DivParams& p, bool backward) {
  check(p.n_rows >= 0, "n_rows must be >= 0");
  check(p.n_cols >= 1 || p.n_rows == 0, "n_cols must be >= 1");
  check(p.mode == 0 || p.mode == 1, "mode must be 0 (kl family) or 1 (jsd)");
  check(p.s_dtype >= 0 && p.s_dtype <= 3, "unsupported student dtype code");
  check(p.t_dtype >= 0 && p.t_dtype <= 3, "unsupported teacher dtype code");
  check((p.s_dtype == kFloat64) == (p.t_dtype == kFloat64),
        "float64 logits need float64 for both student and teacher");
  check(p.inv_temp > 0.0, "inv_temp must be > 0");
  if (p.n_rows == 0) return;
  check(p.s != 0 && p.t != 0, "null logits pointer");
  if (backward) {
    check(p.stats != 0, "backward needs stats");
    check(p.grad_rows != 0, "backward needs grad_rows");
  } else {
    check(p.row_loss != 0, "forward needs row_loss");
  }
  if (p.grad_s != 0 || p.grad_t != 0) check(p.grad_rows != 0, "gradients need grad_rows");
}

}  // namespace ssld
