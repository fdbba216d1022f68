// STG-CMA two-way adapter attention: the math of the CUDA kernels, written once for the
// GPU and for the host execution (see av_adapter_attention.cpp).
//
// Per frame n, with S = scale h_v h_a^T (Lv x La):
//   h_v' = h_v + gate_v[n] softmax_rows(S) h_a,    h_a' = h_a + gate_a[n] softmax_rows(S^T) h_v
//
// Dims: N frames, La audio / Lv visual tokens, r bottleneck width. Modality 0 is audio,
// 1 is visual. A *side* s is the attention whose queries are the tokens of modality s and
// whose keys and values are the tokens X_o of the other modality o = 1 - s. Both sides
// have the same form, so one block driver serves both directions:
//   fwd, side s:  S_s = scale X_s X_o^T,  o_s = softmax_rows(S_s) X_o,
//                 lse_s = logsumexp_rows(S_s),  out_s = X_s + gate_s o_s
//   bwd, side s (G = gate * dout, delta = rowsum(G o), P_s = exp(S_s - lse_s) and
//   P_o^T = exp(S_s - lse_o^T), the other side's probabilities seen from side s):
//     dS   = scale (P_s (G_s X_o^T - delta_s) + P_o^T (X_s G_o^T - delta_o^T))
//     dX_s = dout_s + P_o^T G_o + dS X_o
//     dgate_o = sum_j dout_o[j] . o_o[j]        (written by the side's first tile)
// (the reference's dh_v = dout_v + P_a^T G_a + dS h_a and dh_a = dout_a + P_v^T G_v +
// dS^T h_v, split by the rows they produce). Each block owns rows of one side and
// recomputes its scores, so blocks never share outputs: no atomics, no second pass.
//
// Execution model: see common/block_exec.cuh. A kernel is a sequence of phases separated
// by block barriers; `ex.phase(fn)` is run by DeviceExec on the GPU
// (av_adapter_attention.cu) and by HostExec on the host (av_adapter_attention.cpp). No
// warp shuffles, no atomics.
//
// Tiling. One launch per direction (fwd, bwd) over blocks (side, frame, tile of fq query
// rows): side 0's blocks first, then side 1's. A block streams over the keys of its frame
// in chunks of kc (usually one chunk), everything in fp32 shared memory, rows zero-padded
// to a multiple of 4 floats for 16-byte vector reads. Score-like products (X_s X_o^T and,
// in the bwd, G_s X_o^T, X_s G_o^T) run on register micro-tiles of RM rows x RN keys per
// thread (keys jj, jj + kt, ..., so that neighbouring threads read neighbouring rows);
// P X_o-like products accumulate in registers, one owner thread per (row, 4-wide slice).
#pragma once

#include <cstdint>

#include "common/block_exec.cuh"

namespace avfast {
namespace av_adapter {

// ---------------------------------------------------------------------------------------
// Compile-time limits and tiling policy
// ---------------------------------------------------------------------------------------
constexpr int kThreads = 256;              // block size of both kernels (launch bound)
constexpr int kFwdItems = 4;               // fwd: (row, 4-wide slice) accumulators per thread
constexpr int kBwdItems = 4;               // bwd: (row, 4-wide slice) accumulators per thread
constexpr int kFwdRM = 4, kFwdRN = 4;      // fwd score micro-tile: rows x keys per thread
constexpr int kBwdRM = 2, kBwdRN = 4;      // bwd micro-tile (three products per element)
constexpr int kMaxRows = 64;               // query rows per block
constexpr int kScoresPerBlock = 4096;      // target rows x keys per block (sets fq)
constexpr int kKcMax = 256;                // keys per chunk
constexpr int kDotGroups = 8;              // bwd: at most this many partial dots per row (delta)
constexpr int kMaxR = 1024;                // checked by the op
constexpr int64_t kSmemBudget = 96 * 1024; // bytes per block; opt-in above 48 KiB (sm_80+)

// Tiling of one side: blocks of fq query rows (fqp = fq padded to the micro-tile),
// key chunks of kc keys (kcp = kt * RN), score tiles with row stride ldp; bwd: delta of
// a row as ng partial dot products over cg 4-wide slices each.
struct SidePlan {
  int fq, fqp, kc, kcp, kt, ldp, cg, ng;
  int64_t ntiles;       // blocks per frame
  int64_t smem_floats;  // this side's shared memory
};

struct FwdParams {
  // inputs: h[m] (N, L[m], r) any strides; gate[m] (N,) fp32 any stride
  const void* h[2];
  int64_t sh[2][3];
  bool vec_h[2];  // rows readable 4 elements at a time (vec4_ok)
  const float* gate[2];
  int64_t sgate[2];
  // outputs, contiguous: out[m] (N, L[m], r) scalar_t; o[m] (N, L[m], r), lse[m] (N, L[m]) fp32
  void* out[2];
  float* o[2];
  float* lse[2];
  int64_t N, L[2];
  int r, ldr;
  float scale;
  bool vec_out;  // r % 4 == 0: 4-element stores
  SidePlan plan[2];
  int threads;
  int64_t smem_floats;
};

struct BwdParams {
  const void* h[2];     // (N, L[m], r) scalar_t
  const void* dout[2];  // (N, L[m], r) scalar_t
  const float* o[2];    // (N, L[m], r)
  const float* lse[2];  // (N, L[m])
  const float* gate[2];  // (N,)
  int64_t sh[2][3], sdo[2][3], so[2][3], slse[2][2], sgate[2];
  bool vec_h[2], vec_do[2], vec_o[2];
  // outputs, contiguous: dh[m] (N, L[m], r) scalar_t; dgate[m] (N,) fp32
  void* dh[2];
  float* dgate[2];
  int64_t N, L[2];
  int r, ldr;
  float scale;
  bool vec_out;
  SidePlan plan[2];
  int threads;
  int64_t smem_floats;
};

// ---------------------------------------------------------------------------------------
// Planning (host). Deterministic in the shapes and the budget only, so that the host
// execution runs exactly the tiling that the GPU runs.
// ---------------------------------------------------------------------------------------
AVF_HD AVF_FI int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
AVF_HD AVF_FI int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

inline int64_t fwd_side_floats(const SidePlan& s, int ldr) {
  // x (fqp, ldr) | y (kcp, ldr) | s (fqp, ldp) | pmax, psum (fqp, kt) | m, l, alpha (fqp)
  return int64_t(s.fqp) * ldr + int64_t(s.kcp) * ldr + int64_t(s.fqp) * s.ldp +
         2 * int64_t(s.fqp) * s.kt + 3 * int64_t(s.fqp);
}

inline int64_t bwd_side_floats(const SidePlan& s, int ldr, int64_t nk) {
  // x, g (fqp, ldr) | y, go (kcp, ldr), aliased by the delta partials ((nk + fqp), ng) |
  // po, ds (fqp, ldp) | lse_q, delta_q (fqp) | lse_k, raw_k (nk)
  const int64_t kv = 2 * int64_t(s.kcp) * ldr;
  const int64_t part = (nk + s.fqp) * s.ng;
  return 2 * int64_t(s.fqp) * ldr + round_up(kv > part ? kv : part, 4) +
         2 * int64_t(s.fqp) * s.ldp + 2 * int64_t(s.fqp) + 2 * nk;
}

inline void set_tiles(SidePlan& s, int64_t nq, int64_t fq, int rm) {
  s.ntiles = nq > 0 ? cdiv(nq, fq) : 0;
  s.fq = static_cast<int>(nq > 0 ? cdiv(nq, s.ntiles) : 1);  // balanced tiles
  s.fqp = static_cast<int>(round_up(s.fq, rm));
}

inline void set_chunks(SidePlan& s, int64_t nk, int64_t kc, int rn) {
  if (nk > 0) kc = cdiv(nk, cdiv(nk, kc));  // balanced chunks
  s.kc = static_cast<int>(kc < 1 ? 1 : kc);
  s.kt = static_cast<int>(cdiv(s.kc, rn));
  s.kcp = s.kt * rn;
  s.ldp = smem_ld(s.kcp);
}

// bwd: split each delta dot product into partials only while rows (nk + fqp) are fewer
// than threads, so that the partials never outgrow the key-chunk buffers they alias.
inline void set_dot_groups(SidePlan& s, int64_t nk, int nr4) {
  int64_t ng = cdiv(kThreads, nk + s.fqp);
  if (ng > kDotGroups) ng = kDotGroups;
  if (ng > nr4) ng = nr4;
  s.cg = static_cast<int>(cdiv(nr4, ng < 1 ? 1 : ng));
  s.ng = static_cast<int>(cdiv(nr4, s.cg));
}

// Side with nq query rows over nk keys. Returns false if no tiling fits the budget.
inline bool plan_side(SidePlan& s, int64_t nq, int64_t nk, int r, int ldr, int rm, int rn,
                      int items, bool bwd, int64_t budget_bytes) {
  const int64_t nr4 = r > 0 ? (r + 3) / 4 : 1;
  int64_t fq = int64_t(kThreads) * items / nr4;  // accumulators must fit in registers
  if (fq > kMaxRows) fq = kMaxRows;
  const int64_t fq_work = kScoresPerBlock / (nk > 0 ? nk : 1);
  if (fq > fq_work) fq = fq_work;
  if (fq > nq) fq = nq;
  if (fq < 1) fq = 1;
  int64_t kc = nk < kKcMax ? nk : kKcMax;
  for (;;) {
    set_tiles(s, nq, fq, rm);
    set_chunks(s, nk, kc, rn);
    set_dot_groups(s, nk, static_cast<int>(nr4));
    s.smem_floats = bwd ? bwd_side_floats(s, ldr, nk) : fwd_side_floats(s, ldr);
    if (s.smem_floats * 4 <= budget_bytes) return true;
    if (kc > 16) kc = (kc + 1) / 2;
    else if (fq > 1) fq = (fq + 1) / 2;
    else if (kc > 1) kc = (kc + 1) / 2;
    else return false;
  }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------
// Elements [d, d + 4) of a row (element stride sd), zero past d_max. vec: one 4-element load.
template <class T>
AVF_HD AVF_FI F4 ld_row4(const T* row, int64_t sd, int d, int d_max, bool vec) {
  if (vec) return ld4_global(row + d);
  F4 x = f4_zero();
  if (d < d_max) x.x = to_f(row[d * sd]);
  if (d + 1 < d_max) x.y = to_f(row[(d + 1) * sd]);
  if (d + 2 < d_max) x.z = to_f(row[(d + 2) * sd]);
  if (d + 3 < d_max) x.w = to_f(row[(d + 3) * sd]);
  return x;
}

// Stores the first min(4, d_max - d) elements of x at row[d ..] (contiguous row).
template <class T>
AVF_HD AVF_FI void st_row4(T* row, int d, int d_max, F4 x, bool vec) {
  if (vec) {
    st4_global(row + d, x);
    return;
  }
  AVF_UNROLL for (int e = 0; e < 4; ++e) if (d + e < d_max) row[d + e] = static_cast<T>(f4_get(x, e));
}

// Can rows of this (N, L, r) tensor be read 4 elements at a time? Unit last stride,
// other strides multiples of 4 and a 4-element aligned base.
inline bool vec4_ok(const void* ptr, const int64_t* s, int64_t r, int64_t elem_size) {
  return s[2] == 1 && r % 4 == 0 && s[0] % 4 == 0 && s[1] % 4 == 0 &&
         reinterpret_cast<uintptr_t>(ptr) % (4 * elem_size) == 0;
}

// Row-major (rows x ld) fp32 tile <- mult * rows [r0, r0 + nrows) of a strided (N, L, r)
// tensor at frame n, zero padded (rows past nrows, columns past r). Consecutive threads
// take consecutive 4-column groups of a row, so loads coalesce when the last stride is 1.
template <class T>
AVF_HD AVF_FI void load_rows(int tid, int nthreads, float* dst, int rows, int ld, int nrows,
                             int r, const T* src, const int64_t* s, int64_t n, int64_t r0,
                             float mult, bool vec) {
  const T* base = src + n * s[0] + r0 * s[1];
  const int nc = ld / 4;
  int i = tid / nc, c = tid - i * nc;  // (i, c) = divmod(k, nc) for k = tid, tid + T, ...
  const int di = nthreads / nc, dc = nthreads - di * nc;
  while (i < rows) {
    F4 x = f4_zero();
    const int d = 4 * c;
    if (i < nrows && d < r) x = scale4(ld_row4(base + i * s[1], s[2], d, r, vec), mult);
    st4(dst + i * ld + d, x);
    i += di;
    c += dc;
    if (c >= nc) {
      c -= nc;
      ++i;
    }
  }
}

// acc + sum_{j < kn} (w1[j] x1[j, ..] + w2[j] x2[j, ..]), both tiles with row stride ldx.
AVF_HD AVF_FI F4 rows_times_tiles(const float* w1, const float* x1, const float* w2,
                                  const float* x2, int ldx, int kn, F4 acc) {
  int j = 0;
  for (; j + 4 <= kn; j += 4) {
    const F4 a = ld4(w1 + j), b = ld4(w2 + j);
    acc = axpy4(a.x, ld4(x1 + j * ldx), acc);
    acc = axpy4(b.x, ld4(x2 + j * ldx), acc);
    acc = axpy4(a.y, ld4(x1 + (j + 1) * ldx), acc);
    acc = axpy4(b.y, ld4(x2 + (j + 1) * ldx), acc);
    acc = axpy4(a.z, ld4(x1 + (j + 2) * ldx), acc);
    acc = axpy4(b.z, ld4(x2 + (j + 2) * ldx), acc);
    acc = axpy4(a.w, ld4(x1 + (j + 3) * ldx), acc);
    acc = axpy4(b.w, ld4(x2 + (j + 3) * ldx), acc);
  }
  for (; j < kn; ++j) {
    acc = axpy4(w1[j], ld4(x1 + j * ldx), acc);
    acc = axpy4(w2[j], ld4(x2 + j * ldx), acc);
  }
  return acc;
}

// Block index -> (side, frame, tile); side 0's N * ntiles[0] blocks come first.
AVF_HD AVF_FI void decode_block(const SidePlan* plan, int64_t N, int64_t block, int& side,
                                int64_t& n, int64_t& tile) {
  const int64_t b0 = N * plan[0].ntiles;
  side = block < b0 ? 0 : 1;
  const int64_t rel = side == 0 ? block : block - b0;
  n = rel / plan[side].ntiles;
  tile = rel - n * plan[side].ntiles;
}

// ---------------------------------------------------------------------------------------
// Forward: block = (side s, frame n, tile of fq rows of X_s). Per key chunk of X_o:
// load, scores (+ partial row max), row max, probabilities (+ partial row sums), P X_o.
// Online softmax in fp32; output in registers, one owner per (row, 4-wide slice).
// ---------------------------------------------------------------------------------------
struct FwdRegs {
  F4 acc[kFwdItems];  // unnormalized P X_o of one (row, slice)
};

template <class scalar_t, class Exec>
AVF_HD void fwd_block(Exec& ex, const FwdParams& p, int64_t block, float* smem) {
  constexpr int RM = kFwdRM, RN = kFwdRN;
  int side;
  int64_t n, tile;
  decode_block(p.plan, p.N, block, side, n, tile);
  const int other = 1 - side;
  const SidePlan& pl = p.plan[side];
  const int T = p.threads, r = p.r, ldr = p.ldr, nr4 = (r + 3) / 4;
  const int fqp = pl.fqp, kcp = pl.kcp, kt = pl.kt, ldp = pl.ldp, kc = pl.kc;
  const int64_t nq = p.L[side], nk = p.L[other];
  const int64_t f0 = tile * pl.fq;
  const int nf = static_cast<int>(min64(pl.fq, nq - f0));
  const int n_mt = (fqp / RM) * kt;  // score micro-tiles
  const float scale = p.scale;

  float* x_s = smem;                // (fqp, ldr) query rows X_s
  float* y_s = x_s + fqp * ldr;     // (kcp, ldr) key chunk of X_o
  float* s_s = y_s + kcp * ldr;     // (fqp, ldp) scores, then probabilities
  float* pm_s = s_s + fqp * ldp;    // (fqp, kt) partial row max per micro-tile column
  float* ps_s = pm_s + fqp * kt;    // (fqp, kt) partial row sums
  float* m_s = ps_s + fqp * kt;     // (fqp) running max
  float* l_s = m_s + fqp;           // (fqp) running sum
  float* a_s = l_s + fqp;           // (fqp) rescale factor of the current chunk

  const scalar_t* xp = static_cast<const scalar_t*>(p.h[side]);
  const scalar_t* yp = static_cast<const scalar_t*>(p.h[other]);

  // Phase: query rows, row statistics, accumulators.
  ex.phase([&](int tid, FwdRegs& rg) {
    load_rows(tid, T, x_s, fqp, ldr, nf, r, xp, p.sh[side], n, f0, 1.f, p.vec_h[side]);
    for (int f = tid; f < fqp; f += T) {
      m_s[f] = -INFINITY;
      l_s[f] = 0.f;
    }
    AVF_UNROLL for (int it = 0; it < kFwdItems; ++it) rg.acc[it] = f4_zero();
  });

  for (int64_t c0 = 0; c0 < nk; c0 += kc) {
    const int kn = static_cast<int>(min64(kc, nk - c0));
    // Phase: key chunk.
    ex.phase([&](int tid, FwdRegs&) {
      load_rows(tid, T, y_s, kcp, ldr, kn, r, yp, p.sh[other], n, c0, 1.f, p.vec_h[other]);
    });
    // Phase: scores s[f][j] = scale x_f . y_j on RM x RN micro-tiles (keys jj + b kt);
    // partial max over the valid keys of each micro-tile row.
    ex.phase([&](int tid, FwdRegs&) {
      for (int mt = tid; mt < n_mt; mt += T) {
        const int fi = mt / kt, jj = mt - fi * kt;
        float acc[RM][RN];
        AVF_UNROLL for (int a = 0; a < RM; ++a) AVF_UNROLL for (int b = 0; b < RN; ++b) acc[a][b] = 0.f;
        const float* xr = x_s + fi * RM * ldr;
        const float* yr = y_s + jj * ldr;
        for (int c = 0; c < nr4; ++c) {
          F4 xv[RM], yv[RN];
          AVF_UNROLL for (int a = 0; a < RM; ++a) xv[a] = ld4(xr + a * ldr + 4 * c);
          AVF_UNROLL for (int b = 0; b < RN; ++b) yv[b] = ld4(yr + b * kt * ldr + 4 * c);
          AVF_UNROLL for (int a = 0; a < RM; ++a) AVF_UNROLL for (int b = 0; b < RN; ++b)
            acc[a][b] = dot4(xv[a], yv[b], acc[a][b]);
        }
        AVF_UNROLL for (int a = 0; a < RM; ++a) {
          const int f = fi * RM + a;
          float mx = -INFINITY;
          AVF_UNROLL for (int b = 0; b < RN; ++b) {
            const int j = jj + b * kt;
            const float s = acc[a][b] * scale;
            s_s[f * ldp + j] = s;
            if (j < kn) mx = avf_max(mx, s);
          }
          pm_s[f * kt + jj] = mx;
        }
      }
    });
    // Phase: new running max and rescale factor per row.
    ex.phase([&](int tid, FwdRegs&) {
      for (int f = tid; f < nf; f += T) {
        float mx = -INFINITY;
        for (int jj = 0; jj < kt; ++jj) mx = avf_max(mx, pm_s[f * kt + jj]);
        const float m_old = m_s[f];
        const float m_new = avf_max(m_old, mx);
        a_s[f] = m_new == -INFINITY ? 1.f : avf_exp(m_old - m_new);
        m_s[f] = m_new;
      }
    });
    // Phase: probabilities exp(s - m) (0 for padding), partial row sums.
    ex.phase([&](int tid, FwdRegs&) {
      for (int mt = tid; mt < n_mt; mt += T) {
        const int fi = mt / kt, jj = mt - fi * kt;
        AVF_UNROLL for (int a = 0; a < RM; ++a) {
          const int f = fi * RM + a;
          const float m = f < nf ? m_s[f] : 0.f;
          float sum = 0.f;
          AVF_UNROLL for (int b = 0; b < RN; ++b) {
            const int j = jj + b * kt;
            float pv = 0.f;
            if (f < nf && j < kn) {
              const float s = s_s[f * ldp + j];
              pv = s == -INFINITY ? 0.f : avf_exp(s - m);
            }
            s_s[f * ldp + j] = pv;
            sum += pv;
          }
          ps_s[f * kt + jj] = sum;
        }
      }
    });
    // Phase: acc = alpha acc + P Y (owner per (row, slice)); l = alpha l + rowsum(P).
    ex.phase([&](int tid, FwdRegs& rg) {
      AVF_UNROLL for (int it = 0; it < kFwdItems; ++it) {
        const int item = tid + it * T;
        if (item < nf * nr4) {
          const int f = item / nr4, c = item - f * nr4;
          rg.acc[it] = row_times_tile(s_s + f * ldp, y_s + 4 * c, ldr, kn, scale4(rg.acc[it], a_s[f]));
        }
      }
      for (int f = tid; f < nf; f += T) {
        float sum = 0.f;
        for (int jj = 0; jj < kt; ++jj) sum += ps_s[f * kt + jj];
        l_s[f] = l_s[f] * a_s[f] + sum;
      }
    });
  }

  // Phase: o = acc / l, out = x + gate o, lse = m + log l.
  const float gate = p.gate[side][n * p.sgate[side]];
  scalar_t* out = static_cast<scalar_t*>(p.out[side]);
  float* o = p.o[side];
  ex.phase([&](int tid, FwdRegs& rg) {
    AVF_UNROLL for (int it = 0; it < kFwdItems; ++it) {
      const int item = tid + it * T;
      if (item < nf * nr4) {
        const int f = item / nr4, c = item - f * nr4;
        const float l = l_s[f];
        const F4 ov = scale4(rg.acc[it], l > 0.f ? 1.f / l : 0.f);
        const F4 xv = ld4(x_s + f * ldr + 4 * c);
        const F4 yv = F4{xv.x + gate * ov.x, xv.y + gate * ov.y, xv.z + gate * ov.z, xv.w + gate * ov.w};
        const int64_t row = (n * nq + f0 + f) * r;
        st_row4(o + row, 4 * c, r, ov, p.vec_out);
        st_row4(out + row, 4 * c, r, yv, p.vec_out);
      }
    }
    for (int f = tid; f < nf; f += T) p.lse[side][n * nq + f0 + f] = m_s[f] + avf_log(l_s[f]);
  });
}

// ---------------------------------------------------------------------------------------
// Backward: block = (side s, frame n, tile of fq rows of X_s); the formulas are at the
// top of this file. Prologue: rows X_s, G_s = gate_s dout_s, dX_s = dout_s (registers),
// lse and delta of the block's rows and of all keys X_o of the frame (delta from ng
// partial dot products per row, then their sum). Per key chunk: load X_o, G_o; the three
// products on micro-tiles and P_o^T, dS; dX_s += P_o^T G_o + dS X_o.
// ---------------------------------------------------------------------------------------
struct BwdRegs {
  F4 acc[kBwdItems];  // dX_s of one (row, slice)
};

template <class scalar_t, class Exec>
AVF_HD void bwd_block(Exec& ex, const BwdParams& p, int64_t block, float* smem) {
  constexpr int RM = kBwdRM, RN = kBwdRN;
  int side;
  int64_t n, tile;
  decode_block(p.plan, p.N, block, side, n, tile);
  const int other = 1 - side;
  const SidePlan& pl = p.plan[side];
  const int T = p.threads, r = p.r, ldr = p.ldr, nr4 = (r + 3) / 4;
  const int fqp = pl.fqp, kcp = pl.kcp, kt = pl.kt, ldp = pl.ldp, kc = pl.kc;
  const int cg = pl.cg, ng = pl.ng;
  const int64_t nq = p.L[side], nk = p.L[other];
  const int64_t f0 = tile * pl.fq;
  const int nf = static_cast<int>(nq > f0 ? min64(pl.fq, nq - f0) : 0);
  const int n_mt = (fqp / RM) * kt;
  const float scale = p.scale;
  const float gate_s = p.gate[side][n * p.sgate[side]];
  const float gate_o = p.gate[other][n * p.sgate[other]];

  const int64_t kv_floats = 2 * int64_t(kcp) * ldr, part_floats = (nk + fqp) * ng;
  float* x_s = smem;                // (fqp, ldr) rows X_s
  float* g_s = x_s + fqp * ldr;     // (fqp, ldr) G_s = gate_s dout_s
  float* y_s = g_s + fqp * ldr;     // (kcp, ldr) key chunk of X_o
  float* go_s = y_s + kcp * ldr;    // (kcp, ldr) G_o = gate_o dout_o
  float* part_s = y_s;              // (nk + fqp, ng) delta partials (prologue only)
  float* po_s = y_s + round_up(kv_floats > part_floats ? kv_floats : part_floats, 4);  // (fqp, ldp) P_o^T
  float* ds_s = po_s + fqp * ldp;   // (fqp, ldp) dS
  float* lseq_s = ds_s + fqp * ldp; // (fqp) lse_s of the block's rows
  float* dlq_s = lseq_s + fqp;      // (fqp) delta_s
  float* lsek_s = dlq_s + fqp;      // (nk) lse_o of all keys
  float* rawk_s = lsek_s + nk;      // (nk) dout_o . o_o of all keys (delta_o / gate_o)

  const scalar_t* xp = static_cast<const scalar_t*>(p.h[side]);
  const scalar_t* yp = static_cast<const scalar_t*>(p.h[other]);
  const scalar_t* dxp = static_cast<const scalar_t*>(p.dout[side]);
  const scalar_t* dyp = static_cast<const scalar_t*>(p.dout[other]);

  // Phase: rows X_s and G_s; dX_s = dout_s; lse of rows and keys; delta partials.
  ex.phase([&](int tid, BwdRegs& rg) {
    load_rows(tid, T, x_s, fqp, ldr, nf, r, xp, p.sh[side], n, f0, 1.f, p.vec_h[side]);
    load_rows(tid, T, g_s, fqp, ldr, nf, r, dxp, p.sdo[side], n, f0, gate_s, p.vec_do[side]);
    AVF_UNROLL for (int it = 0; it < kBwdItems; ++it) {
      const int item = tid + it * T;
      rg.acc[it] = f4_zero();
      if (item < nf * nr4) {
        const int f = item / nr4, c = item - f * nr4;
        const scalar_t* row = dxp + n * p.sdo[side][0] + (f0 + f) * p.sdo[side][1];
        rg.acc[it] = ld_row4(row, p.sdo[side][2], 4 * c, r, p.vec_do[side]);
      }
    }
    const float* lq = p.lse[side] + n * p.slse[side][0];
    const float* lk = p.lse[other] + n * p.slse[other][0];
    for (int f = tid; f < nf; f += T) lseq_s[f] = lq[(f0 + f) * p.slse[side][1]];
    for (int64_t j = tid; j < nk; j += T) lsek_s[j] = lk[j * p.slse[other][1]];
    // part[R][g] = dout . o over slices [g cg, (g + 1) cg) of row R: keys R < nk, then rows.
    for (int64_t i = tid; i < (nk + nf) * ng; i += T) {
      const int64_t R = i / ng;
      const int g = static_cast<int>(i - R * ng);
      const int m = R < nk ? other : side;
      const int64_t row = R < nk ? R : f0 + (R - nk);
      const scalar_t* dr = static_cast<const scalar_t*>(p.dout[m]) + n * p.sdo[m][0] + row * p.sdo[m][1];
      const float* orow = p.o[m] + n * p.so[m][0] + row * p.so[m][1];
      float acc = 0.f;
      const int c_end = static_cast<int>(min64(nr4, int64_t(g + 1) * cg));
      for (int c = g * cg; c < c_end; ++c)
        acc = dot4(ld_row4(dr, p.sdo[m][2], 4 * c, r, p.vec_do[m]),
                   ld_row4(orow, p.so[m][2], 4 * c, r, p.vec_o[m]), acc);
      part_s[R * ng + g] = acc;
    }
  });
  // Phase: raw_k = dout_o . o_o per key; delta_q = gate_s dout_s . o_s per row.
  ex.phase([&](int tid, BwdRegs&) {
    for (int64_t R = tid; R < nk + nf; R += T) {
      float sum = 0.f;
      for (int g = 0; g < ng; ++g) sum += part_s[R * ng + g];
      if (R < nk) rawk_s[R] = sum;
      else dlq_s[R - nk] = gate_s * sum;
    }
  });

  if (nf > 0) {
    for (int64_t c0 = 0; c0 < nk; c0 += kc) {
      const int kn = static_cast<int>(min64(kc, nk - c0));
      // Phase: key chunk X_o and G_o (overwrites the delta partials).
      ex.phase([&](int tid, BwdRegs&) {
        load_rows(tid, T, y_s, kcp, ldr, kn, r, yp, p.sh[other], n, c0, 1.f, p.vec_h[other]);
        load_rows(tid, T, go_s, kcp, ldr, kn, r, dyp, p.sdo[other], n, c0, gate_o, p.vec_do[other]);
      });
      // Phase: on RM x RN micro-tiles s = scale x.y, gy = g.y, xg = x.go, then
      // P_s = exp(s - lse_s), P_o^T = exp(s - lse_o), dS (0 for padding).
      ex.phase([&](int tid, BwdRegs&) {
        for (int mt = tid; mt < n_mt; mt += T) {
          const int fi = mt / kt, jj = mt - fi * kt;
          float sxy[RM][RN], sgy[RM][RN], sxg[RM][RN];
          AVF_UNROLL for (int a = 0; a < RM; ++a) AVF_UNROLL for (int b = 0; b < RN; ++b)
            sxy[a][b] = sgy[a][b] = sxg[a][b] = 0.f;
          const float* xr = x_s + fi * RM * ldr;
          const float* gr = g_s + fi * RM * ldr;
          const float* yr = y_s + jj * ldr;
          const float* ogr = go_s + jj * ldr;
          for (int c = 0; c < nr4; ++c) {
            F4 xv[RM], gv[RM], yv[RN], ov[RN];
            AVF_UNROLL for (int a = 0; a < RM; ++a) {
              xv[a] = ld4(xr + a * ldr + 4 * c);
              gv[a] = ld4(gr + a * ldr + 4 * c);
            }
            AVF_UNROLL for (int b = 0; b < RN; ++b) {
              yv[b] = ld4(yr + b * kt * ldr + 4 * c);
              ov[b] = ld4(ogr + b * kt * ldr + 4 * c);
            }
            AVF_UNROLL for (int a = 0; a < RM; ++a) AVF_UNROLL for (int b = 0; b < RN; ++b) {
              sxy[a][b] = dot4(xv[a], yv[b], sxy[a][b]);
              sgy[a][b] = dot4(gv[a], yv[b], sgy[a][b]);
              sxg[a][b] = dot4(xv[a], ov[b], sxg[a][b]);
            }
          }
          AVF_UNROLL for (int a = 0; a < RM; ++a) {
            const int f = fi * RM + a;
            AVF_UNROLL for (int b = 0; b < RN; ++b) {
              const int j = jj + b * kt;
              float po = 0.f, ds = 0.f;
              if (f < nf && j < kn) {
                const float s = sxy[a][b] * scale;
                const float ps = avf_exp(s - lseq_s[f]);
                po = avf_exp(s - lsek_s[c0 + j]);
                ds = scale * (ps * (sgy[a][b] - dlq_s[f]) + po * (sxg[a][b] - gate_o * rawk_s[c0 + j]));
              }
              po_s[f * ldp + j] = po;
              ds_s[f * ldp + j] = ds;
            }
          }
        }
      });
      // Phase: dX_s += P_o^T G_o + dS X_o (owner per (row, slice)).
      ex.phase([&](int tid, BwdRegs& rg) {
        AVF_UNROLL for (int it = 0; it < kBwdItems; ++it) {
          const int item = tid + it * T;
          if (item < nf * nr4) {
            const int f = item / nr4, c = item - f * nr4;
            rg.acc[it] = rows_times_tiles(po_s + f * ldp, go_s + 4 * c, ds_s + f * ldp, y_s + 4 * c,
                                          ldr, kn, rg.acc[it]);
          }
        }
      });
    }
  }

  // Phase: store dX_s; the side's first tile stores dgate_o = sum_j dout_o[j] . o_o[j].
  scalar_t* dx = static_cast<scalar_t*>(p.dh[side]);
  ex.phase([&](int tid, BwdRegs& rg) {
    AVF_UNROLL for (int it = 0; it < kBwdItems; ++it) {
      const int item = tid + it * T;
      if (item < nf * nr4) {
        const int f = item / nr4, c = item - f * nr4;
        st_row4(dx + (n * nq + f0 + f) * r, 4 * c, r, rg.acc[it], p.vec_out);
      }
    }
    if (tile == 0 && tid == 0) {
      float sum = 0.f;
      for (int64_t j = 0; j < nk; ++j) sum += rawk_s[j];
      p.dgate[other][n] = sum;
    }
  });
}

}  // namespace av_adapter
}  // namespace avfast
