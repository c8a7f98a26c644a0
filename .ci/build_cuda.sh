#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: no GPU needed, warnings are errors.
#   1. kernels/group_norm_act_cuda.cu with nvcc for sm_80 and sm_90;
#   2. the torch binding kernels/group_norm_act_cuda_op.cpp with the host compiler against
#      torch's headers (a CPU-only torch wheel lacks one generated c10/cuda header; a
#      stand-in is provided for this syntax check only).
# Usage: .ci/build_cuda.sh            (NVCC, CXX and PYTHON may be overridden)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-c++}"
PYTHON="${PYTHON:-python}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

command -v "$NVCC" >/dev/null || { echo "build_cuda.sh: nvcc not found (set NVCC=...)" >&2; exit 2; }
echo "== nvcc: $("$NVCC" --version | tail -1)"

echo "== nvcc -c kernels/group_norm_act_cuda.cu (sm_80, sm_90, -Werror)"
"$NVCC" -c -std=c++17 -O3 \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
  -I"$ROOT/kernels" "$ROOT/kernels/group_norm_act_cuda.cu" -o "$OUT/group_norm_act_cuda.o"

CUDA_ROOT="${CUDA_HOME:-$("$PYTHON" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "/usr/local/cuda")')}"
echo "== host compile of kernels/group_norm_act_cuda_op.cpp against torch headers (-fsyntax-only -Werror)"
TORCH_INCLUDE="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))')"
INCLUDES=()
for dir in $TORCH_INCLUDE; do INCLUDES+=(-isystem "$dir"); done
FIRST_INCLUDE="${TORCH_INCLUDE%% *}"
if [ ! -f "$FIRST_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$OUT/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  INCLUDES+=(-isystem "$OUT/stub")
fi
"$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DD2O_FAST_WITH_CUDA \
  "${INCLUDES[@]}" -isystem "$CUDA_ROOT/include" -I"$ROOT/kernels" "$ROOT/kernels/group_norm_act_cuda_op.cpp"

echo "== CUDA kernels compile cleanly"
