// av_adapter_attention: CUDA launches. The block drivers (fwd_block, bwd_block) and their
// execution model are in kernel.cuh; checks and planning in av_adapter_attention.cpp.
// One launch for the forward, one for the backward, both directions in each.
#include "av_adapter_attention.h"

#include <algorithm>
#include <atomic>

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/launch.h"

namespace avfast {
namespace av_adapter {
namespace {

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
    const at::Tensor& gate_v, double scale) {
  const c10::cuda::CUDAGuard guard(h_a.device());
  const int64_t budget = std::min<int64_t>(kSmemBudget, smem_optin_bytes(h_a.get_device()));
  FwdCall c = prepare_fwd(h_a, h_v, gate_a, gate_v, scale, budget);
  dispatch_dtype(kOp, h_a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    static std::atomic<int> done[kMaxDevices] = {};
    launch_blocks(av_adapter_fwd_kernel<scalar_t>, c.num_blocks, c.p, h_a.get_device(), done);
  });
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
  dispatch_dtype(kOp, h_a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    static std::atomic<int> done[kMaxDevices] = {};
    launch_blocks(av_adapter_bwd_kernel<scalar_t>, c.num_blocks, c.p, h_a.get_device(), done);
  });
  return {c.dh_a, c.dh_v, c.dgate_a, c.dgate_v};
}

}  // namespace
}  // namespace av_adapter
}  // namespace avfast

TORCH_LIBRARY_IMPL(avfast_C, CUDA, m) {
  m.impl("av_adapter_attention_fwd", &avfast::av_adapter::fwd_cuda);
  m.impl("av_adapter_attention_bwd", &avfast::av_adapter::bwd_cuda);
}
