// A C++ consumer of the avfast_C library (CMake target avfast_cpp_consumer): runs the
// av_pair_attention forward and backward on the CPU (host execution of the CUDA block
// code) and on the GPU when one is present, and checks the forward against ATen math.
#include <cstdio>

#include <torch/torch.h>

#include "avfast.h"

static at::Tensor two_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                double scale) {
  auto s = at::einsum("bfhd,bnhd->bhfn", {q, k}) * scale;
  return at::einsum("bhfn,bnhd->bfhd", {at::softmax(s, -1), v});
}

static bool run(const c10::Device& dev) {
  const int64_t B = 2, F = 16, H = 4, Na = 19, Nv = 49, Dq = 16, Dv = 64;
  const double scale = 0.25;
  auto opt = at::TensorOptions().device(dev).dtype(at::kFloat);
  auto q = at::randn({B, F, H, Dq}, opt), k_a = at::randn({B, Na, H, Dq}, opt);
  auto v_a = at::randn({B, Na, H, Dv}, opt), k_v = at::randn({B, Nv, H, Dq}, opt);
  auto v_v = at::randn({B, Nv, H, Dv}, opt), bias = at::randn({H, Dv}, opt);
  auto [out, o_half, lse] =
      avfast::av_pair_attention_fwd(q, k_a, v_a, k_v, v_v, bias, std::nullopt, std::nullopt, scale);
  auto expect = two_attention(q, k_a, v_a, scale) + two_attention(q, k_v, v_v, scale) + bias;
  auto grads = avfast::av_pair_attention_bwd(at::ones_like(out), q, k_a, v_a, k_v, v_v,
                                             std::nullopt, std::nullopt, o_half, lse, scale);
  const double err = (out - expect).abs().max().item<double>();
  const bool ok = err < 1e-4 && std::get<0>(grads).sizes() == q.sizes();
  std::printf("avfast_C av_pair_attention on %s: max |out - ref| = %.3g -> %s\n",
              dev.str().c_str(), err, ok ? "ok" : "FAILED");
  return ok;
}

int main() {
  bool ok = run(c10::Device(c10::kCPU));
  if (torch::cuda::is_available()) ok = run(c10::Device(c10::kCUDA, 0)) && ok;
  return ok ? 0 : 1;
}
