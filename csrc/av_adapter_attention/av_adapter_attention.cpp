// av_adapter_attention: argument checks, output allocation, and the CPU implementation.
//
// Host execution, as for av_pair_attention: the CPU kernel registered here runs the CUDA
// kernels' own block drivers (fwd_block / bwd_block in kernel.cuh) on the host. Every
// thread block of the launch grid is executed by HostExec, which runs each phase of the
// block as `for tid in 0..blockDim: phase(tid, regs[tid])`, with a host buffer standing in
// for shared memory and one register struct per emulated thread. Blocks are independent
// and run in parallel (at::parallel_for); the tiling plan is the one the GPU uses. This
// checks the CUDA math on a machine without a GPU; it is not meant to be fast. With
// AVFAST_HOST_THREAD_ORDER=reverse the emulated threads of each phase run in reverse
// order: the results must not change (a check for data races between threads of a phase).
#include "av_adapter_attention.h"

#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/launch.h"

namespace avfast {
namespace av_adapter {
namespace {

// Shape, then dtype (h_a's, or float32 when fp32 is set), then device (h_a's).
void check_tensor(const at::Tensor& t, const char* name, const char* dims,
                  const std::vector<int64_t>& expected, const at::Tensor& h_a, bool fp32 = false) {
  avfast::check_tensor(kOp, "h_a", t, name, dims, expected, h_a, fp32);
}

// h_a (N, La, r) float32/float16/bfloat16, h_v (N, Lv, r), gates (N,) float32.
void check_inputs(const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
                  const at::Tensor& gate_v) {
  check_main_tensor(kOp, h_a, "h_a", 3, "(N, La, r)");
  const int64_t N = h_a.size(0), r = h_a.size(2);
  check_tensor(h_v, "h_v", "(N, Lv, r)", {N, -1, r}, h_a);
  check_tensor(gate_a, "gate_a", "(N,)", {N}, h_a, /*fp32=*/true);
  check_tensor(gate_v, "gate_v", "(N,)", {N}, h_a, /*fp32=*/true);
  TORCH_CHECK_VALUE(r <= kMaxR, kOp, ": r up to ", kMaxR, " is supported, got r=", r);
}

void copy3(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

template <class P>
void fill_common(P& p, const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
                 const at::Tensor& gate_v, double scale) {
  const at::Tensor* h[2] = {&h_a, &h_v};
  const at::Tensor* g[2] = {&gate_a, &gate_v};
  p.N = h_a.size(0);
  p.r = static_cast<int>(h_a.size(2));
  p.ldr = smem_ld(p.r);
  p.scale = static_cast<float>(scale);
  p.vec_out = p.r % 4 == 0;
  for (int m = 0; m < 2; ++m) {
    p.h[m] = h[m]->data_ptr();
    copy3(p.sh[m], *h[m]);
    p.vec_h[m] = vec4_ok(p.h[m], p.sh[m], p.r, h[m]->element_size());
    p.L[m] = h[m]->size(1);
    p.gate[m] = g[m]->data_ptr<float>();
    p.sgate[m] = g[m]->stride(0);
  }
  p.threads = kThreads;
}

// Plans both sides (side s: rows of modality s over the keys of the other).
template <class P>
void plan(P& p, int rm, int rn, int items, bool bwd, int64_t smem_budget) {
  p.smem_floats = 0;
  for (int s = 0; s < 2; ++s) {
    const bool ok = plan_side(p.plan[s], p.L[s], p.L[1 - s], p.r, p.ldr, rm, rn, items, bwd,
                              smem_budget);
    TORCH_CHECK_VALUE(ok, kOp, ": La=", p.L[0], ", Lv=", p.L[1], ", r=", p.r,
                      " need more than the ", smem_budget, " bytes of shared memory per block");
    if (bwd && p.plan[s].ntiles == 0) p.plan[s].ntiles = 1;  // writes the other side's dgate
    if (p.plan[s].smem_floats > p.smem_floats) p.smem_floats = p.plan[s].smem_floats;
  }
}

}  // namespace

FwdCall prepare_fwd(const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
                    const at::Tensor& gate_v, double scale, int64_t smem_budget) {
  check_inputs(h_a, h_v, gate_a, gate_v);
  const int64_t N = h_a.size(0), La = h_a.size(1), Lv = h_v.size(1), r = h_a.size(2);
  FwdCall c;
  FwdParams& p = c.p;
  std::memset(&p, 0, sizeof(p));
  fill_common(p, h_a, h_v, gate_a, gate_v, scale);
  c.out_a = at::empty({N, La, r}, h_a.options());
  c.out_v = at::empty({N, Lv, r}, h_a.options());
  const auto f32 = h_a.options().dtype(at::kFloat);
  c.o_a = at::empty({N, La, r}, f32);
  c.o_v = at::empty({N, Lv, r}, f32);
  c.lse_a = at::empty({N, La}, f32);
  c.lse_v = at::empty({N, Lv}, f32);
  p.out[0] = c.out_a.data_ptr();
  p.out[1] = c.out_v.data_ptr();
  p.o[0] = c.o_a.data_ptr<float>();
  p.o[1] = c.o_v.data_ptr<float>();
  p.lse[0] = c.lse_a.data_ptr<float>();
  p.lse[1] = c.lse_v.data_ptr<float>();
  plan(p, kFwdRM, kFwdRN, kFwdItems, /*bwd=*/false, smem_budget);
  c.num_blocks = N * (p.plan[0].ntiles + p.plan[1].ntiles);
  TORCH_CHECK_VALUE(c.num_blocks <= INT32_MAX, kOp, ": too many frames, N=", N);
  return c;
}

BwdCall prepare_bwd(const at::Tensor& dout_a, const at::Tensor& dout_v, const at::Tensor& h_a,
                    const at::Tensor& h_v, const at::Tensor& gate_a, const at::Tensor& gate_v,
                    const at::Tensor& o_a, const at::Tensor& o_v, const at::Tensor& lse_a,
                    const at::Tensor& lse_v, double scale, int64_t smem_budget) {
  check_inputs(h_a, h_v, gate_a, gate_v);
  const int64_t N = h_a.size(0), La = h_a.size(1), Lv = h_v.size(1), r = h_a.size(2);
  check_tensor(dout_a, "dout_a", "(N, La, r)", {N, La, r}, h_a);
  check_tensor(dout_v, "dout_v", "(N, Lv, r)", {N, Lv, r}, h_a);
  check_tensor(o_a, "o_a", "(N, La, r)", {N, La, r}, h_a, /*fp32=*/true);
  check_tensor(o_v, "o_v", "(N, Lv, r)", {N, Lv, r}, h_a, /*fp32=*/true);
  check_tensor(lse_a, "lse_a", "(N, La)", {N, La}, h_a, /*fp32=*/true);
  check_tensor(lse_v, "lse_v", "(N, Lv)", {N, Lv}, h_a, /*fp32=*/true);

  BwdCall c;
  BwdParams& p = c.p;
  std::memset(&p, 0, sizeof(p));
  fill_common(p, h_a, h_v, gate_a, gate_v, scale);
  const at::Tensor* d[2] = {&dout_a, &dout_v};
  const at::Tensor* o[2] = {&o_a, &o_v};
  const at::Tensor* l[2] = {&lse_a, &lse_v};
  for (int m = 0; m < 2; ++m) {
    p.dout[m] = d[m]->data_ptr();
    copy3(p.sdo[m], *d[m]);
    p.vec_do[m] = vec4_ok(p.dout[m], p.sdo[m], p.r, d[m]->element_size());
    p.o[m] = o[m]->data_ptr<float>();
    copy3(p.so[m], *o[m]);
    p.vec_o[m] = vec4_ok(p.o[m], p.so[m], p.r, 4);
    p.lse[m] = l[m]->data_ptr<float>();
    p.slse[m][0] = l[m]->stride(0);
    p.slse[m][1] = l[m]->stride(1);
  }
  c.dh_a = at::empty({N, La, r}, h_a.options());
  c.dh_v = at::empty({N, Lv, r}, h_a.options());
  c.dgate_a = at::empty({N}, h_a.options().dtype(at::kFloat));
  c.dgate_v = at::empty({N}, h_a.options().dtype(at::kFloat));
  p.dh[0] = c.dh_a.data_ptr();
  p.dh[1] = c.dh_v.data_ptr();
  p.dgate[0] = c.dgate_a.data_ptr<float>();
  p.dgate[1] = c.dgate_v.data_ptr<float>();
  plan(p, kBwdRM, kBwdRN, kBwdItems, /*bwd=*/true, smem_budget);
  c.num_blocks = N * (p.plan[0].ntiles + p.plan[1].ntiles);
  TORCH_CHECK_VALUE(c.num_blocks <= INT32_MAX, kOp, ": too many frames, N=", N);
  return c;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& h_a, const at::Tensor& h_v, const at::Tensor& gate_a,
    const at::Tensor& gate_v, double scale) {
  FwdCall c = prepare_fwd(h_a, h_v, gate_a, gate_v, scale, kSmemBudget);
  const FwdParams& p = c.p;
  dispatch_dtype(kOp, h_a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    run_host<FwdRegs>(p, c.num_blocks, [&](HostExec<FwdRegs>& ex, int64_t blk, float* smem) {
      fwd_block<scalar_t>(ex, p, blk, smem);
    });
  });
  return {c.out_a, c.out_v, c.o_a, c.o_v, c.lse_a, c.lse_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout_a, const at::Tensor& dout_v, const at::Tensor& h_a,
    const at::Tensor& h_v, const at::Tensor& gate_a, const at::Tensor& gate_v,
    const at::Tensor& o_a, const at::Tensor& o_v, const at::Tensor& lse_a,
    const at::Tensor& lse_v, double scale) {
  BwdCall c = prepare_bwd(dout_a, dout_v, h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v,
                          scale, kSmemBudget);
  const BwdParams& p = c.p;
  dispatch_dtype(kOp, h_a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    run_host<BwdRegs>(p, c.num_blocks, [&](HostExec<BwdRegs>& ex, int64_t blk, float* smem) {
      bwd_block<scalar_t>(ex, p, blk, smem);
    });
  });
  return {c.dh_a, c.dh_v, c.dgate_a, c.dgate_v};
}

}  // namespace
}  // namespace av_adapter
}  // namespace avfast

TORCH_LIBRARY_IMPL(avfast_C, CPU, m) {
  m.impl("av_adapter_attention_fwd", &avfast::av_adapter::fwd_cpu);
  m.impl("av_adapter_attention_bwd", &avfast::av_adapter::bwd_cpu);
}
