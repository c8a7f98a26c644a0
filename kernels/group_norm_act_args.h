// Plain-pointer description of one fused GroupNorm call, shared by the torch-facing ops
// (group_norm_act_op.h) and the device kernels (CPU: group_norm_act_cpu_kernel.h, CUDA:
// group_norm_act_cuda.cu). Kernels never see torch types: the CPU kernel translation units
// are built with wide-ISA flags and the CUDA ones must compile with nvcc alone.
#pragma once

#include <cstdint>

namespace d2o_fast {

enum class ScalarType { kFloat, kBFloat16, kHalf };

// Shape of one call. x is [N, C, HW] (NCHW) or [N, HW, C] (channels_last), contiguous.
struct Problem {
  int64_t N, C, HW, G;
  bool channels_last;
  bool silu;
  ScalarType dtype;
};

// Per-(sample, channel) and per-channel parameters, all float32 and contiguous.
// add/scale/shift are [N, C] or nullptr (absent); weight/bias are [C].
struct Params {
  const float* weight;
  const float* bias;
  const float* add;
  const float* scale;
  const float* shift;
};

struct ForwardArgs {
  Problem p;
  Params params;
  float eps;
  const void* x;
  void* y;      // same dtype and layout as x
  float* mean;  // [N, G], statistics of x + add
  float* rstd;  // [N, G]
};

struct BackwardArgs {
  Problem p;
  Params params;
  const void* dy;
  const void* x;
  const float* mean;  // [N, G] from the forward
  const float* rstd;  // [N, G]
  void* dx;           // same dtype and layout as x
  // [N, C] float32 outputs; the caller reduces the last two over N.
  float* dadd;
  float* dscale;
  float* dshift;
  float* dweight_per_sample;
  float* dbias_per_sample;
};

}  // namespace d2o_fast
