// pybind11 module ssld_kernels._C: the parameter block and the kernel entry points.
#include <pybind11/pybind11.h>

#include "common.h"
#include "match.h"

namespace py = pybind11;

namespace ssld {
const char* cpu_isa();
void divergence_forward_cpu(const DivParams& p);
void divergence_backward_cpu(const DivParams& p);
#ifdef SSLD_WITH_CUDA
void divergence_forward_cuda(const DivParams& p);
void divergence_backward_cuda(const DivParams& p);
int cuda_device_count();
#endif
}  // namespace ssld

// run_released<f>: calls the kernel f(const P&) with the GIL released (P deduced from f).
template <class Fn> struct KernelParam;
template <class P> struct KernelParam<void (*)(const P&)> { using type = P; };

template <auto F>
void run_released(const typename KernelParam<decltype(F)>::type& p) {
  py::gil_scoped_release release;
  F(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ssld_kernels compiled kernels (C++ CPU, CUDA when built with it)";
  py::class_<ssld::DivParams>(m, "DivParams")
      .def(py::init<>())
#define F(name) .def_readwrite(#name, &ssld::DivParams::name)
      F(s) F(s_dtype) F(s_stride) F(t) F(t_dtype) F(t_stride) F(n_rows) F(n_cols)
      F(mode) F(beta) F(coef_a) F(coef_b) F(inv_temp) F(loss_scale) F(grad_scale)
      F(weight) F(mask) F(grad_rows) F(grad_rows_stride) F(row_loss) F(stats)
      F(grad_s) F(grad_s_stride) F(grad_t) F(grad_t_stride) F(num_threads) F(stream) F(device)
      F(cuda_threads) F(cuda_blocks) F(cuda_row_cache);
#undef F
  py::class_<ssld::KnnParams>(m, "KnnParams")
      .def(py::init<>())
#define F(name) .def_readwrite(#name, &ssld::KnnParams::name)
      F(q) F(q_stride) F(nq_total) F(db) F(db_stride) F(ndb_total) F(dtype) F(dim)
      F(n_groups) F(q_off) F(db_off) F(k) F(out_dist) F(out_idx) F(num_threads) F(stream)
      F(device) F(workspace) F(workspace_bytes);
#undef F
  // ABI constants of common.h; ssld_kernels/_abi.py must match (tests/test_abi.py).
  m.attr("STATS_WIDTH") = ssld::kStatsWidth;
  py::dict dtype_codes;
  for (int d : {ssld::kFloat32, ssld::kFloat16, ssld::kBFloat16, ssld::kFloat64, ssld::kUInt8})
    dtype_codes[ssld::dtype_name(d)] = d;
  m.attr("DTYPE_CODES") = dtype_codes;
  m.def("cpu_isa", &ssld::cpu_isa, "instruction set of the CPU kernels in use");
  m.def("divergence_forward_cpu", &run_released<ssld::divergence_forward_cpu>);
  m.def("divergence_backward_cpu", &run_released<ssld::divergence_backward_cpu>);
  m.def("match_knn_cpu", &run_released<ssld::match_knn_cpu>,
        "exact k-nearest-neighbour matching over ragged groups (see csrc/match.h)");
#ifdef SSLD_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_device_count", &ssld::cuda_device_count);
  m.def("divergence_forward_cuda", &run_released<ssld::divergence_forward_cuda>);
  m.def("divergence_backward_cuda", &run_released<ssld::divergence_backward_cuda>);
  m.def("match_knn_cuda", &run_released<ssld::match_knn_cuda>,
        "exact k-nearest-neighbour matching over ragged groups on the GPU (see csrc/match.cu)");
  m.def("match_knn_cuda_workspace_bytes", &ssld::match_knn_cuda_workspace_bytes,
        "device workspace bytes match_knn_cuda needs for these parameters");
#else
  m.attr("with_cuda") = false;
  m.def("cuda_device_count", []() { return 0; });
#endif
}
