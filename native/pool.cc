// The CPU kernels' worker threads (declared in gemm_common.h), one set per process, shared by every ISA's GEMM
// and op kernels. Compiled with the baseline flags only.
//
// OpenMP served before. Its idle threads either spin for milliseconds (libgomp's default), which on machines
// with few cores stole the CPU from everything else in the process, or, with a short GOMP_SPINCOUNT, went to
// sleep between kernels, and waking one costs tens of microseconds on a virtual machine: as much as a whole
// decode-sized kernel, a few hundred of which make one decoding step. These workers spin for a while after
// each task (LOWRANK_SPIN_US, default 200 microseconds), then sleep: the kernels of one step or layer find
// them awake, and idle gaps longer than that leave the CPU to others.
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "gemm_common.h"

namespace lowrank {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Pool {
 public:
  void run(int tasks, PoolFn fn, void* ctx) {
    if (tasks <= 1 || busy_.exchange(true, std::memory_order_acquire)) {
      // one task, or another thread (or an enclosing task) has the workers: the caller runs them all
      for (int t = 0; t < tasks; ++t) fn(ctx, t);
      return;
    }
    while (workers_ < tasks - 1) spawn();
    fn_ = fn;
    ctx_ = ctx;
    tasks_ = tasks;
    pending_.store(workers_, std::memory_order_relaxed);
    gen_.fetch_add(1);  // seq_cst: pairs with a worker's check before it sleeps
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    fn(ctx, 0);
    while (pending_.load(std::memory_order_acquire) > 0) cpu_relax();
    busy_.store(false, std::memory_order_release);
  }

 private:
  void spawn() {
    const int id = ++workers_;
    const uint64_t g0 = gen_.load();  // the generation before the task it is spawned for
    std::thread([this, id, g0] { work(id, g0); }).detach();
  }

  void work(int id, uint64_t seen) {
    const char* e = getenv("LOWRANK_SPIN_US");
    const int64_t spin_ns = (e ? atoll(e) : 200) * 1000;
    for (;;) {
      uint64_t g;
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 1; (g = gen_.load()) == seen; ++i) {
        cpu_relax();
        if (i % 64 == 0 &&
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count() >
                spin_ns) {
          std::unique_lock<std::mutex> lk(mu_);
          ++sleepers_;
          cv_.wait(lk, [&] { return gen_.load() != seen; });
          --sleepers_;
          t0 = std::chrono::steady_clock::now();
        }
      }
      seen = g;
      if (id < tasks_) fn_(ctx_, id);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0}, sleepers_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int workers_ = 0, tasks_ = 0;
  PoolFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

}  // namespace

void pool_run(int tasks, PoolFn fn, void* ctx) {
  static Pool* pool = new Pool();  // never destroyed: its detached workers outlive static destruction
  pool->run(tasks, fn, ctx);
}

}  // namespace lowrank
