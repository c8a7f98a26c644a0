// CUDA implementation of the d2o_fast_native::group_norm_act_{forward,backward} ops:
// validation and output allocation (group_norm_act_op.h), then the kernels of
// group_norm_act_cuda.cu on the current stream. Built only when the extension is built
// with CUDA (D2O_FAST_WITH_CUDA).

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "group_norm_act_cuda.h"
#include "group_norm_act_op.h"

namespace d2o_fast {
namespace {

void check_cuda(const Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "group_norm_act (CUDA): x must be a CUDA tensor, got ", x.device());
}

std::tuple<Tensor, Tensor, Tensor> forward_cuda(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                const OptTensor& add, const OptTensor& scale, const OptTensor& shift,
                                                int64_t num_groups, double eps, bool silu) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const PreparedCall call = prepare_call(x, weight, bias, add, scale, shift, num_groups, silu);
  Tensor y = at::empty_like(call.x);
  const auto float_opts = call.x.options().dtype(at::kFloat);
  Tensor mean = at::empty({call.problem.N, num_groups}, float_opts);
  Tensor rstd = at::empty({call.problem.N, num_groups}, float_opts);
  Tensor workspace = at::empty({cuda::forward_workspace_size(call.problem)}, float_opts);
  const ForwardArgs args{call.problem, kernel_params(call), static_cast<float>(eps), call.x.data_ptr(),
                         y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>()};
  C10_CUDA_CHECK(cuda::forward(args, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {y, mean, rstd};
}

BackwardResult backward_cuda(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                             const OptTensor& add, const OptTensor& scale, const OptTensor& shift, const Tensor& mean,
                             const Tensor& rstd, int64_t num_groups, bool silu) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  StagedBackward staged = stage_backward(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu);
  Tensor workspace = at::empty({cuda::backward_workspace_size(staged.call.problem)},
                               staged.call.x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::backward(staged.args(), workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return assemble_grads(staged.dx, staged.grads, weight, bias, add, scale, shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2o_fast_native, CUDA, m) {
  m.impl("group_norm_act_forward", &forward_cuda);
  m.impl("group_norm_act_backward", &backward_cuda);
}

}  // namespace d2o_fast
