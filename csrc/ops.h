// Declarations of the C++ CPU kernels bound in module.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include <c10/util/Optional.h>

namespace compkern {
// eps_ops.cpp. combine_eps: preds (K+1, B, *S), weights (K,) or (B, K) -> (B, *S) in preds' dtype.
at::Tensor combine_eps_cpu(const at::Tensor& preds, const at::Tensor& weights);
// eps_ops.cpp. lift_partial: noise (T, B, *S), preds (T, K+1, B, *S), weights (T, B) ->
// (sum_wd (K, B), sum_wd2 (K, B), sum_wd_pixel (K, B, H, W) if pixel_map), fp32 (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> lift_partial_cpu(
    const at::Tensor& noise, const at::Tensor& preds, const at::Tensor& weights, bool pixel_map);
}  // namespace compkern
