// C++ CPU kernels of the two memory-bound ops: combine_eps and lift_partial.
//
// Both make one pass over their inputs. Work is split into items of (row b, block of up to
// kBlock contiguous elements) and distributed with OpenMP; every item owns its slice of the
// output, so there are no races and no atomics. fp16/bf16 are read directly and converted to
// fp32 one block at a time into small per-thread buffers (AVX-512/F16C when available), all
// arithmetic runs in the accumulation type (fp32, fp64 for fp64 inputs) in loops the compiler
// vectorizes, and reductions use `omp simd reduction`.
//
// OpenMP pragmas cannot sit inside the AT_DISPATCH lambda, so each kernel is a template called
// from inside the dispatch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace compkern {
namespace {

constexpr int64_t kCombineBlock = 2048;  // elements per work item of combine_eps
constexpr int64_t kLiftBlock = 1024;     // pixels per work item of lift_partial

// ---- conversion of one block to / from the accumulation type -------------------------------

inline void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

inline void float_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // Round to nearest even, NaN -> quiet NaN (as c10::BFloat16 does).
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), qnan = _mm512_set1_epi32(0x7FC0);
  for (; i + 16 <= n; i += 16) {
    __m512 x = _mm512_loadu_ps(src + i);
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(r));
  }
#endif
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

// Pointer to n values of src in the accumulation type A: src itself when T == A, else `buf`
// filled with the converted values.
template <typename T, typename A>
inline const A* load_acc(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    half_to_float(src, buf, n);
    return buf;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_to_float(src, buf, n);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

template <typename T, typename A>
inline void store_acc(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    float_to_half(src, dst, n);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    float_to_bf16(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// ---- combine_eps ----------------------------------------------------------------------------

// out[b, :] = p0 + sum_k w[b, k] * (p[k+1, b, :] - p0),  p0 = p[0, b, :].
template <typename T>
void combine_kernel(const T* preds, const at::opmath_type<T>* w, T* out, int64_t K, int64_t B, int64_t N) {
  using A = at::opmath_type<T>;
  const int64_t nblk = (N + kCombineBlock - 1) / kCombineBlock;
  const int64_t items = B * nblk;
#pragma omp parallel
  {
    std::vector<A> buf(3 * kCombineBlock);
    A* __restrict__ b0 = buf.data();
    A* __restrict__ bk = b0 + kCombineBlock;
    A* __restrict__ acc = bk + kCombineBlock;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / nblk, j0 = (it % nblk) * kCombineBlock;
      const int64_t n = std::min(kCombineBlock, N - j0);
      const A* __restrict__ p0 = load_acc<T, A>(preds + b * N + j0, b0, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) acc[i] = A(0);
      for (int64_t k = 0; k < K; ++k) {
        const A* __restrict__ pk = load_acc<T, A>(preds + ((k + 1) * B + b) * N + j0, bk, n);
        const A wk = w[b * K + k];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) acc[i] += wk * (pk[i] - p0[i]);
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) acc[i] = p0[i] + acc[i];
      store_acc<T, A>(acc, out + b * N + j0, n);
    }
  }
}

// ---- lift_partial ---------------------------------------------------------------------------

// noise (T, B, C, P), preds (T, K+1, B, C, P), w (T, B). For each work item (b, block of pixels)
// the trials t and channels c are walked in order; noise and preds[:, 0] are read once for all K
// conditions. Per trial the channel-summed difference pix_t[k] is formed; its block sum goes to
// dpart (T, K, B, nblk) and, with a pixel map, w[t, b] * pix_t[k] is added to pixel (K, B, P).
template <typename T>
void lift_kernel(const T* noise, const T* preds, const at::opmath_type<T>* w, double* dpart,
                 at::opmath_type<T>* pixel, int64_t T_, int64_t K, int64_t B, int64_t C, int64_t P) {
  using A = at::opmath_type<T>;
  const int64_t nblk = (P + kLiftBlock - 1) / kLiftBlock;
  const int64_t items = B * nblk;
#pragma omp parallel
  {
    std::vector<A> buf((4 + K) * kLiftBlock);
    A* __restrict__ bn = buf.data();
    A* __restrict__ b0 = bn + kLiftBlock;
    A* __restrict__ bk = b0 + kLiftBlock;
    A* __restrict__ e0 = bk + kLiftBlock;
    A* __restrict__ pix_t = e0 + kLiftBlock;  // (K, kLiftBlock)
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / nblk, blk = it % nblk, j0 = blk * kLiftBlock;
      const int64_t n = std::min(kLiftBlock, P - j0);
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t c = 0; c < C; ++c) {
          const A* __restrict__ nz = load_acc<T, A>(noise + ((t * B + b) * C + c) * P + j0, bn, n);
          const A* __restrict__ p0 = load_acc<T, A>(preds + ((t * (K + 1) * B + b) * C + c) * P + j0, b0, n);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const A r = nz[i] - p0[i];
            e0[i] = r * r;
          }
          for (int64_t k = 0; k < K; ++k) {
            const A* __restrict__ pk =
                load_acc<T, A>(preds + (((t * (K + 1) + k + 1) * B + b) * C + c) * P + j0, bk, n);
            A* __restrict__ acc = pix_t + k * kLiftBlock;
            if (c == 0) {
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) {
                const A r = nz[i] - pk[i];
                acc[i] = e0[i] - r * r;
              }
            } else {
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) {
                const A r = nz[i] - pk[i];
                acc[i] += e0[i] - r * r;
              }
            }
          }
        }
        const A wt = w[t * B + b];
        for (int64_t k = 0; k < K; ++k) {
          const A* __restrict__ acc = pix_t + k * kLiftBlock;
          A s = A(0);
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < n; ++i) s += acc[i];
          dpart[((t * K + k) * B + b) * nblk + blk] = static_cast<double>(s);
          if (pixel != nullptr) {
            A* __restrict__ px = pixel + (k * B + b) * P + j0;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) px[i] += wt * acc[i];
          }
        }
      }
    }
  }
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu_float(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, name,
              " must be float32, float16, bfloat16 or float64, got ", t);
}

}  // namespace

at::Tensor combine_eps_cpu(const at::Tensor& preds_in, const at::Tensor& weights_in) {
  check_cpu_float(preds_in, "preds");
  check_cpu_float(weights_in, "weights");
  TORCH_CHECK(preds_in.dim() >= 2, "preds must be (K+1, B, *S), got ", preds_in.sizes());
  const int64_t K = preds_in.size(0) - 1, B = preds_in.size(1);
  TORCH_CHECK(K >= 1, "preds must stack at least one condition: (K+1, B, *S) with K >= 1");
  TORCH_CHECK((weights_in.dim() == 1 && weights_in.size(0) == K) ||
                  (weights_in.dim() == 2 && weights_in.size(0) == B && weights_in.size(1) == K),
              "weights must be (K,) or (B, K) with K = ", K, ", B = ", B, ", got ", weights_in.sizes());
  const at::Tensor preds = preds_in.contiguous();
  const at::Tensor weights = weights_in.to(acc_type(preds.scalar_type())).expand({B, K}).contiguous();
  at::Tensor out = at::empty(preds.sizes().slice(1), preds.options());
  const int64_t N = B == 0 ? 0 : out.numel() / B;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds.scalar_type(), "combine_eps_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    combine_kernel<scalar_t>(preds.data_ptr<scalar_t>(), weights.data_ptr<A>(), out.data_ptr<scalar_t>(), K, B, N);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> lift_partial_cpu(
    const at::Tensor& noise_in, const at::Tensor& preds_in, const at::Tensor& weights_in, bool pixel_map) {
  check_cpu_float(noise_in, "noise");
  check_cpu_float(preds_in, "preds");
  check_cpu_float(weights_in, "weights");
  TORCH_CHECK(noise_in.scalar_type() == preds_in.scalar_type(), "noise and preds must share a dtype, got ",
              noise_in.scalar_type(), " and ", preds_in.scalar_type());
  TORCH_CHECK(noise_in.dim() >= 2 && preds_in.dim() == noise_in.dim() + 1,
              "noise must be (T, B, *S) and preds (T, K+1, B, *S), got ", noise_in.sizes(), " and ", preds_in.sizes());
  const int64_t T_ = noise_in.size(0), B = noise_in.size(1), K = preds_in.size(1) - 1;
  TORCH_CHECK(K >= 1 && preds_in.size(0) == T_ && preds_in.size(2) == B &&
                  preds_in.sizes().slice(3) == noise_in.sizes().slice(2),
              "preds must be (T, K+1, B, *S) with K >= 1 for noise ", noise_in.sizes(), ", got ", preds_in.sizes());
  TORCH_CHECK(weights_in.dim() == 2 && weights_in.size(0) == T_ && weights_in.size(1) == B,
              "weights must be (T, B) = (", T_, ", ", B, "), got ", weights_in.sizes());
  TORCH_CHECK(!pixel_map || noise_in.dim() == 5, "pixel_map needs S = (C, H, W), got noise ", noise_in.sizes());

  const at::Tensor noise = noise_in.contiguous();
  const at::Tensor preds = preds_in.contiguous();
  const auto acc = acc_type(preds.scalar_type());
  const at::Tensor weights = weights_in.to(acc).contiguous();
  const int64_t S = B == 0 ? 0 : (T_ == 0 ? 0 : noise.numel() / (T_ * B));
  // With a pixel map the channel axis is summed separately; without one, S is one flat row.
  const int64_t C = pixel_map ? noise.size(2) : 1;
  const int64_t P = pixel_map ? noise.size(3) * noise.size(4) : S;
  const int64_t nblk = std::max<int64_t>(1, (P + kLiftBlock - 1) / kLiftBlock);

  at::Tensor sum_wd = at::zeros({K, B}, preds.options().dtype(acc));
  at::Tensor sum_wd2 = at::zeros({K, B}, preds.options().dtype(acc));
  c10::optional<at::Tensor> pixel;
  if (pixel_map) pixel = at::zeros({K, B, noise.size(3), noise.size(4)}, preds.options().dtype(acc));
  if (T_ == 0 || B == 0 || K == 0) return {sum_wd, sum_wd2, pixel};

  // Partial sums of d per (t, k, b, pixel block); reduced below in fp64 (small: T*K*B*nblk).
  std::vector<double> dpart(static_cast<size_t>(T_ * K * B * nblk), 0.0);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds.scalar_type(), "lift_partial_cpu", [&] {
      using A = at::opmath_type<scalar_t>;
      lift_kernel<scalar_t>(noise.data_ptr<scalar_t>(), preds.data_ptr<scalar_t>(), weights.data_ptr<A>(),
                            dpart.data(), pixel_map ? pixel->data_ptr<A>() : nullptr, T_, K, B, C, P);
    });
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "lift_partial_cpu_reduce", [&] {
    const scalar_t* w = weights.data_ptr<scalar_t>();
    scalar_t* swd = sum_wd.data_ptr<scalar_t>();
    scalar_t* swd2 = sum_wd2.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t b = 0; b < B; ++b) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t t = 0; t < T_; ++t) {
          const double* part = dpart.data() + ((t * K + k) * B + b) * nblk;
          double d = 0.0;
          for (int64_t j = 0; j < nblk; ++j) d += part[j];
          const double wt = static_cast<double>(w[t * B + b]);
          s1 += wt * d;
          s2 += wt * d * d;
        }
        swd[k * B + b] = static_cast<scalar_t>(s1);
        swd2[k * B + b] = static_cast<scalar_t>(s2);
      }
    }
  });
  return {sum_wd, sum_wd2, pixel};
}

}  // namespace compkern
