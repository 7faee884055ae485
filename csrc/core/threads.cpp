#include "core/threads.h"

#include <atomic>
#include <stdexcept>
#include <string>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace moe_ext {
namespace {

// A process-wide count rather than omp_set_num_threads(), whose setting is per calling thread and so
// would not reach kernels called from other Python threads.
std::atomic<int>& thread_count() {
#ifdef _OPENMP
  static std::atomic<int> count{omp_get_max_threads()};
#else
  static std::atomic<int> count{1};
#endif
  return count;
}

}  // namespace

int num_threads() { return thread_count().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads: expected an integer >= 1; got " + std::to_string(n));
  thread_count().store(n, std::memory_order_relaxed);
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace moe_ext
