"""What the native extension is built from: one list shared by setup.py and native.py's JIT build.

Imports nothing, so setup.py can load it before d2o_fast's dependencies are installed.
Link order matters: the baseline-ISA objects come before the AVX2/AVX512 ones so that inline
functions emitted by several of them resolve to the baseline copy (see
kernels/group_norm_act_cpu_kernel.h). CMakeLists.txt keeps the same order.
"""

CPU_SOURCES = ('extension.cpp', 'group_norm_act_cpu.cpp', 'group_norm_act_cpu_default.cpp',
               'group_norm_act_cpu_avx2.cpp', 'group_norm_act_cpu_avx512.cpp')
CUDA_SOURCES = ('group_norm_act_cuda_op.cpp', 'group_norm_act_cuda.cu')
# Portable flags only: the wide-ISA kernels select their ISA in the source and are dispatched at run time.
CXX_FLAGS = ('-O3', '-g0', '-fopenmp', '-Wno-unknown-pragmas')  # torch headers use CUDA's '#pragma unroll'
NVCC_FLAGS = ('-O3', '-std=c++17', '--expt-relaxed-constexpr')
LINK_FLAGS = ('-fopenmp',)
# Defined when the CUDA sources are part of the build.
CUDA_MACRO = 'D2O_FAST_WITH_CUDA'
