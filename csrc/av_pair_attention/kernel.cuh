// Dense audio-visual pair attention: the math of the CUDA kernels, written once for the
// GPU and for the host execution (see av_pair_attention.cpp).
//
//   out = softmax(scale q k_a^T) v_a + softmax(scale q k_v^T) v_v + v_bias
//
// Dims: B batch, F fusion queries, Na/Nv audio/visual keys, H heads, Dq query/key head
// width, Dv value head width. "half" 0 is audio, 1 is visual.
//
// Execution model: see common/block_exec.cuh. A kernel is a sequence of phases separated
// by block barriers; the block drivers below (`fwd_block`, `bwd_block`) call
// `ex.phase(fn)`, run by DeviceExec on the GPU (av_pair_attention.cu) and by HostExec on
// the host (av_pair_attention.cpp). No warp shuffles, no atomics.
//
// Tiling. fwd: one block per (b, h, tile of FT queries); it streams over the keys of
// each half in chunks of KC keys with an online softmax in fp32. bwd: one block per
// (b, h); for each chunk of KC keys (both halves) it builds P and dS for all queries
// (in tiles of FT) once, and accumulates dK, dV (registers, one owner thread per
// (key, 4-wide slice)) and dQ (registers when F fits one tile, otherwise an fp32
// workspace owned by the block) from them. All tiles live in shared memory as fp32,
// rows zero-padded to a multiple of 4 so that dot products run on 16-byte vectors.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/block_exec.cuh"

namespace avfast {
namespace av_pair {

// ---------------------------------------------------------------------------------------
// Compile-time limits (registers per thread) and tiling policy
// ---------------------------------------------------------------------------------------
constexpr int kMaxThreads = 256;   // launch bound of both kernels
constexpr int kFwdItems = 4;       // fwd: (query, 4-wide Dv slice) accumulators per thread
constexpr int kBwdKVItems = 4;     // bwd: (key, 4-wide Dq|Dv slice) accumulators per thread
constexpr int kBwdQItems = 4;      // bwd: (query, 4-wide Dq slice) accumulators per thread
constexpr int kMaxHeadDim = 512;   // checked by the op
constexpr int64_t kFwdSmemBudget = 48 * 1024;  // bytes; no opt-in needed
constexpr int64_t kBwdSmemBudget = 96 * 1024;  // bytes; opt-in above 48 KiB (sm_80+)

enum BiasKind : int { kBiasNone = 0, kBiasFloat = 1, kBiasHalf = 2, kBiasBFloat16 = 3 };

struct FwdParams {
  // inputs (element strides); k[half], v[half]; mask[half] == nullptr: no mask
  const void* q;
  const void* k[2];
  const void* v[2];
  const bool* mask[2];
  const void* bias;  // (H, Dv), read as bias_kind
  int bias_kind;
  // outputs, contiguous: out (B, F, H, Dv) scalar_t, o_half (B, F, H, 2, Dv), lse (B, F, H, 2)
  void* out;
  float* o_half;
  float* lse;
  int64_t B, F, H, N[2];
  int Dq, Dv;
  int64_t sq[4], sk[2][4], sv[2][4], smask[2][2], sbias[2];
  float scale;
  bool vec_q, vec_k[2], vec_v[2];  // 4-element vector loads allowed (vec4_ok)
  // plan (plan_fwd)
  int threads, ft, kc, num_ft, ldq, ldk, ldv, ldp;
  int64_t smem_floats;
};

struct BwdParams {
  const void* dout;  // (B, F, H, Dv)
  const void* q;
  const void* k[2];
  const void* v[2];
  const bool* mask[2];
  const float* o_half;  // (B, F, H, 2, Dv)
  const float* lse;     // (B, F, H, 2)
  // outputs, contiguous, in the inputs' dtype (all equal to scalar_t)
  void* dq;
  void* dk[2];
  void* dv[2];
  float* dq_ws;  // (B, H, F, 4*ceil(Dq/4)) fp32 workspace, only when !dq_in_regs
  int64_t B, F, H, N[2];
  int Dq, Dv;
  int64_t sdo[4], sq[4], sk[2][4], sv[2][4], smask[2][2], so[5], slse[4];
  float scale;
  bool vec_q, vec_do, vec_k[2], vec_v[2];  // 4-element vector loads allowed (vec4_ok)
  // plan (plan_bwd)
  int threads, ft, kc, num_ft, ldq, ldk, ldv, ldp;
  bool dq_in_regs;
  int64_t smem_floats;
};

inline int div_up(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
inline int pow2_ceil(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

inline int64_t fwd_smem_floats(int ft, int kc, int ldq, int ldk, int ldv) {
  const int ldp = smem_ld(kc);
  return int64_t(ft) * ldq + int64_t(kc) * ldk + int64_t(kc) * ldv + int64_t(ft) * ldp +
         5 * int64_t(ft) + kc + 2;
}

// Picks FT, KC and the block size of the forward. Deterministic in the shapes only, so
// that the host execution runs exactly the tiling that the GPU runs.
inline void plan_fwd(FwdParams& p) {
  const int nsv = (p.Dv + 3) / 4 > 0 ? (p.Dv + 3) / 4 : 1;
  p.ldq = p.ldk = smem_ld(p.Dq);
  p.ldv = smem_ld(p.Dv);
  int64_t ft = p.F < 64 ? p.F : 64;
  const int64_t ft_regs = (kMaxThreads * kFwdItems) / nsv;  // accumulators must fit
  if (ft > ft_regs) ft = ft_regs;
  if (ft < 1) ft = 1;
  int kc = 64;
  while (fwd_smem_floats(int(ft), kc, p.ldq, p.ldk, p.ldv) * 4 > kFwdSmemBudget) {
    if (kc > 16) kc /= 2;
    else if (ft > 1) ft = (ft + 1) / 2;
    else if (kc > 1) kc /= 2;
    else break;
  }
  p.ft = int(ft);
  p.kc = kc;
  p.ldp = smem_ld(kc);
  p.num_ft = p.F > 0 ? div_up(p.F, p.ft) : 1;
  int threads = pow2_ceil((p.ft * p.kc + 1) / 2);
  const int need = pow2_ceil(div_up(int64_t(p.ft) * nsv, kFwdItems));
  if (threads < need) threads = need;
  if (threads < 64) threads = 64;
  if (threads > kMaxThreads) threads = kMaxThreads;
  p.threads = threads;
  p.smem_floats = fwd_smem_floats(p.ft, p.kc, p.ldq, p.ldk, p.ldv);
}

inline int64_t bwd_smem_floats(int ft, int kc, int ldq, int ldk, int ldv) {
  const int ldp = smem_ld(kc);
  return int64_t(ft) * (ldq + ldv) + int64_t(kc) * (ldk + ldv) + 2 * int64_t(ft) * ldp +
         4 * int64_t(ft) + kc + 2;
}

inline void plan_bwd(BwdParams& p, int64_t smem_budget = kBwdSmemBudget) {
  const int nsq = (p.Dq + 3) / 4, nsv = (p.Dv + 3) / 4;
  const int nsk = nsq + nsv > 0 ? nsq + nsv : 1;
  p.ldq = p.ldk = smem_ld(p.Dq);
  p.ldv = smem_ld(p.Dv);
  p.threads = kMaxThreads;
  int kc = (kMaxThreads * kBwdKVItems) / nsk;  // dK/dV accumulators must fit
  if (kc > 64) kc = 64;
  if (kc > 8) kc = kc / 8 * 8;
  if (kc < 1) kc = 1;
  int64_t ft = p.F < 64 ? p.F : 64;
  if (ft < 1) ft = 1;
  while (bwd_smem_floats(int(ft), kc, p.ldq, p.ldk, p.ldv) * 4 > smem_budget) {
    if (kc > 16) kc /= 2;
    else if (ft > 8) ft = (ft + 1) / 2;
    else if (kc > 1) kc /= 2;
    else if (ft > 1) ft = (ft + 1) / 2;
    else break;
  }
  p.ft = int(ft);
  p.kc = kc;
  p.ldp = smem_ld(kc);
  p.num_ft = p.F > 0 ? div_up(p.F, p.ft) : 1;
  p.dq_in_regs = p.num_ft == 1 && int64_t(p.ft) * nsq <= int64_t(p.threads) * kBwdQItems;
  p.smem_floats = bwd_smem_floats(p.ft, p.kc, p.ldq, p.ldk, p.ldv);
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------
AVF_HD AVF_FI float read_bias(const void* ptr, int kind, int64_t off) {
  switch (kind) {
    case kBiasFloat:
      return static_cast<const float*>(ptr)[off];
    case kBiasHalf:
      return static_cast<float>(static_cast<const c10::Half*>(ptr)[off]);
    case kBiasBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[off]);
    default:
      return 0.f;
  }
}

// Can rows of this (B, N, H, D) tensor be read 4 elements at a time? Unit last stride,
// other strides multiples of 4 and a 4-element aligned base: every (row, 4c) is aligned.
inline bool vec4_ok(const void* ptr, const int64_t* s, int64_t d, int64_t elem_size) {
  return s[3] == 1 && d % 4 == 0 && s[0] % 4 == 0 && s[1] % 4 == 0 && s[2] % 4 == 0 &&
         reinterpret_cast<uintptr_t>(ptr) % (4 * elem_size) == 0;
}

// Row-major (rows x ld) fp32 tile <- rows [r0, r0 + nrows) of a strided (B, N, H, D)
// tensor at (b, h), zero padded. Each step moves 4 columns of one row: consecutive
// threads take consecutive column groups, so loads coalesce when the last stride is 1;
// `vec` (see vec4_ok) reads the 4 elements with one 8/16-byte load.
template <class scalar_t>
AVF_HD AVF_FI void load_tile(int tid, int nthreads, float* dst, int rows, int ld, int nrows,
                             int d_max, const scalar_t* src, const int64_t* s, int64_t b,
                             int64_t r0, int64_t h, bool vec) {
  const scalar_t* base = src + b * s[0] + r0 * s[1] + h * s[2];
  const int nc = ld / 4;
  int r = tid / nc, c = tid - r * nc;  // (r, c) = divmod(i, nc) for i = tid, tid + T, ...
  const int dr = nthreads / nc, dc = nthreads - dr * nc;
  while (r < rows) {
    F4 x = f4_zero();
    const int d = 4 * c;
    if (r < nrows && d < d_max) {
      const scalar_t* rp = base + r * s[1];
      if (vec) {
        x = ld4_global(rp + d);
      } else {
        x.x = to_f(rp[d * s[3]]);
        if (d + 1 < d_max) x.y = to_f(rp[(d + 1) * s[3]]);
        if (d + 2 < d_max) x.z = to_f(rp[(d + 2) * s[3]]);
        if (d + 3 < d_max) x.w = to_f(rp[(d + 3) * s[3]]);
      }
    }
    st4(dst + r * ld + d, x);
    r += dr;
    c += dc;
    if (c >= nc) {
      c -= nc;
      ++r;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward: block = (b, h, query tile). Phases per key chunk: load K/V, scores, row max,
// probabilities, P V (+ row sums). Output in registers, one owner per (f, 4-wide slice).
// ---------------------------------------------------------------------------------------
struct FwdRegs {
  F4 acc[kFwdItems];  // running unnormalized output of the current half
  F4 out[kFwdItems];  // sum of the normalized halves
};

template <class scalar_t, class Exec>
AVF_HD void fwd_block(Exec& ex, const FwdParams& p, int64_t block, float* smem) {
  const int T = p.threads;
  const int ft = p.ft, kc = p.kc, ldq = p.ldq, ldk = p.ldk, ldv = p.ldv, ldp = p.ldp;
  const int Dq = p.Dq, Dv = p.Dv;
  const int nq4 = (Dq + 3) / 4, nsv = (Dv + 3) / 4;
  const int64_t tile = block % p.num_ft, bh = block / p.num_ft;
  const int64_t h = bh % p.H, b = bh / p.H;
  const int64_t f0 = tile * ft;
  const int nf = static_cast<int>(min64(ft, p.F - f0));
  const int64_t F = p.F, H = p.H;

  float* q_s = smem;               // (ft, ldq)
  float* k_s = q_s + ft * ldq;     // (kc, ldk)
  float* v_s = k_s + kc * ldk;     // (kc, ldv)
  float* s_s = v_s + kc * ldv;     // (ft, ldp): scores, then probabilities
  float* m_s = s_s + ft * ldp;     // (2, ft): running max per half
  float* l_s = m_s + 2 * ft;       // (2, ft): running sum per half
  float* a_s = l_s + 2 * ft;       // (ft): rescale factor of the current chunk
  float* kv_s = a_s + ft;          // (kc): 1 if the key is in range and not padded
  float* flag_s = kv_s + kc;       // (2): the sample has a valid key in the half

  // Phase: query tile, row statistics, flags, accumulators.
  ex.phase([&](int tid, FwdRegs& r) {
    load_tile(tid, T, q_s, ft, ldq, nf, Dq, static_cast<const scalar_t*>(p.q), p.sq, b, f0, h, p.vec_q);
    for (int i = tid; i < 2 * ft; i += T) {
      m_s[i] = -INFINITY;
      l_s[i] = 0.f;
    }
    if (tid < 2) flag_s[tid] = (p.mask[tid] == nullptr && p.N[tid] > 0) ? 1.f : 0.f;
    AVF_UNROLL
    for (int it = 0; it < kFwdItems; ++it) r.acc[it] = r.out[it] = f4_zero();
  });
  // Phase: a sample has a valid pair iff it has a valid audio key and a valid visual key.
  ex.phase([&](int tid, FwdRegs&) {
    for (int half = 0; half < 2; ++half) {
      const bool* mk = p.mask[half];
      if (mk == nullptr) continue;
      for (int64_t i = tid; i < p.N[half]; i += T)
        if (!mk[b * p.smask[half][0] + i * p.smask[half][1]]) flag_s[half] = 1.f;
    }
  });
  const bool valid = flag_s[0] != 0.f && flag_s[1] != 0.f;  // uniform over the block

  scalar_t* out = static_cast<scalar_t*>(p.out);
  if (!valid) {  // no valid pair: out = 0 (no bias), o_half = 0, lse = +inf
    ex.phase([&](int tid, FwdRegs&) {
      for (int i = tid; i < nf * Dv; i += T) {
        const int f = i / Dv, d = i - f * Dv;
        const int64_t row = (b * F + f0 + f) * H + h;
        out[row * Dv + d] = static_cast<scalar_t>(0.f);
        p.o_half[(row * 2 + 0) * Dv + d] = 0.f;
        p.o_half[(row * 2 + 1) * Dv + d] = 0.f;
      }
      for (int i = tid; i < nf * 2; i += T) {
        const int f = i / 2, hf = i - 2 * f;
        p.lse[((b * F + f0 + f) * H + h) * 2 + hf] = INFINITY;
      }
    });
    return;
  }

  for (int half = 0; half < 2; ++half) {
    const scalar_t* kp = static_cast<const scalar_t*>(p.k[half]);
    const scalar_t* vp = static_cast<const scalar_t*>(p.v[half]);
    const bool* mk = p.mask[half];
    const int64_t N = p.N[half];
    float* m_h = m_s + half * ft;
    float* l_h = l_s + half * ft;

    for (int64_t c0 = 0; c0 < N; c0 += kc) {
      const int kn = static_cast<int>(min64(kc, N - c0));
      // Phase: K/V chunk and key validity.
      ex.phase([&](int tid, FwdRegs&) {
        load_tile(tid, T, k_s, kc, ldk, kn, Dq, kp, p.sk[half], b, c0, h, p.vec_k[half]);
        load_tile(tid, T, v_s, kc, ldv, kn, Dv, vp, p.sv[half], b, c0, h, p.vec_v[half]);
        for (int j = tid; j < kc; j += T) {
          bool ok = j < kn;
          if (ok && mk != nullptr) ok = !mk[b * p.smask[half][0] + (c0 + j) * p.smask[half][1]];
          kv_s[j] = ok ? 1.f : 0.f;
        }
      });
      // Phase: scores s[f][j] = scale q_f . k_j, -inf for padded keys.
      ex.phase([&](int tid, FwdRegs&) {
        for (int i = tid; i < nf * kc; i += T) {
          const int f = i / kc, j = i - f * kc;
          float s = -INFINITY;
          if (kv_s[j] != 0.f) {
            const float* qr = q_s + f * ldq;
            const float* kr = k_s + j * ldk;
            float acc = 0.f;
            for (int c = 0; c < nq4; ++c) acc = dot4(ld4(qr + 4 * c), ld4(kr + 4 * c), acc);
            s = acc * p.scale;
          }
          s_s[f * ldp + j] = s;
        }
      });
      // Phase: new running max and rescale factor per query row.
      ex.phase([&](int tid, FwdRegs&) {
        for (int f = tid; f < nf; f += T) {
          float mx = -INFINITY;
          for (int j = 0; j < kn; ++j) mx = avf_max(mx, s_s[f * ldp + j]);
          const float m_old = m_h[f];
          const float m_new = avf_max(m_old, mx);
          a_s[f] = m_new == -INFINITY ? 1.f : avf_exp(m_old - m_new);
          m_h[f] = m_new;
        }
      });
      // Phase: probabilities p = exp(s - m).
      ex.phase([&](int tid, FwdRegs&) {
        for (int i = tid; i < nf * kc; i += T) {
          const int f = i / kc, j = i - f * kc;
          const float s = s_s[f * ldp + j];
          s_s[f * ldp + j] = s == -INFINITY ? 0.f : avf_exp(s - m_h[f]);
        }
      });
      // Phase: acc = alpha acc + P V (owner per (f, slice)); l = alpha l + rowsum(P).
      ex.phase([&](int tid, FwdRegs& r) {
        AVF_UNROLL
        for (int it = 0; it < kFwdItems; ++it) {
          const int item = tid + it * T;
          if (item < nf * nsv) {
            const int f = item / nsv, vs = item - f * nsv;
            const float* pr = s_s + f * ldp;
            const float* vc = v_s + 4 * vs;
            const F4 acc = row_times_tile(pr, vc, ldv, kn, scale4(r.acc[it], a_s[f]));
            r.acc[it] = acc;
          }
        }
        for (int f = tid; f < nf; f += T) {
          float sum = 0.f;
          for (int j = 0; j < kn; ++j) sum += s_s[f * ldp + j];
          l_h[f] = l_h[f] * a_s[f] + sum;
        }
      });
    }

    // Phase: normalize the half, store o_half and lse; after the visual half, out.
    ex.phase([&](int tid, FwdRegs& r) {
      AVF_UNROLL
      for (int it = 0; it < kFwdItems; ++it) {
        const int item = tid + it * T;
        if (item < nf * nsv) {
          const int f = item / nsv, vs = item - f * nsv;
          const float l = l_h[f];
          const F4 o = scale4(r.acc[it], l > 0.f ? 1.f / l : 0.f);
          const int64_t row = (b * F + f0 + f) * H + h;
          float* oh = p.o_half + (row * 2 + half) * Dv;
          r.out[it] = F4{r.out[it].x + o.x, r.out[it].y + o.y, r.out[it].z + o.z, r.out[it].w + o.w};
          r.acc[it] = f4_zero();
          AVF_UNROLL for (int e = 0; e < 4; ++e) {
            const int d = 4 * vs + e;
            if (d < Dv) {
              oh[d] = f4_get(o, e);
              if (half == 1) {
                float y = f4_get(r.out[it], e);
                if (p.bias_kind != kBiasNone)
                  y += read_bias(p.bias, p.bias_kind, h * p.sbias[0] + d * p.sbias[1]);
                out[row * Dv + d] = static_cast<scalar_t>(y);
              }
            }
          }
        }
      }
      for (int f = tid; f < nf; f += T)
        p.lse[((b * F + f0 + f) * H + h) * 2 + half] = m_h[f] + avf_log(l_h[f]);
    });
  }
}

// ---------------------------------------------------------------------------------------
// Backward: block = (b, h). Per half and key chunk: load K/V; per query tile: (load Q,
// dO, lse, delta), then P and dS, then dK/dV (owner per (key, slice)) and dQ.
//
//   P = exp(scale q k^T - lse)      delta_f = dO_f . o_half_f(half)
//   dV = P^T dO                     dS = P * (dO V^T - delta)
//   dQ = scale dS K (both halves)   dK = scale dS^T Q
// ---------------------------------------------------------------------------------------
struct BwdRegs {
  F4 dkv[kBwdKVItems];  // dK or dV slice of one key of the current chunk
  F4 dq[kBwdQItems];    // dQ slice of one query (when dq_in_regs)
};

template <class scalar_t, class Exec>
AVF_HD void bwd_block(Exec& ex, const BwdParams& p, int64_t block, float* smem) {
  const int T = p.threads;
  const int ft = p.ft, kc = p.kc, ldq = p.ldq, ldk = p.ldk, ldv = p.ldv, ldp = p.ldp;
  const int Dq = p.Dq, Dv = p.Dv;
  const int nq4 = (Dq + 3) / 4, nv4 = (Dv + 3) / 4;
  const int nsq = nq4, nsk = nq4 + nv4;
  const int64_t h = block % p.H, b = block / p.H;
  const int64_t F = p.F, H = p.H;
  const int wsld = 4 * nsq;  // workspace row length

  float* q_s = smem;               // (ft, ldq)
  float* do_s = q_s + ft * ldq;    // (ft, ldv)
  float* k_s = do_s + ft * ldv;    // (kc, ldk)
  float* v_s = k_s + kc * ldk;     // (kc, ldv)
  float* p_s = v_s + kc * ldv;     // (ft, ldp)
  float* ds_s = p_s + ft * ldp;    // (ft, ldp)
  float* lse_s = ds_s + ft * ldp;  // (2, ft)
  float* dl_s = lse_s + 2 * ft;    // (2, ft): delta per half
  float* kv_s = dl_s + 2 * ft;     // (kc)
  float* flag_s = kv_s + kc;       // (2)

  scalar_t* dq = static_cast<scalar_t*>(p.dq);

  ex.phase([&](int tid, BwdRegs& r) {
    if (tid < 2) flag_s[tid] = (p.mask[tid] == nullptr && p.N[tid] > 0) ? 1.f : 0.f;
    AVF_UNROLL
    for (int it = 0; it < kBwdQItems; ++it) r.dq[it] = f4_zero();
  });
  ex.phase([&](int tid, BwdRegs&) {
    for (int half = 0; half < 2; ++half) {
      const bool* mk = p.mask[half];
      if (mk == nullptr) continue;
      for (int64_t i = tid; i < p.N[half]; i += T)
        if (!mk[b * p.smask[half][0] + i * p.smask[half][1]]) flag_s[half] = 1.f;
    }
  });
  const bool valid = flag_s[0] != 0.f && flag_s[1] != 0.f;

  if (!valid) {  // no valid pair: every gradient of this (b, h) is zero
    ex.phase([&](int tid, BwdRegs&) {
      for (int64_t i = tid; i < F * Dq; i += T) {
        const int64_t f = i / Dq, d = i - f * Dq;
        dq[((b * F + f) * H + h) * Dq + d] = static_cast<scalar_t>(0.f);
      }
      for (int half = 0; half < 2; ++half) {
        const int64_t N = p.N[half];
        scalar_t* dk = static_cast<scalar_t*>(p.dk[half]);
        scalar_t* dv = static_cast<scalar_t*>(p.dv[half]);
        for (int64_t i = tid; i < N * Dq; i += T) {
          const int64_t n = i / Dq, d = i - n * Dq;
          dk[((b * N + n) * H + h) * Dq + d] = static_cast<scalar_t>(0.f);
        }
        for (int64_t i = tid; i < N * Dv; i += T) {
          const int64_t n = i / Dv, d = i - n * Dv;
          dv[((b * N + n) * H + h) * Dv + d] = static_cast<scalar_t>(0.f);
        }
      }
    });
    return;
  }

  const scalar_t* qp = static_cast<const scalar_t*>(p.q);
  const scalar_t* dop = static_cast<const scalar_t*>(p.dout);

  for (int half = 0; half < 2; ++half) {
    const scalar_t* kp = static_cast<const scalar_t*>(p.k[half]);
    const scalar_t* vp = static_cast<const scalar_t*>(p.v[half]);
    scalar_t* dk = static_cast<scalar_t*>(p.dk[half]);
    scalar_t* dv = static_cast<scalar_t*>(p.dv[half]);
    const bool* mk = p.mask[half];
    const int64_t N = p.N[half];

    for (int64_t c0 = 0; c0 < N; c0 += kc) {
      const int kn = static_cast<int>(min64(kc, N - c0));
      const bool first_chunk = half == 0 && c0 == 0;
      // Phase: K/V chunk and key validity; reset the dK/dV accumulators.
      ex.phase([&](int tid, BwdRegs& r) {
        load_tile(tid, T, k_s, kc, ldk, kn, Dq, kp, p.sk[half], b, c0, h, p.vec_k[half]);
        load_tile(tid, T, v_s, kc, ldv, kn, Dv, vp, p.sv[half], b, c0, h, p.vec_v[half]);
        for (int j = tid; j < kc; j += T) {
          bool ok = j < kn;
          if (ok && mk != nullptr) ok = !mk[b * p.smask[half][0] + (c0 + j) * p.smask[half][1]];
          kv_s[j] = ok ? 1.f : 0.f;
        }
        AVF_UNROLL
        for (int it = 0; it < kBwdKVItems; ++it) r.dkv[it] = f4_zero();
      });

      for (int t = 0; t < p.num_ft; ++t) {
        const int64_t f0 = int64_t(t) * ft;
        const int nf = static_cast<int>(min64(ft, F - f0));
        if (p.num_ft > 1 || first_chunk) {
          // Phase: query tile, dO tile, lse of both halves.
          ex.phase([&](int tid, BwdRegs&) {
            load_tile(tid, T, q_s, ft, ldq, nf, Dq, qp, p.sq, b, f0, h, p.vec_q);
            load_tile(tid, T, do_s, ft, ldv, nf, Dv, dop, p.sdo, b, f0, h, p.vec_do);
            for (int i = tid; i < 2 * nf; i += T) {
              const int hf = i / nf, f = i - hf * nf;
              lse_s[hf * ft + f] = p.lse[b * p.slse[0] + (f0 + f) * p.slse[1] + h * p.slse[2] + hf * p.slse[3]];
            }
          });
          // Phase: delta per query row and half.
          ex.phase([&](int tid, BwdRegs&) {
            for (int i = tid; i < 2 * nf; i += T) {
              const int hf = i / nf, f = i - hf * nf;
              const float* o = p.o_half + b * p.so[0] + (f0 + f) * p.so[1] + h * p.so[2] + hf * p.so[3];
              const float* g = do_s + f * ldv;
              float acc = 0.f;
              for (int d = 0; d < Dv; ++d) acc += g[d] * o[d * p.so[4]];
              dl_s[hf * ft + f] = acc;
            }
          });
        }
        // Phase: P and dS of the (query tile, key chunk).
        ex.phase([&](int tid, BwdRegs&) {
          for (int i = tid; i < nf * kc; i += T) {
            const int f = i / kc, j = i - f * kc;
            const float lse = lse_s[half * ft + f];
            float pv = 0.f, ds = 0.f;
            if (kv_s[j] != 0.f && lse < INFINITY) {
              const float* qr = q_s + f * ldq;
              const float* kr = k_s + j * ldk;
              float s = 0.f;
              for (int c = 0; c < nq4; ++c) s = dot4(ld4(qr + 4 * c), ld4(kr + 4 * c), s);
              pv = avf_exp(s * p.scale - lse);
              const float* gr = do_s + f * ldv;
              const float* vr = v_s + j * ldv;
              float dp = 0.f;
              for (int c = 0; c < nv4; ++c) dp = dot4(ld4(gr + 4 * c), ld4(vr + 4 * c), dp);
              ds = pv * (dp - dl_s[half * ft + f]);
            }
            p_s[f * ldp + j] = pv;
            ds_s[f * ldp + j] = ds;
          }
        });
        // Phase: dK/dV += over the tile's queries (owner per (key, slice)); dQ += dS K.
        const bool last_tile = t == p.num_ft - 1;
        ex.phase([&](int tid, BwdRegs& r) {
          AVF_UNROLL
          for (int it = 0; it < kBwdKVItems; ++it) {
            const int item = tid + it * T;
            if (item < kn * nsk) {
              const int j = item / nsk, sl = item - j * nsk;
              F4 acc = r.dkv[it];
              if (sl < nsq) {  // dK_j[4 sl ..] += sum_f dS[f][j] Q[f][4 sl ..]
                for (int f = 0; f < nf; ++f) acc = axpy4(ds_s[f * ldp + j], ld4(q_s + f * ldq + 4 * sl), acc);
              } else {         // dV_j[4 sv ..] += sum_f P[f][j] dO[f][4 sv ..]
                const int sv = sl - nsq;
                for (int f = 0; f < nf; ++f) acc = axpy4(p_s[f * ldp + j], ld4(do_s + f * ldv + 4 * sv), acc);
              }
              r.dkv[it] = acc;
              if (last_tile) {
                if (sl < nsq) {
                  scalar_t* dst = dk + ((b * N + c0 + j) * H + h) * Dq;
                  AVF_UNROLL for (int e = 0; e < 4; ++e)
                    if (4 * sl + e < Dq) dst[4 * sl + e] = static_cast<scalar_t>(f4_get(acc, e) * p.scale);
                } else {
                  const int sv = sl - nsq;
                  scalar_t* dst = dv + ((b * N + c0 + j) * H + h) * Dv;
                  AVF_UNROLL for (int e = 0; e < 4; ++e)
                    if (4 * sv + e < Dv) dst[4 * sv + e] = static_cast<scalar_t>(f4_get(acc, e));
                }
              }
            }
          }
          if (p.dq_in_regs) {
            AVF_UNROLL
            for (int it = 0; it < kBwdQItems; ++it) {
              const int item = tid + it * T;
              if (item < nf * nsq) {
                const int f = item / nsq, sl = item - f * nsq;
                r.dq[it] = row_times_tile(ds_s + f * ldp, k_s + 4 * sl, ldk, kn, r.dq[it]);
              }
            }
          } else {
            for (int item = tid; item < nf * nsq; item += T) {
              const int f = item / nsq, sl = item - f * nsq;
              float* w = p.dq_ws + ((b * H + h) * F + f0 + f) * wsld + 4 * sl;
              F4 acc = first_chunk ? f4_zero() : F4{w[0], w[1], w[2], w[3]};
              acc = row_times_tile(ds_s + f * ldp, k_s + 4 * sl, ldk, kn, acc);
              w[0] = acc.x;
              w[1] = acc.y;
              w[2] = acc.z;
              w[3] = acc.w;
            }
          }
        });
      }
    }
  }

  // Phase: dQ = scale * accumulated dS K.
  ex.phase([&](int tid, BwdRegs& r) {
    if (p.dq_in_regs) {
      AVF_UNROLL
      for (int it = 0; it < kBwdQItems; ++it) {
        const int item = tid + it * T;
        if (item < F * nsq) {
          const int f = item / nsq, sl = item - f * nsq;
          scalar_t* dst = dq + ((b * F + f) * H + h) * Dq;
          AVF_UNROLL for (int e = 0; e < 4; ++e)
            if (4 * sl + e < Dq) dst[4 * sl + e] = static_cast<scalar_t>(f4_get(r.dq[it], e) * p.scale);
        }
      }
    } else {
      for (int64_t item = tid; item < F * nsq; item += T) {
        const int64_t f = item / nsq, sl = item - f * nsq;
        const float* w = p.dq_ws + ((b * H + h) * F + f) * wsld + 4 * sl;
        scalar_t* dst = dq + ((b * F + f) * H + h) * Dq;
        AVF_UNROLL for (int e = 0; e < 4; ++e)
          if (4 * sl + e < Dq) dst[4 * sl + e] = static_cast<scalar_t>(w[e] * p.scale);
      }
    }
  });
}

}  // namespace av_pair
}  // namespace avfast
