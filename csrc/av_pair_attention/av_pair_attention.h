// Shared by the CPU (host execution) and CUDA implementations of av_pair_attention:
// argument checks, output allocation and the kernel parameters.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "common/checks.h"
#include "kernel.cuh"

namespace avfast {
namespace av_pair {

constexpr const char* kOp = "av_pair_attention";  // error messages: "av_pair_attention: ..."

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

}  // namespace av_pair
}  // namespace avfast
