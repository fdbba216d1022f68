// The execution model shared by the avfast CUDA ops, and the small fp32 helpers their
// block drivers (csrc/<op>/kernel.cuh) are written with.
//
// Execution model. A kernel is a sequence of *phases* separated by block barriers. Each
// phase is a per-thread function `(tid, regs)` that reads and writes shared memory
// (`smem`), global memory and the thread's private registers (`regs`). A phase never
// reads what another thread writes in the same phase (the only exception: several
// threads storing the same constant into a flag). A block driver calls `ex.phase(fn)`:
//   - on the GPU (DeviceExec) that is `fn(threadIdx.x, regs); __syncthreads();`;
//   - on the host (HostExec) it is `for tid in 0..T: fn(tid, regs[tid])`, which is an
//     exact emulation of the block under the rule above.
// No warp shuffles, no atomics: so the CPU path runs the very code that the GPU runs.
// Shared-memory tiles are fp32, rows zero-padded to a multiple of 4 floats so that dot
// products run on 16-byte vectors (F4).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define AVF_HD __host__ __device__
#define AVF_FI __forceinline__
#define AVF_UNROLL _Pragma("unroll")
#else
#define AVF_HD
#define AVF_FI inline
#define AVF_UNROLL
#endif

namespace avfast {

// ---------------------------------------------------------------------------------------
// Block executors
// ---------------------------------------------------------------------------------------
// Runs one thread block on the host: each phase is executed by every emulated thread in
// turn, with one register struct per emulated thread; `reverse` runs them in reverse
// order (a check for data races between threads of one phase).
template <class Regs>
struct HostExec {
  int threads;
  bool reverse;
  std::vector<Regs> regs;
  HostExec(int t, bool rev) : threads(t), reverse(rev), regs(t) {}
  template <class Fn>
  void phase(Fn&& fn) {
    for (int i = 0; i < threads; ++i) {
      const int tid = reverse ? threads - 1 - i : i;
      fn(tid, regs[tid]);
    }
  }
};

#if defined(__CUDACC__)
// One CUDA thread block: `phase` runs the per-thread function, then a block barrier.
template <class Regs>
struct DeviceExec {
  Regs r;
  template <class Fn>
  __device__ __forceinline__ void phase(Fn&& fn) {
    fn(static_cast<int>(threadIdx.x), r);
    __syncthreads();
  }
};
#endif

// ---------------------------------------------------------------------------------------
// Shared-memory layout
// ---------------------------------------------------------------------------------------
// Shared-memory row stride (floats) for a row of d values read as 16-byte vectors: a
// multiple of 4 whose quotient by 4 is odd, so 8 consecutive rows hit 8 distinct
// 16-byte bank groups (conflict-free 128-bit loads across rows).
inline int smem_ld(int d) {
  int ld = (d + 3) / 4 * 4;
  if (((ld / 4) & 1) == 0) ld += 4;
  return ld;
}

// ---------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------
AVF_HD AVF_FI float avf_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

AVF_HD AVF_FI float avf_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

AVF_HD AVF_FI float avf_max(float a, float b) { return a > b ? a : b; }
AVF_HD AVF_FI int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <class T>
AVF_HD AVF_FI float to_f(T x) {
  return static_cast<float>(x);
}

// ---------------------------------------------------------------------------------------
// 4-wide fp32 vectors
// ---------------------------------------------------------------------------------------
struct alignas(16) F4 {
  float x, y, z, w;
};

AVF_HD AVF_FI F4 f4_zero() { return F4{0.f, 0.f, 0.f, 0.f}; }

// 16-byte load from (16-byte aligned) shared memory.
AVF_HD AVF_FI F4 ld4(const float* ptr) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const F4*>(ptr);
#else
  F4 r;
  std::memcpy(&r, ptr, sizeof(F4));
  return r;
#endif
}

AVF_HD AVF_FI void st4(float* ptr, F4 x) {  // 16-byte store to shared memory
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<F4*>(ptr) = x;
#else
  std::memcpy(ptr, &x, sizeof(F4));
#endif
}

AVF_HD AVF_FI float dot4(F4 a, F4 b, float acc) {
  acc += a.x * b.x;
  acc += a.y * b.y;
  acc += a.z * b.z;
  acc += a.w * b.w;
  return acc;
}

AVF_HD AVF_FI F4 axpy4(float a, F4 x, F4 y) {  // y + a x
  return F4{y.x + a * x.x, y.y + a * x.y, y.z + a * x.z, y.w + a * x.w};
}

AVF_HD AVF_FI F4 scale4(F4 x, float a) { return F4{x.x * a, x.y * a, x.z * a, x.w * a}; }

AVF_HD AVF_FI float f4_get(const F4& v, int e) {
  return e == 0 ? v.x : (e == 1 ? v.y : (e == 2 ? v.z : v.w));
}

// ---------------------------------------------------------------------------------------
// Global memory: 4 consecutive elements of any kernel dtype (float, Half, BFloat16)
// ---------------------------------------------------------------------------------------
template <class T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// 4 consecutive elements from global memory; ptr aligned to 4 elements.
template <class T>
AVF_HD AVF_FI F4 ld4_global(const T* ptr) {
  Pack4<T> pk;
#if defined(__CUDA_ARCH__)
  pk = *reinterpret_cast<const Pack4<T>*>(ptr);
#else
  std::memcpy(&pk, ptr, sizeof(pk));
#endif
  return F4{to_f(pk.v[0]), to_f(pk.v[1]), to_f(pk.v[2]), to_f(pk.v[3])};
}

// 4 consecutive elements to global memory; ptr aligned to 4 elements.
template <class T>
AVF_HD AVF_FI void st4_global(T* ptr, F4 x) {
  Pack4<T> pk;
  pk.v[0] = static_cast<T>(x.x);
  pk.v[1] = static_cast<T>(x.y);
  pk.v[2] = static_cast<T>(x.z);
  pk.v[3] = static_cast<T>(x.w);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack4<T>*>(ptr) = pk;
#else
  std::memcpy(ptr, &pk, sizeof(pk));
#endif
}

// ---------------------------------------------------------------------------------------
// Tile products
// ---------------------------------------------------------------------------------------
// acc + sum_{j < kn} w[j] * x[j * ldx .. + 4]: a row of P (or dS) times 4 columns of a
// shared-memory tile with row stride ldx.
AVF_HD AVF_FI F4 row_times_tile(const float* w, const float* x, int ldx, int kn, F4 acc) {
  int j = 0;
  for (; j + 4 <= kn; j += 4) {
    const F4 wj = ld4(w + j);
    acc = axpy4(wj.x, ld4(x + j * ldx), acc);
    acc = axpy4(wj.y, ld4(x + (j + 1) * ldx), acc);
    acc = axpy4(wj.z, ld4(x + (j + 2) * ldx), acc);
    acc = axpy4(wj.w, ld4(x + (j + 3) * ldx), acc);
  }
  for (; j < kn; ++j) acc = axpy4(w[j], ld4(x + j * ldx), acc);
  return acc;
}

}  // namespace avfast
