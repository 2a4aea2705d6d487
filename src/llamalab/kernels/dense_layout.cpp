// The decode step over the dense cache (llamalab/kv/dense.py): each sequence's rotated key and its value
// written at its position, then each query head attending over positions 0..pos in fp32 (scores, softmax and
// the weighted sum of values), its output rounded once, as SDPA's CPU kernel does.

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "kv_layout.h"
#include "projection.h"
#include "simd.h"

namespace llamalab {
namespace {

// acc = sum_t p[t] * values[t] for values L x (16 C), the C sums in registers.
template <int C, typename T>
void weighted_sum(const float* p, const T* values, int64_t L, float* acc) {
  __m512 sum[C];
  for (int c = 0; c < C; c++) sum[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; t++) {
    const __m512 pt = _mm512_set1_ps(p[t]);
    for (int c = 0; c < C; c++) sum[c] = _mm512_fmadd_ps(pt, load16(values + t * 16 * C + 16 * c, 0xFFFF), sum[c]);
  }
  for (int c = 0; c < C; c++) _mm512_storeu_ps(acc + 16 * c, sum[c]);
}

// The same for any D (the sums in memory, a masked last slice).
template <typename T>
void weighted_sum(const float* p, const T* values, int64_t L, int64_t D, float* acc) {
  std::fill_n(acc, D, 0.f);
  for (int64_t t = 0; t < L; t++) {
    const __m512 pt = _mm512_set1_ps(p[t]);
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = first(D - c);
      const __m512 v = load16(values + t * D + c, m);
      _mm512_mask_storeu_ps(acc + c, m, _mm512_fmadd_ps(pt, v, _mm512_maskz_loadu_ps(m, acc + c)));
    }
  }
}

// out = softmax(scale * keys @ q) @ values over L cached positions (keys, values: L x D, contiguous).
template <typename T>
void attend(const T* q, const T* keys, const T* values, int64_t L, int64_t D, float scale, float* scores,
            T* out) {
  const int64_t L4 = L / 4 * 4;
  gemv_rows<4>(raw(keys), raw(q), scores, 0, L4, D);
  gemv_rows<1>(raw(keys), raw(q), scores, L4, L, D);
  const float inv = exp_scores(scores, L, scale);
  alignas(64) float acc[kMaxHeadDim];
  switch (D) {  // the common head sizes keep their sums in registers
    case 64: weighted_sum<4>(scores, values, L, acc); break;
    case 128: weighted_sum<8>(scores, values, L, acc); break;
    default: weighted_sum(scores, values, L, D, acc);
  }
  for (int64_t c = 0; c < D; c++) out[c] = T(acc[c] * inv);
}

template <typename T>
struct DenseLayout : KVLayout<T> {
  std::vector<at::Tensor> held;  // the cache tensors the pointers below point into
  std::vector<T*> k, v;

  // The cache of sequence b, kv head g, from position 0 (max_len x D, contiguous), in a layer's cache.
  T* at(T* layer, const LayerPass<T>& p, int64_t b, int64_t g) const {
    return layer + (p.rows[b] * this->Hkv + g) * this->max_len * this->D;
  }

  void attend(int64_t l, const LayerPass<T>& p) const override {
    const int64_t H = p.H, Hkv = p.Hkv, D = p.D, Nqkv = (H + 2 * Hkv) * D;
    // k heads rotated and v heads copied into the cache at each sequence's position
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.B * Hkv; i++) {
      const int64_t b = i / Hkv, g = i % Hkv, pos = p.positions[b];
      const T* in = p.qkv + b * Nqkv;
      rope(in + (H + g) * D, p.cos + b * D, p.sin + b * D, at(k[l], p, b, g) + pos * D, D);
      std::copy_n(in + (H + Hkv + g) * D, D, at(v[l], p, b, g) + pos * D);
    }
    thread_local std::vector<float> scores;
    thread_local std::vector<T> q;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.B * H; i++) {  // each q head rotated, then attending
      const int64_t b = i / H, hh = i % H, g = hh / (H / Hkv), L = p.positions[b] + 1;
      q.resize(D);
      rope(p.qkv + b * Nqkv + hh * D, p.cos + b * D, p.sin + b * D, q.data(), D);
      scores.resize(L);
      llamalab::attend(q.data(), at(k[l], p, b, g), at(v[l], p, b, g), L, D, p.scale, scores.data(),
                       p.out + i * D);
    }
  }
};

}  // namespace

template <typename T>
std::unique_ptr<KVLayout<T>> dense_layout(const std::vector<at::Tensor>& tensors) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(!tensors.empty() && tensors.size() % 2 == 0, "decode_step: the dense cache is a k and a v per layer");
  auto layout = std::make_unique<DenseLayout<T>>();
  const at::Tensor& first_k = tensors[0];
  for (const at::Tensor& c : tensors) {
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == dtype && c.is_contiguous() && c.dim() == 4,
                "decode_step: a cache must be a contiguous 4-D CPU tensor of the model's dtype");
    TORCH_CHECK(c.sizes() == first_k.sizes(), "decode_step: cache shapes differ between layers");
  }
  layout->held = tensors;
  for (size_t i = 0; i < tensors.size(); i += 2) {
    layout->k.push_back(layout->held[i].template mutable_data_ptr<T>());
    layout->v.push_back(layout->held[i + 1].template mutable_data_ptr<T>());
  }
  layout->n_layers = static_cast<int64_t>(tensors.size() / 2);
  layout->rows = first_k.size(0);
  layout->Hkv = first_k.size(1);
  layout->max_len = first_k.size(2);
  layout->D = first_k.size(3);
  return layout;
}

template std::unique_ptr<KVLayout<float>> dense_layout<float>(const std::vector<at::Tensor>&);
template std::unique_ptr<KVLayout<bf16>> dense_layout<bf16>(const std::vector<at::Tensor>&);

}  // namespace llamalab
