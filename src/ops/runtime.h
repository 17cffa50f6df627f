// The thread pool, oneDNN engine and stream that every kernel of the custom-op library shares
// (src/ops/onednn_conv.cc, src/ops/group_norm.cc, ...; built into one library by src/ops/build.py),
// and the attribute for its vectorised loops.
#ifndef FCOS_OPS_RUNTIME_H_
#define FCOS_OPS_RUNTIME_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "oneapi/dnnl/dnnl_threadpool.hpp"

// Loops marked FCOS_CLONES are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time (GCC function multi-versioning), since the library is built once for whatever CPU runs it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FCOS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FCOS_CLONES
#endif

namespace fcos_ops {

// MindSpore's libdnnl.so.3 is built for the threadpool runtime: without a pool oneDNN runs on
// one thread. Workers spin for a moment before sleeping because oneDNN calls parallel_for several
// times per convolution (reorders, then the kernel) and a sleeping thread takes tens of
// microseconds to wake: with a plain condition variable the small config's convolutions took (in a
// standalone harness of these kernels) 1.18x torch's time, with the spin 0.99x.
class SpinPool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit SpinPool(int threads) : threads_(std::max(threads, 1)) {
    for (int t = 1; t < threads_; ++t) workers_.emplace_back([this] { Work(); });
  }
  ~SpinPool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
    }
    wake_.notify_all();
    for (auto &worker : workers_) worker.join();
  }
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return in_parallel_; }
  uint64_t get_flags() const override { return 0; }  // synchronous: parallel_for returns when done
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 1 || threads_ == 1 || in_parallel_) {
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
    fn_ = &fn;
    jobs_ = n;
    next_.store(0);
    pending_.store(threads_ - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    Run();
    while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    fn_ = nullptr;
  }

 private:
  void Run() {
    in_parallel_ = true;
    for (int i = next_.fetch_add(1); i < jobs_; i = next_.fetch_add(1)) (*fn_)(i, jobs_);
    in_parallel_ = false;
  }
  void Work() {
    long seen = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (generation_.load(std::memory_order_acquire) == seen && !stop_.load() &&
             std::chrono::steady_clock::now() < until) {
        std::this_thread::yield();
      }
      if (generation_.load() == seen && !stop_.load()) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
      }
      if (stop_.load()) return;
      seen = generation_.load();
      Run();
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void(int, int)> *fn_ = nullptr;
  int jobs_ = 0;
  std::atomic<int> next_{0};
  std::atomic<int> pending_{0};
  std::atomic<long> generation_{0};
  std::atomic<bool> stop_{false};
  static thread_local bool in_parallel_;  // defined below (inline: one per library)
};
inline thread_local bool SpinPool::in_parallel_ = false;

// The CPUs this process may run on (a pinned benchmark or rank gets fewer than the machine has;
// spinning threads on a shared CPU would take turns instead of working).
inline int AllowedCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(CPU_COUNT(&set), 1);
  return std::max(static_cast<int>(std::thread::hardware_concurrency()), 1);
}

struct Runtime {
  std::mutex mutex;  // one kernel at a time: they share the pool (and the convolutions, scratch buffers)
  SpinPool pool;
  dnnl::engine engine;
  dnnl::stream stream;
  Runtime()
      : pool(AllowedCpus()),
        engine(dnnl::engine::kind::cpu, 0),
        stream(dnnl::threadpool_interop::make_stream(engine, &pool)) {}
};

// One pool, engine and stream for every kernel of the library (inline: one instance across its
// translation units).
inline Runtime &GetRuntime() {
  static Runtime runtime;
  return runtime;
}

// Runs task(t) for t in [0, tasks) on the pool, tasks dealt round-robin to its threads, one
// kernel at a time (the kernels that are plain loops, not oneDNN primitives).
template <typename Task>
void ForEachTask(int64_t tasks, const Task &task) {
  Runtime &runtime = GetRuntime();
  std::lock_guard<std::mutex> lock(runtime.mutex);
  runtime.pool.parallel_for(runtime.pool.get_num_threads(), [&](int thread, int threads) {
    for (int64_t t = thread; t < tasks; t += threads) task(t);
  });
}

}  // namespace fcos_ops

#endif  // FCOS_OPS_RUNTIME_H_
