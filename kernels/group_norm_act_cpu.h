// Interface between the torch-facing CPU op (group_norm_act_cpu.cpp) and the vectorised
// kernels (group_norm_act_cpu_kernel.h), which are compiled once per CPU capability.
// Plain pointers only: the kernel translation units must not see torch tensors, so that
// nothing but code inside their own capability namespace is built with wide-ISA flags.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace d2o_fast::cpu {

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

using ForwardFn = void (*)(const ForwardArgs&);
using BackwardFn = void (*)(const BackwardArgs&);

// One pair per capability; defined in group_norm_act_cpu_{default,avx2,avx512}.cpp.
namespace DEFAULT { void forward(const ForwardArgs&); void backward(const BackwardArgs&); }
namespace AVX2 { void forward(const ForwardArgs&); void backward(const BackwardArgs&); }
namespace AVX512 { void forward(const ForwardArgs&); void backward(const BackwardArgs&); }

// Capability selection (group_norm_act_cpu.cpp). By default the op uses the best capability
// both this CPU and torch allow (torch's choice honours ATEN_CPU_CAPABILITY); tests force
// each supported one in turn to cover all three builds.
std::vector<std::string> supported_capabilities();
std::string active_capability();
void force_capability(const std::string& name);  // "" restores the automatic choice

}  // namespace d2o_fast::cpu
