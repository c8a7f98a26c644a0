"""d2o_fast: fast D2O / D2O-F training of one-step generators from pretrained EDM U-Nets.

The fused GroupNorm kernels in kernels/ are built here as optional torch extensions
(see d2o_fast/ops/native.py for the JIT fallback); install with
`pip install --no-build-isolation -e .` so the build sees the installed torch.
"""

from setuptools import find_packages, setup

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
        'nvidia-ml-py',
        'triton; platform_system == "Linux"',
        'nvidia-dali-cuda130; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        'dev': ['pytest', 'pytest-benchmark', 'ninja'],
    },
)
