// Shared by the CPU (host execution) and CUDA implementations of av_pair_attention:
// argument checks, output allocation and the kernel parameters.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernel.cuh"

namespace avfast {
namespace av_pair {

struct FwdCall {
  FwdParams p;
  at::Tensor out, o_half, lse;
  int64_t num_blocks;  // 0: nothing to launch
};

struct BwdCall {
  BwdParams p;
  at::Tensor dq, dk_a, dv_a, dk_v, dv_v;
  at::Tensor dq_ws;  // defined iff !p.dq_in_regs
  int64_t num_blocks;
};

// Check the arguments (raising with "av_pair_attention: <arg> must be ..., got ..."),
// allocate the outputs and plan the launch. bwd_smem_budget is in bytes.
FwdCall prepare_fwd(const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a,
                    const at::Tensor& k_v, const at::Tensor& v_v,
                    const std::optional<at::Tensor>& v_bias,
                    const std::optional<at::Tensor>& key_padding_mask_a,
                    const std::optional<at::Tensor>& key_padding_mask_v, double scale);

BwdCall prepare_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_a,
                    const at::Tensor& v_a, const at::Tensor& k_v, const at::Tensor& v_v,
                    const std::optional<at::Tensor>& key_padding_mask_a,
                    const std::optional<at::Tensor>& key_padding_mask_v,
                    const at::Tensor& o_half, const at::Tensor& lse, double scale,
                    int64_t bwd_smem_budget);

// Calls fn(scalar_t{}) for the kernel dtypes: float, c10::Half, c10::BFloat16.
template <class Fn>
void dispatch_dtype(at::ScalarType dt, Fn&& fn) {
  switch (dt) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "av_pair_attention: unsupported dtype ", dt);
  }
}

}  // namespace av_pair
}  // namespace avfast
