// compkern._C: pybind11 bindings of the C++ CPU kernels. Each op lives in its own file and is
// declared in ops.h; this file only binds them.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "compkern C++ CPU kernels (OpenMP over rows, fp32 accumulation)";
}
