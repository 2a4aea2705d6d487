// The native decode step's interface (decode_step.cpp), shared with the Python bindings (bindings.cpp).

#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace llamalab {

// A model and its cache as the step reads them, checked and parsed once by `prepare_decode`.
struct PreparedStep {
  virtual ~PreparedStep() = default;
  // One decode step for B sequences: embedded (B, d), cos/sin (B, head_dim), the token of sequence b at
  // positions[b] of cache row rows[b] (distinct rows); int_dot puts the quantized projections on the integer
  // path (qgemm.h). Returns logits (B, vocab).
  virtual at::Tensor step(const at::Tensor& embedded, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& rows, const at::Tensor& positions, bool int_dot) const = 0;
};

// The model's weights and its cache (a layout named `kv_layout` with its tensors and settings, kv_layout.h).
std::shared_ptr<PreparedStep> prepare_decode(const std::vector<at::Tensor>& layers, const std::string& kv_layout,
                                             const std::vector<at::Tensor>& kv_tensors,
                                             const std::vector<int64_t>& kv_settings, int64_t n_heads, double eps,
                                             double scale, const at::Tensor& norm, const std::vector<at::Tensor>& head);

}  // namespace llamalab
