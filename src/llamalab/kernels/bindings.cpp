// The extension module: the ops of gemv.cpp, quant_linear.cpp and decode_step.cpp, loaded by
// llamalab/kernels/__init__.py.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "decode_step.h"

namespace llamalab {
at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x);
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, const at::Tensor& perm, bool int_dot);
at::Tensor quant_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                            int64_t in_features, at::ScalarType dtype);
}  // namespace llamalab

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  m.def("gemv_bf16", &llamalab::gemv_bf16, "y = weight @ x for a bf16 weight (batch-1 decode)", arg("weight"),
        arg("x"));
  pybind11::class_<llamalab::PreparedStep, std::shared_ptr<llamalab::PreparedStep>>(m, "PreparedStep")
      .def("__call__", &llamalab::PreparedStep::step,
           "logits of one decode step of a batch of sequences (see decode_step.h)", arg("embedded"), arg("cos"),
           arg("sin"), arg("rows"), arg("positions"), arg("int_dot"));
  m.def("prepare_decode", &llamalab::prepare_decode,
        "a bf16 or fp32 LLaMA and its cache (a layout's name, tensors and settings), read once for native decode "
        "steps (see decode_step.cpp, kv_layout.h)",
        arg("layers"), arg("kv_layout"), arg("kv_tensors"), arg("kv_settings"), arg("n_heads"), arg("eps"),
        arg("scale"), arg("norm"), arg("head"));
  m.def("quant_matmul", &llamalab::quant_matmul,
        "y = x @ W^T for a weight-only int8/int4 W in a native layout (see quant_linear.cpp); int_dot: 8-bit "
        "activations and integer dot products",
        arg("x"), arg("codes"), arg("scales"), arg("zeros"), arg("perm"), arg("int_dot"));
  m.def("quant_dequantize", &llamalab::quant_dequantize,
        "the weight of int8/int4 codes in bf16 or fp32, in the codes' column order", arg("codes"), arg("scales"),
        arg("zeros"), arg("in_features"), arg("dtype"));
}
