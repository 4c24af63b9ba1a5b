// Storage of the per-device error flags (see device_errors.h).
#include "device_errors.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>

#include <mutex>
#include <vector>

namespace pyseg {
namespace {

std::mutex flags_mutex;

// Leaked on purpose: freeing CUDA memory while the process exits can outlive the CUDA context.
std::vector<at::Tensor*>& flags() {
  static auto* all = new std::vector<at::Tensor*>(c10::cuda::device_count(), nullptr);
  return *all;
}

at::Tensor& flag_tensor(c10::DeviceIndex index) {
  const std::lock_guard<std::mutex> lock(flags_mutex);
  auto& all = flags();
  TORCH_CHECK(index >= 0 && static_cast<size_t>(index) < all.size(), "no CUDA device ", index);
  if (all[index] == nullptr) {
    const c10::cuda::CUDAGuard guard(index);
    // Made inside a CUDA graph capture, the flag would live in the graph's private pool and be zeroed only on replay.
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "pyseg's first CUDA op on device ", static_cast<int>(index), " ran inside a CUDA graph capture: "
                "run one pyseg op on that device before capturing (it allocates the device error flag)");
    all[index] = new at::Tensor(at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, index)));
  }
  return *all[index];
}

}  // namespace

int32_t* device_error_flag(const c10::Device& device) {
  TORCH_CHECK(device.is_cuda(), "device_error_flag needs a CUDA device, got ", device);
  return flag_tensor(device.has_index() ? device.index() : c10::cuda::current_device()).data_ptr<int32_t>();
}

at::Tensor device_error_flag_tensor(int64_t device_index) {
  return flag_tensor(static_cast<c10::DeviceIndex>(device_index));
}

}  // namespace pyseg
