// Running the block drivers of an avfast op (see block_exec.cuh): on the host, every
// block of the launch grid by HostExec (run_host); on the GPU, one kernel launch with
// the dynamic shared memory it needs (launch_blocks, CUDA translation units only).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "common/block_exec.cuh"

#if defined(__CUDACC__)
#include <atomic>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace avfast {

// AVFAST_HOST_THREAD_ORDER=reverse: the host execution runs the emulated threads of each
// phase in reverse order. The results must not change (a check for data races between
// threads of one phase).
inline bool host_reverse_order() {
  const char* e = std::getenv("AVFAST_HOST_THREAD_ORDER");
  return e != nullptr && std::strcmp(e, "reverse") == 0;
}

// Runs the blocks [0, num_blocks) of a launch on the host, in parallel over blocks:
// block(ex, blk, smem) with a HostExec<Regs> of p.threads threads and a host buffer of
// p.smem_floats floats (16-byte aligned) standing in for shared memory.
template <class Regs, class P, class Block>
void run_host(const P& p, int64_t num_blocks, Block&& block) {
  const bool reverse = host_reverse_order();
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    HostExec<Regs> ex(p.threads, reverse);
    std::vector<F4> smem((p.smem_floats + 3) / 4);
    for (int64_t blk = begin; blk < end; ++blk) block(ex, blk, reinterpret_cast<float*>(smem.data()));
  });
}

#if defined(__CUDACC__)
constexpr int kMaxDevices = 64;

// cudaDevAttrMaxSharedMemoryPerBlockOptin of the device, cached.
inline int64_t smem_optin_bytes(int device) {
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Raises the kernel's dynamic shared memory limit when a launch needs more than 48 KiB.
// done[device]: the limit already set for this kernel (one array per kernel).
template <class Kernel>
void ensure_smem(Kernel kernel, int64_t bytes, int device, std::atomic<int>* done) {
  if (bytes <= 48 * 1024) return;
  if (device >= 0 && device < kMaxDevices && done[device].load(std::memory_order_relaxed) >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (device >= 0 && device < kMaxDevices)
    done[device].store(static_cast<int>(bytes), std::memory_order_relaxed);
}

// Launches kernel(p) over num_blocks blocks of p.threads threads with p.smem_floats
// floats of dynamic shared memory on the current stream of `device` (nothing if
// num_blocks == 0). done: as for ensure_smem.
template <class P>
void launch_blocks(void (*kernel)(P), int64_t num_blocks, const P& p, int device,
                   std::atomic<int>* done) {
  if (num_blocks == 0) return;
  const int64_t bytes = p.smem_floats * 4;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  ensure_smem(kernel, bytes, device, done);
  kernel<<<static_cast<unsigned>(num_blocks), p.threads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace avfast
