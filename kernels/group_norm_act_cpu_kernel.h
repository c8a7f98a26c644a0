// Vectorised CPU kernels of y = act(GN(x + add) * (1 + scale) + shift).
//
// This header is the body of group_norm_act_cpu_{default,avx2,avx512}.cpp: each of them
// defines CPU_CAPABILITY (DEFAULT / AVX2 / AVX512) plus the matching CPU_CAPABILITY_* macro
// and includes it once. at::vec and the code below live in CPU_CAPABILITY namespaces, so
// the three builds never share a kernel symbol.
//
// Algorithm (all statistics in float32 lanes, accumulated into double):
//   forward : 1) moments of x + add per group;  2) mean, rstd and the per-(sample, channel) coefficients K, A, B
//             with z = (x - K) * A + B;  3) y = act((x - K) * A + B): a subtract and an FMA (+ SiLU) per element.
//   backward: 1) per-(sample, channel) sums P = sum dz, Q = sum dz * hc, H = sum hc with hc = x - K = x + add - mean;
//             2) per group: the GroupNorm input-gradient coefficients E, F, G with dx = dz * E + hc * F + G, and the
//                [N, C] parameter gradients;  3) dx = dz * E + hc * F + G.
// Centring on K = mean - add before scaling (rather than folding it into one x * A + B) keeps float32 accurate when
// |mean| >> std.
// NCHW: a group's Cg rows are one contiguous span, and one task runs all three phases for it, so x and dy are read
// from memory once and the later passes find them in cache. Its moments come from a corrected two-pass over the
// span with no per-row reduction, so 8x8 rows cost what 32x32 ones do; its backward keeps dz from phase 1 in a
// per-task scratch (when the group fits) instead of recomputing the SiLU derivative.
// channels_last: a "chunk" of rows (all channels) is the unit of work; each phase runs over all chunks, with
// per-(sample, chunk, channel) moments Chan-combined in double.

#if !defined(CPU_CAPABILITY)
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including this header"
#endif

// Wide-ISA code generation for this whole translation unit, as ATen builds its own AVX2 /
// AVX512 kernels. The ISA feature macros are what sleef.h and at::vec test to pick their
// paths. Inline torch/c10 functions emitted here are duplicates of ones the baseline
// translation units also emit; those are linked first (see setup.py), so the linker keeps
// their baseline copies and code outside this file never runs a wide-ISA instruction.
#if defined(CPU_CAPABILITY_AVX512)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX2)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "group_norm_act_cpu.h"

// GCC false positives in at::vec's reduced-precision conversions and reductions (_mm512_undefined_* inputs)
// and torch's CUDA-style '#pragma unroll'; the -Wpsabi note is about 32/64-byte vector
// arguments of functions that never cross this translation unit's boundary.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace d2o_fast::cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
// Elements per work item of the channels_last kernels: 32 KiB of float32 rows (16 KiB of bfloat16), which the
// forward's second moments pass and its output pass find in L1 or near it (a chunk twice as large spills to L2
// between the two passes).
constexpr int64_t kChunkElements = 8192;
// Minimum elements per parallel task (at::parallel_for grain).
constexpr int64_t kGrainElements = 32768;

//----------------------------------------------------------------------------
// Loads/stores in float whatever the storage type; partial vectors are zero-padded.

template <typename T>
inline Vec load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kW ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if (n == kW) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
    float buf[kW] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return Vec::loadu(buf);
  }
}

template <typename T>
inline void store(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kW) v.store(p); else v.store(p, n);
  } else {
    if (n == kW) {
      at::vec::convert_from_float<T>(v, v).store(p, kW);
      return;
    }
    float buf[kW];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

// Zero the lanes >= n of a partial vector (padding lanes must not enter reductions).
inline Vec keep(const Vec& v, int64_t n) { return n == kW ? v : Vec::set(Vec(0.f), v, n); }

// Horizontal sum by log2(kW) shuffles (a scalar loop over a stored vector costs more than a short row's work).
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// The horizontal sums of three vectors, sharing the shuffle steps (AVX512: 8 shuffles and 5 adds instead of 24
// instructions; the NCHW backward takes three per row, which at 8x8 is one per 1.3 vectors of work).
inline void hsum3(const Vec& a, const Vec& b, const Vec& c, float& sa, float& sb, float& sc) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 zero = _mm512_setzero_ps();
  // 128-bit lanes [a0+a2, a1+a3, b0+b2, b1+b3] and [c0+c2, c1+c3, 0, 0].
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(c, zero, 0x44), _mm512_shuffle_f32x4(c, zero, 0xEE));
  // One 128-bit lane per input: [a, b, c, 0], four partial sums each.
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, c0, 0x88), _mm512_shuffle_f32x4(ab, c0, 0xDD));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  alignas(64) float out[16];
  _mm512_store_ps(out, t);
  sa = out[0];
  sb = out[4];
  sc = out[8];
#else
  sa = hsum(a);
  sb = hsum(b);
  sc = hsum(c);
#endif
}

// f(offset, count) over [0, n) in vector steps; the tail gets count < kW.
template <typename F>
inline void for_each_vec(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) f(i, kW);
  if (i < n) f(i, n - i);
}

// sigmoid(z) = 1 / (1 + exp(-z)) of NV independent vectors.
// AVX512: exp(-z) = 2^t with t = -z log2(e) clamped above at 100 (so 1 + 2^t stays finite; below 1e-30 the sigmoid
// is 2^-100 either way), t = n + f with |f| <= 1/2, 2^f from a degree-5 polynomial fitted on that interval (relative
// error 2e-7 in float32 arithmetic) scaled by 2^n with scalef, and 1 / (1 + 2^t) from the reciprocal estimate and
// one Newton step: 14 instructions, about half of at::vec's exp_u20 followed by a division. NaN propagates (the
// min keeps its second operand when unordered). The other builds use exp_u20 and a division.
// This and the element functions below work on NV vectors at once, each step applied to all of them before the
// next: one sigmoid is a dependency chain of about 50 cycles, and the out-of-order window alone overlaps too few of
// them when the vectors come one after another.
template <int NV>
inline void sigmoid_n(const Vec (&z)[NV], Vec (&s)[NV]) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 t[NV], n[NV], q[NV];
  for (int v = 0; v < NV; ++v) t[v] = _mm512_min_ps(_mm512_set1_ps(100.f), _mm512_mul_ps(z[v], _mm512_set1_ps(-1.44269504088896341f)));
  for (int v = 0; v < NV; ++v) n[v] = _mm512_roundscale_ps(t[v], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  for (int v = 0; v < NV; ++v) t[v] = _mm512_sub_ps(t[v], n[v]);
  for (int v = 0; v < NV; ++v) q[v] = _mm512_fmadd_ps(_mm512_set1_ps(0.0013266970636323094f), t[v], _mm512_set1_ps(0.009675459936261177f));
  for (int v = 0; v < NV; ++v) q[v] = _mm512_fmadd_ps(q[v], t[v], _mm512_set1_ps(0.05550742521882057f));
  for (int v = 0; v < NV; ++v) q[v] = _mm512_fmadd_ps(q[v], t[v], _mm512_set1_ps(0.24022121727466583f));
  for (int v = 0; v < NV; ++v) q[v] = _mm512_fmadd_ps(q[v], t[v], _mm512_set1_ps(0.6931469440460205f));
  for (int v = 0; v < NV; ++v) q[v] = _mm512_fmadd_ps(q[v], t[v], _mm512_set1_ps(1.0000001192092896f));
  for (int v = 0; v < NV; ++v) q[v] = _mm512_add_ps(_mm512_scalef_ps(q[v], n[v]), _mm512_set1_ps(1.f));
  for (int v = 0; v < NV; ++v) n[v] = _mm512_rcp14_ps(q[v]);
  for (int v = 0; v < NV; ++v) s[v] = Vec(_mm512_fmadd_ps(n[v], _mm512_fnmadd_ps(q[v], n[v], _mm512_set1_ps(1.f)), n[v]));
#else
  const Vec one(1.f);
  for (int v = 0; v < NV; ++v) s[v] = one / (one + z[v].neg().exp_u20());
#endif
}

// z -> act(z), in place.
template <bool kSilu, int NV>
inline void activate(Vec (&z)[NV]) {
  if constexpr (kSilu) {
    Vec s[NV];
    sigmoid_n(z, s);
    for (int v = 0; v < NV; ++v) z[v] = z[v] * s[v];
  }
}

// dL/dy -> dL/dz in place, given the recomputed pre-activation z.
template <bool kSilu, int NV>
inline void grad_pre_activation(const Vec (&z)[NV], Vec (&g)[NV]) {
  if constexpr (kSilu) {
    const Vec one(1.f);
    Vec s[NV];
    sigmoid_n(z, s);
    for (int v = 0; v < NV; ++v) g[v] = g[v] * s[v] * at::vec::fmadd(z[v], one - s[v], one);
  }
}

// f(i, nv, m) over [0, n) in blocks of vectors: blocks of V full vectors (nv = integral_constant<V>, m = kW), then
// single vectors (nv = integral_constant<1>), the last with m < kW lanes when n is not a multiple of kW.
template <int V, typename F>
inline void for_each_vec_block(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + V * kW <= n; i += V * kW) f(i, std::integral_constant<int, V>{}, kW);
  for (; i < n; i += kW) f(i, std::integral_constant<int, 1>{}, std::min(kW, n - i));
}

//----------------------------------------------------------------------------
// Work decomposition of the channels_last kernels (NCHW works per group): a "chunk" is `rows` consecutive spatial
// positions of one sample, all channels.

struct Chunking {
  int64_t rows;     // spatial positions per chunk
  int64_t chunks;   // chunks per sample
  int64_t count(int64_t k, int64_t HW) const { return std::min(rows, HW - k * rows); }
  // Element offset of chunk t = n * chunks + k (its first row, first channel).
  int64_t offset(int64_t t, const Problem& p) const { return ((t / chunks) * p.HW + (t % chunks) * rows) * p.C; }
};

inline Chunking make_chunking(const Problem& p) {
  const int64_t rows = std::clamp<int64_t>(kChunkElements / std::max<int64_t>(p.C, 1), 1, p.HW);
  return {rows, (p.HW + rows - 1) / rows};
}

// Runs the three phases of a channels_last kernel: chunk(t) over every chunk t = n * chunks + k, then group(ng) over
// every group, then chunk2(t) over every chunk; make_scratch() gives each task its scratch. With at least as many
// samples as threads, one task runs all three phases for a sample, so the later phases find the sample's x and dy
// in L2 (a sample of 8x8 x 512 or 16x16 x 256 is 128-256 KiB); with fewer, each phase is parallel over all chunks
// or groups.
template <typename Scratch, typename MakeScratch, typename Phase1, typename Phase2, typename Phase3>
void run_phases_nhwc(const Problem& p, const Chunking& ch, MakeScratch&& make_scratch, Phase1&& phase1,
                     Phase2&& phase2, Phase3&& phase3) {
  if (p.N >= at::get_num_threads()) {
    at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch = make_scratch();
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = n * ch.chunks; t < (n + 1) * ch.chunks; ++t) phase1(t, scratch);
        for (int64_t ng = n * p.G; ng < (n + 1) * p.G; ++ng) phase2(ng, scratch);
        for (int64_t t = n * ch.chunks; t < (n + 1) * ch.chunks; ++t) phase3(t, scratch);
      }
    });
    return;
  }
  at::parallel_for(0, p.N * ch.chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch = make_scratch();
    for (int64_t t = begin; t < end; ++t) phase1(t, scratch);
  });
  at::parallel_for(0, p.N * p.G, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch = make_scratch();
    for (int64_t ng = begin; ng < end; ++ng) phase2(ng, scratch);
  });
  at::parallel_for(0, p.N * ch.chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch = make_scratch();
    for (int64_t t = begin; t < end; ++t) phase3(t, scratch);
  });
}

inline int64_t grain(int64_t elements_per_task) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_task, 1));
}

// A [N, C] parameter's m entries from nc (a vector step), or `otherwise` when the parameter is absent.
inline Vec param_vec(const float* t, int64_t nc, int64_t m, float otherwise) { return t ? load(t + nc, m) : Vec(otherwise); }

// Per-(n, c) coefficients K, A, B of z = (x - K) * A + B: arrays of `size` entries.
struct Coefs {
  std::vector<float> K, A, B;
  explicit Coefs(int64_t size) : K(size), A(size), B(size) {}
  // Channels [c, c + count) of sample n, all of one group with statistics mean and rstd, into entries [i, i + count).
  // Vector steps: at 8x8 there are as many (n, c) as 64 elements per channel, so scalar per-channel work would
  // cost as much as the elementwise passes.
  void set_group(const Params& pr, int64_t nc, int64_t c, int64_t count, float mean, float rstd, int64_t i) {
    for_each_vec(count, [&](int64_t j, int64_t m) {
      const Vec s1 = param_vec(pr.scale, nc + j, m, 0.f) + Vec(1.f);
      store(&K[i + j], Vec(mean) - param_vec(pr.add, nc + j, m, 0.f), m);
      store(&A[i + j], Vec(rstd) * load(pr.weight + c + j, m) * s1, m);
      store(&B[i + j], at::vec::fmadd(load(pr.bias + c + j, m), s1, param_vec(pr.shift, nc + j, m, 0.f)), m);
    });
  }
};

//----------------------------------------------------------------------------
// Forward.

// Sums over a group run in float32 lanes, four independent accumulators (one add chain's 3-4 cycle latency per vector
// would otherwise bound these passes), flushed into a double total every kFlushElements elements and at the end, so
// lane round-off stays that of a short sum.
constexpr int64_t kFlushElements = 4096;

// Phase 1 + 2, NCHW: mean and rstd of one group of x + add, whose Cg rows of HW elements are one contiguous span,
// corrected two-pass (the span is L1/L2 resident for the second pass, which also sums the residuals d = h - mean
// to remove the rounding error of the first-pass mean; matters when |mean| >> std). No per-row reductions, so
// short rows (8x8) cost what long ones do.
template <typename T>
inline void group_moments_nchw(const T* xg, const float* add, int64_t Cg, int64_t HW, float eps, float& mean,
                               float& rstd) {
  const int64_t numel = Cg * HW;
  const double count = static_cast<double>(numel);
  double total = 0.0;
  for (int64_t s0 = 0; s0 < numel; s0 += kFlushElements) {  // the span in one run: rows do not matter here
    Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    for_each_vec_block<4>(std::min(kFlushElements, numel - s0), [&](int64_t j, auto nv, int64_t m) {
      for (int u = 0; u < decltype(nv)::value; ++u) acc[u] += load(xg + s0 + j + u * kW, m);
    });
    total += static_cast<double>(hsum((acc[0] + acc[1]) + (acc[2] + acc[3])));
  }
  double add_sum = 0.0;
  if (add) for (int64_t i = 0; i < Cg; ++i) add_sum += add[i];
  const float mean0 = static_cast<float>((total + static_cast<double>(HW) * add_sum) / count);
  // Residuals h - mean0 = x - (mean0 - add), row by row.
  const int64_t flush_rows = std::max<int64_t>(1, kFlushElements / HW);
  double residual = 0.0, square = 0.0;
  for (int64_t i0 = 0; i0 < Cg; i0 += flush_rows) {
    Vec r[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)}, q[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    for (int64_t i = i0; i < std::min(Cg, i0 + flush_rows); ++i) {
      const Vec k(mean0 - (add ? add[i] : 0.f));
      for_each_vec_block<4>(HW, [&](int64_t j, auto nv, int64_t m) {
        for (int u = 0; u < decltype(nv)::value; ++u) {
          const Vec d = keep(load(xg + i * HW + j + u * kW, m) - k, m);
          r[u] += d;
          q[u] = at::vec::fmadd(d, d, q[u]);
        }
      });
    }
    residual += static_cast<double>(hsum((r[0] + r[1]) + (r[2] + r[3])));
    square += static_cast<double>(hsum((q[0] + q[1]) + (q[2] + q[3])));
  }
  const double var = std::max(square - residual * residual / count, 0.0) / count;
  mean = static_cast<float>(static_cast<double>(mean0) + residual / count);
  rstd = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
}

// Phase 1, NHWC: per-channel mean and M2 over `rows` rows of C channels, corrected two-pass. The first pass reads x
// from memory in row order, four rows per visit of the running sums (four sequential streams, which the hardware
// prefetcher follows; walking a chunk's rows per block of channels defeated it and stalled on x). The second (the
// chunk is L2 resident now) keeps a block of channels' sums in registers while it walks all rows.
template <typename T>
inline void chunk_moments(const T* x, int64_t rows, int64_t C, float* mean, float* m2) {
  constexpr int64_t kRows = 4;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    for_each_vec(C, [&](int64_t c, int64_t m) {
      Vec v[kRows];
      for (int64_t r = 0; r < kRows; ++r) v[r] = r0 + r < rows ? load(x + (r0 + r) * C + c, m) : Vec(0.f);
      const Vec sum = (v[0] + v[1]) + (v[2] + v[3]);
      store(mean + c, r0 ? load(mean + c, m) + sum : sum, m);
    });
  }
  const Vec inv(1.f / static_cast<float>(rows));
  for_each_vec_block<4>(C, [&](int64_t c0, auto nv, int64_t m) {
    constexpr int NV = decltype(nv)::value;
    Vec mu[NV], residual[NV], square[NV];
    for (int v = 0; v < NV; ++v) {
      mu[v] = load(mean + c0 + v * kW, m) * inv;
      residual[v] = square[v] = Vec(0.f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int v = 0; v < NV; ++v) {
        const Vec d = keep(load(x + r * C + c0 + v * kW, m) - mu[v], m);
        residual[v] += d;
        square[v] = at::vec::fmadd(d, d, square[v]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      store(mean + c0 + v * kW, at::vec::fmadd(residual[v], inv, mu[v]), m);
      store(m2 + c0 + v * kW, at::vec::maximum(square[v] - residual[v] * residual[v] * inv, Vec(0.f)), m);
    }
  });
}

// Phase 2 for one group ng: Chan-combine its chunk moments -> mean, rstd, and K, A, B per (n, c). The per-channel
// combination runs in vector steps over the group's channels; channel_mean / channel_m2 are scratch of Cg floats.
inline void combine_group(const ForwardArgs& args, const Chunking& ch, int64_t ng, const float* cmean, const float* cm2,
                          Coefs& k, float* channel_mean, float* channel_m2) {
  const Problem& p = args.p;
  const int64_t Cg = p.C / p.G;
  const int64_t n = ng / p.G, c0 = (ng % p.G) * Cg, nc0 = n * p.C + c0;
  const int64_t first = n * ch.chunks * p.C + c0;  // entry of (chunk 0, channel c0); chunk t's is t * C further
  const Vec inv_hw(1.f / static_cast<float>(p.HW));
  for_each_vec(Cg, [&](int64_t i, int64_t m) {
    Vec sum(0.f), m2(0.f);
    for (int64_t t = 0; t < ch.chunks; ++t) {  // counts differ only for the last chunk
      sum = at::vec::fmadd(Vec(static_cast<float>(ch.count(t, p.HW))), load(cmean + first + t * p.C + i, m), sum);
    }
    const Vec mu = sum * inv_hw;
    for (int64_t t = 0; t < ch.chunks; ++t) {
      const Vec d = load(cmean + first + t * p.C + i, m) - mu;
      m2 += at::vec::fmadd(Vec(static_cast<float>(ch.count(t, p.HW))) * d, d, load(cm2 + first + t * p.C + i, m));
    }
    store(channel_mean + i, mu + param_vec(args.params.add, nc0 + i, m, 0.f), m);
    store(channel_m2 + i, m2, m);
  });
  double mu = 0.0;
  for (int64_t i = 0; i < Cg; ++i) mu += channel_mean[i];
  mu /= static_cast<double>(Cg);
  double m2 = 0.0;
  for (int64_t i = 0; i < Cg; ++i) {
    const double d = channel_mean[i] - mu;
    m2 += channel_m2[i] + static_cast<double>(p.HW) * d * d;
  }
  const double var = m2 / static_cast<double>(Cg * p.HW);
  const float mean = static_cast<float>(mu);
  const float rstd = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(args.eps)));
  args.mean[ng] = mean;
  args.rstd[ng] = rstd;
  k.set_group(args.params, nc0, c0, Cg, mean, rstd, nc0);
}

// NCHW: one task per group: its statistics, then its output while the group is still in cache (x is read from
// memory once).
template <typename T, bool kSilu>
void forward_nchw(const ForwardArgs& args) {
  const Problem& p = args.p;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const int64_t Cg = p.C / p.G;
  at::parallel_for(0, p.N * p.G, grain(Cg * p.HW), [&](int64_t begin, int64_t end) {
    Coefs k(Cg);  // the group's rows
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / p.G, first = n * p.C + (ng % p.G) * Cg;  // n * C + c of the group's first channel
      group_moments_nchw(x + first * p.HW, args.params.add ? args.params.add + first : nullptr, Cg, p.HW, args.eps,
                         args.mean[ng], args.rstd[ng]);
      k.set_group(args.params, first, first - n * p.C, Cg, args.mean[ng], args.rstd[ng], 0);
      for (int64_t nc = first; nc < first + Cg; ++nc) {
        const Vec kc(k.K[nc - first]), a(k.A[nc - first]), b(k.B[nc - first]);
        const T* xr = x + nc * p.HW;
        T* yr = y + nc * p.HW;
        for_each_vec_block<4>(p.HW, [&](int64_t i, auto nv, int64_t m) {
          constexpr int NV = decltype(nv)::value;
          // The next group's x (read by its first pass), while this one computes.
          for (int v = 0; v < NV; ++v) __builtin_prefetch(xr + i + v * kW + Cg * p.HW);
          Vec z[NV];
          for (int v = 0; v < NV; ++v) z[v] = at::vec::fmadd(load(xr + i + v * kW, m) - kc, a, b);
          activate<kSilu>(z);
          for (int v = 0; v < NV; ++v) store(yr + i + v * kW, z[v], m);
        });
      }
    }
  });
}

// channels_last: moments per chunk of rows, the groups' statistics, then the output per chunk.
template <typename T, bool kSilu>
void forward_nhwc(const ForwardArgs& args) {
  const Problem& p = args.p;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const int64_t Cg = p.C / p.G;
  Coefs k(p.N * p.C);
  const Chunking ch = make_chunking(p);
  std::vector<float> cmean(p.N * ch.chunks * p.C), cm2(p.N * ch.chunks * p.C);
  struct Scratch {
    std::vector<float> channel_mean, channel_m2;  // Cg floats each (group combine)
  };
  run_phases_nhwc<Scratch>(
      p, ch, [&] { return Scratch{std::vector<float>(Cg), std::vector<float>(Cg)}; },
      [&](int64_t t, Scratch&) {
        chunk_moments(x + ch.offset(t, p), ch.count(t % ch.chunks, p.HW), p.C, &cmean[t * p.C], &cm2[t * p.C]);
      },
      [&](int64_t ng, Scratch& s) {
        combine_group(args, ch, ng, cmean.data(), cm2.data(), k, s.channel_mean.data(), s.channel_m2.data());
      },
      [&](int64_t t, Scratch&) {
        const int64_t n = t / ch.chunks, nc0 = n * p.C, rows = ch.count(t % ch.chunks, p.HW);
        const T* xt = x + ch.offset(t, p);
        T* yt = y + ch.offset(t, p);
        // The same rows of the next sample, which its first pass reads from memory next: fetched while this one
        // computes, as the NCHW forward fetches the next group (the first pass had stalled on x).
        const T* xnext = n + 1 < p.N ? xt + p.HW * p.C : xt;
        const float* Kn = &k.K[nc0];
        const float* An = &k.A[nc0];
        const float* Bn = &k.B[nc0];
        for (int64_t r = 0; r < rows; ++r) {
          for_each_vec_block<4>(p.C, [&](int64_t c0, auto nv, int64_t m) {
            constexpr int NV = decltype(nv)::value;
            Vec z[NV];
            for (int v = 0; v < NV; ++v) __builtin_prefetch(xnext + r * p.C + c0 + v * kW);
            for (int v = 0; v < NV; ++v) {
              const int64_t c = c0 + v * kW;
              z[v] = at::vec::fmadd(load(xt + r * p.C + c, m) - load(Kn + c, m), load(An + c, m), load(Bn + c, m));
            }
            activate<kSilu>(z);
            for (int v = 0; v < NV; ++v) store(yt + r * p.C + c0 + v * kW, z[v], m);
          });
        }
      });
}

//----------------------------------------------------------------------------
// Backward.

// The forward's coefficients, from its saved statistics.
inline Coefs backward_coefs(const BackwardArgs& args) {
  const Problem& p = args.p;
  const int64_t Cg = p.C / p.G;
  Coefs k(p.N * p.C);
  for (int64_t ng = 0; ng < p.N * p.G; ++ng) {
    const int64_t first = (ng / p.G) * p.C + (ng % p.G) * Cg;
    k.set_group(args.params, first, (ng % p.G) * Cg, Cg, args.mean[ng], args.rstd[ng], first);
  }
  return k;
}

// Phase 1 accumulation of NV vectors of one NCHW row (one set of coefficients): P += dz, Q += dz * hc, H += hc.
// g holds dL/dy on entry and dz on return (zero in padding lanes, where dy = 0).
template <bool kSilu, int NV>
inline void accumulate_grad_sums(const Vec (&x)[NV], Vec (&g)[NV], const Vec& kc, const Vec& a, const Vec& b, int64_t m,
                                 Vec& P, Vec& Q, Vec& H) {
  Vec hc[NV], z[NV];
  for (int v = 0; v < NV; ++v) {
    hc[v] = keep(x[v] - kc, m);
    z[v] = at::vec::fmadd(hc[v], a, b);
  }
  grad_pre_activation<kSilu>(z, g);
  for (int v = 0; v < NV; ++v) {
    P += g[v];
    Q = at::vec::fmadd(g[v], hc[v], Q);
    H += hc[v];
  }
}

// Phase 2 for one group ng, from its channels' totals sp = sum dz, sq = sum dz * hc, sh = sum hc (sh only read when
// there is an add): the dx coefficients E, F, G of its Cg channels (written to E[0, Cg) ...) and its [N, C]
// parameter gradients. Vector steps over the channels (see Coefs::set_group).
inline void group_grad_coefficients(const BackwardArgs& args, int64_t ng, const float* sp, const float* sq,
                                    const float* sh, float* E, float* F, float* G) {
  const Problem& p = args.p;
  const Params& pr = args.params;
  const int64_t Cg = p.C / p.G;
  const int64_t c0 = (ng % p.G) * Cg, first = (ng / p.G) * p.C + c0;  // the group's first channel and its n * C + c
  const float r = args.rstd[ng];
  // Means over the group of dxhat and dxhat * xhat (gamma = weight * (1 + scale)).
  Vec v1(0.f), v2(0.f);
  for_each_vec(Cg, [&](int64_t i, int64_t m) {
    const Vec gamma = load(pr.weight + c0 + i, m) * (param_vec(pr.scale, first + i, m, 0.f) + Vec(1.f));
    v1 = at::vec::fmadd(gamma, load(sp + i, m), v1);
    v2 = at::vec::fmadd(gamma, load(sq + i, m), v2);
  });
  const double M = static_cast<double>(Cg * p.HW);
  const float m1 = static_cast<float>(hsum(v1) / M);
  const float m2 = static_cast<float>(static_cast<double>(r) * hsum(v2) / M);
  const Vec f(-r * r * m2), g(-r * m1), rv(r), hw(static_cast<float>(p.HW));
  for_each_vec(Cg, [&](int64_t i, int64_t m) {
    const int64_t nc = first + i;
    const Vec s1 = param_vec(pr.scale, nc, m, 0.f) + Vec(1.f);
    const Vec w = load(pr.weight + c0 + i, m);
    const Vec e = rv * w * s1;
    const Vec vp = load(sp + i, m);
    const Vec sum_dz_xhat = rv * load(sq + i, m);
    store(E + i, e, m);
    store(F + i, f, m);
    store(G + i, g, m);
    if (args.dadd) store(args.dadd + nc, at::vec::fmadd(e, vp, at::vec::fmadd(f, load(sh + i, m), g * hw)), m);
    if (args.dscale) store(args.dscale + nc, at::vec::fmadd(w, sum_dz_xhat, load(pr.bias + c0 + i, m) * vp), m);
    if (args.dshift) store(args.dshift + nc, vp, m);
    store(args.dweight_per_sample + nc, s1 * sum_dz_xhat, m);
    store(args.dbias_per_sample + nc, s1 * vp, m);
  });
}

// NCHW backward keeps a group's dz between its two passes instead of recomputing the SiLU derivative: float32 keeps
// it in dx itself (so the first pass also brings dx's lines into cache, and the second reads and overwrites them
// there); 16-bit types keep it in a per-task scratch when the group has at most this many elements (256 KiB, L2),
// and prefetch dx's lines for writing during the first pass.
constexpr int64_t kGroupScratchElements = 65536;
// The backward's first pass, which streams x and dy from memory while computing the SiLU derivative, prefetches them
// this many elements ahead (the hardware prefetcher alone leaves it stalling on dy).
constexpr int64_t kPrefetchElements = 256;

// NCHW: one task per group: its sums, its coefficients, then its dx while x and dy are still in cache (read from
// memory once).
template <typename T, bool kSilu>
void backward_nchw(const BackwardArgs& args) {
  const Problem& p = args.p;
  const T* x = static_cast<const T*>(args.x);
  const T* dy = static_cast<const T*>(args.dy);
  T* dx = static_cast<T*>(args.dx);
  const int64_t Cg = p.C / p.G;
  constexpr bool kDzInDx = std::is_same_v<T, float>;
  const bool in_scratch = !kDzInDx && Cg * p.HW <= kGroupScratchElements;
  at::parallel_for(0, p.N * p.G, grain(Cg * p.HW), [&](int64_t begin, int64_t end) {
    std::vector<float> sp(Cg), sq(Cg), sh(Cg);
    Coefs k(Cg);  // the group's K, A, B per row, for both passes
    std::vector<float> E(Cg), F(Cg), G(Cg);
    std::vector<float> scratch(in_scratch ? Cg * p.HW : 0);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / p.G, first = n * p.C + (ng % p.G) * Cg;  // n * C + c of the group's first channel
      // Where row i's dz is kept (nullptr: recomputed).
      const auto dz_row = [&](int64_t i) -> float* {
        if constexpr (kDzInDx) {
          return dx + (first + i) * p.HW;
        } else {
          return in_scratch ? scratch.data() + i * p.HW : nullptr;
        }
      };
      k.set_group(args.params, first, first - n * p.C, Cg, args.mean[ng], args.rstd[ng], 0);
      for (int64_t i = 0; i < Cg; ++i) {
        const int64_t nc = first + i;
        const Vec kc(k.K[i]), a(k.A[i]), b(k.B[i]);
        const T* xr = x + nc * p.HW;
        const T* gr = dy + nc * p.HW;
        T* dxr = dx + nc * p.HW;
        float* dzr = dz_row(i);
        Vec vp(0.f), vq(0.f), vh(0.f);
        for_each_vec_block<4>(p.HW, [&](int64_t j, auto nv, int64_t m) {
          constexpr int NV = decltype(nv)::value;
          Vec xv[NV], g[NV];
          for (int v = 0; v < NV; ++v) {
            __builtin_prefetch(xr + j + v * kW + kPrefetchElements);
            __builtin_prefetch(gr + j + v * kW + kPrefetchElements);
            if constexpr (!kDzInDx) __builtin_prefetch(dxr + j + v * kW, 1);
            xv[v] = load(xr + j + v * kW, m);
            g[v] = load(gr + j + v * kW, m);
          }
          accumulate_grad_sums<kSilu>(xv, g, kc, a, b, m, vp, vq, vh);
          if (dzr) for (int v = 0; v < NV; ++v) store(dzr + j + v * kW, g[v], m);
        });
        hsum3(vp, vq, vh, sp[i], sq[i], sh[i]);
      }
      group_grad_coefficients(args, ng, sp.data(), sq.data(), sh.data(), E.data(), F.data(), G.data());
      for (int64_t i = 0; i < Cg; ++i) {
        const int64_t nc = first + i;
        const Vec kc(k.K[i]), a(k.A[i]), b(k.B[i]), e(E[i]), f(F[i]), g(G[i]);
        const T* xr = x + nc * p.HW;
        const T* gr = dy + nc * p.HW;
        const float* dzr = dz_row(i);
        T* dxr = dx + nc * p.HW;
        for_each_vec_block<4>(p.HW, [&](int64_t j, auto nv, int64_t m) {
          constexpr int NV = decltype(nv)::value;
          Vec hc[NV], dz[NV];
          for (int v = 0; v < NV; ++v) hc[v] = load(xr + j + v * kW, m) - kc;
          if (dzr) {
            for (int v = 0; v < NV; ++v) dz[v] = load(dzr + j + v * kW, m);
          } else {
            Vec z[NV];
            for (int v = 0; v < NV; ++v) {
              z[v] = at::vec::fmadd(hc[v], a, b);
              dz[v] = load(gr + j + v * kW, m);
            }
            grad_pre_activation<kSilu>(z, dz);
          }
          for (int v = 0; v < NV; ++v) store(dxr + j + v * kW, at::vec::fmadd(dz[v], e, at::vec::fmadd(hc[v], f, g)), m);
        });
      }
    }
  });
}

// The last phase of the channels_last backward walks a chunk this many rows at a time, and within them by blocks of
// channels whose coefficients stay in registers: they are loaded once per row group, and memory is still visited as
// kRowGroup sequential streams (a row at a time reloads the coefficients, four to six per vector at 16x16 x 256).
constexpr int64_t kRowGroup = 4;

// channels_last: sums per chunk of rows, the groups' coefficients, then dx per chunk. float32 keeps dz in dx between
// the first and last phase (as NCHW does) instead of recomputing the SiLU derivative.
template <typename T, bool kSilu>
void backward_nhwc(const BackwardArgs& args) {
  const Problem& p = args.p;
  const T* x = static_cast<const T*>(args.x);
  const T* dy = static_cast<const T*>(args.dy);
  T* dx = static_cast<T*>(args.dx);
  constexpr bool kDzInDx = std::is_same_v<T, float>;
  const int64_t Cg = p.C / p.G;
  const Chunking ch = make_chunking(p);
  const Coefs k = backward_coefs(args);
  const int64_t partials = p.N * ch.chunks * p.C;
  std::vector<float> P(partials), Q(partials), H(partials);
  std::vector<float> E(p.N * p.C), F(p.N * p.C), G(p.N * p.C);
  struct Scratch {
    std::vector<float> sp, sq, sh;  // Cg floats each
  };
  run_phases_nhwc<Scratch>(
      p, ch, [&] { return Scratch{std::vector<float>(Cg), std::vector<float>(Cg), std::vector<float>(Cg)}; },
      [&](int64_t t, Scratch&) {
        const int64_t n = t / ch.chunks, rows = ch.count(t % ch.chunks, p.HW), off = ch.offset(t, p);
        float* Pt = &P[t * p.C];
        float* Qt = &Q[t * p.C];
        float* Ht = &H[t * p.C];
        const float* Kn = &k.K[n * p.C];
        const float* An = &k.A[n * p.C];
        const float* Bn = &k.B[n * p.C];
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t e = off + r * p.C;
          for_each_vec_block<2>(p.C, [&](int64_t c0, auto nv, int64_t m) {
            constexpr int NV = decltype(nv)::value;
            Vec hc[NV], z[NV], g[NV];
            for (int v = 0; v < NV; ++v) {
              const int64_t c = c0 + v * kW;
              hc[v] = keep(load(x + e + c, m) - load(Kn + c, m), m);
              z[v] = at::vec::fmadd(hc[v], load(An + c, m), load(Bn + c, m));
              g[v] = load(dy + e + c, m);
            }
            grad_pre_activation<kSilu>(z, g);  // g: dy -> dz (zero in padding lanes, where dy = 0)
            for (int v = 0; v < NV; ++v) {
              const int64_t c = c0 + v * kW;
              if constexpr (kDzInDx) store(dx + e + c, g[v], m);
              store(Pt + c, load(Pt + c, m) + g[v], m);
              store(Qt + c, at::vec::fmadd(g[v], hc[v], load(Qt + c, m)), m);
              store(Ht + c, load(Ht + c, m) + hc[v], m);
            }
          });
        }
      },
      [&](int64_t ng, Scratch& s) {
        const int64_t n = ng / p.G, c0 = (ng % p.G) * Cg;
        for_each_vec(Cg, [&](int64_t i, int64_t m) {
          Vec vp(0.f), vq(0.f), vh(0.f);
          for (int64_t t = 0; t < ch.chunks; ++t) {
            const int64_t idx = (n * ch.chunks + t) * p.C + c0 + i;
            vp += load(&P[idx], m);
            vq += load(&Q[idx], m);
            vh += load(&H[idx], m);
          }
          store(&s.sp[i], vp, m);
          store(&s.sq[i], vq, m);
          store(&s.sh[i], vh, m);
        });
        const int64_t first = n * p.C + c0;
        group_grad_coefficients(args, ng, s.sp.data(), s.sq.data(), s.sh.data(), &E[first], &F[first], &G[first]);
      },
      [&](int64_t t, Scratch&) {
        const int64_t nc0 = (t / ch.chunks) * p.C, rows = ch.count(t % ch.chunks, p.HW), off = ch.offset(t, p);
        for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
          const int64_t nr = std::min(kRowGroup, rows - r0);
          for_each_vec_block<2>(p.C, [&](int64_t c0, auto nv, int64_t m) {
            constexpr int NV = decltype(nv)::value;
            Vec kc[NV], a[NV], b[NV], e[NV], f[NV], g[NV];
            for (int v = 0; v < NV; ++v) {
              const int64_t i = nc0 + c0 + v * kW;
              kc[v] = load(&k.K[i], m);
              e[v] = load(&E[i], m);
              f[v] = load(&F[i], m);
              g[v] = load(&G[i], m);
              if constexpr (!kDzInDx) {
                a[v] = load(&k.A[i], m);
                b[v] = load(&k.B[i], m);
              }
            }
            for (int64_t r = r0; r < r0 + nr; ++r) {
              const int64_t j = off + r * p.C + c0;
              Vec hc[NV], dz[NV];
              for (int v = 0; v < NV; ++v) hc[v] = load(x + j + v * kW, m) - kc[v];
              if constexpr (kDzInDx) {
                for (int v = 0; v < NV; ++v) dz[v] = load(dx + j + v * kW, m);
              } else {
                Vec z[NV];
                for (int v = 0; v < NV; ++v) {
                  z[v] = at::vec::fmadd(hc[v], a[v], b[v]);
                  dz[v] = load(dy + j + v * kW, m);
                }
                grad_pre_activation<kSilu>(z, dz);
              }
              for (int v = 0; v < NV; ++v) store(dx + j + v * kW, at::vec::fmadd(dz[v], e[v], at::vec::fmadd(hc[v], f[v], g[v])), m);
            }
          });
        }
      });
}

//----------------------------------------------------------------------------
// Entry points of this capability: dtype / activation dispatch.

template <template <typename, bool> class Kernel, typename Args>
inline void dispatch(const Args& args) {
  const bool silu = args.p.silu;
  switch (args.p.dtype) {
    case ScalarType::kFloat: silu ? Kernel<float, true>::run(args) : Kernel<float, false>::run(args); break;
    case ScalarType::kBFloat16: silu ? Kernel<c10::BFloat16, true>::run(args) : Kernel<c10::BFloat16, false>::run(args); break;
    case ScalarType::kHalf: silu ? Kernel<c10::Half, true>::run(args) : Kernel<c10::Half, false>::run(args); break;
  }
}

template <typename T, bool kSilu>
struct ForwardKernel {
  static void run(const ForwardArgs& a) { a.p.channels_last ? forward_nhwc<T, kSilu>(a) : forward_nchw<T, kSilu>(a); }
};
template <typename T, bool kSilu>
struct BackwardKernel {
  static void run(const BackwardArgs& a) { a.p.channels_last ? backward_nhwc<T, kSilu>(a) : backward_nchw<T, kSilu>(a); }
};

void forward(const ForwardArgs& args) { dispatch<ForwardKernel>(args); }
void backward(const BackwardArgs& args) { dispatch<BackwardKernel>(args); }

}  // namespace CPU_CAPABILITY
}  // namespace d2o_fast::cpu

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
