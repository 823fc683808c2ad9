// Parameter block of the exact batched k-nearest-neighbour descriptor matcher (SIFT dedup).
//
// Ragged groups (image pairs): group g matches queries [q_off[g], q_off[g+1]) of a packed
// query matrix against database rows [db_off[g], db_off[g+1]) of a packed database matrix.
// For every query the k database rows of its group with the smallest squared L2 distance are
// returned, ascending by distance, ties broken by the lower database index, indices LOCAL to
// the group's database (row - db_off[g]). Slots beyond the group's database size hold
// +inf / -1. The output is deterministic and independent of num_threads.
//
// Distances:
//   uint8   sum_d (a_d - b_d)^2 in exact integer arithmetic (needs dim * 255^2 < 2^31, i.e.
//           dim <= 33025), stored as float32 (exact below 2^24, i.e. for dim <= 258; above
//           that the float32 is the integer rounded to nearest, the ORDER stays the exact one).
//   float32 sum_d (a_d - b_d)^2 accumulated in float over d in ascending order (fused
//           multiply-add where the CPU variant has FMA), never via |a|^2 + |b|^2 - 2 a.b.
//           A NaN distance (NaN in a descriptor, or inf - inf) sorts after every number,
//           +inf included, and is reported as NaN with its index.
// Memory: O(nq * k) plus per-thread tiles; the distance matrix is never stored.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "common.h"

namespace ssld {

constexpr int kKnnMaxK = 64;
constexpr int64_t kKnnMaxU8Dim = 33025;  // dim * 255^2 < 2^31: exact int32 distances

struct KnnParams {
  std::uintptr_t q = 0;         // packed queries [nq_total, dim], row stride q_stride, last-dim stride 1
  std::int64_t q_stride = 0;    // elements
  std::int64_t nq_total = 0;
  std::uintptr_t db = 0;        // packed database [ndb_total, dim], row stride db_stride
  std::int64_t db_stride = 0;   // elements
  std::int64_t ndb_total = 0;
  int dtype = kUInt8;           // kUInt8 or kFloat32 (both matrices)
  std::int64_t dim = 0;
  std::int64_t n_groups = 1;
  std::uintptr_t q_off = 0;     // int64 [n_groups + 1]: 0 = q_off[0] <= ... <= q_off[n_groups] = nq_total
  std::uintptr_t db_off = 0;    // int64 [n_groups + 1]: 0 = db_off[0] <= ... = ndb_total
  int k = 2;                    // neighbours per query, 1..kKnnMaxK
  std::uintptr_t out_dist = 0;  // float32 [nq_total, k], contiguous
  std::uintptr_t out_idx = 0;   // int64 [nq_total, k], contiguous
  int num_threads = 1;           // CPU: threads to use
  std::uintptr_t stream = 0;     // CUDA: cudaStream_t of every launch (q, db, outputs on `device`;
                                 //   q_off / db_off stay host arrays, read by the host)
  int device = 0;                // CUDA: device index of every pointer
  std::uintptr_t workspace = 0;  // CUDA: optional device buffer on `device` for the schedule and
  std::uint64_t workspace_bytes = 0;  //   norms (>= match_knn_cuda_workspace_bytes); 0: own
};

// Argument checks shared by the CPU and CUDA kernels (readable std::invalid_argument).
inline void check_knn_params(const KnnParams& p) {
  check(p.dtype == kUInt8 || p.dtype == kFloat32,
        std::string("match_knn: unsupported dtype ") + dtype_name(p.dtype) +
            " (expected uint8 or float32)");
  check(p.dim >= 1, "match_knn: dim must be >= 1, got " + std::to_string(p.dim));
  if (p.dtype == kUInt8)
    check(p.dim <= kKnnMaxU8Dim, "match_knn: uint8 descriptors need dim <= " +
                                     std::to_string(kKnnMaxU8Dim) +
                                     " (dim * 255^2 < 2^31), got " + std::to_string(p.dim));
  check(p.dim <= (int64_t{1} << 40), "match_knn: dim is too large");
  check(p.k >= 1 && p.k <= kKnnMaxK, "match_knn: k must be in [1, " + std::to_string(kKnnMaxK) +
                                         "], got " + std::to_string(p.k));
  check(p.n_groups >= 0, "match_knn: n_groups must be >= 0");
  check(p.nq_total >= 0 && p.ndb_total >= 0, "match_knn: nq_total and ndb_total must be >= 0");
  check(p.nq_total <= std::numeric_limits<int64_t>::max() / kKnnMaxK,
        "match_knn: nq_total is too large");
  check(p.q_stride >= 0 && p.db_stride >= 0, "match_knn: row strides must be >= 0");
  check(p.q_off != 0 && p.db_off != 0, "match_knn: null q_off / db_off pointer");
  check(p.q_off % 8 == 0 && p.db_off % 8 == 0,
        "match_knn: q_off / db_off are not aligned to int64");
  const auto* q_off = reinterpret_cast<const int64_t*>(p.q_off);
  const auto* db_off = reinterpret_cast<const int64_t*>(p.db_off);
  check(q_off[0] == 0 && db_off[0] == 0, "match_knn: q_off[0] and db_off[0] must be 0");
  for (int64_t g = 0; g < p.n_groups; ++g) {
    if (q_off[g + 1] < q_off[g] || db_off[g + 1] < db_off[g])
      throw std::invalid_argument("match_knn: offsets must be nondecreasing (group " +
                                  std::to_string(g) + ": q_off " + std::to_string(q_off[g]) +
                                  " -> " + std::to_string(q_off[g + 1]) + ", db_off " +
                                  std::to_string(db_off[g]) + " -> " +
                                  std::to_string(db_off[g + 1]) + ")");
  }
  check(q_off[p.n_groups] == p.nq_total,
        "match_knn: q_off[n_groups] = " + std::to_string(q_off[p.n_groups]) +
            " but nq_total = " + std::to_string(p.nq_total));
  check(db_off[p.n_groups] == p.ndb_total,
        "match_knn: db_off[n_groups] = " + std::to_string(db_off[p.n_groups]) +
            " but ndb_total = " + std::to_string(p.ndb_total));
  if (p.nq_total == 0) return;
  check(p.q != 0 && p.out_dist != 0 && p.out_idx != 0,
        "match_knn: null query or output pointer");
  check(p.out_dist % 4 == 0 && p.out_idx % 8 == 0,
        "match_knn: out_dist / out_idx are not aligned to float32 / int64");
  if (p.ndb_total > 0) check(p.db != 0, "match_knn: null database pointer");
  if (p.dtype == kFloat32)
    check(p.q % 4 == 0 && p.db % 4 == 0, "match_knn: float32 descriptors are not 4-byte aligned");
}

void match_knn_cpu(const KnnParams& p);
void match_knn_cuda(const KnnParams& p);  // csrc/match.cu (builds with SSLD_WITH_CUDA only)
// Device workspace bytes match_knn_cuda needs for `p` (0: none); checks `p` like the call.
std::size_t match_knn_cuda_workspace_bytes(const KnnParams& p);

}  // namespace ssld
