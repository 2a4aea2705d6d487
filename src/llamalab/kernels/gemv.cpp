// Batch-1 matrix-vector products for CPU decode: y = W @ x with a bf16 weight W (N x K, row-major).
//
// Built and loaded by llamalab/kernels/__init__.py, which only calls it on CPUs with AVX512-BF16. The whole
// file is compiled with the AVX-512 flags, so it must never be loaded on a CPU without them.
//
// Decode at batch 1 reads every weight once per token, so this is a streaming problem: the arithmetic is
// trivial (one VDPBF16PS per 64-byte cache line of W) and the speed is set by how well the loads keep the
// memory system busy. What mattered, measured on a 2-core Sapphire Rapids VM (see benchmarks/gemv.py):
//   * software prefetch a fixed distance ahead in W: the model (270 MB in bf16) does not stay in cache,
//     and prefetching ~12 KB ahead streams it ~1.4x faster than the hardware prefetchers alone (one
//     token's GEMVs: ~15 -> ~22 GB/s on 2 threads, ~11 -> ~16 GB/s on 1). Rows are contiguous, so
//     "ahead in this row" runs on into the next rows; 8-16 KB are equally good;
//   * 4 rows per step, so each 64-byte slice of x is loaded once for 4 rows and 4 accumulator chains
//     hide the VDPBF16PS latency. 8 rows, or 2 accumulators per row, were no faster;
//   * each thread gets one contiguous run of rows (at::parallel_for splits the range evenly), so it walks
//     one sequential stream;
//   * a small fixed cost per call: torch.mv on bf16 spends ~35 us a call even on a 8 x 576 matrix, which
//     over the 121 GEMVs of a SmolLM2-135M token is ~4 ms; this kernel costs ~3 us.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kRows = 4;                  // rows per step (shares each load of x)
constexpr int64_t kPrefetchBytes = 12 * 1024; // how far ahead in W to prefetch (see above)
constexpr int64_t kGrainBytes = 32 * 1024;    // a thread's smallest share of W: below it a fork costs more

inline void store(float v, c10::BFloat16* y) { *y = c10::BFloat16(v); }  // round to nearest even
inline void store(float v, float* y) { *y = v; }

// y[r0:r1] = W[r0:r1] @ x with R rows per step (R = kRows for the bulk, 1 for the last N % kRows rows).
// K need not be a multiple of 32: the last partial slice is read with a mask, so it loads zeros past the
// end of the row instead of the next row's first elements.
template <int R, typename Out>
void gemv_rows(const uint16_t* w, const uint16_t* x, Out* y, int64_t r0, int64_t r1, int64_t K) {
  const int64_t K32 = K / 32 * 32;
  const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1);
  for (int64_t r = r0; r + R <= r1; r += R) {
    const uint16_t* wr = w + r * K;
    __m512 acc[R];
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K32; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int i = 0; i < R; i++) {
        const uint16_t* p = wr + i * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(p), xv);
      }
    }
    if (tail) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + k);
      for (int i = 0; i < R; i++)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + i * K + k), xv);
    }
    for (int i = 0; i < R; i++) store(_mm512_reduce_add_ps(acc[i]), y + r + i);
  }
}

template <typename Out>
void gemv(const uint16_t* w, const uint16_t* x, Out* y, int64_t N, int64_t K) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (kRows * K * 2));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kRows, r1 = std::min(N, b1 * kRows);
    const int64_t bulk = r0 + (r1 - r0) / kRows * kRows;
    gemv_rows<kRows>(w, x, y, r0, bulk, K);
    gemv_rows<1>(w, x, y, bulk, r1, K);
  });
}

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = weight @ x for a bf16 weight (batch-1 decode)", pybind11::arg("weight"),
        pybind11::arg("x"));
}
