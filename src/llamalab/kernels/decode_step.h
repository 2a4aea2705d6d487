// The native decode step's interface (decode_step.cpp), shared with the Python bindings (bindings.cpp).

#pragma once

#include <ATen/ATen.h>

#include <memory>
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

std::shared_ptr<PreparedStep> prepare_decode(const std::vector<at::Tensor>& layers,
                                             const std::vector<at::Tensor>& k_cache,
                                             const std::vector<at::Tensor>& v_cache, int64_t n_heads, double eps,
                                             double scale, const at::Tensor& norm, const std::vector<at::Tensor>& head);

}  // namespace llamalab
