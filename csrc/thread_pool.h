// A small persistent thread pool for the CPU kernels (header-only, one process-wide instance).
//
//   ssld::parallel_for(n, num_threads, [&](std::int64_t begin, std::int64_t end) { ... });
//
// splits [0, n) into min(n, num_threads) contiguous chunks of near-equal size and runs them on
// the calling thread plus num_threads - 1 pool workers, returning when all chunks are done.
// The first exception thrown by a chunk is rethrown in the caller. Calls from inside a chunk
// (nested) run serially; concurrent calls from several threads are serialised.
//
// We do not use OpenMP: PyTorch ships its own libgomp and two OpenMP runtimes in one process
// conflict. Workers spin briefly after each job (kernels called back to back, as matching
// does, then skip the wake-up) unless the job says not to, and then sleep on a condition
// variable.
//
// The singleton is created on first use and intentionally never destroyed (destroying
// threads during interpreter shutdown is a classic source of hangs); a forked child (e.g. a
// DataLoader worker) has no worker threads, so it detects the new pid and builds a fresh pool.
//
// This header is shared by every ISA variant of the kernels (one pool for all of them). Its
// inline functions are compiled in each ISA's object and the linker keeps one copy, the first
// in link order: link the baseline object first (CMakeLists.txt lists base, avx2, avx512), so
// that the copy kept never needs AVX. The per-ISA lambdas reach the pool type-erased through a
// function pointer and stay in their own translation units.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>

#include <unistd.h>

namespace ssld {
namespace detail {

inline bool& in_parallel_region() {
  static thread_local bool flag = false;
  return flag;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

class ThreadPool {
 public:
  using ChunkFn = void (*)(void* ctx, std::int64_t begin, std::int64_t end);
  static constexpr int kMaxThreads = 1024;
  static constexpr int kSpinIters = 20000;  // ~0.5-1 ms of pause before sleeping

  ThreadPool() : pid_(::getpid()) {}
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  pid_t pid() const { return pid_; }

  // Runs fn(ctx, begin, end) over min(n, num_threads) contiguous chunks of [0, n). With
  // spin_after false the workers sleep as soon as the job is done instead of spinning first
  // (for jobs that PyTorch ops usually follow: spinning workers would hold cores they need).
  void run(std::int64_t n, int num_threads, ChunkFn fn, void* ctx, bool spin_after = true) {
    if (n <= 0) return;
    const std::int64_t chunks64 = std::min<std::int64_t>(
        n, std::min<std::int64_t>(std::max(num_threads, 1), kMaxThreads));
    const int chunks = static_cast<int>(chunks64);
    if (chunks <= 1 || in_parallel_region()) {
      run_serial(n, fn, ctx);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mutex_);
    ensure_workers(chunks - 1);
    std::uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mutex_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      nchunks_ = chunks;
      error_ = nullptr;
      spin_after_.store(spin_after, std::memory_order_relaxed);
      pending_.store(chunks, std::memory_order_relaxed);
      active_workers_.store(chunks - 1, std::memory_order_relaxed);
      gen = generation_.load(std::memory_order_relaxed) + 1;
      // claim word: generation in the high 32 bits, chunks left to claim in the low 32 bits
      claim_.store((gen << 32) | static_cast<std::uint64_t>(chunks), std::memory_order_relaxed);
      generation_.store(gen, std::memory_order_release);
    }
    wake_cv_.notify_all();
    work(gen);
    // wait for the chunks the workers claimed
    for (int i = 0; i < kSpinIters && pending_.load(std::memory_order_acquire) != 0; ++i) cpu_relax();
    if (pending_.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lk(mutex_);
      done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    std::exception_ptr err;
    {
      std::lock_guard<std::mutex> lk(mutex_);
      err = error_;
      error_ = nullptr;
    }
    if (err) std::rethrow_exception(err);
  }

 private:
  static void run_serial(std::int64_t n, ChunkFn fn, void* ctx) {
    bool& flag = in_parallel_region();
    const bool saved = flag;
    flag = true;
    try {
      fn(ctx, 0, n);
    } catch (...) {
      flag = saved;
      throw;
    }
    flag = saved;
  }

  // Workers are detached: the pool lives until the process exits, and they only ever block
  // on its condition variable.
  void ensure_workers(int count) {
    while (num_workers_ < count) {
      const int idx = num_workers_;
      const std::uint64_t seen = generation_.load(std::memory_order_acquire);
      std::thread([this, idx, seen] { worker_loop(idx, seen); }).detach();
      ++num_workers_;
    }
  }

  // Claims and runs chunks of generation gen until none is left.
  void work(std::uint64_t gen) {
    bool& flag = in_parallel_region();
    const bool saved = flag;
    flag = true;
    for (;;) {
      std::uint64_t cur = claim_.load(std::memory_order_acquire);
      bool claimed = false;
      while ((cur >> 32) == (gen & 0xffffffffu) && (cur & 0xffffffffu) != 0) {
        if (claim_.compare_exchange_weak(cur, cur - 1, std::memory_order_acq_rel,
                                         std::memory_order_acquire)) {
          claimed = true;
          break;
        }
      }
      if (!claimed) break;
      // the job cannot finish before this chunk does, so its fields are stable here
      const int chunk = nchunks_ - static_cast<int>(cur & 0xffffffffu);
      const std::int64_t begin = n_ * chunk / nchunks_;
      const std::int64_t end = n_ * (chunk + 1) / nchunks_;
      try {
        fn_(ctx_, begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        { std::lock_guard<std::mutex> lk(mutex_); }
        done_cv_.notify_all();
      }
    }
    flag = saved;
  }

  void worker_loop(int idx, std::uint64_t seen) {
    for (;;) {
      std::uint64_t gen = seen;
      const int spin = spin_after_.load(std::memory_order_relaxed) ? kSpinIters : 0;
      for (int i = 0; i < spin; ++i) {
        gen = generation_.load(std::memory_order_acquire);
        if (gen != seen) break;
        cpu_relax();
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lk(mutex_);
        wake_cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        gen = generation_.load(std::memory_order_acquire);
      }
      seen = gen;
      // workers beyond what this job asked for go back to waiting (a hint: claims are checked)
      if (idx < active_workers_.load(std::memory_order_relaxed)) work(gen);
    }
  }

  const pid_t pid_;
  std::mutex call_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_cv_;
  std::condition_variable done_cv_;
  int num_workers_ = 0;  // guarded by call_mutex_
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<std::uint64_t> claim_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> active_workers_{0};
  std::atomic<bool> spin_after_{true};  // the last job's choice (see run)
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::int64_t n_ = 0;
  int nchunks_ = 0;
  std::exception_ptr error_;
};

// The process-wide pool (created on first use, never destroyed; rebuilt in a forked child).
inline ThreadPool& global_thread_pool() {
  static std::atomic<ThreadPool*> instance{nullptr};
  static std::mutex create_mutex;
  ThreadPool* p = instance.load(std::memory_order_acquire);
  if (p != nullptr && p->pid() == ::getpid()) return *p;
  std::lock_guard<std::mutex> lk(create_mutex);
  p = instance.load(std::memory_order_acquire);
  if (p == nullptr || p->pid() != ::getpid()) {
    p = new ThreadPool();  // the parent's pool (if any) is leaked on purpose: its threads are gone
    instance.store(p, std::memory_order_release);
  }
  return *p;
}

}  // namespace detail

// Runs fn(begin, end) over min(n, num_threads) contiguous chunks of [0, n) in parallel;
// spin_after: see ThreadPool::run.
template <class F>
inline void parallel_for(std::int64_t n, int num_threads, F&& fn, bool spin_after = true) {
  using Fn = std::remove_reference_t<F>;
  if (n <= 0) return;
  if (num_threads <= 1 || n == 1 || detail::in_parallel_region()) {
    fn(std::int64_t{0}, n);
    return;
  }
  detail::global_thread_pool().run(
      n, num_threads,
      [](void* ctx, std::int64_t begin, std::int64_t end) { (*static_cast<Fn*>(ctx))(begin, end); },
      const_cast<void*>(static_cast<const void*>(&fn)), spin_after);
}

}  // namespace ssld
