// The decode step over a KIVI cache (llamalab/kv/kivi.py, KiviStore), read in its packed form: keys and values
// are dequantized 16 at a time in registers inside attention, never into a dense copy of the past (what the
// paper's CUDA kernels do by multiplying against the packed codes).
//
// A layer of a row and kv head holds: keys quantized per channel in groups of G tokens (positions 0..nk-1),
// values per token in groups of G channels (0..nv-1), both as packed 2- or 4-bit codes with fp16 scales and
// minimums, then the full-precision residual: keys nk..pos-1 in a window filled from its first slot, values
// nv..pos-1 right-aligned in a window of R slots. Between passes nk = floor(length / R) R and nv = max(0,
// length - R), so the step derives both from the position of the new token.
//
// Numerics are the PyTorch path's (kivi.py's dequantize_keys/values, then SDPA): each dequantized value is
// code * scale + minimum with the fp16 scale and minimum converted to the cache's dtype and the product and the
// sum each rounded to it (bf16; fp32 is exact), the new token attends in full precision, and scores, softmax
// and the weighted sum run in fp32 with the output rounded once. Only the order of summation differs. Then,
// as the PyTorch path does after attention, the new key and value join the residual and what overflows it is
// quantized (scalar code: R keys every R steps, one value a step), with the same rounding as quantize_keys /
// quantize_values, so either path can continue the other's cache.
//
// Work is shared out by (sequence, kv head, run of positions): each dequantizes its keys and values once for
// the query heads that share them (grouped-query attention); the runs' softmax sums are merged after (the
// split-softmax of flash-decoding), then the new token is stored.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "gemv.h"
#include "kv_layout.h"
#include "simd.h"

namespace llamalab {
namespace {

using half = c10::Half;

// 16 codes of a packed row from code c on (c a multiple of 16; codes are packed first in the lowest bits,
// llamalab/quant/pack.py), as int32 lanes; lanes past `m` read no memory and come out 0.
[[gnu::always_inline]] inline __m512i codes16(const uint8_t* row, int64_t c, int bits, __mmask16 m) {
  const int n = __builtin_popcount(m);
  const __mmask16 bytes = first((n * bits + 7) / 8);
  const __m128i b = _mm_maskz_loadu_epi8(bytes, row + c * bits / 8);
  __m128i spread;
  __m512i shifts;
  if (bits == 4) {
    spread = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  } else {
    spread = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    shifts = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
  }
  const __m512i codes = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(spread), shifts);
  return _mm512_maskz_and_epi32(m, codes, _mm512_set1_epi32((1 << bits) - 1));
}

// n fp16 values as fp32 rounded to T (as `.to(dtype)` does in the PyTorch path).
template <typename T>
void scales_as(const half* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    _mm512_mask_storeu_ps(out + i, m, rnd16<T>(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, in + i))));
  }
}

[[gnu::always_inline]] inline __m512 dequant(__m512i codes, __m512 scale, __m512 minimum, bool bf) {
  const __m512 x = _mm512_cvtepi32_ps(codes);
  return bf ? rnd16<bf16>(_mm512_add_ps(rnd16<bf16>(_mm512_mul_ps(x, scale)), minimum))
            : _mm512_fmadd_ps(x, scale, minimum);  // exact product: one rounding either way
}

// Asymmetric min/max codes of x[0..n) (stride `stride`) with the fp16 scale and minimum that are stored, as
// kivi.py's _minmax_codes computes them.
inline void minmax_codes(const float* x, int64_t n, int64_t stride, int bits, uint8_t* codes, half* scale,
                         half* minimum) {
  float mn = x[0], mx = x[0];
  for (int64_t i = 1; i < n; i++) {
    mn = std::min(mn, x[i * stride]);
    mx = std::max(mx, x[i * stride]);
  }
  const float top = static_cast<float>((1 << bits) - 1);
  *minimum = half(mn);
  *scale = half((mx - mn) / top);
  const float s = static_cast<float>(*scale), safe = s > 0 ? s : 1.f, lo = static_cast<float>(*minimum);
  for (int64_t i = 0; i < n; i++)
    codes[i * stride] = static_cast<uint8_t>(std::clamp(std::nearbyint((x[i * stride] - lo) / safe), 0.f, top));
}

inline void pack_row(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  std::memset(out, 0, (n * bits + 7) / 8);
  for (int64_t i = 0; i < n; i++) out[i * bits / 8] |= static_cast<uint8_t>(codes[i] << (i * bits % 8));
}

template <typename T>
struct KiviLayout : KVLayout<T> {
  struct Layer {
    uint8_t *k_codes, *v_codes;
    half *k_scale, *k_min, *v_scale, *v_min;
    T *k_res, *v_res;
  };
  std::vector<at::Tensor> held;
  std::vector<Layer> layers;
  int bits = 0;
  int64_t G = 0, R = 0, cap = 0, pb = 0;

  // Scratch shared by the workers: each part's unnormalised sums, its maximum score and its sum of exps,
  // per query head (sized once a layer by one worker).
  mutable std::vector<float> part_acc, part_max, part_sum;

  void attend(int64_t l, const LayerPass<T>& p) const override {
    const Layer& w = layers[l];
    const int64_t units = p.B * p.Hkv, rep = p.H / p.Hkv;
    // Each (sequence, kv head) is split into S runs of positions, so that the workers get equal shares even
    // when there are fewer kv heads than twice the workers (SmolLM2: 3 kv heads on 2 cores); S = 1 below a
    // few hundred positions, where the split costs more than it saves.
    const int64_t L = *std::max_element(p.positions, p.positions + p.B) + 1;
    const int64_t wanted = (2 * omp_get_num_threads() + units - 1) / units;
    const int64_t S = std::max<int64_t>(1, std::min({wanted, L / kMinRun, kMaxParts}));
#pragma omp single
    {
      part_acc.resize(units * S * rep * p.D);
      part_max.resize(units * S * rep);
      part_sum.resize(units * S * rep);
    }  // (an implicit barrier)
#pragma omp for schedule(static)
    for (int64_t i = 0; i < units * S; i++) attend_part(w, p, i / S / p.Hkv, i / S % p.Hkv, i % S, S, i);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < units; i++) {
      const int64_t b = i / p.Hkv, g = i % p.Hkv;
      merge(p, b, g, S, i * S);
      const T* in = p.qkv + b * (p.H + 2 * p.Hkv) * p.D;
      thread_local std::vector<T> k_new;
      k_new.resize(p.D);
      rope(in + (p.H + g) * p.D, p.cos + b * p.D, p.sin + b * p.D, k_new.data(), p.D);
      store(w, p.rows[b] * p.Hkv + g, p.positions[b], k_new.data(), in + (p.H + p.Hkv + g) * p.D, p.D);
    }
  }

  static constexpr int64_t kMinRun = 256;  // positions
  static constexpr int64_t kMaxParts = 64;

  // Part `part` of S of sequence b's positions, for the query heads of kv head g: their scores, exps and
  // unnormalised weighted sum of values over the part's positions, into slot `slot` of the part scratch.
  void attend_part(const Layer& w, const LayerPass<T>& p, int64_t b, int64_t g, int64_t part, int64_t S,
                   int64_t slot) const {
    constexpr bool bf = std::is_same_v<T, bf16>;
    const int64_t D = p.D, H = p.H, Hkv = p.Hkv, rep = H / Hkv, pos = p.positions[b], L = pos + 1;
    const int64_t nk = pos / R * R, nv = std::max<int64_t>(0, pos - R), ng = D / G, head = p.rows[b] * Hkv + g;
    const int64_t t0 = L * part / S, t1 = L * (part + 1) / S, n = t1 - t0;
    const T* in = p.qkv + b * (H + 2 * Hkv) * D;
    const uint8_t* kc = w.k_codes + head * cap * pb;
    const uint8_t* vc = w.v_codes + head * cap * pb;
    const T* k_res = w.k_res + head * R * D;
    const T* v_res = w.v_res + head * R * D;
    const T* v_new = in + (H + Hkv + g) * D;
    // Scratch of this worker. (Through local pointers: a thread_local in a shared library costs a call at
    // every use, which the loops below would pay per position.)
    thread_local std::vector<float> scores_tl, kscale_tl, kmin_tl, vscale_tl, vmin_tl;
    thread_local std::vector<T> qh_tl, k_new_tl;  // the rotated query heads and new key
    const int64_t q0 = std::min(t0, nv), q1 = std::min(t1, nv);  // the part's quantized values
    qh_tl.resize(rep * D);
    k_new_tl.resize(D);
    scores_tl.resize(rep * n);
    kscale_tl.resize(D);
    kmin_tl.resize(D);
    vscale_tl.resize((q1 - q0) * ng);
    vmin_tl.resize((q1 - q0) * ng);
    T *qh = qh_tl.data(), *k_new = k_new_tl.data();
    float *scores = scores_tl.data(), *kscale = kscale_tl.data(), *kmin = kmin_tl.data();
    float *vscale = vscale_tl.data(), *vmin = vmin_tl.data();
    rope(in + (H + g) * D, p.cos + b * D, p.sin + b * D, k_new, D);
    for (int64_t r = 0; r < rep; r++) rope(in + (g * rep + r) * D, p.cos + b * D, p.sin + b * D, &qh[r * D], D);

    // Scores, 4 positions and up to 4 query heads at a time: each slice of a key is dequantized in registers
    // once for the heads that share it. bf16 slices are 32 channels, rounded and packed by one VCVTNE2PS2BF16
    // and dotted in pairs (VDPBF16PS, as the dense cache's keys are); fp32 slices are 16, dotted by FMA.
    // gemv.h's store_sums adds up 4 positions' sums at once.
    using Vec = std::conditional_t<bf, __m512bh, __m512>;
    constexpr int64_t kStep = bf ? 32 : 16;
    const auto full_slice = [&](const T* x, int64_t c) -> Vec {  // full-precision keys, and the queries
      if constexpr (bf) {
        const int64_t left = D - c;
        const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << left) - 1);
        return (__m512bh)_mm512_maskz_loadu_epi16(m, x + c);
      } else {
        return _mm512_maskz_loadu_ps(first(D - c), x + c);
      }
    };
    const auto half_slice = [&](const uint8_t* row, int64_t c) {  // 16 channels of x * scale + min, unrounded
      const __mmask16 m = c < D ? first(D - c) : 0;
      const __m512 x = _mm512_cvtepi32_ps(codes16(row, c, bits, m));
      const __m512 scaled = rnd16<T>(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, &kscale[std::min(c, D - 1)])));
      return _mm512_add_ps(scaled, _mm512_maskz_loadu_ps(m, &kmin[std::min(c, D - 1)]));
    };
    const auto quant_slice = [&](const uint8_t* row, int64_t c) -> Vec {
      if constexpr (bf) {
        return _mm512_cvtne2ps_pbh(half_slice(row, c + 16), half_slice(row, c));
      } else {
        return half_slice(row, c);  // fp32: the product is exact, so one rounding either way
      }
    };
    const auto madd = [](__m512 acc, Vec k, Vec qv) {
      if constexpr (bf) {
        return _mm512_dpbf16_ps(acc, k, qv);
      } else {
        return _mm512_fmadd_ps(k, qv, acc);
      }
    };
    // M positions (4, or 1 for the last few of a run) against NR query heads from head r0: the accumulators
    // are indexed by constants only, so they stay in registers.
    const auto block = [&](auto nr_c, auto m_c, int64_t u, bool quantized, int64_t r0) {
      constexpr int NR = decltype(nr_c)::value, M = decltype(m_c)::value;
      __m512 acc[NR][M];
      const uint8_t* codes[M];
      const T* full[M];
      #pragma GCC unroll 4
      for (int i = 0; i < M; i++) {
        const int64_t t = u + i;
        codes[i] = kc + t * pb;
        full[i] = t < pos ? k_res + (t - nk) * D : k_new;
        #pragma GCC unroll 4
        for (int j = 0; j < NR; j++) acc[j][i] = _mm512_setzero_ps();
      }
      for (int64_t c = 0; c < D; c += kStep) {
        Vec qv[NR];
        #pragma GCC unroll 4
        for (int j = 0; j < NR; j++) qv[j] = full_slice(&qh[(r0 + j) * D], c);
        #pragma GCC unroll 4
        for (int i = 0; i < M; i++) {
          const Vec kv = quantized ? quant_slice(codes[i], c) : full_slice(full[i], c);
          #pragma GCC unroll 4
          for (int j = 0; j < NR; j++) acc[j][i] = madd(acc[j][i], kv, qv[j]);
        }
      }
      #pragma GCC unroll 4
      for (int j = 0; j < NR; j++) {
        float* out = &scores[(r0 + j) * n + u - t0];
        if constexpr (M == 4) {
          store_sums(acc[j], out);
        } else {
          *out = _mm512_reduce_add_ps(acc[j][0]);
        }
      }
    };
    const auto heads = [&](auto m_c, int64_t u, bool quantized) {
      for (int64_t r0 = 0; r0 < rep; r0 += 4) switch (std::min<int64_t>(4, rep - r0)) {
          case 1: block(std::integral_constant<int, 1>{}, m_c, u, quantized, r0); break;
          case 2: block(std::integral_constant<int, 2>{}, m_c, u, quantized, r0); break;
          case 3: block(std::integral_constant<int, 3>{}, m_c, u, quantized, r0); break;
          default: block(std::integral_constant<int, 4>{}, m_c, u, quantized, r0);
        }
    };
    // Runs of positions that read alike: quantized keys of one group (one set of scales), or full precision.
    for (int64_t u = t0; u < t1;) {
      const bool quantized = u < nk;
      const int64_t end = quantized ? std::min({t1, nk, (u / G + 1) * G}) : t1;
      if (quantized) {
        scales_as<T>(w.k_scale + (head * (cap / G) + u / G) * D, D, kscale);
        scales_as<T>(w.k_min + (head * (cap / G) + u / G) * D, D, kmin);
      }
      for (; u + 4 <= end; u += 4) heads(std::integral_constant<int, 4>{}, u, quantized);
      for (; u < end; u++) heads(std::integral_constant<int, 1>{}, u, quantized);
    }
    for (int64_t r = 0; r < rep; r++)
      part_sum[slot * rep + r] = exp_sum(&scores[r * n], n, p.scale, part_max[slot * rep + r]);

    // The weighted sum of values, a slice of 16 channels at a time for up to 4 query heads in registers.
    scales_as<T>(w.v_scale + (head * cap + q0) * ng, (q1 - q0) * ng, vscale);
    scales_as<T>(w.v_min + (head * cap + q0) * ng, (q1 - q0) * ng, vmin);
    const T* window = v_res + (R - (pos - nv)) * D;  // value nv's slot
    float* acc_out = &part_acc[slot * rep * D];
    // NR query heads from r0, one slice of 16 channels: their sums stay in registers.
    const auto value_slice = [&](auto nr_c, int64_t r0, int64_t c) {
      constexpr int NR = decltype(nr_c)::value;
      const __mmask16 m = first(D - c);
      // lane i of the slice lies in value group (c + i) / G: its scale and minimum, broadcast where the slice
      // is one group, else spread from the token's ng of them (at most 16)
      alignas(64) int32_t lanes[16];
      for (int lane = 0; lane < 16; lane++) lanes[lane] = static_cast<int32_t>(std::min<int64_t>(c + lane, D - 1) / G);
      const __m512i group_of = _mm512_load_si512(lanes);
      const bool one_group = lanes[0] == lanes[15];
      const __mmask16 groups = first(ng);
      const float* weights[NR];
      __m512 acc[NR];
      #pragma GCC unroll 4
      for (int j = 0; j < NR; j++) {
        weights[j] = &scores[(r0 + j) * n];  // weights[j][t - t0]: position t's exp for head r0 + j
        acc[j] = _mm512_setzero_ps();
      }
      for (int64_t t = q0; t < q1; t++) {
        const float *sm = &vscale[(t - q0) * ng], *mn = &vmin[(t - q0) * ng];
        const __m512 scale = one_group ? _mm512_set1_ps(sm[lanes[0]])
                                       : _mm512_permutexvar_ps(group_of, _mm512_maskz_loadu_ps(groups, sm));
        const __m512 minimum = one_group ? _mm512_set1_ps(mn[lanes[0]])
                                         : _mm512_permutexvar_ps(group_of, _mm512_maskz_loadu_ps(groups, mn));
        const __m512 v = dequant(codes16(vc + t * pb, c, bits, m), scale, minimum, bf);
        #pragma GCC unroll 4
        for (int j = 0; j < NR; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j][t - t0]), v, acc[j]);
      }
      for (int64_t t = std::max(t0, nv); t < t1; t++) {
        const __m512 v = load16(t < pos ? window + (t - nv) * D + c : v_new + c, m);
        #pragma GCC unroll 4
        for (int j = 0; j < NR; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j][t - t0]), v, acc[j]);
      }
      #pragma GCC unroll 4
      for (int j = 0; j < NR; j++) _mm512_mask_storeu_ps(acc_out + (r0 + j) * D + c, m, acc[j]);
    };
    for (int64_t r0 = 0; r0 < rep; r0 += 4)
      for (int64_t c = 0; c < D; c += 16) switch (std::min<int64_t>(4, rep - r0)) {
          case 1: value_slice(std::integral_constant<int, 1>{}, r0, c); break;
          case 2: value_slice(std::integral_constant<int, 2>{}, r0, c); break;
          case 3: value_slice(std::integral_constant<int, 3>{}, r0, c); break;
          default: value_slice(std::integral_constant<int, 4>{}, r0, c);
        }
  }

  // Sequence b's output for the query heads of kv head g from its S parts (from slot `slot` on): each part's
  // sums rescaled to the common maximum, normalised and rounded once.
  void merge(const LayerPass<T>& p, int64_t b, int64_t g, int64_t S, int64_t slot) const {
    const int64_t D = p.D, rep = p.H / p.Hkv;
    for (int64_t r = 0; r < rep; r++) {
      float mx = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t s = 0; s < S; s++) mx = std::max(mx, part_max[(slot + s) * rep + r]);
      float weight[kMaxParts];
      for (int64_t s = 0; s < S; s++) {
        weight[s] = S == 1 ? 1.f : std::exp(part_max[(slot + s) * rep + r] - mx);
        total += part_sum[(slot + s) * rep + r] * weight[s];
      }
      const float inv = 1.f / total;
      T* out = p.out + (b * p.H + g * rep + r) * D;
      for (int64_t c = 0; c < D; c++) {
        float sum = 0.f;
        for (int64_t s = 0; s < S; s++) sum += part_acc[((slot + s) * rep + r) * D + c] * weight[s];
        out[c] = T(sum * inv);
      }
    }
  }

  // The new token joins the residual windows; R full keys, or the value leaving its window, are quantized.
  void store(const Layer& w, int64_t head, int64_t pos, const T* k, const T* v, int64_t D) const {
    const int64_t nk = pos / R * R, nv = std::max<int64_t>(0, pos - R);
    T* k_res = w.k_res + head * R * D;
    T* v_res = w.v_res + head * R * D;
    std::copy_n(k, D, k_res + (pos - nk) * D);
    thread_local std::vector<float> x;
    thread_local std::vector<uint8_t> codes;
    if (pos + 1 - nk == R) {  // per channel over groups of G tokens
      x.resize(R * D);
      codes.resize(R * D);
      for (int64_t i = 0; i < R * D; i++) x[i] = f(k_res[i]);
      for (int64_t gi = 0; gi < R / G; gi++)
        for (int64_t c = 0; c < D; c++) {
          const int64_t at = (head * (cap / G) + nk / G + gi) * D + c;
          minmax_codes(&x[gi * G * D + c], G, D, bits, &codes[gi * G * D + c], w.k_scale + at, w.k_min + at);
        }
      for (int64_t t = 0; t < R; t++) pack_row(&codes[t * D], D, bits, w.k_codes + (head * cap + nk + t) * pb);
    }
    const int64_t held = pos - nv;  // values in the window before this one
    if (held == R) {  // the oldest leaves: per token over groups of G channels
      x.resize(D);
      codes.resize(D);
      for (int64_t c = 0; c < D; c++) x[c] = f(v_res[c]);
      const int64_t ng = D / G;
      for (int64_t j = 0; j < ng; j++)
        minmax_codes(&x[j * G], G, 1, bits, &codes[j * G], w.v_scale + (head * cap + nv) * ng + j,
                     w.v_min + (head * cap + nv) * ng + j);
      pack_row(codes.data(), D, bits, w.v_codes + (head * cap + nv) * pb);
    }
    const int64_t kept = std::min(held, R - 1);  // the newest `kept` move one slot left, the new one is last
    std::memmove(v_res + (R - 1 - kept) * D, v_res + (R - kept) * D, kept * D * sizeof(T));
    std::copy_n(v, D, v_res + (R - 1) * D);
  }
};

}  // namespace

template <typename T>
std::unique_ptr<KVLayout<T>> kivi_layout(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& ints) {
  constexpr int kPerLayer = 8;  // k codes, scale, min; v codes, scale, min; k and v residual windows
  TORCH_CHECK(!tensors.empty() && tensors.size() % kPerLayer == 0 && ints.size() == 4,
              "decode_step: a KIVI cache is 8 tensors per layer and {bits, group, residual, max_len}");
  auto layout = std::make_unique<KiviLayout<T>>();
  layout->bits = static_cast<int>(ints[0]);
  layout->G = ints[1];
  layout->R = ints[2];
  layout->max_len = ints[3];
  const at::Tensor& k_res = tensors[6];
  TORCH_CHECK(k_res.dim() == 4, "decode_step: KIVI's residual window must be 4-D");
  const int64_t B = k_res.size(0), Hkv = k_res.size(1), D = k_res.size(3), G = layout->G, R = layout->R;
  TORCH_CHECK((layout->bits == 2 || layout->bits == 4) && G > 0 && D % G == 0 && R % G == 0 && k_res.size(2) == R,
              "decode_step: unsupported KIVI settings");
  TORCH_CHECK(D / G <= 16 && D <= kMaxHeadDim, "decode_step: KIVI needs at most 16 value groups a head");
  layout->cap = (layout->max_len + G - 1) / G * G;
  layout->pb = (D * layout->bits + 7) / 8;
  const int64_t cap = layout->cap, pb = layout->pb;
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  const std::vector<std::vector<int64_t>> shapes = {{B, Hkv, cap, pb},     {B, Hkv, cap / G, D}, {B, Hkv, cap / G, D},
                                                    {B, Hkv, cap, pb},     {B, Hkv, cap, D / G}, {B, Hkv, cap, D / G},
                                                    {B, Hkv, R, D},        {B, Hkv, R, D}};
  const at::ScalarType types[kPerLayer] = {at::kByte, at::kHalf, at::kHalf, at::kByte, at::kHalf, at::kHalf, dtype, dtype};
  layout->held = tensors;
  for (size_t i = 0; i < tensors.size(); i += kPerLayer) {
    at::Tensor* t = &layout->held[i];
    for (int j = 0; j < kPerLayer; j++)
      TORCH_CHECK(t[j].device().is_cpu() && t[j].is_contiguous() && t[j].scalar_type() == types[j] &&
                      t[j].sizes() == at::IntArrayRef(shapes[j]),
                  "decode_step: KIVI tensor ", j, " of layer ", i / kPerLayer, " is not the expected layout");
    layout->layers.push_back({t[0].template mutable_data_ptr<uint8_t>(), t[3].template mutable_data_ptr<uint8_t>(),
                              t[1].template mutable_data_ptr<half>(), t[2].template mutable_data_ptr<half>(),
                              t[4].template mutable_data_ptr<half>(), t[5].template mutable_data_ptr<half>(), t[6].template mutable_data_ptr<T>(),
                              t[7].template mutable_data_ptr<T>()});
  }
  layout->n_layers = static_cast<int64_t>(tensors.size() / kPerLayer);
  layout->rows = B;
  layout->Hkv = Hkv;
  layout->D = D;
  return layout;
}

template std::unique_ptr<KVLayout<float>> kivi_layout<float>(const std::vector<at::Tensor>&, const std::vector<int64_t>&);
template std::unique_ptr<KVLayout<bf16>> kivi_layout<bf16>(const std::vector<at::Tensor>&, const std::vector<int64_t>&);

}  // namespace llamalab
