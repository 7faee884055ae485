// Device discovery. Linked against the static CUDA runtime, so this module loads without a driver; the
// runtime then reports "no device" (or "driver missing"), which we turn into device_count() == 0.

#include "cuda/common.cuh"

namespace moe_ext::cuda {

namespace {

struct Discovery {
  int count = 0;
  std::string error;
};

const Discovery& discovery() {
  static const Discovery found = [] {
    Discovery d;
    const cudaError_t status = cudaGetDeviceCount(&d.count);
    if (status != cudaSuccess) {
      d.count = 0;
      // The runtime reports a missing driver (no libcuda) as an insufficient one: say both.
      d.error = status == cudaErrorInsufficientDriver
                    ? "no NVIDIA driver found, or it is older than this CUDA runtime (cudaErrorInsufficientDriver)"
                    : std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
      cudaGetLastError();  // clear it, so that no later check reports it again
    } else if (d.count == 0) {
      d.error = "no CUDA device";
    }
    return d;
  }();
  return found;
}

}  // namespace

int device_count() { return discovery().count; }

const char* runtime_error() { return discovery().error.c_str(); }

void require_device(const char* what) {
  if (device_count() > 0) return;
  throw std::runtime_error(std::string(what) + ": no CUDA device is available (CUDA runtime: " +
                           runtime_error() + "); moe_ext's CUDA kernels need an NVIDIA GPU (sm_80 or later)");
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace moe_ext::cuda
