// Python module of the d2o_fast native extension. The ops themselves are registered with
// the dispatcher as torch.ops.d2o_fast_native.group_norm_act_{forward,backward} (CPU in
// group_norm_act_cpu.cpp, CUDA in group_norm_act_cuda_op.cpp); this module only reports
// how the extension was built and lets tests pin the CPU capability.

#include <torch/extension.h>
#include <torch/version.h>

#include "group_norm_act_cpu.h"

// sha256 prefix of the sources this module was built from (d2o_fast/ops/native_sources.py: source_digest), so that
// native.py does not use a prebuilt module older than the sources beside it.
#ifndef D2O_FAST_SOURCE_DIGEST
#define D2O_FAST_SOURCE_DIGEST
#endif
#define D2O_FAST_STRINGIZE_(x) #x
#define D2O_FAST_STRINGIZE(x) D2O_FAST_STRINGIZE_(x)
#if defined(D2O_FAST_WITH_CUDA)
#define D2O_FAST_BUILD_KIND "cuda"
#else
#define D2O_FAST_BUILD_KIND "cpu"
#endif
#define D2O_FAST_TORCH_VERSION                                                   \
  D2O_FAST_STRINGIZE(TORCH_VERSION_MAJOR) "." D2O_FAST_STRINGIZE(TORCH_VERSION_MINOR) "." \
  D2O_FAST_STRINGIZE(TORCH_VERSION_PATCH)
// The same facts and the torch the module was compiled against, as one string in the binary, which native.py reads
// before deciding to load the module (loading a stale module and then a fresh one would register the same torch ops
// twice; a module built against another torch release need not match its C++ ABI).
extern "C" __attribute__((used)) const char d2o_fast_build_marker[] =
    "d2o_fast_build:" D2O_FAST_STRINGIZE(D2O_FAST_SOURCE_DIGEST) ":" D2O_FAST_BUILD_KIND ":torch" D2O_FAST_TORCH_VERSION;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2o_fast native kernels (fused GroupNorm + modulation + SiLU)";
#if defined(D2O_FAST_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("source_digest") = D2O_FAST_STRINGIZE(D2O_FAST_SOURCE_DIGEST);
  m.attr("torch_version") = D2O_FAST_TORCH_VERSION;
  m.def("supported_cpu_capabilities", &d2o_fast::cpu::supported_capabilities,
        "CPU capabilities compiled in and supported by this CPU, best first");
  m.def("active_cpu_capability", &d2o_fast::cpu::active_capability, "CPU capability the op uses now");
  m.def("force_cpu_capability", &d2o_fast::cpu::force_capability, py::arg("name"),
        "Pin the CPU capability (tests); '' restores the automatic choice");
}
