// CUDA kernels of y = act(GN(x + add) * (1 + scale) + shift), forward and backward,
// NCHW and NHWC (channels_last), float32 / float16 / bfloat16 storage, float32 math.
//
// Same three-phase algorithm as the CPU kernels (group_norm_act_cpu_kernel.h):
//   forward : partial_reduce<Moments>  per (n, c, chunk) Welford mean/M2/count
//             finalize_statistics      per (n, g): Chan-combine -> mean, rstd, and per (n, c)
//                                      K, A, B with z = (x - K) * A + B, K = mean - add
//             apply_forward            y = act((x - K) * A + B), vectorised elementwise
//   backward: backward_coefficients    per (n, c): K, A, B from the saved statistics
//             partial_reduce<GradSums> per (n, c, chunk) P = sum dz, Q = sum dz * hc, H = sum hc,
//                                      hc = x - K
//             finalize_gradients       per (n, g): dx = dz * E + hc * F + G coefficients and the
//                                      [N, C] parameter gradients
//             apply_backward           dx, recomputing dz (cheaper than storing it)
// A chunk is a segment of one contiguous (n, c) row (NCHW) or a block of spatial rows of
// one sample across 32 channels (NHWC, coalesced over channels). Partial results are laid
// out [N, C, chunks] for both layouts, so the finalize kernels are layout-agnostic.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "group_norm_act_cuda.h"

namespace d2o_fast::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;
constexpr int64_t kRowChunk = 4096;       // NCHW: elements of one (n, c) row per block
constexpr int kChannelsPerBlock = 32;     // NHWC: threadIdx.x, consecutive channels
constexpr int kRowsPerBlock = 8;          // NHWC: threadIdx.y
constexpr int64_t kRowsPerChunk = 64;     // NHWC: spatial positions per block
constexpr int64_t kMaxGrid = 1 << 20;     // elementwise kernels are grid-stride beyond this

//----------------------------------------------------------------------------
// Storage types.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kVec elements moved with one 16-byte (or narrower) memory transaction.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

//----------------------------------------------------------------------------
// Math shared by the kernels.

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }

template <bool kSilu>
__device__ __forceinline__ float activate(float z) { return kSilu ? z * sigmoid(z) : z; }

// dL/dz from dL/dy and the recomputed pre-activation z.
template <bool kSilu>
__device__ __forceinline__ float grad_pre_activation(float z, float dy) {
  if (!kSilu) return dy;
  const float s = sigmoid(z);
  return dy * s * fmaf(z, 1.f - s, 1.f);
}

__device__ __forceinline__ float param_or(const float* t, int64_t i, float otherwise) { return t ? t[i] : otherwise; }

// Per-(n, c) coefficients of z = (x - K) * A + B. Centring on K = mean - add before scaling
// keeps float32 accurate when |mean| >> std.
struct Coefs {
  float *K, *A, *B;
};

__device__ __forceinline__ void pre_activation_coefs(const Params& pr, int64_t n, int64_t c, int64_t C, float mean,
                                                     float rstd, const Coefs& k) {
  const int64_t nc = n * C + c;
  const float s1 = 1.f + param_or(pr.scale, nc, 0.f);
  k.K[nc] = mean - param_or(pr.add, nc, 0.f);
  k.A[nc] = rstd * pr.weight[c] * s1;
  k.B[nc] = pr.bias[c] * s1 + param_or(pr.shift, nc, 0.f);
}

// Flat element index -> n * C + c.
__device__ __forceinline__ int64_t sample_channel(int64_t i, int64_t C, int64_t HW, bool channels_last) {
  return channels_last ? (i / (HW * C)) * C + i % C : i / HW;
}

//----------------------------------------------------------------------------
// Accumulators and block reductions.

struct Welford {
  float mean, m2, n;
  __device__ static Welford zero() { return {0.f, 0.f, 0.f}; }
  __device__ void push(float x) {
    n += 1.f;
    const float d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ static Welford merge(const Welford& a, const Welford& b) {
    const float n = a.n + b.n;
    if (n == 0.f) return a;
    const float d = b.mean - a.mean, wb = b.n / n;
    return {a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb, n};
  }
  __device__ Welford shfl_down(unsigned offset) const {
    return {__shfl_down_sync(0xffffffffu, mean, offset), __shfl_down_sync(0xffffffffu, m2, offset),
            __shfl_down_sync(0xffffffffu, n, offset)};
  }
};

struct Sums3 {
  float a, b, c;
  __device__ static Sums3 zero() { return {0.f, 0.f, 0.f}; }
  __device__ static Sums3 merge(const Sums3& x, const Sums3& y) { return {x.a + y.a, x.b + y.b, x.c + y.c}; }
  __device__ Sums3 shfl_down(unsigned offset) const {
    return {__shfl_down_sync(0xffffffffu, a, offset), __shfl_down_sync(0xffffffffu, b, offset),
            __shfl_down_sync(0xffffffffu, c, offset)};
  }
};

template <class S>
__device__ __forceinline__ S warp_reduce(S s) {
  for (unsigned offset = kWarp / 2; offset > 0; offset /= 2) s = S::merge(s, s.shfl_down(offset));
  return s;
}

// Reduce over a 1-D block whose size is a multiple of 32; the result is valid in thread 0.
template <class S>
__device__ S block_reduce(S s) {
  __shared__ S partial[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  s = warp_reduce(s);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : S::zero();
    s = warp_reduce(s);
  }
  return s;
}

//----------------------------------------------------------------------------
// Phase 1: per-(n, c, chunk) partial reductions, one Op per direction.

template <typename T>
struct MomentsOp {
  using Acc = Welford;
  static constexpr bool kReadsGrad = false;
  const T* x;
  const T* dy;  // unused
  float *mean, *m2, *count;
  __device__ void push(Acc& acc, int64_t, float xv, float) const { acc.push(xv); }
  __device__ void write(int64_t idx, const Acc& acc) const {
    mean[idx] = acc.mean;
    m2[idx] = acc.m2;
    count[idx] = acc.n;
  }
};

template <typename T, bool kSilu>
struct GradSumsOp {
  using Acc = Sums3;  // a = sum dz, b = sum dz * hc, c = sum hc
  static constexpr bool kReadsGrad = true;
  const T* x;
  const T* dy;
  Coefs k;
  float *P, *Q, *H;
  __device__ void push(Acc& acc, int64_t nc, float xv, float g) const {
    const float hc = xv - k.K[nc];
    const float dz = grad_pre_activation<kSilu>(fmaf(hc, k.A[nc], k.B[nc]), g);
    acc.a += dz;
    acc.b = fmaf(dz, hc, acc.b);
    acc.c += hc;
  }
  __device__ void write(int64_t idx, const Acc& acc) const {
    P[idx] = acc.a;
    Q[idx] = acc.b;
    H[idx] = acc.c;
  }
};

// NCHW: block (blockIdx.x = n * C + c, blockIdx.y = chunk) reduces row[chunk * kRowChunk, ...).
// kVec > 1 requires HW % kVec == 0 and 16-byte aligned tensors.
template <class Op, typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads) partial_reduce_nchw(Op op, int64_t HW, int chunks) {
  const int64_t nc = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kRowChunk;
  const int64_t end = begin + kRowChunk < HW ? begin + kRowChunk : HW;
  typename Op::Acc acc = Op::Acc::zero();
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < end; i += static_cast<int64_t>(blockDim.x) * kVec) {
    const Pack<T, kVec> xs = *reinterpret_cast<const Pack<T, kVec>*>(op.x + nc * HW + i);
    Pack<T, kVec> gs{};
    if constexpr (Op::kReadsGrad) gs = *reinterpret_cast<const Pack<T, kVec>*>(op.dy + nc * HW + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) op.push(acc, nc, to_float(xs.v[j]), Op::kReadsGrad ? to_float(gs.v[j]) : 0.f);
  }
  acc = block_reduce(acc);
  if (threadIdx.x == 0) op.write(nc * chunks + blockIdx.y, acc);
}

// NHWC: block (n, chunk of kRowsPerChunk rows, 32 channels); threadIdx.x walks channels
// (coalesced), threadIdx.y strides over the chunk's rows, then the rows are combined.
template <class Op, typename T>
__global__ void __launch_bounds__(kChannelsPerBlock * kRowsPerBlock)
    partial_reduce_nhwc(Op op, int64_t C, int64_t HW, int chunks) {
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.z) * kChannelsPerBlock + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t r1 = r0 + kRowsPerChunk < HW ? r0 + kRowsPerChunk : HW;
  typename Op::Acc acc = Op::Acc::zero();
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsPerBlock) {
      const int64_t i = (n * HW + r) * C + c;
      op.push(acc, n * C + c, to_float(op.x[i]), Op::kReadsGrad ? to_float(op.dy[i]) : 0.f);
    }
  }
  __shared__ typename Op::Acc rows[kRowsPerBlock][kChannelsPerBlock];
  rows[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int j = 1; j < kRowsPerBlock; ++j) acc = Op::Acc::merge(acc, rows[j][threadIdx.x]);
    op.write((n * C + c) * chunks + blockIdx.y, acc);
  }
}

//----------------------------------------------------------------------------
// Phase 2.

// Block per (n, g): combine the group's partial moments (shifted by add), write mean/rstd
// and the per-channel coefficients K, A, B.
__global__ void __launch_bounds__(kMaxThreads)
    finalize_statistics(const float* pmean, const float* pm2, const float* pcount, Params pr, int64_t C, int64_t G,
                        int chunks, float eps, float* mean_out, float* rstd_out, Coefs k) {
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G, Cg = C / G;
  Welford acc = Welford::zero();
  for (int64_t i = threadIdx.x; i < Cg * chunks; i += blockDim.x) {
    const int64_t c = g * Cg + i / chunks;
    const int64_t idx = (n * C + c) * chunks + i % chunks;
    acc = Welford::merge(acc, Welford{pmean[idx] + param_or(pr.add, n * C + c, 0.f), pm2[idx], pcount[idx]});
  }
  acc = block_reduce(acc);
  __shared__ float mean, rstd;
  if (threadIdx.x == 0) {
    const float var = fmaxf(acc.m2 / acc.n, 0.f);
    mean = acc.mean;
    rstd = rsqrtf(var + eps);
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < Cg; i += blockDim.x) {
    const int64_t c = g * Cg + i;
    pre_activation_coefs(pr, n, c, C, mean, rstd, k);
  }
}

// Thread per (n, c): the forward's K, A, B from its saved statistics.
__global__ void backward_coefficients(Params pr, const float* mean, const float* rstd, int64_t N, int64_t C,
                                      int64_t G, Coefs k) {
  const int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (nc >= N * C) return;
  const int64_t n = nc / C, c = nc % C, ng = n * G + c / (C / G);
  pre_activation_coefs(pr, n, c, C, mean[ng], rstd[ng], k);
}

struct ChannelSums {
  float p, q, h;
};

__device__ __forceinline__ ChannelSums channel_sums(const float* P, const float* Q, const float* H, int64_t nc,
                                                    int chunks) {
  ChannelSums s{0.f, 0.f, 0.f};
  for (int k = 0; k < chunks; ++k) {
    s.p += P[nc * chunks + k];
    s.q += Q[nc * chunks + k];
    s.h += H[nc * chunks + k];
  }
  return s;
}

// Block per (n, g): means over the group of dxhat and dxhat * xhat, then per channel the
// dx coefficients E, F, G and the per-sample parameter gradients.
__global__ void __launch_bounds__(kMaxThreads)
    finalize_gradients(BackwardArgs args, const float* P, const float* Q, const float* H, int chunks, float* E,
                       float* F, float* Gc) {
  const Problem& p = args.p;
  const Params& pr = args.params;
  const int64_t ng = blockIdx.x, n = ng / p.G, g = ng % p.G, Cg = p.C / p.G;
  const float r = args.rstd[ng];
  Sums3 acc = Sums3::zero();  // a = sum gamma * P, b = sum gamma * r * Q
  for (int64_t i = threadIdx.x; i < Cg; i += blockDim.x) {
    const int64_t c = g * Cg + i, nc = n * p.C + c;
    const ChannelSums s = channel_sums(P, Q, H, nc, chunks);
    const float gamma = pr.weight[c] * (1.f + param_or(pr.scale, nc, 0.f));
    acc.a += gamma * s.p;
    acc.b += gamma * r * s.q;
  }
  acc = block_reduce(acc);
  __shared__ float m1, m2;
  if (threadIdx.x == 0) {
    const float M = static_cast<float>(Cg * p.HW);
    m1 = acc.a / M;
    m2 = acc.b / M;
  }
  __syncthreads();
  const float f = -r * r * m2;
  for (int64_t i = threadIdx.x; i < Cg; i += blockDim.x) {
    const int64_t c = g * Cg + i, nc = n * p.C + c;
    const ChannelSums s = channel_sums(P, Q, H, nc, chunks);
    const float s1 = 1.f + param_or(pr.scale, nc, 0.f);
    const float e = r * pr.weight[c] * s1;
    const float sum_dz_xhat = r * s.q;
    E[nc] = e;
    F[nc] = f;
    Gc[nc] = -r * m1;
    if (args.dadd) args.dadd[nc] = e * s.p + f * s.h - r * m1 * static_cast<float>(p.HW);
    if (args.dscale) args.dscale[nc] = pr.weight[c] * sum_dz_xhat + pr.bias[c] * s.p;
    if (args.dshift) args.dshift[nc] = s.p;
    args.dweight_per_sample[nc] = s1 * sum_dz_xhat;
    args.dbias_per_sample[nc] = s1 * s.p;
  }
}

//----------------------------------------------------------------------------
// Phase 3: elementwise.

template <typename T, int kVec, bool kSilu>
__global__ void __launch_bounds__(kMaxThreads)
    apply_forward(const T* x, T* y, Coefs k, int64_t packs, int64_t C, int64_t HW, bool channels_last) {
  for (int64_t pk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, kVec> in = reinterpret_cast<const Pack<T, kVec>*>(x)[pk];
    Pack<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t nc = sample_channel(pk * kVec + j, C, HW, channels_last);
      out.v[j] = from_float<T>(activate<kSilu>(fmaf(to_float(in.v[j]) - k.K[nc], k.A[nc], k.B[nc])));
    }
    reinterpret_cast<Pack<T, kVec>*>(y)[pk] = out;
  }
}

template <typename T, int kVec, bool kSilu>
__global__ void __launch_bounds__(kMaxThreads)
    apply_backward(const T* x, const T* dy, T* dx, Coefs k, const float* E, const float* F, const float* G,
                   int64_t packs, int64_t C, int64_t HW, bool channels_last) {
  for (int64_t pk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, kVec> xs = reinterpret_cast<const Pack<T, kVec>*>(x)[pk];
    const Pack<T, kVec> gs = reinterpret_cast<const Pack<T, kVec>*>(dy)[pk];
    Pack<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t nc = sample_channel(pk * kVec + j, C, HW, channels_last);
      const float hc = to_float(xs.v[j]) - k.K[nc];
      const float dz = grad_pre_activation<kSilu>(fmaf(hc, k.A[nc], k.B[nc]), to_float(gs.v[j]));
      out.v[j] = from_float<T>(fmaf(dz, E[nc], fmaf(hc, F[nc], G[nc])));
    }
    reinterpret_cast<Pack<T, kVec>*>(dx)[pk] = out;
  }
}

//----------------------------------------------------------------------------
// Host side: geometry, workspace layout, launches.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int chunks_of(const Problem& p) {
  return static_cast<int>(p.channels_last ? ceil_div(p.HW, kRowsPerChunk) : ceil_div(p.HW, kRowChunk));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Threads of a 1-D block covering `work` items (a multiple of 32, at most kMaxThreads).
int threads_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(kWarp, ceil_div(work, kWarp) * kWarp)));
}

unsigned elementwise_blocks(int64_t packs) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(kMaxGrid, ceil_div(packs, kMaxThreads))));
}

template <class Op, typename T>
void launch_partial_reduce(const Op& op, const Problem& p, bool vectorizable, cudaStream_t stream) {
  const int chunks = chunks_of(p);
  if (p.channels_last) {
    const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(chunks),
                    static_cast<unsigned>(ceil_div(p.C, kChannelsPerBlock)));
    partial_reduce_nhwc<Op, T><<<grid, dim3(kChannelsPerBlock, kRowsPerBlock), 0, stream>>>(op, p.C, p.HW, chunks);
    return;
  }
  constexpr int kVec = vec_width<T>();
  const dim3 grid(static_cast<unsigned>(p.N * p.C), static_cast<unsigned>(chunks));
  const int64_t per_block = std::min<int64_t>(p.HW, kRowChunk);
  if (vectorizable && p.HW % kVec == 0) {
    partial_reduce_nchw<Op, T, kVec><<<grid, threads_for(per_block / kVec), 0, stream>>>(op, p.HW, chunks);
  } else {
    partial_reduce_nchw<Op, T, 1><<<grid, threads_for(per_block), 0, stream>>>(op, p.HW, chunks);
  }
}

// Elementwise launches use kVec-wide packs when every tensor is aligned and the size allows.
template <template <typename, int, bool> class Launch, typename T, bool kSilu, typename... Args>
void launch_elementwise(const Problem& p, bool vectorizable, cudaStream_t stream, Args... args) {
  constexpr int kVec = vec_width<T>();
  const int64_t total = p.N * p.C * p.HW;
  if (vectorizable && total % kVec == 0) {
    Launch<T, kVec, kSilu>::run(elementwise_blocks(total / kVec), stream, total / kVec, args...);
  } else {
    Launch<T, 1, kSilu>::run(elementwise_blocks(total), stream, total, args...);
  }
}

template <typename T, int kVec, bool kSilu>
struct ApplyForward {
  static void run(unsigned blocks, cudaStream_t stream, int64_t packs, const T* x, T* y, Coefs k, int64_t C,
                  int64_t HW, bool channels_last) {
    apply_forward<T, kVec, kSilu><<<blocks, kMaxThreads, 0, stream>>>(x, y, k, packs, C, HW, channels_last);
  }
};

template <typename T, int kVec, bool kSilu>
struct ApplyBackward {
  static void run(unsigned blocks, cudaStream_t stream, int64_t packs, const T* x, const T* dy, T* dx, Coefs k,
                  const float* E, const float* F, const float* G, int64_t C, int64_t HW, bool channels_last) {
    apply_backward<T, kVec, kSilu><<<blocks, kMaxThreads, 0, stream>>>(x, dy, dx, k, E, F, G, packs, C, HW,
                                                                       channels_last);
  }
};

template <typename T, bool kSilu>
void forward_typed(const ForwardArgs& args, float* ws, cudaStream_t stream) {
  const Problem& p = args.p;
  const int chunks = chunks_of(p);
  const int64_t partials = p.N * p.C * chunks, NC = p.N * p.C;
  float* pmean = ws;
  float* pm2 = pmean + partials;
  float* pcount = pm2 + partials;
  const Coefs k{pcount + partials, pcount + partials + NC, pcount + partials + 2 * NC};
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const bool vectorizable = aligned16(x) && aligned16(y);

  launch_partial_reduce<MomentsOp<T>, T>(MomentsOp<T>{x, nullptr, pmean, pm2, pcount}, p, vectorizable, stream);
  finalize_statistics<<<static_cast<unsigned>(p.N * p.G), threads_for(p.C / p.G * chunks), 0, stream>>>(
      pmean, pm2, pcount, args.params, p.C, p.G, chunks, args.eps, args.mean, args.rstd, k);
  launch_elementwise<ApplyForward, T, kSilu>(p, vectorizable, stream, x, y, k, p.C, p.HW, p.channels_last);
}

template <typename T, bool kSilu>
void backward_typed(const BackwardArgs& args, float* ws, cudaStream_t stream) {
  const Problem& p = args.p;
  const int chunks = chunks_of(p);
  const int64_t partials = p.N * p.C * chunks, NC = p.N * p.C;
  const Coefs k{ws, ws + NC, ws + 2 * NC};
  float* E = ws + 3 * NC;
  float* F = E + NC;
  float* G = F + NC;
  float* P = G + NC;
  float* Q = P + partials;
  float* H = Q + partials;
  const T* x = static_cast<const T*>(args.x);
  const T* dy = static_cast<const T*>(args.dy);
  T* dx = static_cast<T*>(args.dx);
  const bool vectorizable = aligned16(x) && aligned16(dy) && aligned16(dx);

  backward_coefficients<<<static_cast<unsigned>(ceil_div(NC, kMaxThreads)), kMaxThreads, 0, stream>>>(
      args.params, args.mean, args.rstd, p.N, p.C, p.G, k);
  using Op = GradSumsOp<T, kSilu>;
  launch_partial_reduce<Op, T>(Op{x, dy, k, P, Q, H}, p, vectorizable, stream);
  finalize_gradients<<<static_cast<unsigned>(p.N * p.G), threads_for(p.C / p.G), 0, stream>>>(args, P, Q, H, chunks,
                                                                                                 E, F, G);
  launch_elementwise<ApplyBackward, T, kSilu>(p, vectorizable, stream, x, dy, dx, k, static_cast<const float*>(E),
                                              static_cast<const float*>(F), static_cast<const float*>(G), p.C, p.HW,
                                              p.channels_last);
}

template <template <typename, bool> class Typed, typename Args>
cudaError_t dispatch(const Args& args, float* workspace, cudaStream_t stream) {
  const bool silu = args.p.silu;
  switch (args.p.dtype) {
    case ScalarType::kFloat:
      silu ? Typed<float, true>::run(args, workspace, stream) : Typed<float, false>::run(args, workspace, stream);
      break;
    case ScalarType::kHalf:
      silu ? Typed<__half, true>::run(args, workspace, stream) : Typed<__half, false>::run(args, workspace, stream);
      break;
    case ScalarType::kBFloat16:
      silu ? Typed<__nv_bfloat16, true>::run(args, workspace, stream)
           : Typed<__nv_bfloat16, false>::run(args, workspace, stream);
      break;
  }
  return cudaGetLastError();
}

template <typename T, bool kSilu>
struct ForwardTyped {
  static void run(const ForwardArgs& a, float* ws, cudaStream_t s) { forward_typed<T, kSilu>(a, ws, s); }
};
template <typename T, bool kSilu>
struct BackwardTyped {
  static void run(const BackwardArgs& a, float* ws, cudaStream_t s) { backward_typed<T, kSilu>(a, ws, s); }
};

}  // namespace

int64_t forward_workspace_size(const Problem& p) { return 3 * p.N * p.C * chunks_of(p) + 3 * p.N * p.C; }

int64_t backward_workspace_size(const Problem& p) { return 3 * p.N * p.C * chunks_of(p) + 6 * p.N * p.C; }

cudaError_t forward(const ForwardArgs& args, float* workspace, cudaStream_t stream) {
  return dispatch<ForwardTyped>(args, workspace, stream);
}

cudaError_t backward(const BackwardArgs& args, float* workspace, cudaStream_t stream) {
  return dispatch<BackwardTyped>(args, workspace, stream);
}

}  // namespace d2o_fast::cuda
