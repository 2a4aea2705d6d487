// Small AVX-512 helpers shared by the decode step (decode_step.cpp) and the cache layouts it attends over
// (kv_layout.h, kivi_layout.cpp): rounding as PyTorch rounds, masked loads of bf16 or fp32, exp and softmax.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace llamalab {

using bf16 = c10::BFloat16;

template <typename T>
inline float f(T v) { return static_cast<float>(v); }
template <typename T>
inline float rnd(float v) { return static_cast<float>(T(v)); }  // bf16: round to nearest even, as PyTorch

// The same rounding on 16 lanes: what storing to a T tensor and reading back does (none for float).
template <typename T>
inline __m512 rnd16(__m512 x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);  // round to nearest even, as c10::BFloat16
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

constexpr int64_t kMaxHeadDim = 512;

// exp on 16 floats: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2 and a degree-7 Taylor polynomial
// (truncation error < 6e-9, below fp32's resolution); inputs far below -87 come out 0 through scalef.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 first(int64_t k) { return k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << k) - 1); }

inline __m512 load16(const bf16* p, __mmask16 m) {  // bf16 -> fp32 is a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// Attention's softmax, unnormalised: scores[t] *= scale, then exp(scores[t] - max) in place; returns their
// sum and sets `mx` to the max.
inline float exp_sum(float* scores, int64_t L, float scale, float& mx) {
  mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < L; t++) mx = std::max(mx, scores[t] *= scale);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; t += 16) {
    const __mmask16 m = first(L - t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(scores + t, m, e);
    total = _mm512_mask_add_ps(total, m, total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// The same, returning 1 / sum.
inline float exp_scores(float* scores, int64_t L, float scale) {
  float mx;
  return 1.f / exp_sum(scores, L, scale, mx);
}

// Rotate-half RoPE of one head: out = x * cos + rotate_half(x) * sin, rounded as PyTorch's three ops.
template <typename T>
void rope(const T* x, const T* cos, const T* sin, T* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; i++) {
    const float rotated = i < half ? -f(x[i + half]) : f(x[i - half]);
    out[i] = T(rnd<T>(f(x[i]) * f(cos[i])) + rnd<T>(rotated * f(sin[i])));
  }
}

}  // namespace llamalab
