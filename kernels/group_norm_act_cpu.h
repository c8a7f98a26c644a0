// Interface between the torch-facing CPU op (group_norm_act_cpu.cpp) and the vectorised
// kernels (group_norm_act_cpu_kernel.h), which are compiled once per CPU capability.
#pragma once

#include "group_norm_act_args.h"

#include <cstdint>
#include <string>
#include <vector>

namespace d2o_fast::cpu {

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
