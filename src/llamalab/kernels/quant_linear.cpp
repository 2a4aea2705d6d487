// The ops behind UniformQuantLinear's "native" layout (llamalab/quant/base.py): products with a few rows
// (decode outside the fused step, short chunks) read the packed codes directly (qgemm.h); longer inputs
// (prefill) dequantize the weight once into the activations' dtype and use a dense matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <utility>
#include <vector>

#include "projection.h"

namespace llamalab {

namespace {

template <typename T>
at::Tensor matmul(const at::Tensor& x, const at::Tensor* quant, int64_t N, bool int_dot) {
  const int64_t M = x.size(0), K = x.size(1);
  const Projection<T> p = projection<T>(quant, N, K, "the quantized weight");
  TORCH_CHECK(!p.dense, "quant_matmul: the weight must be uint8 codes");
  at::Tensor y = at::empty({M, N}, x.options());
  std::vector<float> scratch;
  matmul_group(&p, 1, x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), M, scratch, int_dot);
  return y;
}

inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(c10::BFloat16* out, __m512 v) {  // round to nearest even, as c10::BFloat16(float)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
}

// Each row decoded 32 codes at a time exactly as the product kernel decodes them (qgemm.h), then put back in
// column order: for 4 bits a decoded pair of vectors holds the even and the odd codes, which are interleaved.
template <int BITS, bool SIGNED, typename T>
void dequantize_rows(const QuantMatrix& m, T* out) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  at::parallel_for(0, m.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const uint8_t* row = m.codes + n * m.row_bytes();
      T* w_row = out + n * m.K;
      const int64_t per = m.groups_per_step(), span = per * m.group();
      for (int64_t g = 0; g < m.G; g += per) {
        const GroupDecoder<BITS, SIGNED> dec(m, n, g, g + per - 1);
        for (int64_t c = g * m.group(); c < g * m.group() + span; c += kQuantBlock) {
          __m512 w[2];
          dec.decode32(row, c, w);
          if constexpr (BITS == 4) {
            if (m.levels) std::swap(w[0], w[1]);  // NF4: the low nibbles hold the odd codes
            const __m512 even = w[0];
            w[0] = _mm512_permutex2var_ps(even, first, w[1]);
            w[1] = _mm512_permutex2var_ps(even, second, w[1]);
          }
          store16(w_row + c, w[0]);
          store16(w_row + c + 16, w[1]);
        }
      }
    }
  });
}

template <typename T>
void dequantize(const QuantMatrix& m, T* out) {
  if (m.bits == 4)
    dequantize_rows<4, false>(m, out);
  else if (m.signed_codes)
    dequantize_rows<8, true>(m, out);
  else
    dequantize_rows<8, false>(m, out);
}

}  // namespace

// y (M, N) = x (M, K) @ W^T for W given as (codes, scales, zeros, perm) (see projection.h), in x's dtype
// (bf16 or fp32).
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, const at::Tensor& perm, bool int_dot) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "quant_matmul: x must be a contiguous CPU matrix");
  const at::Tensor quant[4] = {codes, scales, zeros, perm};
  if (x.scalar_type() == at::kFloat) return matmul<float>(x, quant, codes.size(0), int_dot);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "quant_matmul: x must be bf16 or fp32");
  return matmul<c10::BFloat16>(x, quant, codes.size(0), int_dot);
}

// W (N, K) in `dtype` (bf16 or fp32), in the codes' column order: each value exactly the fp32
// scale * (code - zero), rounded once to dtype.
at::Tensor quant_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                            int64_t in_features, at::ScalarType dtype) {
  const at::Tensor none = at::empty({0});
  const at::Tensor quant[4] = {codes, scales, zeros, none};
  TORCH_CHECK(codes.dim() == 2, "quant_dequantize: codes must be a matrix");
  const int64_t N = codes.size(0);
  at::Tensor w = at::empty({N, in_features}, codes.options().dtype(dtype));
  if (dtype == at::kFloat) {
    dequantize(projection<float>(quant, N, in_features, "the quantized weight").quant, w.mutable_data_ptr<float>());
  } else {
    TORCH_CHECK(dtype == at::kBFloat16, "quant_dequantize: dtype must be bf16 or fp32");
    dequantize(projection<c10::BFloat16>(quant, N, in_features, "the quantized weight").quant,
               w.mutable_data_ptr<c10::BFloat16>());
  }
  return w;
}

}  // namespace llamalab
