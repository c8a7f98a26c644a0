"""d2o_fast: fast D2O / D2O-F training of one-step generators from pretrained EDM U-Nets.

The fused GroupNorm kernels in kernels/ are built here as the optional torch extension
`d2o_fast._C` (CPU always; CUDA too with D2O_FAST_CUDA=1, or when CUDA_HOME is set and torch
sees a GPU; D2O_FAST_CUDA=0 forces CPU only). Install with
`pip install --no-build-isolation -e ".[dev]"` so the build sees the installed torch.
A failed extension build only warns: d2o_fast/ops/native.py then compiles the same sources
on first use (JIT), and if that fails too the other kernel backends are used.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

#----------------------------------------------------------------------------
# Native extension.

def _native_sources():
    """d2o_fast/ops/native_sources.py, loaded by path (the package's dependencies may not be installed yet)."""
    spec = importlib.util.spec_from_file_location('d2o_fast_native_sources',
                                                  os.path.join(ROOT, 'd2o_fast', 'ops', 'native_sources.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(message):
    print(f'WARNING: d2o_fast native extension: {message}', file=sys.stderr)


def _want_cuda(torch, cpp_extension):
    flag = os.environ.get('D2O_FAST_CUDA')
    if flag is not None:
        return flag == '1'
    return bool(os.environ.get('CUDA_HOME')) and torch.cuda.is_available()


def native_extension():
    """([extension], cmdclass) for d2o_fast._C, or ([], {}) when torch is not importable."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _warn(f'torch is not importable ({e}); not building it (the JIT fallback builds it on first use)')
        return [], {}
    src = _native_sources()
    with_cuda = _want_cuda(torch, cpp_extension)
    if with_cuda and cpp_extension.CUDA_HOME is None:
        _warn('CUDA requested but no CUDA toolkit found; building the CPU kernels only')
        with_cuda = False
    names = src.build_sources(with_cuda)
    macros = [(src.DIGEST_MACRO, src.source_digest(os.path.join(ROOT, 'kernels'), with_cuda))]
    macros += [(src.CUDA_MACRO, None)] if with_cuda else []
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = kind(name='d2o_fast._C', sources=[f'kernels/{n}' for n in names], define_macros=macros,
               extra_compile_args={'cxx': list(src.CXX_FLAGS), 'nvcc': list(src.NVCC_FLAGS)},
               extra_link_args=list(src.LINK_FLAGS))

    class TolerantBuildExtension(cpp_extension.BuildExtension):
        """A failed kernel build must not fail the install: native.py falls back to a JIT build."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing, CUDA mismatch, ...
                _warn(f'build failed ({type(e).__name__}: {e}); the package installs without it')

    return [ext], {'build_ext': TolerantBuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = native_extension()

#----------------------------------------------------------------------------

setup(
    name='d2o_fast',
    version='0.1.0',
    description='Performance-optimized D2O / D2O-F training of one-step generators from EDM U-Nets',
    packages=find_packages(include=['d2o_fast', 'd2o_fast.*']),
    include_package_data=True,
    package_data={'d2o_fast': ['assets/*']},
    python_requires='>=3.11',
    install_requires=[
        'torch>=2.4',
        'numpy',
        'safetensors',
        'pillow',
        'scipy',
        'scikit-learn',
        'tensorboard',
        'matplotlib',
        'nvidia-ml-py',
        'triton; platform_system == "Linux"',
        'nvidia-dali-cuda130; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    extras_require={
        'dev': ['pytest', 'pytest-benchmark', 'ninja'],
    },
)
