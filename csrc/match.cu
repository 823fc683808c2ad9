// CUDA kernel of the exact batched k-nearest-neighbour matcher (contract: csrc/match.h; CPU
// twin: match_cpu.cpp). One launch per call; the distance matrix never leaves the SM.
//
// Work decomposition
//   block    = BM = 32 * NW consecutive queries of ONE group (a "tile" of the host-built
//              schedule, see below) against every database row of that group, visited in
//              database tiles of BN rows, ascending. NW = 4 warps (128 threads) unless the
//              shared memory of the device is too small for the k asked (then 2, then 1).
//   warp     = owns 32 of the block's queries: their running top-k lists (shared memory) are
//              only ever touched by this warp, so top-k needs __syncwarp, never __syncthreads.
//   pipeline = kStages (3) shared-memory stages filled with cp.async (16-byte copies with
//              zero fill; a plain load/store variant when rows are not 16-byte aligned), one
//              stage = one database tile x one 128-byte slice of the descriptors ("chunk").
//              When a descriptor is longer than 128 bytes the queries' chunk travels with the
//              stage too; when it fits (SIFT: D = 128) the query tile is loaded once.
//
// uint8 (exact integers): d(a, b) = |a|^2 + |b|^2 - 2 a.b, with a.b from int8 tensor cores:
//   mma.sync.m16n8k32.row.col.s32.u8.u8.s32 (unsigned operands: no -128 shift needed, and
//   the zero padding of the K dimension (D not a multiple of 32) adds exactly 0).
//   Tile BM x BN = 128 x 128; warp tile 32 x 128 = 2 x 16 mma tiles, 128 int32 accumulators
//   per thread; shared tiles are [row][128 bytes] with the 16-byte segments XOR-swizzled by
//   (row & 7), so ldmatrix.x4 is conflict free. For D <= 128 the warp's query fragments
//   (32 registers) are loaded once per block. |a|^2 and |b|^2 come from a pre-pass kernel
//   (int32 per row, in the workspace). Everything fits int32 for D <= 33025: a.b <= D*255^2,
//   and the filter value c = |b|^2 - 2 a.b lies in [-|a|^2, |b|^2] (computed mod 2^32).
// float32: SIMT, acc = fmaf(a_d - b_d, a_d - b_d, acc) over d ascending from +0, exactly the
//   sequence of the CPU kernels' FMA variants (avx2/avx512 builds: bit-identical distances;
//   the SSE2 "base" CPU build rounds the product separately). Tile BM x 64, warp tile 32 x 64,
//   8 x 8 accumulators per thread (rows ty + 4 i, columns tx + 8 j), shared rows padded to
//   36 floats (conflict-free scalar reads).
//
// Fused top-k (k <= 64, never through global memory)
//   Per query a list of k packed keys (distance key << 32 | local index) sorted ascending in
//   shared memory; missing = (INT32_MAX << 32 | 0xffffffff). Distance keys: uint8 the exact
//   int32 distance; float32 the bits with the sign cleared, clamped to 0x7f800001 (NaN after
//   +inf, as match_cpu.cpp). Comparing whole keys gives "ties to the lower index" for free.
//   Epilogue of a database tile: every accumulator is compared with its query's threshold
//   (distance part of the k-th key) kept in registers; uint8 does this per 8-column mma tile
//   with one IMAD + ISETP per value (|a|^2 folded into the threshold). Only when some lane of
//   the warp has a hit (__any_sync) the slow path runs: the lanes sharing a query row insert
//   their hits one lane at a time (insertion into the sorted list, exact 64-bit compare), then
//   the thresholds are re-read. Exactness: a threshold is re-read only after all candidates
//   of lower index were inserted, and a candidate whose distance EQUALS it has a higher index
//   than the k-th entry, so the strict "<" filter never drops a key that belongs in the list.
//
// Ragged groups and the schedule
//   The offsets are host arrays (CPU int64 tensors, as for the CPU kernel). The host splits
//   every group with queries into tiles {q0, q1, db0, ndb} of <= BM queries (a group without
//   database rows still gets tiles: they write +inf / -1), sorts them by decreasing database
//   size (the long ones start first), and copies them into a device workspace: the caller's
//   (ssld_kernels.match takes it from torch's caching allocator, sized by
//   match_knn_cuda_workspace_bytes), else one allocated with cudaMallocAsync on the caller's
//   stream and released with cudaFreeAsync on the same stream after the launch (stream
//   ordered: no synchronisation, no leak on errors). The copy
//   is a cudaMemcpyAsync from pageable memory: the CUDA runtime consumes (stages) a pageable
//   source before the call returns, so the host vector may go away right after (the same
//   thing torch's non_blocking copies from pageable memory rely on). The uint8 row norms live
//   in the same workspace.
//
// Launch: grid = number of tiles, block = 32 * NW threads, dynamic shared memory (NW = 4):
//   uint8   Q (1 or 3 stages) x 16 KB + 3 x 16 KB database + 1.5 KB norms + 128 * k * 8 B lists
//           (k = 2, D <= 128: 67.5 KB; k = 64, D > 128: 161.5 KB)
//   float32 Q (1 or 3) x 18 KB + 3 x 9 KB database + 128 * k * 8 B lists
// The device and stream come from KnnParams (the previous current device is restored).
// Requires compute capability >= 8.0 (cp.async, u8 mma); older GPUs get a readable error.
//
// Performance model (uint8, D = 128, not yet measured): per warp and database tile 128 mma +
// 32 ldmatrix + ~2.4 instructions per distance in the epilogue (~300), so the kernel is
// bound by issue slots about as much as by the tensor cores; ptxas: ~227 registers, 2 blocks
// (8 warps) per SM. Each block streams its group's database once per 128 queries (L2 traffic
// ndb * D bytes per block). wgmma/TMA would need an sm_90a target, which the build does not
// produce ("80-real;90").
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cuda_utils.cuh"
#include "match.h"

namespace ssld {
namespace {

using std::int32_t;
using std::int64_t;
using std::uint32_t;
using u64 = unsigned long long;

constexpr int kStages = 3;           // cp.async pipeline depth
constexpr int kChunkBytes = 128;     // descriptor bytes per stage (uint8: 128 dims, float: 32)
constexpr int kWarpRows = 32;        // queries owned by one warp
constexpr int kMaxWarps = 4;
constexpr int kU8Cols = 128;         // database rows per tile, uint8
constexpr int kF32Cols = 64;         // database rows per tile, float32
constexpr int kF32Pitch = 36 * 4;    // bytes per shared row of the float kernel (32 + 4 floats)
constexpr int32_t kMissingDist = 0x7fffffff;
constexpr uint32_t kNaNKey = 0x7f800001u;  // float keys: +inf is 0x7f800000
constexpr u64 kMissingKey = 0x7fffffffffffffffull;

// One block's work: queries [q0, q1) (global rows) against database rows [db0, db0 + ndb).
struct KTile {
  int64_t q0, q1, db0, ndb;
};

struct KArgs {
  const unsigned char* q;
  int64_t q_pitch;  // bytes
  const unsigned char* db;
  int64_t db_pitch;  // bytes
  int64_t row_bytes;  // dim * element size
  int64_t dim;
  int64_t nk;  // chunks of kChunkBytes per descriptor
  int k;
  const KTile* tiles;
  const int32_t* q_norm;  // uint8 only: |row|^2
  const int32_t* db_norm;
  float* out_dist;
  int64_t* out_idx;
};

// Dynamic shared memory carve-up, shared by the host (size) and the kernels (offsets).
struct SmemLayout {
  int b_off, n_off, keys_off, total;
};

__host__ __device__ inline SmemLayout smem_layout(bool u8, int nw, bool q_resident, int k) {
  const int bm = nw * kWarpRows;
  const int pitch = u8 ? kChunkBytes : kF32Pitch;
  const int cols = u8 ? kU8Cols : kF32Cols;
  SmemLayout l;
  l.b_off = (q_resident ? 1 : kStages) * bm * pitch;
  l.n_off = l.b_off + kStages * cols * pitch;
  l.keys_off = l.n_off + (u8 ? kStages * kU8Cols * 4 : 0);
  l.total = l.keys_off + bm * k * 8;
  return l;
}

// ---------------------------------------------------------------------------------------
// PTX wrappers (sm_80+)
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; bytes [src_bytes, 16) of the destination are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x32 u8, row) * b (32x8 u8, col), int32 accumulation.
__device__ __forceinline__ void mma_u8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------
// Tile loads: rows [0, rows) of a shared tile (pitch dst_pitch bytes) get bytes
// [col0, col0 + 128) of source rows; rows >= valid_rows and bytes >= row_bytes read as 0.
// 8 segments of 16 bytes per row, segment s of row r stored at (s ^ (r & 7)) when swizzled.
// kAligned: every source row starts 16-byte aligned (cp.async); else plain loads.
// ---------------------------------------------------------------------------------------
template <bool kAligned, bool kSwizzle>
__device__ __forceinline__ void load_tile(unsigned char* dst, int dst_pitch, int rows,
                                          const unsigned char* src, int64_t src_pitch,
                                          int64_t valid_rows, int64_t col0, int64_t row_bytes) {
  for (int e = threadIdx.x; e < rows * 8; e += blockDim.x) {
    const int r = e >> 3, seg = e & 7;
    unsigned char* d = dst + r * dst_pitch + ((kSwizzle ? (seg ^ (r & 7)) : seg) << 4);
    const int64_t off = col0 + (seg << 4);
    int n = 0;
    const unsigned char* s = src;  // any aligned address when nothing is read
    if (r < valid_rows && off < row_bytes) {
      n = static_cast<int>(min64(16, row_bytes - off));
      s = src + r * src_pitch + off;
    }
    if (kAligned) {
      cp_async16(d, s, n);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (((reinterpret_cast<std::uintptr_t>(s) | static_cast<std::uintptr_t>(n)) & 3) == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (4 * i < n) w[i] = reinterpret_cast<const uint32_t*>(s)[i];
      } else {
#pragma unroll
        for (int b = 0; b < 16; ++b)
          if (b < n) w[b >> 2] |= static_cast<uint32_t>(s[b]) << (8 * (b & 3));
      }
      *reinterpret_cast<uint4*>(d) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// Inserts key into the ascending list ks[0..k) unless it is not below the k-th key.
__device__ __forceinline__ void list_insert(u64* ks, int k, u64 key) {
  if (key >= ks[k - 1]) return;
  int pos = k - 1;
  while (pos > 0) {
    const u64 prev = ks[pos - 1];
    if (prev < key) break;
    ks[pos] = prev;
    --pos;
  }
  ks[pos] = key;
}

__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t b = __float_as_uint(x) & 0x7fffffffu;
  return b < kNaNKey ? b : kNaNKey;
}

// Writes the lists of the warp's valid rows: dist float32 [.., k] and index int64 [.., k].
template <bool kU8>
__device__ __forceinline__ void write_lists(const KArgs& a, const u64* sk, int warp, int lane,
                                            int64_t q0, int64_t nq) {
  const int k = a.k;
  for (int e = lane; e < kWarpRows * k; e += 32) {
    const int rr = e / k;
    const int j = e - rr * k;
    const int r = warp * kWarpRows + rr;
    if (r >= nq) break;  // rows grow with e
    const u64 key = sk[r * k + j];
    const uint32_t dk = static_cast<uint32_t>(key >> 32);
    const int64_t o = (q0 + r) * k + j;
    float d;
    int64_t idx;
    if (dk == static_cast<uint32_t>(kMissingDist)) {
      d = __int_as_float(0x7f800000);  // +inf
      idx = -1;
    } else {
      if (kU8)
        d = __int2float_rn(static_cast<int32_t>(dk));
      else
        d = dk == kNaNKey ? __int_as_float(0x7fc00000) : __uint_as_float(dk);
      idx = static_cast<int64_t>(static_cast<uint32_t>(key));
    }
    a.out_dist[o] = d;
    a.out_idx[o] = idx;
  }
}

// Producer/consumer position in the (database tile, chunk) stage sequence.
struct StagePos {
  int64_t t = 0;  // database tile
  int64_t c = 0;  // chunk
  int buf = 0;    // shared stage buffer
  __device__ __forceinline__ void next(int64_t nk) {
    if (++buf == kStages) buf = 0;
    if (++c == nk) {
      c = 0;
      ++t;
    }
  }
};

// ---------------------------------------------------------------------------------------
// uint8 kernel: int8 tensor cores + fused top-k.
// ---------------------------------------------------------------------------------------
template <bool kAligned>
__global__ void __launch_bounds__(kMaxWarps * 32) knn_u8_kernel(const KArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  const int nw = blockDim.x >> 5;
  const int bm = nw * kWarpRows;
  const int k = a.k;
  const int64_t nk = a.nk;
  const bool q_resident = nk == 1;
  const SmemLayout lay = smem_layout(true, nw, q_resident, k);
  unsigned char* sq = smem;
  unsigned char* sb = smem + lay.b_off;
  int32_t* sn = reinterpret_cast<int32_t*>(smem + lay.n_off);
  u64* sk = reinterpret_cast<u64*>(smem + lay.keys_off);

  const KTile tile = a.tiles[blockIdx.x];
  const int64_t nq = tile.q1 - tile.q0;  // 1 .. bm
  const int64_t ndb = tile.ndb;
  const int64_t total = (ndb + kU8Cols - 1) / kU8Cols * nk;  // stages
  const unsigned char* qsrc = a.q + tile.q0 * a.q_pitch;
  const unsigned char* dbsrc = a.db + tile.db0 * a.db_pitch;  // read only when ndb > 0

  for (int e = threadIdx.x; e < bm * k; e += blockDim.x) sk[e] = kMissingKey;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  // Accumulator rows of this lane: slot = 2 * mt + h -> row warp*32 + 16 mt + 8 h + g.
  // thr[slot] = (distance of the row's k-th key) - |a|^2; INT_MIN for rows past the tile.
  int32_t na[4], thr[4];
  int row_ok = 0;
#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    const int r = warp * kWarpRows + (slot >> 1) * 16 + (slot & 1) * 8 + g;
    na[slot] = 0;
    thr[slot] = INT_MIN;
    if (r < nq) {
      na[slot] = a.q_norm[tile.q0 + r];
      thr[slot] = kMissingDist - na[slot];
      row_ok |= 1 << slot;
    }
  }

  auto produce = [&](int64_t s, const StagePos& ps) {
    if (s < total) {
      if (!q_resident)
        load_tile<kAligned, true>(sq + ps.buf * bm * kChunkBytes, kChunkBytes, bm, qsrc,
                                  a.q_pitch, nq, ps.c * kChunkBytes, a.row_bytes);
      const int64_t base = ps.t * kU8Cols;
      const int64_t rows = min64(kU8Cols, ndb - base);
      load_tile<kAligned, true>(sb + ps.buf * kU8Cols * kChunkBytes, kChunkBytes, kU8Cols,
                                dbsrc + base * a.db_pitch, a.db_pitch, rows,
                                ps.c * kChunkBytes, a.row_bytes);
      if (ps.c == nk - 1) {  // database norms, read by this tile's epilogue
        for (int j = threadIdx.x; j < kU8Cols; j += blockDim.x) {
          const bool ok = j < rows;
          cp_async4(sn + ps.buf * kU8Cols + j, ok ? a.db_norm + tile.db0 + base + j : a.db_norm,
                    ok ? 4 : 0);
        }
      }
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform
  };

  StagePos prod, cons;
  int64_t next_s = 0;
  if (total > 0) {
    if (q_resident)
      load_tile<kAligned, true>(sq, kChunkBytes, bm, qsrc, a.q_pitch, nq, 0, a.row_bytes);
    for (int i = 0; i < kStages - 1; ++i) {
      produce(next_s++, prod);
      prod.next(nk);
    }
  }
  __syncthreads();  // list initialisation visible to every warp

  int32_t acc[2][16][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0;
  uint32_t afr[2][4][4];
  bool a_loaded = false;
  const bool warp_active = warp * kWarpRows < nq;  // warp-uniform

  for (int64_t s = 0; s < total; ++s) {
    cp_async_wait<kStages - 2>();  // stage s has landed (this thread's copies) ...
    __syncthreads();               // ... and everybody's; stage s-1's buffer is free
    produce(next_s++, prod);
    prod.next(nk);

    const int buf = cons.buf;
    if (!warp_active) {  // every row of this warp is past the tile: only help with the loads
      cons.next(nk);
      continue;
    }
    if (!q_resident || !a_loaded) {
      const unsigned char* qs = sq + (q_resident ? 0 : buf * bm * kChunkBytes);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          // matrices: (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (8-15, 16-31)
          const int row = warp * kWarpRows + mt * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
          const int seg = ks * 2 + (lane >> 4);
          ldmatrix_x4(afr[mt][ks], qs + row * kChunkBytes + ((seg ^ (row & 7)) << 4));
        }
      a_loaded = true;
    }
    const int nks = static_cast<int>((min64(kChunkBytes, a.row_bytes - cons.c * kChunkBytes) + 31) >> 5);
    const unsigned char* bs = sb + buf * kU8Cols * kChunkBytes;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      if (ks < nks) {
#pragma unroll
        for (int np = 0; np < 8; ++np) {
          // matrices: (n-tile 2np, k 0-15), (2np, k 16-31), (2np+1, k 0-15), (2np+1, k 16-31)
          const int row = np * 16 + (lane >> 4) * 8 + (lane & 7);
          const int seg = ks * 2 + ((lane >> 3) & 1);
          uint32_t bf[4];
          ldmatrix_x4(bf, bs + row * kChunkBytes + ((seg ^ (row & 7)) << 4));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_u8(acc[mt][2 * np], afr[mt][ks], bf[0], bf[1]);
            mma_u8(acc[mt][2 * np + 1], afr[mt][ks], bf[2], bf[3]);
          }
        }
      }
    }

    if (cons.c == nk - 1) {  // the tile's distances are complete: top-k epilogue
      const int64_t base = cons.t * kU8Cols;
      const int nvalid = static_cast<int>(min64(kU8Cols, ndb - base));
      const int32_t* ns = sn + buf * kU8Cols;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const int col = nt * 8 + tig * 2;
        const int2 nb = *reinterpret_cast<const int2*>(ns + col);
        // c = |b|^2 - 2 a.b (exact, see the header); hit when c + |a|^2 < k-th distance
        int32_t cv[2][4];
        bool hit = false;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const uint32_t nbe = static_cast<uint32_t>((e & 1) ? nb.y : nb.x);
            cv[mt][e] = static_cast<int32_t>(nbe - 2u * static_cast<uint32_t>(acc[mt][nt][e]));
            hit |= cv[mt][e] < thr[mt * 2 + (e >> 1)];
          }
        if (__any_sync(0xffffffffu, hit)) {
          // the 4 lanes of a quad share their rows: they insert one after the other
#pragma unroll 1
          for (int ph = 0; ph < 4; ++ph) {
            if (tig == ph) {
#pragma unroll
              for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  const int slot = mt * 2 + (e >> 1);
                  const int j = col + (e & 1);
                  if (cv[mt][e] < thr[slot] && j < nvalid) {
                    const int r = warp * kWarpRows + mt * 16 + (e >> 1) * 8 + g;
                    const uint32_t d = static_cast<uint32_t>(cv[mt][e]) + static_cast<uint32_t>(na[slot]);
                    list_insert(sk + r * k, k,
                                (static_cast<u64>(d) << 32) | static_cast<uint32_t>(base + j));
                  }
                }
            }
            __syncwarp();
          }
#pragma unroll
          for (int slot = 0; slot < 4; ++slot) {
            if (row_ok & (1 << slot)) {
              const int r = warp * kWarpRows + (slot >> 1) * 16 + (slot & 1) * 8 + g;
              thr[slot] = static_cast<int32_t>(sk[r * k + k - 1] >> 32) - na[slot];
            }
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0;
    }
    cons.next(nk);
  }
  cp_async_wait<0>();
  __syncwarp();
  write_lists<true>(a, sk, warp, lane, tile.q0, nq);
#endif
}

// ---------------------------------------------------------------------------------------
// float32 kernel: SIMT FMA in the CPU's order + fused top-k.
// ---------------------------------------------------------------------------------------
template <bool kAligned>
__global__ void __launch_bounds__(kMaxWarps * 32) knn_f32_kernel(const KArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kPitchF = kF32Pitch / 4;
  const int nw = blockDim.x >> 5;
  const int bm = nw * kWarpRows;
  const int k = a.k;
  const int64_t nk = a.nk;
  const bool q_resident = nk == 1;
  const SmemLayout lay = smem_layout(false, nw, q_resident, k);
  unsigned char* sq = smem;
  unsigned char* sb = smem + lay.b_off;
  u64* sk = reinterpret_cast<u64*>(smem + lay.keys_off);

  const KTile tile = a.tiles[blockIdx.x];
  const int64_t nq = tile.q1 - tile.q0;
  const int64_t ndb = tile.ndb;
  const int64_t total = (ndb + kF32Cols - 1) / kF32Cols * nk;
  const unsigned char* qsrc = a.q + tile.q0 * a.q_pitch;
  const unsigned char* dbsrc = a.db + tile.db0 * a.db_pitch;

  for (int e = threadIdx.x; e < bm * k; e += blockDim.x) sk[e] = kMissingKey;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ty = lane >> 3, tx = lane & 7;
  // rows of this thread: warp*32 + ty + 4 i (i < 8); columns tx + 8 j (j < 8)
  // thr[i]: distance key of row i's k-th entry; 0 (nothing passes) for rows past the tile
  uint32_t thr[8];
  int row_ok = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const bool ok = warp * kWarpRows + ty + 4 * i < nq;
    thr[i] = ok ? static_cast<uint32_t>(kMissingDist) : 0u;
    row_ok |= ok ? 1 << i : 0;
  }

  auto produce = [&](int64_t s, const StagePos& ps) {
    if (s < total) {
      if (!q_resident)
        load_tile<kAligned, false>(sq + ps.buf * bm * kF32Pitch, kF32Pitch, bm, qsrc, a.q_pitch,
                                   nq, ps.c * kChunkBytes, a.row_bytes);
      const int64_t base = ps.t * kF32Cols;
      load_tile<kAligned, false>(sb + ps.buf * kF32Cols * kF32Pitch, kF32Pitch, kF32Cols,
                                 dbsrc + base * a.db_pitch, a.db_pitch,
                                 min64(kF32Cols, ndb - base), ps.c * kChunkBytes, a.row_bytes);
    }
    cp_async_commit();
  };

  StagePos prod, cons;
  int64_t next_s = 0;
  if (total > 0) {
    if (q_resident)
      load_tile<kAligned, false>(sq, kF32Pitch, bm, qsrc, a.q_pitch, nq, 0, a.row_bytes);
    for (int i = 0; i < kStages - 1; ++i) {
      produce(next_s++, prod);
      prod.next(nk);
    }
  }
  __syncthreads();

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  const bool warp_active = warp * kWarpRows < nq;  // warp-uniform

  for (int64_t s = 0; s < total; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    produce(next_s++, prod);
    prod.next(nk);

    const int buf = cons.buf;
    if (!warp_active) {
      cons.next(nk);
      continue;
    }
    const float* qa = reinterpret_cast<const float*>(sq + (q_resident ? 0 : buf * bm * kF32Pitch)) +
                      (warp * kWarpRows + ty) * kPitchF;
    const float* bb = reinterpret_cast<const float*>(sb + buf * kF32Cols * kF32Pitch) + tx * kPitchF;
    const int nd = static_cast<int>(min64(kChunkBytes / 4, a.dim - cons.c * (kChunkBytes / 4)));
    auto step = [&](int dd) {
      float av[8], bv[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = qa[4 * i * kPitchF + dd];
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = bb[8 * j * kPitchF + dd];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float df = __fsub_rn(av[i], bv[j]);
          acc[i][j] = __fmaf_rn(df, df, acc[i][j]);
        }
    };
    if (nd == kChunkBytes / 4) {
#pragma unroll 4
      for (int dd = 0; dd < kChunkBytes / 4; ++dd) step(dd);
    } else {
#pragma unroll 1
      for (int dd = 0; dd < nd; ++dd) step(dd);
    }

    if (cons.c == nk - 1) {
      const int64_t base = cons.t * kF32Cols;
      const int nvalid = static_cast<int>(min64(kF32Cols, ndb - base));
      bool hit = false;
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) hit |= float_key(acc[i][j]) < thr[i];
      if (__any_sync(0xffffffffu, hit)) {
        // the 8 lanes with the same ty share their rows: they insert one after the other
#pragma unroll 1
        for (int ph = 0; ph < 8; ++ph) {
          if (tx == ph) {
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                const uint32_t key = float_key(acc[i][j]);
                const int col = tx + 8 * j;
                if (key < thr[i] && col < nvalid) {
                  const int r = warp * kWarpRows + ty + 4 * i;
                  list_insert(sk + r * k, k,
                              (static_cast<u64>(key) << 32) | static_cast<uint32_t>(base + col));
                }
              }
          }
          __syncwarp();
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (row_ok & (1 << i))
            thr[i] = static_cast<uint32_t>(sk[(warp * kWarpRows + ty + 4 * i) * k + k - 1] >> 32);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
    cons.next(nk);
  }
  cp_async_wait<0>();
  __syncwarp();
  write_lists<false>(a, sk, warp, lane, tile.q0, nq);
#endif
}

// |row|^2 of uint8 rows (exact int32, dim <= 33025), one warp per row.
__global__ void u8_norms_kernel(const unsigned char* x, int64_t pitch, int64_t nrows, int64_t dim,
                                int32_t* out) {
  const int lane = threadIdx.x & 31;
  const int64_t wstride = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < nrows;
       r += wstride) {
    const unsigned char* row = x + r * pitch;
    uint32_t s = 0;
    for (int64_t d = lane; d < dim; d += 32) {
      const uint32_t v = row[d];
      s += v * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out[r] = static_cast<int32_t>(s);
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------
void check_cuda(cudaError_t err, const char* what) { cuda_check(err, "match_knn", what); }

// Device workspace released in stream order (also when a later step throws). Devices without
// the stream-ordered allocator (cudaMallocAsync not supported) fall back to cudaMalloc and a
// cudaFree after synchronising the stream.
class StreamBuffer {
 public:
  StreamBuffer(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    const cudaError_t err = cudaMallocAsync(&ptr_, bytes, stream);
    if (err == cudaErrorNotSupported) {
      cudaGetLastError();  // clear it
      ptr_ = nullptr;
      async_ = false;
      check_cuda(cudaMalloc(&ptr_, bytes), "cudaMalloc (workspace)");
    } else {
      check_cuda(err, "cudaMallocAsync (workspace)");
    }
  }
  ~StreamBuffer() {
    if (ptr_ == nullptr) return;
    if (async_) {
      cudaFreeAsync(ptr_, stream_);
    } else {
      cudaStreamSynchronize(stream_);
      cudaFree(ptr_);
    }
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  unsigned char* get() const { return static_cast<unsigned char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
  bool async_ = true;
};

// The checks of match_knn_cpu (csrc/match.h), plus the limits of this kernel.
void check_knn_params_cuda(const KnnParams& p) {
  check_knn_params(p);
  const auto* db_off = reinterpret_cast<const int64_t*>(p.db_off);
  for (int64_t g = 0; g < p.n_groups; ++g) {
    // local indices travel as 32 bits in the sort keys
    if (db_off[g + 1] - db_off[g] > INT32_MAX)
      throw std::invalid_argument("match_knn (cuda): group " + std::to_string(g) + " has " +
                                  std::to_string(db_off[g + 1] - db_off[g]) +
                                  " database rows; at most 2^31 - 1 per group");
  }
}

bool rows_aligned16(std::uintptr_t ptr, int64_t pitch_bytes, int64_t n_rows) {
  if (ptr % 16 != 0) return false;
  return n_rows <= 1 || pitch_bytes % 16 == 0;
}

std::size_t round_up(std::size_t x, std::size_t m) { return (x + m - 1) / m * m; }

void launch_norms(const unsigned char* x, int64_t pitch, int64_t nrows, int64_t dim, int32_t* out,
                  cudaStream_t stream) {
  if (nrows == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((nrows + kThreads / 32 - 1) / (kThreads / 32), 1 << 16);
  u8_norms_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(x, pitch, nrows, dim,
                                                                            out);
}

template <typename Kernel>
void launch_knn(Kernel kernel, const KArgs& args, int64_t n_tiles, int nw, int smem,
                cudaStream_t stream) {
  // The GIL is released around the kernel call: setting the shared-memory limit and
  // launching must not interleave with another thread's call of the same kernel.
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute (shared memory)");
  kernel<<<static_cast<unsigned int>(n_tiles), nw * 32, smem, stream>>>(args);
}

// What a call runs: kernel shape (warps per block, shared memory) and the tile schedule:
// tiles of <= 16 * nw queries of one group, largest database first. Reads device attributes
// (call under a DeviceGuard) and throws the kernel's limits as invalid_argument.
struct KnnPlan {
  bool u8 = true;
  int64_t esize = 1, row_bytes = 0, nk = 0;
  int nw = kMaxWarps, smem = 0;
  std::size_t n_tiles = 0;
  std::vector<KTile> tiles;  // the schedule (when asked for)
  std::size_t tiles_bytes = 0, qn_bytes = 0, dbn_bytes = 0;  // workspace: [tiles | norms]
  std::size_t workspace_bytes() const {
    return n_tiles == 0 ? 0 : tiles_bytes + qn_bytes + dbn_bytes;
  }
};

KnnPlan plan_knn(const KnnParams& p, bool schedule = true) {
  const auto* q_off = reinterpret_cast<const int64_t*>(p.q_off);
  const auto* db_off = reinterpret_cast<const int64_t*>(p.db_off);
  int cc_major = 0, cc_minor = 0, smem_optin = 0;
  check_cuda(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, p.device),
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, p.device),
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device),
             "cudaDeviceGetAttribute");
  if (cc_major < 8)
    throw std::invalid_argument("match_knn: the cuda backend needs compute capability >= 8.0 "
                                "(cp.async, int8 mma); device " + std::to_string(p.device) +
                                " is " + std::to_string(cc_major) + "." +
                                std::to_string(cc_minor) + " (use backend 'triton' or 'torch')");
  KnnPlan plan;
  plan.u8 = p.dtype == kUInt8;
  plan.esize = plan.u8 ? 1 : 4;
  plan.row_bytes = p.dim * plan.esize;
  plan.nk = (plan.row_bytes + kChunkBytes - 1) / kChunkBytes;
  const bool q_resident = plan.nk == 1;
  while (plan.nw > 1 && smem_layout(plan.u8, plan.nw, q_resident, p.k).total > smem_optin)
    plan.nw >>= 1;
  plan.smem = smem_layout(plan.u8, plan.nw, q_resident, p.k).total;
  if (plan.smem > smem_optin)
    throw std::runtime_error("match_knn (cuda): needs " + std::to_string(plan.smem) +
                             " bytes of shared memory per block for k = " + std::to_string(p.k) +
                             ", the device allows " + std::to_string(smem_optin));
  const int64_t bm = int64_t{plan.nw} * kWarpRows;
  std::size_t n_tiles = 0;
  for (int64_t g = 0; g < p.n_groups; ++g) n_tiles += (q_off[g + 1] - q_off[g] + bm - 1) / bm;
  if (n_tiles > static_cast<std::size_t>(INT32_MAX))
    throw std::invalid_argument("match_knn (cuda): too many query tiles");
  plan.n_tiles = n_tiles;
  if (schedule) {  // (the workspace size needs only the count)
    plan.tiles.reserve(n_tiles);
    for (int64_t g = 0; g < p.n_groups; ++g) {
      const int64_t ndb = db_off[g + 1] - db_off[g];
      for (int64_t q0 = q_off[g]; q0 < q_off[g + 1]; q0 += bm)
        plan.tiles.push_back(KTile{q0, std::min(q0 + bm, q_off[g + 1]), db_off[g], ndb});
    }
    std::stable_sort(plan.tiles.begin(), plan.tiles.end(),
                     [](const KTile& x, const KTile& y) { return x.ndb > y.ndb; });
  }
  plan.tiles_bytes = round_up(n_tiles * sizeof(KTile), 256);
  plan.qn_bytes = plan.u8 ? round_up(static_cast<std::size_t>(p.nq_total) * 4, 256) : 0;
  plan.dbn_bytes = plan.u8 ? static_cast<std::size_t>(p.ndb_total) * 4 : 0;
  return plan;
}

}  // namespace

std::size_t match_knn_cuda_workspace_bytes(const KnnParams& p) {
  check_knn_params_cuda(p);
  if (p.nq_total == 0) return 0;
  DeviceGuard guard(p.device, "match_knn");
  return plan_knn(p, /*schedule=*/false).workspace_bytes();
}

void match_knn_cuda(const KnnParams& p) {
  check_knn_params_cuda(p);
  if (p.nq_total == 0) return;
  DeviceGuard guard(p.device, "match_knn");
  cudaGetLastError();  // drop errors left by earlier failed calls (sticky errors resurface)
  const KnnPlan plan = plan_knn(p);
  if (plan.tiles.empty()) return;
  const bool u8 = plan.u8;
  const int nw = plan.nw, smem = plan.smem;
  const auto& tiles = plan.tiles;
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const std::size_t tiles_bytes = plan.tiles_bytes, qn_bytes = plan.qn_bytes;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  // The host-built schedule cannot be recorded into a CUDA graph (its buffer is freed).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone)
    throw std::invalid_argument(
        "match_knn (cuda): cannot run under CUDA graph capture (host-built tile schedule)");
  // Workspace: the caller's (torch's caching allocator: match.py asks for
  // match_knn_cuda_workspace_bytes), else our own, released in stream order.
  std::unique_ptr<StreamBuffer> own;
  unsigned char* ws = reinterpret_cast<unsigned char*>(p.workspace);
  if (ws == nullptr) {
    own = std::make_unique<StreamBuffer>(plan.workspace_bytes(), stream);
    ws = own->get();
  } else if (p.workspace_bytes < plan.workspace_bytes()) {
    throw std::invalid_argument("match_knn (cuda): workspace of " +
                                std::to_string(p.workspace_bytes) + " bytes, " +
                                std::to_string(plan.workspace_bytes()) + " needed");
  } else if (p.workspace % 256 != 0) {  // tiles (int64) and norms are read from it
    throw std::invalid_argument("match_knn (cuda): the workspace must be 256-byte aligned");
  }
  // Pageable source: consumed before cudaMemcpyAsync returns (see the header comment).
  check_cuda(cudaMemcpyAsync(ws, tiles.data(), tiles.size() * sizeof(KTile),
                             cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (schedule)");

  KArgs args;
  args.q = reinterpret_cast<const unsigned char*>(p.q);
  args.q_pitch = p.q_stride * plan.esize;
  args.db = reinterpret_cast<const unsigned char*>(p.db);
  args.db_pitch = p.db_stride * plan.esize;
  args.row_bytes = plan.row_bytes;
  args.dim = p.dim;
  args.nk = plan.nk;
  args.k = p.k;
  args.tiles = reinterpret_cast<const KTile*>(ws);
  args.q_norm = u8 ? reinterpret_cast<const int32_t*>(ws + tiles_bytes) : nullptr;
  args.db_norm = u8 ? reinterpret_cast<const int32_t*>(ws + tiles_bytes + qn_bytes) : nullptr;
  args.out_dist = reinterpret_cast<float*>(p.out_dist);
  args.out_idx = reinterpret_cast<int64_t*>(p.out_idx);

  const bool aligned = rows_aligned16(p.q, args.q_pitch, p.nq_total) &&
                       (p.ndb_total == 0 || rows_aligned16(p.db, args.db_pitch, p.ndb_total));
  if (u8) {
    launch_norms(args.q, args.q_pitch, p.nq_total, p.dim, const_cast<int32_t*>(args.q_norm), stream);
    launch_norms(args.db, args.db_pitch, p.ndb_total, p.dim, const_cast<int32_t*>(args.db_norm),
                 stream);
    check_cuda(cudaGetLastError(), "norm kernel launch");
    if (aligned)
      launch_knn(knn_u8_kernel<true>, args, n_tiles, nw, smem, stream);
    else
      launch_knn(knn_u8_kernel<false>, args, n_tiles, nw, smem, stream);
  } else {
    if (aligned)
      launch_knn(knn_f32_kernel<true>, args, n_tiles, nw, smem, stream);
    else
      launch_knn(knn_f32_kernel<false>, args, n_tiles, nw, smem, stream);
  }
  check_cuda(cudaGetLastError(), "match kernel launch");
}

}  // namespace ssld
