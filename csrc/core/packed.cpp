#include "core/packed.h"

#include <cstdlib>
#include <new>

#include "core/kernels.h"
#include "core/threads.h"

namespace moe_ext {

void PackedWeight::Free::operator()(void* p) const { std::free(p); }

PackedWeight::PackedWeight(const void* w, DType dtype, int64_t E, int64_t N, int64_t K)
    : dtype_(dtype), E_(E), N_(N), K_(K) {
  bytes_ = static_cast<std::size_t>(E * packed_expert_elements(N, K, dtype) * dtype_size(dtype));
  void* data = std::aligned_alloc(64, (bytes_ + 63) / 64 * 64 + 64);
  if (data == nullptr) throw std::bad_alloc();
  data_.reset(data);
  kernels().pack_weight(w, dtype, E, N, K, num_threads(), data);
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
