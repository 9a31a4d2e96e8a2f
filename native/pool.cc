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
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "gemm_common.h"

namespace lowrank {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Read-ahead of streamed regions: the range [next, end) the idle workers still have to read, under a spin lock.
class ReadAhead {
 public:
  void add_region(const char* b, const char* e) {
    lock();
    regions_.push_back({b, e});
    unlock();
  }
  // Removes the region, drops any read-ahead inside it, and returns once no thread is reading.
  void remove_region(const char* b) {
    lock();
    for (size_t i = 0; i < regions_.size(); ++i)
      if (regions_[i].b == b) {
        if (next_ >= regions_[i].b && next_ < regions_[i].e) next_ = end_ = nullptr;
        regions_.erase(regions_.begin() + (long)i);
        break;
      }
    unlock();
    while (reading_.load(std::memory_order_acquire) > 0) cpu_relax();
  }
  void after_read(const char* p, size_t n, size_t ahead) {
    const char* from = p + n;
    lock();
    for (const Region& r : regions_)
      if (p >= r.b && p < r.e) {
        next_ = from < r.e ? from : r.e;
        end_ = (size_t)(r.e - next_) < ahead ? r.e : next_ + ahead;
        break;
      }
    unlock();
  }
  // One chunk of the pending read-ahead, if any: returns whether there was one.
  bool read_chunk() {
    if (next_ == end_) return false;  // racy peek; the claim below is under the lock
    lock();
    const char* b = next_;
    const char* e = end_;
    if (b == e) {
      unlock();
      return false;
    }
    const char* c = (size_t)(e - b) < kChunk ? e : b + kChunk;
    next_ = c;
    reading_.fetch_add(1, std::memory_order_acquire);
    unlock();
    uint64_t acc = 0;
    for (const char* q = b; q < c; q += 64) acc += *(const volatile uint64_t*)q;
    sink_ = sink_ + acc;
    reading_.fetch_sub(1, std::memory_order_release);
    return true;
  }

 private:
  struct Region {
    const char* b;
    const char* e;
  };
  static constexpr size_t kChunk = 16 << 10;  // a task waits for at most this much reading
  void lock() {
    while (lock_.exchange(true, std::memory_order_acquire)) cpu_relax();
  }
  void unlock() { lock_.store(false, std::memory_order_release); }
  std::atomic<bool> lock_{false};
  std::atomic<int> reading_{0};
  std::vector<Region> regions_;
  const char* volatile next_ = nullptr;
  const char* volatile end_ = nullptr;
  volatile uint64_t sink_ = 0;
};

ReadAhead& read_ahead() {
  static ReadAhead* r = new ReadAhead();  // never destroyed, like the pool
  return *r;
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
    // waiting for the workers, the caller reads ahead too (decoding's products set the window past their weight)
    while (pending_.load(std::memory_order_acquire) > 0)
      if (!read_ahead().read_chunk()) cpu_relax();
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
        if (read_ahead().read_chunk()) {  // between tasks: the next weights of a decoding step into the cache
          t0 = std::chrono::steady_clock::now();
          continue;
        }
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

namespace {
constexpr size_t kHuge = (size_t)2 << 20;
size_t stream_span(size_t bytes) { return (bytes + kHuge - 1) / kHuge * kHuge; }
std::atomic<int64_t>& read_ahead_bytes() {
  static std::atomic<int64_t> n{[] {
    const char* e = getenv("LOWRANK_READ_AHEAD_MB");
    const double mb = e ? atof(e) : 8.0;
    return mb > 0 ? (int64_t)(mb * 1048576.0) : (int64_t)0;
  }()};
  return n;
}
}  // namespace

void* stream_alloc(size_t bytes) {
  const size_t n = stream_span(bytes);
  void* p = nullptr;
#if defined(__linux__)
  // 2 MiB-aligned: map a huge page more, then unmap what lies outside the aligned span
  char* raw = (char*)mmap(nullptr, n + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == (char*)MAP_FAILED) return nullptr;
  char* a = (char*)(((uintptr_t)raw + kHuge - 1) & ~(uintptr_t)(kHuge - 1));
  if (a > raw) munmap(raw, (size_t)(a - raw));
  if (raw + n + kHuge > a + n) munmap(a + n, (size_t)(raw + n + kHuge - (a + n)));
  p = a;
#if defined(MADV_HUGEPAGE)
  madvise(p, n, MADV_HUGEPAGE);
#endif
#else
  p = aligned_alloc(64, n);
  if (!p) return nullptr;
  memset(p, 0, n);
#endif
  read_ahead().add_region((const char*)p, (const char*)p + n);
  return p;
}

void stream_free(void* p, size_t bytes) {
  if (!p) return;
  read_ahead().remove_region((const char*)p);
#if defined(__linux__)
  munmap(p, stream_span(bytes));
#else
  (void)bytes;
  free(p);
#endif
}

void stream_read_ahead(const void* p, size_t n) {
  const int64_t ahead = read_ahead_bytes().load(std::memory_order_relaxed);
  if (ahead > 0) read_ahead().after_read((const char*)p, n, (size_t)ahead);
}

int64_t stream_read_ahead_bytes(int64_t bytes) {
  if (bytes >= 0) read_ahead_bytes().store(bytes);
  return read_ahead_bytes().load();
}

}  // namespace lowrank
