// Shared by the CPU (host execution) and CUDA implementations of av_adapter_attention:
// argument checks, output allocation and the kernel parameters.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/checks.h"
#include "kernel.cuh"

namespace avfast {
namespace av_adapter {

constexpr const char* kOp = "av_adapter_attention";  // error messages: "av_adapter_attention: ..."

struct FwdCall {
  FwdParams p;
  at::Tensor out_a, out_v, o_a, o_v, lse_a, lse_v;
  int64_t num_blocks;  // 0: nothing to launch
};

struct BwdCall {
  BwdParams p;
  at::Tensor dh_a, dh_v, dgate_a, dgate_v;
  int64_t num_blocks;
};

// Check the arguments (raising with "av_adapter_attention: <arg> must be ..., got ..."),
// allocate the outputs and plan the launch. smem_budget is in bytes (per block).
FwdCall prepare_fwd(const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
                    const at::Tensor& gate_v, double scale, int64_t smem_budget);

BwdCall prepare_bwd(const at::Tensor& dout_a, const at::Tensor& dout_v, const at::Tensor& h_a,
                    const at::Tensor& h_v, const at::Tensor& gate_a, const at::Tensor& gate_v,
                    const at::Tensor& o_a, const at::Tensor& o_v, const at::Tensor& lse_a,
                    const at::Tensor& lse_v, double scale, int64_t smem_budget);

}  // namespace av_adapter
}  // namespace avfast
