// C++ entry points of the avfast ops, for C++ consumers of the CMake library (avfast_C).
// They call the registered operators through the PyTorch dispatcher, so the CPU (host
// execution) or CUDA kernel is picked from the inputs' device, exactly as
// torch.ops.avfast_C.* does from Python. Argument rules: see the Python docstrings in
// avfast/ops/ (shapes (B, F, H, Dq) etc., any strides, fp32/fp16/bf16).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace avfast {

// Defined in registration.cpp. Calling it guarantees that the library, and so its
// operator registrations, is loaded (linkers drop unreferenced shared libraries).
const char* library_name();

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> av_pair_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a, const at::Tensor& k_v,
    const at::Tensor& v_v, const std::optional<at::Tensor>& v_bias,
    const std::optional<at::Tensor>& key_padding_mask_a,
    const std::optional<at::Tensor>& key_padding_mask_v, double scale) {
  (void)library_name();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("avfast_C::av_pair_attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           double)>();
  return op.call(q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> av_pair_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a,
    const at::Tensor& k_v, const at::Tensor& v_v,
    const std::optional<at::Tensor>& key_padding_mask_a,
    const std::optional<at::Tensor>& key_padding_mask_v, const at::Tensor& o_half,
    const at::Tensor& lse, double scale) {
  (void)library_name();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("avfast_C::av_pair_attention_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, double)>();
  return op.call(dout, q, k_a, v_a, k_v, v_v, key_padding_mask_a, key_padding_mask_v, o_half, lse,
                 scale);
}

// (out_a, out_v, o_a, o_v, lse_a, lse_v); h_a (N, La, r), h_v (N, Lv, r), gates (N,) fp32.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
av_adapter_attention_fwd(const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
                         const at::Tensor& gate_v, double scale) {
  (void)library_name();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("avfast_C::av_adapter_attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double)>();
  return op.call(h_a, h_v, gate_a, gate_v, scale);
}

// (dh_a, dh_v, dgate_a, dgate_v) from the forward's residuals (o_a, o_v, lse_a, lse_v).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> av_adapter_attention_bwd(
    const at::Tensor& dout_a, const at::Tensor& dout_v, const at::Tensor& h_a,
    const at::Tensor& h_v, const at::Tensor& gate_a, const at::Tensor& gate_v,
    const at::Tensor& o_a, const at::Tensor& o_v, const at::Tensor& lse_a,
    const at::Tensor& lse_v, double scale) {
  (void)library_name();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("avfast_C::av_adapter_attention_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double)>();
  return op.call(dout_a, dout_v, h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v, scale);
}

}  // namespace avfast
