"""What the native extension is built from: one list shared by setup.py and native.py's JIT build.

Imports nothing from d2o_fast, so setup.py can load it before d2o_fast's dependencies are installed.
Link order matters: every baseline-ISA object comes before the AVX2/AVX512 ones so that inline functions emitted by
several of them resolve to the baseline copy (see kernels/group_norm_act_cpu_kernel.h). setuptools sorts an
extension's sources by path before compiling and linking them, so the per-ISA builds live in kernels/isa/ and the
build order is `build_sources()`: sorted, with the per-ISA ones last (a test checks it); CMakeLists.txt keeps the
same order.
"""

import hashlib
import pathlib

CPU_SOURCES = ('extension.cpp', 'group_norm_act_cpu.cpp', 'isa/group_norm_act_cpu_0_default.cpp',
               'isa/group_norm_act_cpu_1_avx2.cpp', 'isa/group_norm_act_cpu_2_avx512.cpp')
CUDA_SOURCES = ('group_norm_act_cuda.cu', 'group_norm_act_cuda_op.cpp')
# Portable flags only: the wide-ISA kernels select their ISA in the source and are dispatched at run time.
CXX_FLAGS = ('-O3', '-g0', '-fopenmp', '-Wno-unknown-pragmas')  # torch headers use CUDA's '#pragma unroll'
NVCC_FLAGS = ('-O3', '-std=c++17', '--expt-relaxed-constexpr')
LINK_FLAGS = ('-fopenmp',)
# Defined when the CUDA sources are part of the build.
CUDA_MACRO = 'D2O_FAST_WITH_CUDA'
# Defined as source_digest() of the build: the module's `source_digest` attribute.
DIGEST_MACRO = 'D2O_FAST_SOURCE_DIGEST'


def build_sources(with_cuda):
    """Sources of a build, relative to kernels/, in the order setuptools compiles and links them (sorted)."""
    return tuple(sorted(CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())))


def source_digest(kernels_dir, with_cuda):
    """sha256 (12 hex digits) of the sources a build uses and every header in kernels/: names the JIT cache
    directory, and is compiled into d2o_fast._C so that a prebuilt module older than the sources is not used."""
    kernels_dir = pathlib.Path(kernels_dir)
    digest = hashlib.sha256()
    for name in build_sources(with_cuda):
        digest.update((kernels_dir / name).read_bytes())
    for header in sorted(kernels_dir.glob('*.h')):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]
