// Work spread over XLA's intra-op threads, for t5lite's XLA FFI kernels (cpu_attention.cc,
// cpu_matmul.cc, cpu_transpose.cc).
#ifndef T5LITE_KERNELS_CPU_THREADS_H_
#define T5LITE_KERNELS_CPU_THREADS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace t5lite {

// Runs fn(slot, item) for every item < items on the calling thread and up to threads - 1 tasks
// of XLA's intra-op thread pool (slot < threads tells apart the concurrent runners, for their
// scratch space). Items are claimed one at a time, so the caller never waits for a task that
// has not started: it waits only for items claimed and not yet finished. A task that starts
// after every item was claimed does nothing.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, int threads, Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> slot{1};
  };
  auto state = std::make_shared<State>();
  Fn* body = &fn;
  auto drain = [state, items, body](int slot) {
    for (int64_t i; (i = state->next.fetch_add(1)) < items;) {
      (*body)(slot, i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int t = 1; t < threads; ++t)
    pool.Schedule([state, drain]() { drain(state->slot.fetch_add(1)); });
  drain(0);
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// Threads for `items` work items: XLA's intra-op pool's, at most one per item.
inline int Threads(xla::ffi::ThreadPool& pool, int64_t items) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items)));
}

}  // namespace t5lite

#endif  // T5LITE_KERNELS_CPU_THREADS_H_
