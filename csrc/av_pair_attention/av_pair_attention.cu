// av_pair_attention: CUDA launches. The block drivers (fwd_block, bwd_block) and their
// execution model are in kernel.cuh; checks and planning in av_pair_attention.cpp.
#include "av_pair_attention.h"

#include <algorithm>
#include <atomic>

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/launch.h"

namespace avfast {
namespace av_pair {
namespace {

template <class scalar_t>
__global__ void __launch_bounds__(kMaxThreads, 3) av_pair_fwd_kernel(const FwdParams p) {
  extern __shared__ float4 smem_f4[];
  DeviceExec<FwdRegs> ex;
  fwd_block<scalar_t>(ex, p, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_f4));
}

template <class scalar_t>
__global__ void __launch_bounds__(kMaxThreads, 2) av_pair_bwd_kernel(const BwdParams p) {
  extern __shared__ float4 smem_f4[];
  DeviceExec<BwdRegs> ex;
  bwd_block<scalar_t>(ex, p, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_f4));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a, const at::Tensor& k_v,
    const at::Tensor& v_v, const std::optional<at::Tensor>& v_bias,
    const std::optional<at::Tensor>& mask_a, const std::optional<at::Tensor>& mask_v,
    double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  FwdCall c = prepare_fwd(q, k_a, v_a, k_v, v_v, v_bias, mask_a, mask_v, scale);
  dispatch_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    static std::atomic<int> done[kMaxDevices] = {};
    launch_blocks(av_pair_fwd_kernel<scalar_t>, c.num_blocks, c.p, q.get_device(), done);
  });
  return {c.out, c.o_half, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a,
    const at::Tensor& k_v, const at::Tensor& v_v, const std::optional<at::Tensor>& mask_a,
    const std::optional<at::Tensor>& mask_v, const at::Tensor& o_half, const at::Tensor& lse,
    double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t budget = std::min<int64_t>(kBwdSmemBudget, smem_optin_bytes(q.get_device()));
  BwdCall c = prepare_bwd(dout, q, k_a, v_a, k_v, v_v, mask_a, mask_v, o_half, lse, scale, budget);
  dispatch_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    static std::atomic<int> done[kMaxDevices] = {};
    launch_blocks(av_pair_bwd_kernel<scalar_t>, c.num_blocks, c.p, q.get_device(), done);
  });
  return {c.dq, c.dk_a, c.dv_a, c.dk_v, c.dv_v};
}

}  // namespace
}  // namespace av_pair
}  // namespace avfast

TORCH_LIBRARY_IMPL(avfast_C, CUDA, m) {
  m.impl("av_pair_attention_fwd", &avfast::av_pair::fwd_cuda);
  m.impl("av_pair_attention_bwd", &avfast::av_pair::bwd_cuda);
}
