// C++ CPU kernels of the two memory-bound ops: combine_eps and lift_partial.
//
// Both make one pass over their inputs. Work is split into items of (row b, run of contiguous
// elements) and distributed with OpenMP; every item owns its slice of the output, so there are no
// races and no atomics, and small inputs run on one thread. fp16/bf16 are read directly and
// converted to fp32 in registers; all arithmetic runs in fp32 (fp64 for fp64 inputs).
//
// Two implementations of each op:
//  * AVX-512 (built with -march=native on a machine that has it; fp32/fp16/bf16, lift K <= 8):
//    16-lane intrinsics, masked tails, software prefetch. These are the ones benchmarked.
//  * portable: blocks are converted into small per-thread fp32 buffers and combined in loops the
//    compiler vectorizes (`omp simd`); used for fp64, K > 8 and builds without AVX-512.
//
// OpenMP pragmas cannot sit inside the AT_DISPATCH lambda, so each kernel is a template called
// from inside the dispatch (combine_run / lift_run pick the implementation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
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
constexpr int64_t kLiftSub = 1024;       // lift_partial: pixels converted and combined at a time
constexpr int64_t kLiftRange = 8192;     // lift_partial: at most this many pixels per work item
constexpr int64_t kMinParallel = 1 << 16; // elements read below which one thread does it all

// Threads for `items` work items reading `elems` elements: one for small inputs (a parallel
// region costs more than it saves there, and far more on an oversubscribed machine).
inline int num_threads_for(int64_t items, int64_t elems) {
  if (elems < kMinParallel) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, omp_get_max_threads())));
}

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

// Software prefetch of the n elements after p (the next sub-block of the same stream): the lift
// kernel walks K+2 streams at once, which the hardware prefetchers alone keep ~20% short of.
template <typename T>
inline void prefetch_next(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p + n);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 0);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COMPKERN_AVX512 1
// 16 values of T as fp32 (masked: lanes outside m read nothing and are 0).
template <typename T>
inline __m512 vload16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}


// Stores 16 fp32 lanes as T (lanes outside m untouched); bf16 rounds to nearest even, NaN kept.
template <typename T>
inline void vstore16(T* p, __m512 v, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
  }
}

// Streaming (non-temporal) store of 16 fp32 lanes as T at a suitably aligned p, all lanes: the
// line is written without being read first (no read-for-ownership), for outputs beyond the cache.
template <typename T>
inline bool vstream16(T* p, __m512 v) {
  constexpr uintptr_t align = 16 * sizeof(T);
  if ((reinterpret_cast<uintptr_t>(p) & (align - 1)) != 0) return false;
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(reinterpret_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  return true;
}

// Outputs at least this large are written with streaming stores (half the L3 of the machines this
// runs on: such an output leaves the cache before anyone reads it anyway).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// combine_eps for fp32/fp16/bf16 with the accumulator in a register: per 16 elements, p0 and each
// pk are loaded once and the result is stored once (K+2 streams, nothing else touches memory).
// STREAM: full aligned 16-lane stores bypass the cache (large outputs).
template <typename T, bool STREAM>
void combine_kernel_avx512(const T* preds, const float* w, T* out, int64_t K, int64_t B, int64_t N) {
  constexpr int64_t kAhead = 2048 / sizeof(T);
  const int64_t nblk = (N + kCombineBlock - 1) / kCombineBlock;
  const int64_t items = B * nblk;
#pragma omp parallel num_threads(num_threads_for(items, (K + 1) * B * N))
  {
#pragma omp for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / nblk, j0 = (it % nblk) * kCombineBlock;
    const int64_t n = std::min(kCombineBlock, N - j0);
    const T* p0_row = preds + b * N + j0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      _mm_prefetch(reinterpret_cast<const char*>(p0_row + i + kAhead), _MM_HINT_T0);
      const __m512 p0 = vload16(p0_row + i, m);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const T* pk = preds + ((k + 1) * B + b) * N + j0 + i;
        _mm_prefetch(reinterpret_cast<const char*>(pk + kAhead), _MM_HINT_T0);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(w[b * K + k]), _mm512_sub_ps(vload16(pk, m), p0), acc);
      }
      const __m512 res = _mm512_add_ps(p0, acc);
      if (!STREAM || m != __mmask16(0xFFFF) || !vstream16(out + b * N + j0 + i, res))
        vstore16(out + b * N + j0 + i, res, m);
    }
  }
  if (STREAM) _mm_sfence();  // each thread: its streaming stores are weakly ordered
  }
}

#endif  // COMPKERN_AVX512

// ---- combine_eps ----------------------------------------------------------------------------

// out[b, :] = p0 + sum_k w[b, k] * (p[k+1, b, :] - p0),  p0 = p[0, b, :].
template <typename T>
void combine_kernel(const T* preds, const at::opmath_type<T>* w, T* out, int64_t K, int64_t B, int64_t N) {
  using A = at::opmath_type<T>;
  const int64_t nblk = (N + kCombineBlock - 1) / kCombineBlock;
  const int64_t items = B * nblk;
#pragma omp parallel num_threads(num_threads_for(items, (K + 1) * B * N))
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

// The AVX-512 kernel where it applies (fp32/fp16/bf16), else the portable one.
template <typename T>
void combine_run(const T* preds, const at::opmath_type<T>* w, T* out, int64_t K, int64_t B, int64_t N) {
#ifdef COMPKERN_AVX512
  if constexpr (std::is_same_v<at::opmath_type<T>, float>) {
    if (B * N * static_cast<int64_t>(sizeof(T)) >= kStreamBytes)
      combine_kernel_avx512<T, true>(preds, w, out, K, B, N);
    else
      combine_kernel_avx512<T, false>(preds, w, out, K, B, N);
    return;
  }
#endif
  combine_kernel<T>(preds, w, out, K, B, N);
}

// ---- lift_partial ---------------------------------------------------------------------------

// noise (T, B, C, P), preds (T, K+1, B, C, P), w (T, B). A work item is (row b, range of up to
// kLiftRange pixels); it walks trials t, channels c and sub-blocks of kLiftSub pixels in memory
// order, so every input is read as long contiguous runs (C * range elements per (t, b)) and noise
// and preds[:, 0] are read once for all K conditions. Per trial the channel-summed difference
// pix_t[k] (K, range) is formed; its sum goes to dpart (T, K, B, nrange) and, with a pixel map,
// w[t, b] * pix_t[k] is added to pixel (K, B, P), which the item owns.
template <typename T>
void lift_kernel(const T* noise, const T* preds, const at::opmath_type<T>* w, double* dpart,
                 at::opmath_type<T>* pixel, int64_t T_, int64_t K, int64_t B, int64_t C, int64_t P,
                 int64_t range) {
  using A = at::opmath_type<T>;
  const int64_t nrange = (P + range - 1) / range;
  const int64_t items = B * nrange;
#pragma omp parallel num_threads(num_threads_for(items, T_ * (K + 2) * B * C * P))
  {
    std::vector<A> buf(4 * kLiftSub + K * range);
    A* __restrict__ bn = buf.data();
    A* __restrict__ b0 = bn + kLiftSub;
    A* __restrict__ bk = b0 + kLiftSub;
    A* __restrict__ e0 = bk + kLiftSub;
    A* __restrict__ pix_t = e0 + kLiftSub;  // (K, range)
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / nrange, r = it % nrange, j0 = r * range;
      const int64_t len = std::min(range, P - j0);
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t noise_off = ((t * B + b) * C + c) * P + j0;
          for (int64_t s0 = 0; s0 < len; s0 += kLiftSub) {
            const int64_t n = std::min(kLiftSub, len - s0);
            const T* nz_src = noise + noise_off + s0;
            const T* p0_src = preds + ((t * (K + 1) * B + b) * C + c) * P + j0 + s0;
            prefetch_next(nz_src, n);
            prefetch_next(p0_src, n);
            const A* __restrict__ nz = load_acc<T, A>(nz_src, bn, n);
            const A* __restrict__ p0 = load_acc<T, A>(p0_src, b0, n);
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              const A d0 = nz[i] - p0[i];
              e0[i] = d0 * d0;
            }
            for (int64_t k = 0; k < K; ++k) {
              const T* pk_src = preds + (((t * (K + 1) + k + 1) * B + b) * C + c) * P + j0 + s0;
              prefetch_next(pk_src, n);
              const A* __restrict__ pk = load_acc<T, A>(pk_src, bk, n);
              A* __restrict__ acc = pix_t + k * range + s0;
              if (c == 0) {
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                  const A dk = nz[i] - pk[i];
                  acc[i] = e0[i] - dk * dk;
                }
              } else {
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                  const A dk = nz[i] - pk[i];
                  acc[i] += e0[i] - dk * dk;
                }
              }
            }
          }
        }
        const A wt = w[t * B + b];
        for (int64_t k = 0; k < K; ++k) {
          const A* __restrict__ acc = pix_t + k * range;
          double sum = 0.0;
          for (int64_t s0 = 0; s0 < len; s0 += kLiftSub) {  // fp32 within a sub-block, fp64 across
            const int64_t n = std::min(kLiftSub, len - s0);
            A s = A(0);
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < n; ++i) s += acc[s0 + i];
            sum += static_cast<double>(s);
          }
          dpart[((t * K + k) * B + b) * nrange + r] = sum;
          if (pixel != nullptr) {
            A* __restrict__ px = pixel + (k * B + b) * P + j0;
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) px[i] += wt * acc[i];
          }
        }
      }
    }
  }
}

#ifdef COMPKERN_AVX512
// The fp32/fp16/bf16 lift kernel (KC = K, 1..8). Same work items as lift_kernel; per (t, c) the
// K+2 rows are streamed once, 16 pixels at a time, with
// (noise - p0)^2 - (noise - pk)^2 formed as (pk - p0) * (2 noise - p0 - pk) (exact algebra, one
// product less) and added to acc (K, range), which stays in L1/L2. Software prefetch runs 2 KiB
// ahead in each row: the hardware prefetchers alone leave ~15% on the table with K+2 streams.
template <typename T, int KC>
void lift_kernel_avx512(const T* noise, const T* preds, const float* w, double* dpart, float* pixel,
                        int64_t T_, int64_t B, int64_t C, int64_t P, int64_t range) {
  constexpr int64_t K = KC;
  constexpr int64_t kAhead = 2048 / sizeof(T);
  const int64_t nrange = (P + range - 1) / range;
  const int64_t items = B * nrange;
#pragma omp parallel num_threads(num_threads_for(items, T_ * (K + 2) * B * C * P))
  {
    std::vector<float> accbuf(K * range + 16);
    float* acc = accbuf.data();
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / nrange, r = it % nrange, j0 = r * range;
      const int64_t len = std::min(range, P - j0);
      for (int64_t t = 0; t < T_; ++t) {
        const T* nz_row = noise + (t * B + b) * C * P + j0;
        const T* p0_row = preds + (t * (K + 1) * B + b) * C * P + j0;
        const T* pk_row[KC];
        for (int64_t k = 0; k < K; ++k) pk_row[k] = preds + ((t * (K + 1) + k + 1) * B + b) * C * P + j0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t o = c * P;
          for (int64_t i = 0; i < len; i += 16) {
            const __mmask16 m = len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1);
            _mm_prefetch(reinterpret_cast<const char*>(nz_row + o + i + kAhead), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(p0_row + o + i + kAhead), _MM_HINT_T0);
            const __m512 n = vload16(nz_row + o + i, m);
            const __m512 p0 = vload16(p0_row + o + i, m);
            const __m512 u = _mm512_sub_ps(_mm512_add_ps(n, n), p0);
#pragma GCC unroll 8
            for (int64_t k = 0; k < K; ++k) {
              _mm_prefetch(reinterpret_cast<const char*>(pk_row[k] + o + i + kAhead), _MM_HINT_T0);
              const __m512 pk = vload16(pk_row[k] + o + i, m);
              const __m512 x = _mm512_sub_ps(pk, p0), y = _mm512_sub_ps(u, pk);
              float* a = acc + k * range + i;
              _mm512_mask_storeu_ps(a, m, c == 0 ? _mm512_mul_ps(x, y) : _mm512_fmadd_ps(x, y, _mm512_maskz_loadu_ps(m, a)));
            }
          }
        }
        const __m512 wt = _mm512_set1_ps(w[t * B + b]);
        for (int64_t k = 0; k < K; ++k) {
          double sum = 0.0;  // fp32 lanes within a 1024-pixel chunk, fp64 across chunks
          for (int64_t s0 = 0; s0 < len; s0 += kLiftSub) {
            const int64_t n = std::min(kLiftSub, len - s0);
            __m512 vs = _mm512_setzero_ps();
            for (int64_t i = 0; i < n; i += 16) {
              const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
              const __m512 a = _mm512_maskz_loadu_ps(m, acc + k * range + s0 + i);
              vs = _mm512_add_ps(vs, a);
              if (pixel != nullptr) {
                float* px = pixel + (k * B + b) * P + j0 + s0 + i;
                _mm512_mask_storeu_ps(px, m, _mm512_fmadd_ps(wt, a, _mm512_maskz_loadu_ps(m, px)));
              }
            }
            sum += static_cast<double>(_mm512_reduce_add_ps(vs));
          }
          dpart[((t * K + k) * B + b) * nrange + r] = sum;
        }
      }
    }
  }
}

// Runs the AVX-512 kernel when it applies (fp32/fp16/bf16, K <= 8); false otherwise.
template <typename T>
bool lift_avx512(const T* noise, const T* preds, const float* w, double* dpart, float* pixel, int64_t T_,
                 int64_t K, int64_t B, int64_t C, int64_t P, int64_t range) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    switch (K) {
#define COMPKERN_LIFT_CASE(KC) \
  case KC: lift_kernel_avx512<T, KC>(noise, preds, w, dpart, pixel, T_, B, C, P, range); return true;
      COMPKERN_LIFT_CASE(1) COMPKERN_LIFT_CASE(2) COMPKERN_LIFT_CASE(3) COMPKERN_LIFT_CASE(4)
      COMPKERN_LIFT_CASE(5) COMPKERN_LIFT_CASE(6) COMPKERN_LIFT_CASE(7) COMPKERN_LIFT_CASE(8)
#undef COMPKERN_LIFT_CASE
      default: return false;
    }
  }
}
#endif

// The AVX-512 kernel where it applies, else the portable one.
template <typename T>
void lift_run(const T* noise, const T* preds, const at::opmath_type<T>* w, double* dpart, at::opmath_type<T>* pixel,
              int64_t T_, int64_t K, int64_t B, int64_t C, int64_t P, int64_t range) {
#ifdef COMPKERN_AVX512
  if constexpr (std::is_same_v<at::opmath_type<T>, float>) {
    if (lift_avx512<T>(noise, preds, w, dpart, pixel, T_, K, B, C, P, range)) return;
  }
#endif
  lift_kernel<T>(noise, preds, w, dpart, pixel, T_, K, B, C, P, range);
}

// Pixels per work item: long contiguous runs, but at least two items per thread when B is small.
int64_t lift_range(int64_t P, int64_t B) {
  const int64_t want_items = 2 * static_cast<int64_t>(omp_get_max_threads());
  const int64_t splits = std::max<int64_t>(1, (want_items + B - 1) / std::max<int64_t>(B, 1));
  int64_t range = (P + splits - 1) / splits;
  range = std::max<int64_t>(kLiftSub, std::min<int64_t>(kLiftRange, range));
  return ((range + 15) / 16) * 16;
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

// ---- recycled outputs of combine_eps ---------------------------------------------------------
//
// A fresh output of tens of MB (combine_eps at B = 512: 33.5 MB fp32) comes from mmap every call
// and costs page faults (the kernel zeroes every page) that take ~30-40% of the op's own time even
// with transparent huge pages. A sampler calls combine_eps once per step with the same shape and
// drops the previous step's result, so large outputs (>= kPoolMinBytes) are recycled: their
// deleter returns the buffer to a small pool (at most kPoolMaxBuffers buffers, kPoolMaxBytes in
// all; beyond that it is freed), and the next output of the same size reuses it. Buffers are
// 2 MiB aligned and madvise(MADV_HUGEPAGE)d. COMPKERN_OUTPUT_POOL=0 turns the pool off;
// combine_eps_pool_clear() frees what it holds. Callers that preallocate use out= instead.
constexpr size_t kPoolMinBytes = size_t(4) << 20;
constexpr size_t kPoolMaxBytes = size_t(512) << 20;
constexpr size_t kPoolMaxBuffers = 4;
constexpr size_t kHuge = size_t(2) << 20;

struct OutputPool {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free_list;  // (bytes, buffer)
  size_t held = 0;
  bool enabled = true;
};

OutputPool& output_pool() {
  // Never destroyed: outputs alive at exit may still return their buffer to it.
  static OutputPool* pool = [] {
    auto* p = new OutputPool();
    const char* env = std::getenv("COMPKERN_OUTPUT_POOL");
    p->enabled = !(env != nullptr && std::strcmp(env, "0") == 0);
    return p;
  }();
  return *pool;
}

void pool_release(void* ptr, size_t bytes) {
  OutputPool& pool = output_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (pool.enabled && pool.free_list.size() < kPoolMaxBuffers && pool.held + bytes <= kPoolMaxBytes) {
      pool.free_list.emplace_back(bytes, ptr);
      pool.held += bytes;
      return;
    }
  }
  std::free(ptr);
}

struct PoolCtx {
  void* ptr;
  size_t bytes;
};

void pool_deleter(void* ctx) {
  auto* c = static_cast<PoolCtx*>(ctx);
  pool_release(c->ptr, c->bytes);
  delete c;
}

// An uninitialized contiguous tensor of `sizes`, from the pool when it is large.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  OutputPool& pool = output_pool();
  if (!pool.enabled || nbytes < kPoolMinBytes) return at::empty(sizes, options);
  const size_t bytes = (nbytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    for (size_t i = 0; i < pool.free_list.size(); ++i) {
      if (pool.free_list[i].first == bytes) {
        ptr = pool.free_list[i].second;
        pool.free_list.erase(pool.free_list.begin() + static_cast<std::ptrdiff_t>(i));
        pool.held -= bytes;
        break;
      }
    }
  }
  if (ptr == nullptr) {
    if (posix_memalign(&ptr, kHuge, bytes) != 0) return at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
    madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  }
  auto* ctx = new PoolCtx{ptr, bytes};
  return at::from_blob(ptr, sizes, [ctx](void*) { pool_deleter(ctx); }, options.device(at::kCPU));
}

}  // namespace

void combine_eps_pool_clear() {
  OutputPool& pool = output_pool();
  std::vector<std::pair<size_t, void*>> bufs;
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    bufs.swap(pool.free_list);
    pool.held = 0;
  }
  for (auto& b : bufs) std::free(b.second);
}

int64_t combine_eps_pool_bytes() {
  OutputPool& pool = output_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  return static_cast<int64_t>(pool.held);
}

at::Tensor combine_eps_cpu(const at::Tensor& preds_in, const at::Tensor& weights_in,
                           const c10::optional<at::Tensor>& out_in) {
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
  at::Tensor out;
  if (out_in.has_value()) {
    out = *out_in;
    TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
    TORCH_CHECK(out.scalar_type() == preds.scalar_type(), "out must have dtype ", preds.scalar_type(),
                " (the dtype of preds), got ", out.scalar_type());
    TORCH_CHECK(out.sizes() == preds.sizes().slice(1), "out must have shape (B, *S) = ", preds.sizes().slice(1),
                ", got ", out.sizes());
    TORCH_CHECK(out.is_contiguous(), "out must be contiguous, got strides ", out.strides());
  } else {
    out = pooled_empty(preds.sizes().slice(1), preds.options());
  }
  const int64_t N = B == 0 ? 0 : out.numel() / B;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds.scalar_type(), "combine_eps_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    combine_run<scalar_t>(preds.data_ptr<scalar_t>(), weights.data_ptr<A>(), out.data_ptr<scalar_t>(), K, B, N);
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
  const int64_t range = lift_range(P, B);
  const int64_t nblk = std::max<int64_t>(1, (P + range - 1) / range);

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
      lift_run<scalar_t>(noise.data_ptr<scalar_t>(), preds.data_ptr<scalar_t>(), weights.data_ptr<A>(), dpart.data(),
                         pixel_map ? pixel->data_ptr<A>() : nullptr, T_, K, B, C, P, range);
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
