// Torch-level part shared by the CPU and CUDA ops: argument validation, layout detection,
// float32 parameter staging and output assembly. The device files only launch kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "group_norm_act_cpu.h"

namespace d2o_fast {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Operator schemas, registered once (group_norm_act_cpu.cpp) and implemented per device.
constexpr const char* kForwardSchema =
    "group_norm_act_forward(Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, Tensor? shift, "
    "int num_groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)";
constexpr const char* kBackwardSchema =
    "group_norm_act_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, "
    "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool silu) -> "
    "(Tensor, Tensor, Tensor, Tensor?, Tensor?, Tensor?)";

// A validated call: x in its kernel layout, parameters as float32 contiguous tensors.
struct PreparedCall {
  Problem problem;
  at::MemoryFormat format;
  Tensor x;                             // contiguous in `format`
  Tensor weight, bias;                  // float32 [C]
  std::optional<Tensor> add, scale, shift;  // float32 [N, C]
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline ScalarType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarType::kFloat;
    case at::kBFloat16: return ScalarType::kBFloat16;
    case at::kHalf: return ScalarType::kHalf;
    default: TORCH_CHECK_TYPE(false, "group_norm_act: x must be float32, bfloat16 or float16, got ", t);
  }
  return ScalarType::kFloat;
}

inline Tensor stage_channel_param(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), "group_norm_act: ", name, " must have shape [C] = [",
                    x.size(1), "], got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "group_norm_act: ", name, " must be floating point");
  TORCH_CHECK_VALUE(t.device() == x.device(), "group_norm_act: ", name, " is on ", t.device(), ", x on ", x.device());
  return t.to(at::kFloat).contiguous();
}

inline std::optional<Tensor> stage_sample_param(const OptTensor& t, const Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  const int64_t N = x.size(0), C = x.size(1);
  const bool ok_shape = (t->dim() == 2 && t->size(0) == N && t->size(1) == C) ||
                        (t->dim() == 4 && t->size(0) == N && t->size(1) == C && t->size(2) == 1 && t->size(3) == 1);
  TORCH_CHECK_VALUE(ok_shape, "group_norm_act: ", name, " must have shape [N, C] = [", N, ", ", C, "], got ",
                    t->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "group_norm_act: ", name, " must be floating point");
  TORCH_CHECK_VALUE(t->device() == x.device(), "group_norm_act: ", name, " is on ", t->device(), ", x on ",
                    x.device());
  return t->reshape({N, C}).to(at::kFloat).contiguous();
}

inline PreparedCall prepare_call(const Tensor& x, const Tensor& weight, const Tensor& bias, const OptTensor& add,
                                 const OptTensor& scale, const OptTensor& shift, int64_t num_groups, bool silu) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "group_norm_act: x must be [N, C, *], got ", x.sizes());
  kernel_dtype(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, "group_norm_act: C = ", C,
                    " is not divisible by num_groups = ", num_groups);
  TORCH_CHECK_VALUE(x.numel() > 0, "group_norm_act: x is empty ", x.sizes());
  PreparedCall call;
  // channels_last only when x is not also plain contiguous (e.g. H = W = 1 is both).
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() &&
                             x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  call.format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  call.x = x.contiguous(call.format);
  call.problem = Problem{N, C, x.numel() / (N * C), num_groups, channels_last, silu, kernel_dtype(x.scalar_type())};
  call.weight = stage_channel_param(weight, x, "weight");
  call.bias = stage_channel_param(bias, x, "bias");
  call.add = stage_sample_param(add, x, "add");
  call.scale = stage_sample_param(scale, x, "scale");
  call.shift = stage_sample_param(shift, x, "shift");
  return call;
}

inline const float* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

inline float* data_or_null_mut(std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

inline Params kernel_params(const PreparedCall& call) {
  return {call.weight.data_ptr<float>(), call.bias.data_ptr<float>(), data_or_null(call.add),
          data_or_null(call.scale), data_or_null(call.shift)};
}

inline Tensor stage_statistic(const Tensor& t, const PreparedCall& call, const char* name) {
  const auto& p = call.problem;
  TORCH_CHECK_VALUE(t.numel() == p.N * p.G, "group_norm_act: ", name, " must have N * num_groups = ", p.N * p.G,
                    " elements, got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == call.x.device(), "group_norm_act: ", name, " is on the wrong device");
  return t.to(at::kFloat).contiguous();
}

inline Tensor stage_grad_output(const Tensor& dy, const PreparedCall& call) {
  TORCH_CHECK_VALUE(dy.sizes() == call.x.sizes(), "group_norm_act: dy has shape ", dy.sizes(), ", x has ",
                    call.x.sizes());
  TORCH_CHECK_VALUE(dy.device() == call.x.device(), "group_norm_act: dy is on the wrong device");
  return dy.to(call.x.scalar_type()).contiguous(call.format);
}

// Float [N, C] buffers for the per-sample gradients (only for the inputs that were given).
struct GradBuffers {
  std::optional<Tensor> dadd, dscale, dshift;
  Tensor dweight_per_sample, dbias_per_sample;
};

inline GradBuffers make_grad_buffers(const PreparedCall& call) {
  const auto opts = call.x.options().dtype(at::kFloat);
  const int64_t N = call.problem.N, C = call.problem.C;
  GradBuffers b;
  if (call.add) b.dadd = at::empty({N, C}, opts);
  if (call.scale) b.dscale = at::empty({N, C}, opts);
  if (call.shift) b.dshift = at::empty({N, C}, opts);
  b.dweight_per_sample = at::empty({N, C}, opts);
  b.dbias_per_sample = at::empty({N, C}, opts);
  return b;
}

inline OptTensor grad_like(const std::optional<Tensor>& buffer, const OptTensor& input) {
  if (!buffer.has_value()) return std::nullopt;
  return buffer->to(input->scalar_type()).reshape(input->sizes());
}

using BackwardResult = std::tuple<Tensor, Tensor, Tensor, OptTensor, OptTensor, OptTensor>;

inline BackwardResult assemble_grads(Tensor dx, const GradBuffers& b, const Tensor& weight, const Tensor& bias,
                                     const OptTensor& add, const OptTensor& scale, const OptTensor& shift) {
  return {dx, b.dweight_per_sample.sum(0).to(weight.scalar_type()), b.dbias_per_sample.sum(0).to(bias.scalar_type()),
          grad_like(b.dadd, add), grad_like(b.dscale, scale), grad_like(b.dshift, shift)};
}

// Everything a backward call stages before its kernel runs: the prepared call, dy and the statistics in the
// kernel's layout and dtype, dx, and the per-sample gradient buffers. The device files add only the launch.
struct StagedBackward {
  PreparedCall call;
  Tensor dy, mean, rstd, dx;
  GradBuffers grads;

  BackwardArgs args() {
    return BackwardArgs{call.problem,
                        kernel_params(call),
                        dy.data_ptr(),
                        call.x.data_ptr(),
                        mean.data_ptr<float>(),
                        rstd.data_ptr<float>(),
                        dx.data_ptr(),
                        data_or_null_mut(grads.dadd),
                        data_or_null_mut(grads.dscale),
                        data_or_null_mut(grads.dshift),
                        grads.dweight_per_sample.data_ptr<float>(),
                        grads.dbias_per_sample.data_ptr<float>()};
  }
};

inline StagedBackward stage_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                     const OptTensor& add, const OptTensor& scale, const OptTensor& shift,
                                     const Tensor& mean, const Tensor& rstd, int64_t num_groups, bool silu) {
  StagedBackward s{prepare_call(x, weight, bias, add, scale, shift, num_groups, silu), {}, {}, {}, {}, {}};
  s.dy = stage_grad_output(dy, s.call);
  s.mean = stage_statistic(mean, s.call, "mean");
  s.rstd = stage_statistic(rstd, s.call, "rstd");
  s.dx = at::empty_like(s.call.x);
  s.grads = make_grad_buffers(s.call);
  return s;
}

}  // namespace d2o_fast
