#pragma once
// A minimal work queue over std::thread for the metric drivers: no OpenMP flag is imposed on consumers of this
// header-only library, and the first exception thrown by any item is rethrown on the calling thread.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace tdfusion::metrics::detail {

/// `requested` if positive, otherwise the number of hardware threads (at least 1).
inline int resolve_threads(int requested) {
  if (requested > 0) return requested;
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

/// Calls fn(i) for i in [0, count) on up to `threads` threads (0: all cores). Items are handed out one at a
/// time in index order, so uneven image sizes balance. After a failure no new item starts; of the items that
/// failed, the exception of the lowest index is rethrown (deterministic when one item is bad).
template <class Fn>
void parallel_for(std::size_t count, int threads, Fn&& fn) {
  const std::size_t workers = std::min<std::size_t>(count, static_cast<std::size_t>(resolve_threads(threads)));
  if (workers <= 1) {
    for (std::size_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;
  std::size_t first_index = count;
  std::mutex error_mutex;
  auto work = [&] {
    for (std::size_t i = next++; i < count && !failed.load(); i = next++) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (i < first_index) {
          first_index = i;
          first_error = std::current_exception();
        }
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(work);
  work();
  for (std::thread& thread : pool) thread.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace tdfusion::metrics::detail
