// av_adapter_attention: CUDA launches. The block drivers (fwd_block, bwd_block) and their
// execution model are in kernel.cuh; checks and planning in av_adapter_attention.cpp.
// One launch for the forward, one for the backward, both directions in each.
#include "av_adapter_attention.h"

#include <algorithm>
#include <atomic>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace avfast {
namespace av_adapter {
namespace {

// One CUDA thread block: `phase` runs the per-thread function, then a block barrier.
template <class Regs>
struct DeviceExec {
  Regs r;
  template <class Fn>
  __device__ __forceinline__ void phase(Fn&& fn) {
    fn(static_cast<int>(threadIdx.x), r);
    __syncthreads();
  }
};

template <class scalar_t>
__global__ void __launch_bounds__(kThreads, 2) av_adapter_fwd_kernel(const FwdParams p) {
  extern __shared__ float4 smem_f4[];
  DeviceExec<FwdRegs> ex;
  fwd_block<scalar_t>(ex, p, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_f4));
}

template <class scalar_t>
__global__ void __launch_bounds__(kThreads, 2) av_adapter_bwd_kernel(const BwdParams p) {
  extern __shared__ float4 smem_f4[];
  DeviceExec<BwdRegs> ex;
  bwd_block<scalar_t>(ex, p, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_f4));
}

constexpr int kMaxDevices = 64;

int64_t smem_optin_bytes(int device) {
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Raises the kernel's dynamic shared memory limit when a launch needs more than 48 KiB.
template <class Kernel>
void ensure_smem(Kernel kernel, int64_t bytes, int device, std::atomic<int>* done) {
  if (bytes <= 48 * 1024) return;
  if (device >= 0 && device < kMaxDevices && done[device].load(std::memory_order_relaxed) >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (device >= 0 && device < kMaxDevices)
    done[device].store(static_cast<int>(bytes), std::memory_order_relaxed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
    const at::Tensor& gate_v, double scale) {
  const c10::cuda::CUDAGuard guard(h_a.device());
  const int64_t budget = std::min<int64_t>(kSmemBudget, smem_optin_bytes(h_a.get_device()));
  FwdCall c = prepare_fwd(h_a, h_v, gate_a, gate_v, scale, budget);
  if (c.num_blocks > 0) {
    const int64_t bytes = c.p.smem_floats * 4;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h_a.get_device()).stream();
    dispatch_dtype(h_a.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      static std::atomic<int> done[kMaxDevices] = {};
      ensure_smem(av_adapter_fwd_kernel<scalar_t>, bytes, h_a.get_device(), done);
      av_adapter_fwd_kernel<scalar_t>
          <<<static_cast<unsigned>(c.num_blocks), c.p.threads, bytes, stream>>>(c.p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {c.out_a, c.out_v, c.o_a, c.o_v, c.lse_a, c.lse_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout_a, const at::Tensor& dout_v, const at::Tensor& h_a,
    const at::Tensor& h_v, const at::Tensor& gate_a, const at::Tensor& gate_v,
    const at::Tensor& o_a, const at::Tensor& o_v, const at::Tensor& lse_a,
    const at::Tensor& lse_v, double scale) {
  const c10::cuda::CUDAGuard guard(h_a.device());
  const int64_t budget = std::min<int64_t>(kSmemBudget, smem_optin_bytes(h_a.get_device()));
  BwdCall c = prepare_bwd(dout_a, dout_v, h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v,
                          scale, budget);
  if (c.num_blocks > 0) {
    const int64_t bytes = c.p.smem_floats * 4;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h_a.get_device()).stream();
    dispatch_dtype(h_a.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      static std::atomic<int> done[kMaxDevices] = {};
      ensure_smem(av_adapter_bwd_kernel<scalar_t>, bytes, h_a.get_device(), done);
      av_adapter_bwd_kernel<scalar_t>
          <<<static_cast<unsigned>(c.num_blocks), c.p.threads, bytes, stream>>>(c.p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {c.dh_a, c.dh_v, c.dgate_a, c.dgate_v};
}

}  // namespace
}  // namespace av_adapter
}  // namespace avfast

TORCH_LIBRARY_IMPL(avfast_C, CUDA, m) {
  m.impl("av_adapter_attention_fwd", &avfast::av_adapter::fwd_cuda);
  m.impl("av_adapter_attention_bwd", &avfast::av_adapter::bwd_cuda);
}
