// The Python module avfast._C. Importing it loads this library, whose static
// initializers register the operators (torch.ops.avfast_C.*, see registration.cpp);
// the module itself only exposes build information.
#include <string>

#include <torch/extension.h>

#if defined(AVFAST_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifndef AVFAST_CUDA_ARCH_LIST
#define AVFAST_CUDA_ARCH_LIST ""
#endif

namespace {

bool built_with_cuda() {
#if defined(AVFAST_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

// CUDA runtime version the extension was compiled against, "13.0"; "" without CUDA.
std::string cuda_version() {
#if defined(AVFAST_WITH_CUDA)
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avfast C++/CUDA ops; importing registers torch.ops.avfast_C.*";
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA kernels were compiled in.");
  m.def("cuda_version", &cuda_version, "CUDA version compiled against, e.g. '13.0' ('' if none).");
  m.def("cuda_arch_list", [] { return std::string(AVFAST_CUDA_ARCH_LIST); },
        "TORCH_CUDA_ARCH_LIST used at build time.");
  m.def("host_execution", [] { return true; },
        "True: the CPU kernels of torch.ops.avfast_C run the CUDA block code on the host.");
}
