// Operator schemas of the avfast_C library (torch.ops.avfast_C.*). Each op registers
// its CPU (host execution) and CUDA kernels in csrc/<op>/<op>.{cpp,cu}; a new op adds its
// schema lines here.
#include <torch/library.h>

TORCH_LIBRARY(avfast_C, m) {
  // out (B, F, H, Dv) in q's dtype; o_half (B, F, H, 2, Dv) fp32; lse (B, F, H, 2) fp32.
  m.def(
      "av_pair_attention_fwd(Tensor q, Tensor k_a, Tensor v_a, Tensor k_v, Tensor v_v, "
      "Tensor? v_bias, Tensor? key_padding_mask_a, Tensor? key_padding_mask_v, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  // (dq, dk_a, dv_a, dk_v, dv_v) in the inputs' dtypes; the v_bias gradient is the caller's.
  m.def(
      "av_pair_attention_bwd(Tensor dout, Tensor q, Tensor k_a, Tensor v_a, Tensor k_v, "
      "Tensor v_v, Tensor? key_padding_mask_a, Tensor? key_padding_mask_v, Tensor o_half, "
      "Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out_a (N, La, r), out_v (N, Lv, r) in the inputs' dtype; o_a, o_v (N, L*, r) fp32;
  // lse_a (N, La), lse_v (N, Lv) fp32; gates (N,) fp32.
  m.def(
      "av_adapter_attention_fwd(Tensor h_a, Tensor h_v, Tensor gate_a, Tensor gate_v, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (dh_a, dh_v) in the inputs' dtype, (dgate_a, dgate_v) (N,) fp32.
  m.def(
      "av_adapter_attention_bwd(Tensor dout_a, Tensor dout_v, Tensor h_a, Tensor h_v, "
      "Tensor gate_a, Tensor gate_v, Tensor o_a, Tensor o_v, Tensor lse_a, Tensor lse_v, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace avfast {
const char* library_name() { return "avfast_C"; }
}  // namespace avfast
