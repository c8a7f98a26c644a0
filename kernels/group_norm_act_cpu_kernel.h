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
// Elements per work item of the channels_last kernels: a chunk of rows stays in L2.
constexpr int64_t kChunkElements = 16384;
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

// f(offset, count) over [0, n) in vector steps; the tail gets count < kW.
template <typename F>
inline void for_each_vec(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) f(i, kW);
  if (i < n) f(i, n - i);
}

// sigmoid(z) = 1 / (1 + exp(-z)).
// AVX512: exp(-z) = 2^t with t = -z log2(e) clamped above at 100 (so 1 + 2^t stays finite; below 1e-30 the sigmoid
// is 2^-100 either way), t = n + f with |f| <= 1/2, 2^f from a degree-5 polynomial fitted on that interval (relative
// error 2e-7 in float32 arithmetic) scaled by 2^n with scalef, and 1 / (1 + 2^t) from the reciprocal estimate and
// one Newton step: 14 instructions, about half of at::vec's exp_u20 followed by a division. NaN propagates (the
// min keeps its second operand when unordered). The other builds use exp_u20 and a division.
inline Vec sigmoid(const Vec& z) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 t = _mm512_min_ps(_mm512_set1_ps(100.f), _mm512_mul_ps(z, _mm512_set1_ps(-1.44269504088896341f)));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.0013266970636323094f), f, _mm512_set1_ps(0.009675459936261177f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.05550742521882057f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.24022121727466583f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.6931469440460205f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0000001192092896f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(q, n), _mm512_set1_ps(1.f));
  const __m512 r = _mm512_rcp14_ps(d);
  return Vec(_mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r));  // r + r (1 - d r)
#else
  const Vec one(1.f);
  return one / (one + z.neg().exp_u20());
#endif
}

template <bool kSilu>
inline Vec activate(const Vec& z) {
  if constexpr (kSilu) return z * sigmoid(z); else return z;
}

// dL/dz from dL/dy and the recomputed pre-activation z.
template <bool kSilu>
inline Vec grad_pre_activation(const Vec& z, const Vec& dy) {
  if constexpr (kSilu) {
    const Vec one(1.f);
    const Vec s = sigmoid(z);
    return dy * s * at::vec::fmadd(z, one - s, one);
  } else {
    return dy;
  }
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

// f(n, e) for every row of chunk t: n its sample, e the element offset of the row's first channel.
template <typename F>
inline void for_each_chunk_row(const Problem& p, const Chunking& ch, int64_t t, F&& f) {
  const int64_t n = t / ch.chunks, first = ch.offset(t, p);
  for (int64_t r = 0; r < ch.count(t % ch.chunks, p.HW); ++r) f(n, first + r * p.C);
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

inline float param_or(const float* t, int64_t i, float otherwise) { return t ? t[i] : otherwise; }

// Per-(n, c) coefficients of z = (x - K) * A + B, from the group's mean and rstd.
struct Coef {
  float K, A, B;
};

inline Coef pre_activation_coef(const Params& pr, int64_t nc, int64_t c, float mean, float rstd) {
  const float s1 = 1.f + param_or(pr.scale, nc, 0.f);
  return {mean - param_or(pr.add, nc, 0.f), rstd * pr.weight[c] * s1, pr.bias[c] * s1 + param_or(pr.shift, nc, 0.f)};
}

// Coef of every (n, c) (channels_last, whose rows cross all channels).
struct Coefs {
  std::vector<float> K, A, B;
  explicit Coefs(int64_t size) : K(size), A(size), B(size) {}
  void set(int64_t nc, const Coef& q) {
    K[nc] = q.K;
    A[nc] = q.A;
    B[nc] = q.B;
  }
};

//----------------------------------------------------------------------------
// Forward.

// Sums of vectors over a long run in float32 lanes, flushed to a double total every kFlushElements elements (and at
// the end), so lane round-off stays that of a short sum while short rows still cost no horizontal sum each.
class RunningSum {
 public:
  void add(const Vec& v) { acc_ += v; }
  // After each row of `count` elements.
  void end_row(int64_t count) {
    pending_ += count;
    if (pending_ >= kFlushElements) flush();
  }
  double total() {
    flush();
    return total_;
  }

 private:
  static constexpr int64_t kFlushElements = 4096;
  void flush() {
    total_ += static_cast<double>(hsum(acc_));
    acc_ = Vec(0.f);
    pending_ = 0;
  }
  Vec acc_{0.f};
  int64_t pending_ = 0;
  double total_ = 0.0;
};

// Phase 1 + 2, NCHW: mean and rstd of one group of x + add, whose Cg rows of HW elements are one contiguous span,
// corrected two-pass (the span is L1/L2 resident for the second pass, which also sums the residuals d = h - mean
// to remove the rounding error of the first-pass mean; matters when |mean| >> std). No per-row reductions, so
// short rows (8x8) cost what long ones do.
template <typename T>
inline void group_moments_nchw(const T* xg, const float* add, int64_t Cg, int64_t HW, float eps, float& mean,
                               float& rstd) {
  const double count = static_cast<double>(Cg * HW);
  RunningSum sum;
  for (int64_t i = 0; i < Cg; ++i) {
    for_each_vec(HW, [&](int64_t j, int64_t m) { sum.add(load(xg + i * HW + j, m)); });
    sum.end_row(HW);
  }
  double add_sum = 0.0;
  if (add) for (int64_t i = 0; i < Cg; ++i) add_sum += add[i];
  const float mean0 = static_cast<float>((sum.total() + static_cast<double>(HW) * add_sum) / count);
  RunningSum residual, square;
  for (int64_t i = 0; i < Cg; ++i) {
    const Vec k(mean0 - (add ? add[i] : 0.f));  // h - mean0 = x - k
    for_each_vec(HW, [&](int64_t j, int64_t m) {
      const Vec d = keep(load(xg + i * HW + j, m) - k, m);
      residual.add(d);
      square.add(d * d);
    });
    residual.end_row(HW);
    square.end_row(HW);
  }
  const double r = residual.total();
  const double var = std::max(square.total() - r * r / count, 0.0) / count;
  mean = static_cast<float>(static_cast<double>(mean0) + r / count);
  rstd = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
}

// Phase 1, NHWC: per-channel mean and M2 over `rows` rows of C channels, corrected two-pass
// (the chunk is L2 resident). `residual` is scratch of C floats.
template <typename T>
inline void chunk_moments(const T* x, int64_t rows, int64_t C, float* mean, float* m2, float* residual) {
  std::fill(mean, mean + C, 0.f);
  std::fill(m2, m2 + C, 0.f);
  std::fill(residual, residual + C, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * C;
    for_each_vec(C, [&](int64_t c, int64_t m) { store(mean + c, load(mean + c, m) + load(row + c, m), m); });
  }
  const Vec inv(1.f / static_cast<float>(rows));
  for_each_vec(C, [&](int64_t c, int64_t m) { store(mean + c, load(mean + c, m) * inv, m); });
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * C;
    for_each_vec(C, [&](int64_t c, int64_t m) {
      const Vec d = load(row + c, m) - load(mean + c, m);
      store(residual + c, load(residual + c, m) + d, m);
      store(m2 + c, at::vec::fmadd(d, d, load(m2 + c, m)), m);
    });
  }
  for_each_vec(C, [&](int64_t c, int64_t m) {
    const Vec res = load(residual + c, m);
    store(mean + c, load(mean + c, m) + res * inv, m);
    store(m2 + c, at::vec::maximum(load(m2 + c, m) - res * res * inv, Vec(0.f)), m);
  });
}

// Phase 2 for one group ng: Chan-combine its chunk moments -> mean, rstd, and K, A, B per (n, c).
// channel_mean / channel_m2 are scratch of Cg doubles.
inline void combine_group(const ForwardArgs& args, const Chunking& ch, int64_t ng, const float* cmean, const float* cm2,
                          Coefs& k, double* channel_mean, double* channel_m2) {
  const Problem& p = args.p;
  const int64_t Cg = p.C / p.G;
  const int64_t n = ng / p.G, g = ng % p.G;
  for (int64_t i = 0; i < Cg; ++i) {
    const int64_t c = g * Cg + i;
    // Chunks of one channel: counts differ only for the last chunk.
    double sum = 0.0;
    for (int64_t t = 0; t < ch.chunks; ++t) {
      sum += static_cast<double>(ch.count(t, p.HW)) * cmean[(n * ch.chunks + t) * p.C + c];
    }
    const double mu = sum / static_cast<double>(p.HW);
    double m2 = 0.0;
    for (int64_t t = 0; t < ch.chunks; ++t) {
      const int64_t idx = (n * ch.chunks + t) * p.C + c;
      const double d = cmean[idx] - mu;
      m2 += cm2[idx] + static_cast<double>(ch.count(t, p.HW)) * d * d;
    }
    channel_mean[i] = mu + param_or(args.params.add, n * p.C + c, 0.f);
    channel_m2[i] = m2;
  }
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
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) k.set(n * p.C + c, pre_activation_coef(args.params, n * p.C + c, c, mean, rstd));
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
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / p.G, first = n * p.C + (ng % p.G) * Cg;  // n * C + c of the group's first channel
      group_moments_nchw(x + first * p.HW, args.params.add ? args.params.add + first : nullptr, Cg, p.HW, args.eps,
                         args.mean[ng], args.rstd[ng]);
      for (int64_t nc = first; nc < first + Cg; ++nc) {
        const Coef q = pre_activation_coef(args.params, nc, nc - n * p.C, args.mean[ng], args.rstd[ng]);
        const Vec kc(q.K), a(q.A), b(q.B);
        const T* xr = x + nc * p.HW;
        T* yr = y + nc * p.HW;
        for_each_vec(p.HW, [&](int64_t i, int64_t m) {
          __builtin_prefetch(xr + i + Cg * p.HW);  // the next group's x (read by its first pass), while this one computes
          store(yr + i, activate<kSilu>(at::vec::fmadd(load(xr + i, m) - kc, a, b)), m);
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
    std::vector<float> residual;                 // C floats (chunk moments)
    std::vector<double> channel_mean, channel_m2;  // Cg doubles each (group combine)
  };
  run_phases_nhwc<Scratch>(
      p, ch, [&] { return Scratch{std::vector<float>(p.C), std::vector<double>(Cg), std::vector<double>(Cg)}; },
      [&](int64_t t, Scratch& s) {
        chunk_moments(x + ch.offset(t, p), ch.count(t % ch.chunks, p.HW), p.C, &cmean[t * p.C], &cm2[t * p.C],
                      s.residual.data());
      },
      [&](int64_t ng, Scratch& s) {
        combine_group(args, ch, ng, cmean.data(), cm2.data(), k, s.channel_mean.data(), s.channel_m2.data());
      },
      [&](int64_t t, Scratch&) {
        const int64_t n = t / ch.chunks;
        const float* Kn = &k.K[n * p.C];
        const float* An = &k.A[n * p.C];
        const float* Bn = &k.B[n * p.C];
        for_each_chunk_row(p, ch, t, [&](int64_t, int64_t e) {
          const T* xr = x + e;
          T* yr = y + e;
          for_each_vec(p.C, [&](int64_t c, int64_t m) {
            const Vec hc = load(xr + c, m) - load(Kn + c, m);
            store(yr + c, activate<kSilu>(at::vec::fmadd(hc, load(An + c, m), load(Bn + c, m))), m);
          });
        });
      });
}

//----------------------------------------------------------------------------
// Backward.

// The forward's coefficients, from its saved statistics.
inline Coefs backward_coefs(const BackwardArgs& args) {
  const Problem& p = args.p;
  const int64_t Cg = p.C / p.G;
  Coefs k(p.N * p.C);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t c = 0; c < p.C; ++c) {
      const int64_t ng = n * p.G + c / Cg;
      k.set(n * p.C + c, pre_activation_coef(args.params, n * p.C + c, c, args.mean[ng], args.rstd[ng]));
    }
  }
  return k;
}

// Phase 1 accumulation of one vector: P += dz, Q += dz * hc, H += hc.
template <bool kSilu>
inline Vec accumulate_grad_sums(const Vec& x, const Vec& dy, const Vec& kc, const Vec& a, const Vec& b, int64_t m,
                                Vec& P, Vec& Q, Vec& H) {
  const Vec hc = keep(x - kc, m);
  const Vec dz = grad_pre_activation<kSilu>(at::vec::fmadd(hc, a, b), dy);  // zero in padding lanes (dy = 0 there)
  P += dz;
  Q = at::vec::fmadd(dz, hc, Q);
  H += hc;
  return dz;
}

// Phase 2 for one group ng, from its channels' totals sp = sum dz, sq = sum dz * hc, sh = sum hc (sh only read when
// there is an add): the dx coefficients E, F, G of its Cg channels (written to E[0, Cg) ...) and its [N, C]
// parameter gradients.
inline void group_grad_coefficients(const BackwardArgs& args, int64_t ng, const double* sp, const double* sq,
                                    const double* sh, float* E, float* F, float* G) {
  const Problem& p = args.p;
  const Params& pr = args.params;
  const int64_t Cg = p.C / p.G;
  const double M = static_cast<double>(Cg * p.HW);
  const int64_t n = ng / p.G, first = n * p.C + (ng % p.G) * Cg;  // n * C + c of the group's first channel
  const double r = args.rstd[ng];
  double m1 = 0.0, m2 = 0.0;  // means over the group of dxhat and dxhat * xhat
  for (int64_t i = 0; i < Cg; ++i) {
    const int64_t nc = first + i, c = nc - n * p.C;
    const double gamma = static_cast<double>(pr.weight[c]) * (1.0 + param_or(pr.scale, nc, 0.f));
    m1 += gamma * sp[i];
    m2 += gamma * r * sq[i];
  }
  m1 /= M;
  m2 /= M;
  const double f = -r * r * m2;
  for (int64_t i = 0; i < Cg; ++i) {
    const int64_t nc = first + i, c = nc - n * p.C;
    const double s1 = 1.0 + param_or(pr.scale, nc, 0.f);
    const double e = r * pr.weight[c] * s1;
    E[i] = static_cast<float>(e);
    F[i] = static_cast<float>(f);
    G[i] = static_cast<float>(-r * m1);
    const double sum_dz_xhat = r * sq[i];
    if (args.dadd) args.dadd[nc] = static_cast<float>(e * sp[i] + f * sh[i] - r * m1 * static_cast<double>(p.HW));
    if (args.dscale) args.dscale[nc] = static_cast<float>(pr.weight[c] * sum_dz_xhat + pr.bias[c] * sp[i]);
    if (args.dshift) args.dshift[nc] = static_cast<float>(sp[i]);
    args.dweight_per_sample[nc] = static_cast<float>(s1 * sum_dz_xhat);
    args.dbias_per_sample[nc] = static_cast<float>(s1 * sp[i]);
  }
}

// NCHW backward keeps a group's dz between its two passes instead of recomputing the SiLU derivative: float32 keeps
// it in dx itself (so the first pass also brings dx's lines into cache, and the second reads and overwrites them
// there); 16-bit types keep it in a per-task scratch when the group has at most this many elements (256 KiB, L2),
// and prefetch dx's lines for writing during the first pass.
constexpr int64_t kGroupScratchElements = 65536;
// The backward's first pass, which streams x and dy from memory while computing the SiLU derivative, prefetches them
// this many elements ahead (the hardware prefetcher alone leaves it stalling on dy; about 3-6% measured).
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
  const bool need_h = args.dadd != nullptr;  // sum hc only enters dadd
  at::parallel_for(0, p.N * p.G, grain(Cg * p.HW), [&](int64_t begin, int64_t end) {
    std::vector<double> sp(Cg), sq(Cg), sh(Cg);
    std::vector<Coef> coefs(Cg);  // the group's K, A, B per row, for both passes
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
      for (int64_t i = 0; i < Cg; ++i) {
        const int64_t nc = first + i;
        const Coef q = coefs[i] = pre_activation_coef(args.params, nc, nc - n * p.C, args.mean[ng], args.rstd[ng]);
        const Vec kc(q.K), a(q.A), b(q.B);
        const T* xr = x + nc * p.HW;
        const T* gr = dy + nc * p.HW;
        T* dxr = dx + nc * p.HW;
        float* dzr = dz_row(i);
        Vec vp(0.f), vq(0.f), vh(0.f);
        for_each_vec(p.HW, [&](int64_t j, int64_t m) {
          __builtin_prefetch(xr + j + kPrefetchElements);
          __builtin_prefetch(gr + j + kPrefetchElements);
          if constexpr (!kDzInDx) __builtin_prefetch(dxr + j, 1);
          const Vec dz = accumulate_grad_sums<kSilu>(load(xr + j, m), load(gr + j, m), kc, a, b, m, vp, vq, vh);
          if (dzr) store(dzr + j, dz, m);
        });
        sp[i] = hsum(vp);
        sq[i] = hsum(vq);
        sh[i] = need_h ? hsum(vh) : 0.0;
      }
      group_grad_coefficients(args, ng, sp.data(), sq.data(), sh.data(), E.data(), F.data(), G.data());
      for (int64_t i = 0; i < Cg; ++i) {
        const int64_t nc = first + i;
        const Coef& q = coefs[i];
        const Vec kc(q.K), a(q.A), b(q.B), e(E[i]), f(F[i]), g(G[i]);
        const T* xr = x + nc * p.HW;
        const T* gr = dy + nc * p.HW;
        const float* dzr = dz_row(i);
        T* dxr = dx + nc * p.HW;
        for_each_vec(p.HW, [&](int64_t j, int64_t m) {
          const Vec hc = load(xr + j, m) - kc;
          const Vec dz = dzr ? load(dzr + j, m) : grad_pre_activation<kSilu>(at::vec::fmadd(hc, a, b), load(gr + j, m));
          store(dxr + j, at::vec::fmadd(dz, e, at::vec::fmadd(hc, f, g)), m);
        });
      }
    }
  });
}

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
    std::vector<double> sp, sq, sh;  // Cg doubles each
  };
  run_phases_nhwc<Scratch>(
      p, ch, [&] { return Scratch{std::vector<double>(Cg), std::vector<double>(Cg), std::vector<double>(Cg)}; },
      [&](int64_t t, Scratch&) {
        float* Pt = &P[t * p.C];
        float* Qt = &Q[t * p.C];
        float* Ht = &H[t * p.C];
        for_each_chunk_row(p, ch, t, [&](int64_t n, int64_t e) {
          const T* xr = x + e;
          const T* gr = dy + e;
          T* dxr = dx + e;
          for_each_vec(p.C, [&](int64_t c, int64_t m) {
            const int64_t nc = n * p.C + c;
            Vec vp = load(Pt + c, m), vq = load(Qt + c, m), vh = load(Ht + c, m);
            const Vec dz = accumulate_grad_sums<kSilu>(load(xr + c, m), load(gr + c, m), load(&k.K[nc], m),
                                                       load(&k.A[nc], m), load(&k.B[nc], m), m, vp, vq, vh);
            if constexpr (kDzInDx) store(dxr + c, dz, m);
            store(Pt + c, vp, m);
            store(Qt + c, vq, m);
            store(Ht + c, vh, m);
          });
        });
      },
      [&](int64_t ng, Scratch& s) {
        const int64_t n = ng / p.G, c0 = (ng % p.G) * Cg;
        for (int64_t i = 0; i < Cg; ++i) {
          s.sp[i] = s.sq[i] = s.sh[i] = 0.0;
          for (int64_t t = 0; t < ch.chunks; ++t) {
            const int64_t idx = (n * ch.chunks + t) * p.C + c0 + i;
            s.sp[i] += P[idx];
            s.sq[i] += Q[idx];
            s.sh[i] += H[idx];
          }
        }
        const int64_t first = n * p.C + c0;
        group_grad_coefficients(args, ng, s.sp.data(), s.sq.data(), s.sh.data(), &E[first], &F[first], &G[first]);
      },
      [&](int64_t t, Scratch&) {
        for_each_chunk_row(p, ch, t, [&](int64_t n, int64_t e) {
          const T* xr = x + e;
          const T* gr = dy + e;
          T* dxr = dx + e;
          for_each_vec(p.C, [&](int64_t c, int64_t m) {
            const int64_t nc = n * p.C + c;
            const Vec hc = load(xr + c, m) - load(&k.K[nc], m);
            Vec dz;
            if constexpr (kDzInDx) {
              dz = load(dxr + c, m);
            } else {
              dz = grad_pre_activation<kSilu>(at::vec::fmadd(hc, load(&k.A[nc], m), load(&k.B[nc], m)), load(gr + c, m));
            }
            store(dxr + c, at::vec::fmadd(dz, load(&E[nc], m), at::vec::fmadd(hc, load(&F[nc], m), load(&G[nc], m))), m);
          });
        });
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
