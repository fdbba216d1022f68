// av_pair_attention: argument checks, output allocation, and the CPU implementation.
//
// Host execution. The CPU kernel registered here is not a separate CPU algorithm: it
// runs the CUDA kernels' own block drivers (fwd_block / bwd_block in kernel.cuh) on the
// host. Every thread block of the launch grid is executed by HostExec, which runs each
// phase of the block as `for tid in 0..blockDim: phase(tid, regs[tid])`, with a host
// buffer standing in for shared memory and one register struct per emulated thread.
// Blocks are independent and run in parallel (at::parallel_for). The tiling plan is the
// one the GPU uses. This lets CI check the CUDA math on a machine without a GPU; it is
// not meant to be fast. Set AVFAST_HOST_THREAD_ORDER=reverse to run the emulated threads
// of each phase in reverse order: the results must not change (a check for data races
// between threads of one phase).
#include "av_pair_attention.h"

#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/launch.h"

namespace avfast {
namespace av_pair {
namespace {

// Shape, then dtype (q's, or float32 when fp32 is set), then device; the messages match
// avfast/ops/av_pair_attention.py.
void check_tensor(const at::Tensor& t, const char* name, const char* dims,
                  const std::vector<int64_t>& expected, const at::Tensor& q, bool fp32 = false) {
  avfast::check_tensor(kOp, "q", t, name, dims, expected, q, fp32);
}

void check_mask(const std::optional<at::Tensor>& m, const char* name, const char* dims, int64_t B,
                int64_t N, const at::Tensor& q) {
  if (!m.has_value()) return;
  TORCH_CHECK_TYPE(m->scalar_type() == at::kBool, kOp, ": ", name, " must be a bool Tensor ", dims,
                   " (True = padded key), got dtype ", dtype_str(m->scalar_type()));
  const std::vector<int64_t> expected{B, N};
  TORCH_CHECK_VALUE(m->sizes().equals(expected), kOp, ": ", name, " must be ", dims, " = ",
                    shape_str(expected), ", got ", shape_str(m->sizes()));
  TORCH_CHECK_VALUE(m->device() == q.device(), kOp, ": ", name, " must be on q's device ", q.device(),
                    ", got ", m->device());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a,
               const at::Tensor& k_v, const at::Tensor& v_v,
               const std::optional<at::Tensor>& mask_a, const std::optional<at::Tensor>& mask_v) {
  check_main_tensor(kOp, q, "q", 4, "(B, F, H, Dq)");
  const int64_t B = q.size(0), H = q.size(2), Dq = q.size(3);
  check_tensor(k_a, "k_a", "(B, Na, H, Dq)", {B, -1, H, Dq}, q);
  check_tensor(k_v, "k_v", "(B, Nv, H, Dq)", {B, -1, H, Dq}, q);
  const int64_t Na = k_a.size(1), Nv = k_v.size(1);
  check_mask(mask_a, "key_padding_mask_a", "(B, Na)", B, Na, q);
  check_mask(mask_v, "key_padding_mask_v", "(B, Nv)", B, Nv, q);
  check_tensor(v_a, "v_a", "(B, Na, H, Dv)", {B, Na, H, v_a.dim() == 4 ? v_a.size(3) : -1}, q);
  const int64_t Dv = v_a.size(3);
  check_tensor(v_v, "v_v", "(B, Nv, H, Dv)", {B, Nv, H, Dv}, q);
  TORCH_CHECK_VALUE(Dq <= kMaxHeadDim && Dv <= kMaxHeadDim, kOp, ": head dims up to ", kMaxHeadDim,
                    " are supported, got Dq=", Dq, ", Dv=", Dv);
}

void copy4(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

template <class P>
void fill_common(P& p, const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a,
                 const at::Tensor& k_v, const at::Tensor& v_v,
                 const std::optional<at::Tensor>& mask_a, const std::optional<at::Tensor>& mask_v,
                 double scale) {
  p.q = q.data_ptr();
  p.k[0] = k_a.data_ptr();
  p.k[1] = k_v.data_ptr();
  p.v[0] = v_a.data_ptr();
  p.v[1] = v_v.data_ptr();
  const std::optional<at::Tensor>* masks[2] = {&mask_a, &mask_v};
  for (int hf = 0; hf < 2; ++hf) {
    const auto& m = *masks[hf];
    p.mask[hf] = m.has_value() ? m->data_ptr<bool>() : nullptr;
    p.smask[hf][0] = m.has_value() ? m->stride(0) : 0;
    p.smask[hf][1] = m.has_value() ? m->stride(1) : 0;
  }
  p.B = q.size(0);
  p.F = q.size(1);
  p.H = q.size(2);
  p.N[0] = k_a.size(1);
  p.N[1] = k_v.size(1);
  p.Dq = static_cast<int>(q.size(3));
  p.Dv = static_cast<int>(v_a.size(3));
  copy4(p.sq, q);
  copy4(p.sk[0], k_a);
  copy4(p.sk[1], k_v);
  copy4(p.sv[0], v_a);
  copy4(p.sv[1], v_v);
  p.scale = static_cast<float>(scale);
  const int64_t es = q.element_size();
  p.vec_q = vec4_ok(p.q, p.sq, p.Dq, es);
  for (int hf = 0; hf < 2; ++hf) {
    p.vec_k[hf] = vec4_ok(p.k[hf], p.sk[hf], p.Dq, es);
    p.vec_v[hf] = vec4_ok(p.v[hf], p.sv[hf], p.Dv, es);
  }
}

}  // namespace

FwdCall prepare_fwd(const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a,
                    const at::Tensor& k_v, const at::Tensor& v_v,
                    const std::optional<at::Tensor>& v_bias,
                    const std::optional<at::Tensor>& mask_a,
                    const std::optional<at::Tensor>& mask_v, double scale) {
  check_qkv(q, k_a, v_a, k_v, v_v, mask_a, mask_v);
  const int64_t B = q.size(0), F = q.size(1), H = q.size(2), Dv = v_a.size(3);
  FwdCall c;
  FwdParams& p = c.p;
  std::memset(&p, 0, sizeof(p));
  p.bias_kind = kBiasNone;
  if (v_bias.has_value()) {
    // v_bias may be in q's dtype or in float32 (a parameter under autocast).
    const auto bt = v_bias->scalar_type();
    check_tensor(*v_bias, "v_bias", "(H, Dv)", {H, Dv}, q, /*fp32=*/bt == at::kFloat);
    p.bias = v_bias->data_ptr();
    p.bias_kind = bt == at::kFloat ? kBiasFloat : (bt == at::kHalf ? kBiasHalf : kBiasBFloat16);
    p.sbias[0] = v_bias->stride(0);
    p.sbias[1] = v_bias->stride(1);
  }
  fill_common(p, q, k_a, v_a, k_v, v_v, mask_a, mask_v, scale);
  c.out = at::empty({B, F, H, Dv}, q.options());
  c.o_half = at::empty({B, F, H, 2, Dv}, q.options().dtype(at::kFloat));
  c.lse = at::empty({B, F, H, 2}, q.options().dtype(at::kFloat));
  p.out = c.out.data_ptr();
  p.o_half = c.o_half.data_ptr<float>();
  p.lse = c.lse.data_ptr<float>();
  plan_fwd(p);
  c.num_blocks = (B * H * F == 0) ? 0 : B * H * p.num_ft;
  return c;
}

BwdCall prepare_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_a,
                    const at::Tensor& v_a, const at::Tensor& k_v, const at::Tensor& v_v,
                    const std::optional<at::Tensor>& mask_a,
                    const std::optional<at::Tensor>& mask_v, const at::Tensor& o_half,
                    const at::Tensor& lse, double scale, int64_t bwd_smem_budget) {
  check_qkv(q, k_a, v_a, k_v, v_v, mask_a, mask_v);
  const int64_t B = q.size(0), F = q.size(1), H = q.size(2), Dq = q.size(3), Dv = v_a.size(3);
  const int64_t Na = k_a.size(1), Nv = k_v.size(1);
  check_tensor(dout, "dout", "(B, F, H, Dv)", {B, F, H, Dv}, q);
  check_tensor(o_half, "o_half", "(B, F, H, 2, Dv)", {B, F, H, 2, Dv}, q, /*fp32=*/true);
  check_tensor(lse, "lse", "(B, F, H, 2)", {B, F, H, 2}, q, /*fp32=*/true);

  BwdCall c;
  BwdParams& p = c.p;
  std::memset(&p, 0, sizeof(p));
  fill_common(p, q, k_a, v_a, k_v, v_v, mask_a, mask_v, scale);
  p.dout = dout.data_ptr();
  copy4(p.sdo, dout);
  p.vec_do = vec4_ok(p.dout, p.sdo, p.Dv, dout.element_size());
  p.o_half = o_half.data_ptr<float>();
  for (int i = 0; i < 5; ++i) p.so[i] = o_half.stride(i);
  p.lse = lse.data_ptr<float>();
  copy4(p.slse, lse);
  c.dq = at::empty({B, F, H, Dq}, q.options());
  c.dk_a = at::empty({B, Na, H, Dq}, k_a.options());
  c.dv_a = at::empty({B, Na, H, Dv}, v_a.options());
  c.dk_v = at::empty({B, Nv, H, Dq}, k_v.options());
  c.dv_v = at::empty({B, Nv, H, Dv}, v_v.options());
  p.dq = c.dq.data_ptr();
  p.dk[0] = c.dk_a.data_ptr();
  p.dk[1] = c.dk_v.data_ptr();
  p.dv[0] = c.dv_a.data_ptr();
  p.dv[1] = c.dv_v.data_ptr();
  plan_bwd(p, bwd_smem_budget);
  if (!p.dq_in_regs && B * H * F > 0) {
    c.dq_ws = at::empty({B, H, F, 4 * ((Dq + 3) / 4)}, q.options().dtype(at::kFloat));
    p.dq_ws = c.dq_ws.data_ptr<float>();
  }
  c.num_blocks = B * H;
  return c;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a, const at::Tensor& k_v,
    const at::Tensor& v_v, const std::optional<at::Tensor>& v_bias,
    const std::optional<at::Tensor>& mask_a, const std::optional<at::Tensor>& mask_v,
    double scale) {
  FwdCall c = prepare_fwd(q, k_a, v_a, k_v, v_v, v_bias, mask_a, mask_v, scale);
  const FwdParams& p = c.p;
  dispatch_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    run_host<FwdRegs>(p, c.num_blocks, [&](HostExec<FwdRegs>& ex, int64_t blk, float* smem) {
      fwd_block<scalar_t>(ex, p, blk, smem);
    });
  });
  return {c.out, c.o_half, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_a, const at::Tensor& v_a,
    const at::Tensor& k_v, const at::Tensor& v_v, const std::optional<at::Tensor>& mask_a,
    const std::optional<at::Tensor>& mask_v, const at::Tensor& o_half, const at::Tensor& lse,
    double scale) {
  BwdCall c = prepare_bwd(dout, q, k_a, v_a, k_v, v_v, mask_a, mask_v, o_half, lse, scale,
                          kBwdSmemBudget);
  const BwdParams& p = c.p;
  dispatch_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    run_host<BwdRegs>(p, c.num_blocks, [&](HostExec<BwdRegs>& ex, int64_t blk, float* smem) {
      bwd_block<scalar_t>(ex, p, blk, smem);
    });
  });
  return {c.dq, c.dk_a, c.dv_a, c.dk_v, c.dv_v};
}

}  // namespace
}  // namespace av_pair
}  // namespace avfast

TORCH_LIBRARY_IMPL(avfast_C, CPU, m) {
  m.impl("av_pair_attention_fwd", &avfast::av_pair::fwd_cpu);
  m.impl("av_pair_attention_bwd", &avfast::av_pair::bwd_cpu);
}
