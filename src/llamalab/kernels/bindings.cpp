// The extension module: the ops of gemv.cpp, quant_linear.cpp and decode_step.cpp, loaded by
// llamalab/kernels/__init__.py.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace llamalab {
at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x);
at::Tensor decode_step(const at::Tensor& embedded, const at::Tensor& cos, const at::Tensor& sin,
                       const std::vector<at::Tensor>& layers, const std::vector<at::Tensor>& k_cache,
                       const std::vector<at::Tensor>& v_cache, const at::Tensor& rows, const at::Tensor& positions,
                       int64_t n_heads, double eps, double scale, const at::Tensor& norm, const at::Tensor& head);
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, const at::Tensor& perm);
at::Tensor quant_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                            int64_t in_features, at::ScalarType dtype);
}  // namespace llamalab

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  m.def("gemv_bf16", &llamalab::gemv_bf16, "y = weight @ x for a bf16 weight (batch-1 decode)", arg("weight"),
        arg("x"));
  m.def("decode_step", &llamalab::decode_step,
        "logits of one decode step of a batch of sequences through every layer of a bf16 or fp32 LLaMA "
        "(see decode_step.cpp)",
        arg("embedded"), arg("cos"), arg("sin"), arg("layers"), arg("k_cache"), arg("v_cache"), arg("rows"),
        arg("positions"), arg("n_heads"), arg("eps"), arg("scale"), arg("norm"), arg("head"));
  m.def("quant_matmul", &llamalab::quant_matmul,
        "y = x @ W^T for a weight-only int8/int4 W in the portable layout (see quant_linear.cpp)", arg("x"),
        arg("codes"), arg("scales"), arg("zeros"), arg("perm"));
  m.def("quant_dequantize", &llamalab::quant_dequantize,
        "the weight of int8/int4 codes in bf16 or fp32, in the codes' column order", arg("codes"), arg("scales"),
        arg("zeros"), arg("in_features"), arg("dtype"));
}
