#include "core/packed.h"

#include <cstdint>
#include <cstdlib>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/kernels.h"
#include "core/threads.h"

namespace moe_ext {

namespace {

// Large packed weights sit on 2 MiB-aligned memory advised for transparent huge pages, as NumPy does for
// its large arrays: a decode step streams every byte once, and with 4 KiB pages it also misses the TLB
// every 4 KiB. The advice is only a hint; where it is refused the pages are the usual ones.
constexpr std::size_t kHugePage = std::size_t{2} << 20;

void* allocate(std::size_t bytes) {
  if (bytes > SIZE_MAX - 2 * kHugePage) return nullptr;
  const std::size_t align = bytes >= kHugePage ? kHugePage : 64;
  const std::size_t size = (bytes + 64 + align - 1) / align * align;  // a multiple of align, 64 bytes spare
  void* p = std::aligned_alloc(align, size);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p != nullptr && align == kHugePage) madvise(p, size, MADV_HUGEPAGE);
#endif
  return p;
}

}  // namespace

void PackedWeight::Free::operator()(void* p) const { std::free(p); }

PackedWeight::PackedWeight(const WeightView& w) : dtype_(w.dtype), E_(w.E), N_(w.N), K_(w.K) {
  bytes_ = static_cast<std::size_t>(E_ * packed_expert_elements(N_, K_, dtype_) * dtype_size(dtype_));
  void* data = allocate(bytes_);
  if (data == nullptr) throw std::bad_alloc();
  data_.reset(data);
  kernels().pack_weight(w, num_threads(), data);
}

WeightView PackedWeight::view() const {
  WeightView v;
  v.data = data_.get();
  v.dtype = dtype_;
  v.packed = true;
  v.E = E_, v.N = N_, v.K = K_;
  return v;
}

}  // namespace moe_ext
