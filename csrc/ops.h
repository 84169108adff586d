// Declarations of the C++ CPU kernels bound in module.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include <c10/util/Optional.h>

namespace compkern {
// eps_ops.cpp. combine_eps: preds (K+1, B, *S), weights (K,) or (B, K) -> (B, *S) in preds' dtype.
// With out, writes into it (contiguous, preds' dtype, shape (B, *S)) and returns it; without, large
// outputs come from a small pool of recycled buffers (see eps_ops.cpp).
at::Tensor combine_eps_cpu(const at::Tensor& preds, const at::Tensor& weights, const c10::optional<at::Tensor>& out);
void combine_eps_pool_clear();
int64_t combine_eps_pool_bytes();
// eps_ops.cpp. lift_partial: noise (T, B, *S), preds (T, K+1, B, *S), weights (T, B) ->
// (sum_wd (K, B), sum_wd2 (K, B), sum_wd_pixel (K, B, H, W) if pixel_map), fp32 (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> lift_partial_cpu(
    const at::Tensor& noise, const at::Tensor& preds, const at::Tensor& weights, bool pixel_map);
// attention.cpp. aggregate_attention: layers (B, H_l, P, N) -> (B, P, N) mean over (layer, head), fp32 (fp64).
at::Tensor aggregate_attention_forward_cpu(const std::vector<at::Tensor>& layers);
// attention.cpp. aggregate_attention backward: out (B * heads, P, N) = grad (B, P, N) * scale, in out's dtype.
void aggregate_attention_backward_cpu(const at::Tensor& grad, double scale, at::Tensor& out);
// attention.cpp. attention_losses: maps (B, P, N), tokens (B, K) int64, text_end (B,) int64, weights (ks,)
// -> (sep (B,), en (B,), arg (B, 3) int64 = (p_sep, k_en, q_en)); backward -> grad w.r.t. maps.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_losses_forward_cpu(const at::Tensor& maps, const at::Tensor& tokens,
                                                                            const at::Tensor& text_end,
                                                                            const at::Tensor& weights, bool softmax,
                                                                            double scale);
at::Tensor attention_losses_backward_cpu(const at::Tensor& maps, const at::Tensor& tokens, const at::Tensor& text_end,
                                         const at::Tensor& weights, bool softmax, double scale, const at::Tensor& arg,
                                         const at::Tensor& grad_sep, const at::Tensor& grad_en);
}  // namespace compkern
