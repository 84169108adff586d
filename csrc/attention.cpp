// C++ CPU kernels of aggregate_attention and attention_losses (Separate-and-Enhance losses).
//
// aggregate_attention_forward: layers (B, H_l, P, N), any float dtype -> (B, P, N) in the
//   accumulation type (fp32; fp64 for fp64): the mean over all (layer, head) maps. Work items are
//   (b, block of pixels); each item reads its slice of every layer once and owns its output slice.
// aggregate_attention_backward: out (B * heads, P, N) = grad (B, P, N) * scale broadcast over
//   heads, converted to the layers' dtype in the same pass.
// attention_losses_forward: one pass over maps (B, P, N) per sample b (OpenMP over b): selection of
//   the K tokens with the Attend-and-Excite softmax (optional), Separate (max over pixels of
//   prod/sum), separable Gaussian smoothing with reflect padding and Enhance (1 - min_k max_p).
//   Returns the arg-max / arg-min indices (B, 3) = (p_sep, k_en, q_en) for the backward.
// attention_losses_backward: the gradient is non-zero only on the pixel rows p_sep and the
//   kernel_size^2 neighbourhood of q_en; only those rows are recomputed and written.
// Ties: the first index wins (strict comparisons), as torch.argmax / argmin in the reference.
//
// OpenMP pragmas cannot sit inside the AT_DISPATCH lambda, so each kernel is a template called
// from inside the dispatch. fp16/bf16 are read directly and converted to fp32 per element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace compkern {
namespace {

constexpr int64_t kAggPixelBlock = 8;  // pixels per work item of aggregate_attention

// Element i of src in the accumulation type. bf16 by a bit shift and fp32 -> bf16 by a branch-free
// round to nearest even (finite values), so that loops over them vectorize (c10's conversions
// do not).
template <typename T, typename A>
inline A load_acc(const T* __restrict src, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(src)[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return static_cast<A>(src[i]);
  }
}

template <typename T, typename A>
inline void store_from_acc(T* __restrict dst, int64_t i, A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    u += 0x7FFFu + ((u >> 16) & 1u);
    reinterpret_cast<uint16_t*>(dst)[i] = static_cast<uint16_t>(u >> 16);
  } else {
    dst[i] = static_cast<T>(v);
  }
}

template <typename T, typename A>
inline void accumulate_row(const T* __restrict src, A* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += load_acc<T, A>(src, i);
}

template <typename T, typename A>
void aggregate_kernel(const std::vector<const T*>& src, const std::vector<int64_t>& heads, A* out, int64_t B,
                      int64_t P, int64_t N, A inv_total) {
  const int64_t blocks = (P + kAggPixelBlock - 1) / kAggPixelBlock;
  const int64_t items = B * blocks;
  const int64_t L = static_cast<int64_t>(src.size());
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / blocks, p0 = (it % blocks) * kAggPixelBlock;
    const int64_t n = (std::min(P, p0 + kAggPixelBlock) - p0) * N;
    A* o = out + (b * P + p0) * N;
    std::fill(o, o + n, A(0));
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = heads[l];
      for (int64_t h = 0; h < H; ++h) accumulate_row(src[l] + ((b * H + h) * P + p0) * N, o, n);
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] *= inv_total;
  }
}

inline int64_t reflect(int64_t i, int64_t R) { return i < 0 ? -i : (i >= R ? 2 * (R - 1) - i : i); }

// exp for the softmax: std::exp for double; for float a branch-free Cephes-style expf (about 1 ulp,
// 0 below -87.3 where expf is subnormal) that the compiler vectorizes in `omp simd` loops.
inline double fexp(double x) { return std::exp(x); }
inline float fexp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float t = xc * 1.44269504088896341f;
  const int32_t ni = static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f));
  const float n = static_cast<float>(ni);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return x < -87.3f ? 0.f : y * s;
}

// Softmax statistics of one pixel row over tokens [1, end): max of x and sum of exp(scale (x - max)).
// The row is first copied to a buffer padded with -inf to a multiple of 16 lanes (exp(-inf) = 0), so
// the vector loops have no scalar remainder.
constexpr int64_t kLanes = 16;
constexpr int64_t kMaxRow = 1024;  // rows longer than this take the unpadded loops

template <typename T, typename A>
inline void row_stats(const T* x, int64_t end, A scale, A& mx, A& Z) {
  const A ninf = -std::numeric_limits<A>::infinity();
  A m = ninf, z = 0;
  if (end <= kMaxRow) {
    alignas(64) A buf[kMaxRow];
    const int64_t n = (end + kLanes - 1) / kLanes * kLanes;
#pragma omp simd
    for (int64_t j = 0; j < end; ++j) buf[j] = j >= 1 ? load_acc<T, A>(x, j) : ninf;
    for (int64_t j = end; j < n; ++j) buf[j] = ninf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, buf[j]);
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; ++j) z += fexp(scale * (buf[j] - m));
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 1; j < end; ++j) m = std::max(m, load_acc<T, A>(x, j));
#pragma omp simd reduction(+ : z)
    for (int64_t j = 1; j < end; ++j) z += fexp(scale * (load_acc<T, A>(x, j) - m));
  }
  mx = m;
  Z = z;
}

// The K selected, normalized values of one pixel row.
template <typename T, typename A>
inline void select_row(const T* x, const int64_t* tok, int64_t K, int64_t end, bool softmax, A scale, A* m,
                       int64_t stride) {
  if (softmax) {
    A mx, Z;
    row_stats(x, end, scale, mx, Z);
    const A inv = A(1) / Z;
    for (int64_t k = 0; k < K; ++k) m[k * stride] = fexp(scale * (static_cast<A>(x[tok[k]]) - mx)) * inv;
  } else {
    for (int64_t k = 0; k < K; ++k) m[k * stride] = static_cast<A>(x[tok[k]]);
  }
}

// Separable smoothing with reflect padding: dst = (w w^T) * src, src/dst (R, R), tmp (R, R).
template <typename A>
inline void smooth(const A* src, A* tmp, A* dst, const A* w, int64_t ks, int64_t R) {
  const int64_t c = ks / 2;
  for (int64_t y = 0; y < R; ++y)
    for (int64_t x = 0; x < R; ++x) {
      A s = 0;
      for (int64_t d = 0; d < ks; ++d) s += w[d] * src[y * R + reflect(x + d - c, R)];
      tmp[y * R + x] = s;
    }
  for (int64_t y = 0; y < R; ++y)
    for (int64_t x = 0; x < R; ++x) {
      A s = 0;
      for (int64_t d = 0; d < ks; ++d) s += w[d] * tmp[reflect(y + d - c, R) * R + x];
      dst[y * R + x] = s;
    }
}

template <typename T, typename A>
void losses_forward_kernel(const T* maps, const int64_t* tok, const int64_t* end, const A* w, int64_t ks, int64_t B,
                           int64_t P, int64_t N, int64_t K, int64_t R, bool softmax, A scale, A* sep, A* en,
                           int64_t* arg) {
#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<A> M(K * P), tmp(P), sm(P);
    const T* xb = maps + b * P * N;
    const int64_t* tb = tok + b * K;
    for (int64_t p = 0; p < P; ++p) select_row(xb + p * N, tb, K, end[b], softmax, scale, M.data() + p, P);
    // Separate: max over pixels of prod / sum.
    A best = -std::numeric_limits<A>::infinity();
    int64_t pbest = 0;
    for (int64_t p = 0; p < P; ++p) {
      A prod = 1, s = 0;
      for (int64_t k = 0; k < K; ++k) {
        prod *= M[k * P + p];
        s += M[k * P + p];
      }
      const A r = s > 0 ? prod / s : A(0);
      if (r > best) {
        best = r;
        pbest = p;
      }
    }
    // Enhance: 1 - min over tokens of the max over pixels of the smoothed map.
    A minv = std::numeric_limits<A>::infinity();
    int64_t kbest = 0, qbest = 0;
    for (int64_t k = 0; k < K; ++k) {
      smooth(M.data() + k * P, tmp.data(), sm.data(), w, ks, R);
      A mx = sm[0];
      int64_t q = 0;
      for (int64_t p = 1; p < P; ++p)
        if (sm[p] > mx) {
          mx = sm[p];
          q = p;
        }
      if (mx < minv) {
        minv = mx;
        kbest = k;
        qbest = q;
      }
    }
    sep[b] = best;
    en[b] = A(1) - minv;
    arg[b * 3 + 0] = pbest;
    arg[b * 3 + 1] = kbest;
    arg[b * 3 + 2] = qbest;
  }
}

template <typename T, typename A>
void losses_backward_kernel(const T* maps, const int64_t* tok, const int64_t* end, const A* w, int64_t ks, int64_t B,
                            int64_t P, int64_t N, int64_t K, int64_t R, bool softmax, A scale, const int64_t* arg,
                            const A* gsep, const A* gen, T* grad) {
#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    const T* xb = maps + b * P * N;
    const int64_t* tb = tok + b * K;
    const int64_t e = end[b], pbest = arg[b * 3], kbest = arg[b * 3 + 1], qbest = arg[b * 3 + 2];
    // G[k, p]: gradient w.r.t. the selected maps, on the touched pixels only.
    std::vector<int64_t> touched;
    std::vector<A> G;  // (touched, K)
    auto slot = [&](int64_t p) -> A* {
      for (size_t i = 0; i < touched.size(); ++i)
        if (touched[i] == p) return G.data() + i * K;
      touched.push_back(p);
      G.resize(touched.size() * K, A(0));
      return G.data() + (touched.size() - 1) * K;
    };
    if (gsep[b] != A(0)) {
      std::vector<A> m(K);
      select_row(xb + pbest * N, tb, K, e, softmax, scale, m.data(), 1);
      A s = 0, prod = 1;
      for (int64_t k = 0; k < K; ++k) {
        s += m[k];
        prod *= m[k];
      }
      if (s > 0) {
        // d (prod / s) / d m_k = (others_k - prod / s) / s: no s * s (which underflows in fp32).
        A* g = slot(pbest);
        const A ratio = prod / s;
        for (int64_t k = 0; k < K; ++k) {
          A others = 1;
          for (int64_t i = 0; i < K; ++i)
            if (i != k) others *= m[i];
          g[k] += gsep[b] * ((others - ratio) / s);
        }
      }
    }
    if (gen[b] != A(0)) {
      const int64_t c = ks / 2, qy = qbest / R, qx = qbest % R;
      for (int64_t dy = 0; dy < ks; ++dy)
        for (int64_t dx = 0; dx < ks; ++dx) {
          const int64_t p = reflect(qy + dy - c, R) * R + reflect(qx + dx - c, R);
          slot(p)[kbest] -= gen[b] * w[dy] * w[dx];
        }
    }
    std::vector<A> row(N);
    for (size_t i = 0; i < touched.size(); ++i) {
      const int64_t p = touched[i];
      const A* g = G.data() + i * K;
      const T* x = xb + p * N;
      std::fill(row.begin(), row.end(), A(0));
      if (softmax) {
        A mx, Z;
        row_stats(x, e, scale, mx, Z);
        const A inv = A(1) / Z;
        A dot = 0;
        for (int64_t k = 0; k < K; ++k) dot += g[k] * fexp(scale * (static_cast<A>(x[tb[k]]) - mx)) * inv;
        for (int64_t j = 1; j < e; ++j) row[j] = -scale * fexp(scale * (static_cast<A>(x[j]) - mx)) * inv * dot;
        for (int64_t k = 0; k < K; ++k)
          row[tb[k]] += scale * fexp(scale * (static_cast<A>(x[tb[k]]) - mx)) * inv * g[k];
      } else {
        for (int64_t k = 0; k < K; ++k) row[tb[k]] += g[k];
      }
      T* out = grad + (b * P + p) * N;
      for (int64_t j = 0; j < N; ++j) out[j] = static_cast<T>(row[j]);
    }
  }
}

template <typename T, typename A>
void aggregate_backward_kernel(const A* grad, T* out, int64_t B, int64_t H, int64_t P, int64_t N, A scale) {
  const int64_t blocks = (P + kAggPixelBlock - 1) / kAggPixelBlock;
  const int64_t items = B * H * blocks;
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t bh = it / blocks, b = bh / H, p0 = (it % blocks) * kAggPixelBlock;
    const int64_t n = (std::min(P, p0 + kAggPixelBlock) - p0) * N;
    const A* g = grad + (b * P + p0) * N;
    T* o = out + (bh * P + p0) * N;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store_from_acc<T, A>(o, i, g[i] * scale);
  }
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

at::Tensor aggregate_attention_forward_cpu(const std::vector<at::Tensor>& layers) {
  TORCH_CHECK(!layers.empty(), "aggregate_attention: layers must not be empty");
  const auto& first = layers[0];
  TORCH_CHECK(first.dim() == 4, "aggregate_attention: layers must be (B, H, P, N)");
  const int64_t B = first.size(0), P = first.size(2), N = first.size(3);
  std::vector<int64_t> heads;
  int64_t total = 0;
  for (const auto& t : layers) {
    check_cpu_contiguous(t, "aggregate_attention: every layer");
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(2) == P && t.size(3) == N && t.scalar_type() == first.scalar_type(),
                "aggregate_attention: every layer must be (B, H_l, P, N) of one dtype");
    heads.push_back(t.size(1));
    total += t.size(1);
  }
  const auto acc_type = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, P, N}, first.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "aggregate_attention", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src;
    for (const auto& t : layers) src.push_back(t.data_ptr<scalar_t>());
    aggregate_kernel<scalar_t, A>(src, heads, out.data_ptr<A>(), B, P, N, A(1) / static_cast<A>(total));
  });
  return out;
}

void aggregate_attention_backward_cpu(const at::Tensor& grad, double scale, at::Tensor& out) {
  check_cpu_contiguous(grad, "grad");
  check_cpu_contiguous(out, "out");
  TORCH_CHECK(grad.dim() == 3 && out.dim() == 3 && out.size(0) % grad.size(0) == 0 && out.size(1) == grad.size(1) &&
                  out.size(2) == grad.size(2),
              "aggregate_attention backward: grad (B, P, N), out (B * heads, P, N)");
  const int64_t B = grad.size(0), P = grad.size(1), N = grad.size(2), heads = out.size(0) / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aggregate_attention_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    TORCH_CHECK(grad.scalar_type() == c10::CppTypeToScalarType<A>::value, "grad must be in the accumulation dtype");
    aggregate_backward_kernel<scalar_t, A>(grad.data_ptr<A>(), out.data_ptr<scalar_t>(), B, heads, P, N,
                                           static_cast<A>(scale));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_losses_forward_cpu(const at::Tensor& maps, const at::Tensor& tokens,
                                                                            const at::Tensor& text_end,
                                                                            const at::Tensor& weights, bool softmax,
                                                                            double scale) {
  check_cpu_contiguous(maps, "maps");
  check_cpu_contiguous(tokens, "tokens");
  check_cpu_contiguous(text_end, "text_end");
  check_cpu_contiguous(weights, "weights");
  TORCH_CHECK(maps.dim() == 3 && tokens.dim() == 2 && tokens.size(0) == maps.size(0), "maps (B, P, N), tokens (B, K)");
  const int64_t B = maps.size(0), P = maps.size(1), N = maps.size(2), K = tokens.size(1), ks = weights.size(0);
  const int64_t R = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(P))));
  TORCH_CHECK(R * R == P, "maps: P must be a square");
  const auto acc_type = maps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weights.scalar_type() == acc_type, "weights must be in the accumulation dtype");
  at::Tensor sep = at::empty({B}, maps.options().dtype(acc_type));
  at::Tensor en = at::empty({B}, maps.options().dtype(acc_type));
  at::Tensor arg = at::empty({B, 3}, maps.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "attention_losses_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    losses_forward_kernel<scalar_t, A>(maps.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), text_end.data_ptr<int64_t>(),
                                       weights.data_ptr<A>(), ks, B, P, N, K, R, softmax, static_cast<A>(scale),
                                       sep.data_ptr<A>(), en.data_ptr<A>(), arg.data_ptr<int64_t>());
  });
  return {sep, en, arg};
}

at::Tensor attention_losses_backward_cpu(const at::Tensor& maps, const at::Tensor& tokens, const at::Tensor& text_end,
                                         const at::Tensor& weights, bool softmax, double scale, const at::Tensor& arg,
                                         const at::Tensor& grad_sep, const at::Tensor& grad_en) {
  check_cpu_contiguous(maps, "maps");
  check_cpu_contiguous(arg, "arg");
  check_cpu_contiguous(grad_sep, "grad_sep");
  check_cpu_contiguous(grad_en, "grad_en");
  const int64_t B = maps.size(0), P = maps.size(1), N = maps.size(2), K = tokens.size(1), ks = weights.size(0);
  const int64_t R = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(P))));
  at::Tensor grad = at::zeros_like(maps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "attention_losses_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    TORCH_CHECK(grad_sep.scalar_type() == c10::CppTypeToScalarType<A>::value &&
                    grad_en.scalar_type() == c10::CppTypeToScalarType<A>::value,
                "grad_sep / grad_en must be in the accumulation dtype");
    losses_backward_kernel<scalar_t, A>(maps.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(),
                                        text_end.data_ptr<int64_t>(), weights.data_ptr<A>(), ks, B, P, N, K, R, softmax,
                                        static_cast<A>(scale), arg.data_ptr<int64_t>(), grad_sep.data_ptr<A>(),
                                        grad_en.data_ptr<A>(), grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace compkern
