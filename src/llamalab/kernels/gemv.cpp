// The GEMV op: y = weight @ x for one bf16 weight (batch-1 decode through llamalab.model.linear.Linear).
// The kernel itself, and why it is written as it is, are in gemv.h.

#include <ATen/ATen.h>

#include "gemv.h"

namespace llamalab {

// weight: bf16 (N, K), contiguous. x: K elements, bf16 or fp32 (fp32 is rounded to bf16 first: the dot
// products run in bf16 with fp32 accumulation). Returns (N,) in x's dtype; a bf16 result is the fp32 sum
// rounded once.
at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.device().is_cpu() && x.device().is_cpu(), "gemv_bf16: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "gemv_bf16: weight must be a contiguous 2-D bf16 tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "gemv_bf16: x must be bf16 or fp32");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.numel() == K, "gemv_bf16: x has ", x.numel(), " elements, weight has K = ", K);
  const at::Tensor xb = x.reshape({K}).to(at::kBFloat16).contiguous();
  at::Tensor y = at::empty({N}, x.options());
  if (N == 0 || K == 0) return y.zero_();
  const auto* w = reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.const_data_ptr());
  if (x.scalar_type() == at::kFloat)
    gemv(w, xp, y.mutable_data_ptr<float>(), N, K);
  else
    gemv(w, xp, y.mutable_data_ptr<c10::BFloat16>(), N, K);
  return y;
}

}  // namespace llamalab
