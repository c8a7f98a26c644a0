// CPU implementation of the d2o_fast_native::group_norm_act_{forward,backward} ops:
// validation and output allocation (group_norm_act_op.h), then the vectorised kernels of
// the best CPU capability (group_norm_act_cpu_kernel.h, built once per capability).

#include <ATen/Version.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>

#include "group_norm_act_cpu.h"
#include "group_norm_act_op.h"

namespace d2o_fast {
namespace cpu {

namespace {

struct Capability {
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
};

// Ordered from the most to the least capable.
std::vector<Capability> compiled_capabilities() {
  std::vector<Capability> caps;
#if defined(__x86_64__) || defined(_M_X64)
  caps.push_back({"AVX512", &AVX512::forward, &AVX512::backward});
  caps.push_back({"AVX2", &AVX2::forward, &AVX2::backward});
#endif
  caps.push_back({"DEFAULT", &DEFAULT::forward, &DEFAULT::backward});
  return caps;
}

bool cpu_supports(const std::string& name) {
#if defined(__x86_64__) || defined(_M_X64)
  if (name == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (name == "AVX2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#endif
  return name == "DEFAULT";
}

// Torch's own choice caps ours, so ATEN_CPU_CAPABILITY=avx2 etc. applies to this op too.
bool torch_allows(const std::string& name) {
#if defined(__x86_64__) || defined(_M_X64)
  static const std::string torch_cap = at::get_cpu_capability();  // "DEFAULT", "AVX2" or "AVX512"
  if (name == "AVX512") return torch_cap == "AVX512";
  if (name == "AVX2") return torch_cap == "AVX512" || torch_cap == "AVX2";
#endif
  return name == "DEFAULT";
}

std::mutex forced_mutex;
std::string forced_name;  // "" = automatic

const Capability& active() {
  static const std::vector<Capability> caps = compiled_capabilities();
  std::string forced;
  {
    std::lock_guard<std::mutex> lock(forced_mutex);
    forced = forced_name;
  }
  for (const auto& cap : caps) {
    if (forced.empty() ? (cpu_supports(cap.name) && torch_allows(cap.name)) : forced == cap.name) return cap;
  }
  return caps.back();
}

}  // namespace

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> names;
  for (const auto& cap : compiled_capabilities()) {
    if (cpu_supports(cap.name)) names.emplace_back(cap.name);
  }
  return names;
}

std::string active_capability() { return active().name; }

void force_capability(const std::string& name) {
  TORCH_CHECK_VALUE(name.empty() || cpu_supports(name), "group_norm_act: CPU capability '", name,
                    "' is not supported here; supported: ", c10::Join(", ", supported_capabilities()));
  std::lock_guard<std::mutex> lock(forced_mutex);
  forced_name = name;
}

}  // namespace cpu

namespace {

std::tuple<Tensor, Tensor, Tensor> forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                               const OptTensor& add, const OptTensor& scale, const OptTensor& shift,
                                               int64_t num_groups, double eps, bool silu) {
  const PreparedCall call = prepare_call(x, weight, bias, add, scale, shift, num_groups, silu);
  Tensor y = at::empty_like(call.x);
  const auto stats_opts = call.x.options().dtype(at::kFloat);
  Tensor mean = at::empty({call.problem.N, num_groups}, stats_opts);
  Tensor rstd = at::empty({call.problem.N, num_groups}, stats_opts);
  const ForwardArgs args{call.problem, kernel_params(call), static_cast<float>(eps), call.x.data_ptr(),
                              y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>()};
  cpu::active().forward(args);
  return {y, mean, rstd};
}

BackwardResult backward_cpu(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                            const OptTensor& add, const OptTensor& scale, const OptTensor& shift, const Tensor& mean,
                            const Tensor& rstd, int64_t num_groups, bool silu) {
  StagedBackward staged = stage_backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu);
  cpu::active().backward(staged.args());
  return assemble_grads(staged.dx, staged.grads, weight, bias, add, scale, shift);
}

}  // namespace

TORCH_LIBRARY(d2o_fast_native, m) {
  m.def(kForwardSchema);
  m.def(kBackwardSchema);
}

TORCH_LIBRARY_IMPL(d2o_fast_native, CPU, m) {
  m.impl("group_norm_act_forward", &forward_cpu);
  m.impl("group_norm_act_backward", &backward_cpu);
}

}  // namespace d2o_fast
