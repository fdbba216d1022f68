// Argument checks of the avfast ops, raising "<op>: <arg> must be ..., got ..." (the
// messages of the Python front ends in avfast/ops/), and the dtype dispatch of the
// kernels.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace avfast {

// Python's str() of a torch dtype.
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kBool: return "torch.bool";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kByte: return "torch.uint8";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A shape as Python prints a tuple: "(2, 3)", "(4,)"; sizes < 0 are shown as "*".
inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    os << (i ? ", " : "");
    if (s[i] < 0) os << "*";
    else os << s[i];
  }
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

// `name` of op `op` must be ndim-dimensional (its dims spelled `dims`, e.g. "(B, F, H, Dq)")
// and float32, float16 or bfloat16: the tensor the other arguments are checked against.
inline void check_main_tensor(const char* op, const at::Tensor& t, const char* name, int64_t ndim,
                              const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must be ", dims, ", got ",
                    shape_str(t.sizes()));
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dtype_str(dt));
}

// Argument `name` of op `op` against the main tensor `ref` (called `ref_name`):
// shape `expected` (-1 = any size, shown as "*"; `dims` spells it), then dtype (ref's, or
// float32 when fp32 is set), then device (ref's).
inline void check_tensor(const char* op, const char* ref_name, const at::Tensor& t,
                         const char* name, const char* dims, const std::vector<int64_t>& expected,
                         const at::Tensor& ref, bool fp32) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || t.size(i) == expected[i];
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must be ", dims, " = ", shape_str(expected), ", got ",
                    shape_str(t.sizes()));
  if (fp32) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                     dtype_str(t.scalar_type()));
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ",
                     ref_name, "'s dtype ", dtype_str(ref.scalar_type()), ", got ",
                     dtype_str(t.scalar_type()));
  }
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name,
                    "'s device ", ref.device(), ", got ", t.device());
}

// Calls fn(scalar_t{}) for the kernel dtypes: float, c10::Half, c10::BFloat16.
template <class Fn>
void dispatch_dtype(const char* op, at::ScalarType dt, Fn&& fn) {
  switch (dt) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dt);
  }
}

}  // namespace avfast
