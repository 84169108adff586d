// compkern._C: pybind11 bindings of the C++ CPU kernels. Each op lives in its own file and is
// declared in ops.h; this file only binds them.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "compkern C++ CPU kernels (OpenMP over rows, fp32 accumulation)";
  m.def("combine_eps", &compkern::combine_eps_cpu, "combine_eps on CPU: preds (K+1, B, *S), weights (K,) or (B, K) -> (B, *S)",
        py::arg("preds"), py::arg("weights"), py::arg("out") = py::none());
  m.def("combine_eps_pool_clear", &compkern::combine_eps_pool_clear,
        "free the recycled large combine_eps outputs the pool holds");
  m.def("combine_eps_pool_bytes", &compkern::combine_eps_pool_bytes, "bytes of recycled outputs held by the pool");
  m.def("lift_partial", &compkern::lift_partial_cpu,
        "lift_partial on CPU: noise (T, B, *S), preds (T, K+1, B, *S), weights (T, B), pixel_map -> (sum_wd, sum_wd2, pixel|None)",
        py::arg("noise"), py::arg("preds"), py::arg("weights"), py::arg("pixel_map"));
  m.def("aggregate_attention_forward", &compkern::aggregate_attention_forward_cpu,
        "aggregate_attention on CPU: list of (B, H_l, P, N) -> (B, P, N) mean over (layer, head)", py::arg("layers"));
  m.def("aggregate_attention_backward", &compkern::aggregate_attention_backward_cpu,
        "aggregate_attention backward on CPU: out (B * heads, P, N) = grad (B, P, N) * scale, in out's dtype",
        py::arg("grad"), py::arg("scale"), py::arg("out"));
  m.def("attention_losses_forward", &compkern::attention_losses_forward_cpu,
        "attention_losses on CPU: maps, tokens, text_end, weights, softmax, scale -> (sep, en, arg)", py::arg("maps"),
        py::arg("tokens"), py::arg("text_end"), py::arg("weights"), py::arg("softmax"), py::arg("scale"));
  m.def("attention_losses_backward", &compkern::attention_losses_backward_cpu,
        "attention_losses backward on CPU -> grad w.r.t. maps", py::arg("maps"), py::arg("tokens"), py::arg("text_end"),
        py::arg("weights"), py::arg("softmax"), py::arg("scale"), py::arg("arg"), py::arg("grad_sep"),
        py::arg("grad_en"));
}
