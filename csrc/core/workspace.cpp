#include "core/workspace.h"

#include <cstdlib>
#include <new>

namespace moe_ext {

Workspace::~Workspace() {
  for (void* p : data_) std::free(p);
}

void* Workspace::get(Scratch slot, std::size_t bytes) {
  const int i = static_cast<int>(slot);
  if (bytes <= size_[i] && data_[i] != nullptr) return data_[i];
  // Grow geometrically so a sequence of slightly larger calls does not reallocate every time.
  std::size_t grown = size_[i] + size_[i] / 2;
  std::size_t want = bytes > grown ? bytes : grown;
  want = (want + 63) / 64 * 64;
  if (want == 0) want = 64;
  void* fresh = std::aligned_alloc(64, want);
  if (fresh == nullptr) throw std::bad_alloc();
  std::free(data_[i]);
  data_[i] = fresh;
  size_[i] = want;
  return fresh;
}

std::size_t Workspace::bytes_held() const {
  std::size_t total = 0;
  for (std::size_t s : size_) total += s;
  return total;
}

Workspace& thread_workspace() {
  thread_local Workspace workspace;
  return workspace;
}

}  // namespace moe_ext
