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

#include "common.h"

namespace ssld {

constexpr int kKnnMaxK = 64;

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
};

void match_knn_cpu(const KnnParams& p);
void match_knn_cuda(const KnnParams& p);  // csrc/match.cu (builds with SSLD_WITH_CUDA only)

}  // namespace ssld
