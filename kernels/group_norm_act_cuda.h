// CUDA kernels of the fused GroupNorm + modulation + SiLU op (group_norm_act_cuda.cu).
// Torch-free, so the .cu file compiles with nvcc alone (.ci/build_cuda.sh); the torch op
// that allocates tensors and calls these launchers is group_norm_act_cuda_op.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "group_norm_act_args.h"

namespace d2o_fast::cuda {

// Float32 scratch the launchers need, in elements; the caller allocates it on the device.
int64_t forward_workspace_size(const Problem& p);
int64_t backward_workspace_size(const Problem& p);

// Enqueue the kernels on `stream`; returns the launch status (asynchronous errors surface later).
// x, y/dx, dy are contiguous in the layout given by p.channels_last; float pointers as in the args.
cudaError_t forward(const ForwardArgs& args, float* workspace, cudaStream_t stream);
cudaError_t backward(const BackwardArgs& args, float* workspace, cudaStream_t stream);

}  // namespace d2o_fast::cuda
