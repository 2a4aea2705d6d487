// Weight-only int8 and int4 products for decode: rows of Y = X @ W^T with W stored in llamalab's portable
// b-bit affine layout (UniformQuantLinear in llamalab/quant/base.py, packing in llamalab/quant/pack.py), read
// as it is: no second, kernel-specific copy of the weights.
//
//   codes  uint8 (N, K * bits / 8): bits = 8, one code a byte; bits = 4, code 2j in the low nibble of byte j
//          and code 2j+1 in its high nibble
//   scales (N, G) fp32 or bf16, zeros uint8 (N, ceil(G * bits / 8)) packed the same way; group = K / G
//   W[n, k] = scales[n, k / group] * (codes[n, k] - zeros[n, k / group])
// and NF4 (llamalab/quant/nf4.py, QLoRA's storage): 4-bit codes with the first of each pair in the *high*
// nibble, a 16-value table `levels` instead of zeros, and the per-block absmax (dequantized once at load) as
// the scales: W[n, k] = scales[n, k / group] * levels[codes[n, k]].
//
// Each weight is dequantized in registers to exactly the fp32 value `UniformQuantLinear.dequantize()` gives
// (code minus zero is exact, one rounding for the scale) and multiplied with fp32 x, summing in fp32 in the
// same tiles and order as gemv.h; so a row's result does not depend on the batch it is in either.
//
// Like a dense GEMV this streams the weights once per step, now at 1 or 1/2 byte a weight, so it moves 2 or 4
// times fewer bytes than bf16; but decoding costs instructions, so on 1 core it runs at about the bf16 GEMV's
// weights per second (compute-bound) and gains where bf16 is bandwidth-bound (2+ cores). Measured on the
// 2-core VM (benchmarks/quant_decode.py): whole-model decode int4 g64 1.4x, int8 1.2-1.5x bf16. Decoding, shared
// by the batch's rows: 8 bits widen, subtract the zero, convert, scale (per 16 weights); 4 bits look each
// code up in a 16-entry table of the group's weights (one permute per 16 weights), which is also why a 4-bit
// group's table is built from a precomputed code-minus-zero row (a load and a multiply per row and group).
// The rows of a 4-row block are interleaved in the inner loop so four accumulator chains hide the FMA latency
// (int8 on 1 core, one row at a time: 10 G weights/s; interleaved: 15).
//
// x is rearranged once per call into "code order" (`arrange_input`): act-order's column permutation applied,
// and for 4 bits each 32 columns as the 16 even ones then the 16 odd ones, the order in which one 16-byte load
// yields its low and its high nibbles.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

#include "gemv.h"

namespace llamalab {

constexpr int64_t kQuantBlock = 32;  // codes decoded per step: K and the group size must be multiples of it

struct QuantMatrix {
  const uint8_t* codes;
  const void* scales;  // fp32, or bf16 when scales_bf16
  bool scales_bf16;
  const uint8_t* zeros;   // uniform formats
  const float* levels;    // NF4: the 16 code values (then zeros is null and codes come high nibble first)
  int64_t N, K, G, bits;

  int64_t row_bytes() const { return K * bits / 8; }
  int64_t group() const { return K / G; }
  float scale(int64_t n, int64_t g) const {
    return scales_bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(scales)[n * G + g])
                       : static_cast<const float*>(scales)[n * G + g];
  }
  int32_t zero(int64_t n, int64_t g) const {
    const uint8_t* z = zeros + n * ((G * bits + 7) / 8);
    return bits == 8 ? z[g] : (z[g / 2] >> (4 * (g & 1))) & 15;
  }
};

// x (B x K, any float type) in code order, fp32: xq[b][c] multiplies code c, which is input column perm[c]
// (perm may be null); for 4 bits, the code in the low nibble of byte j of each 16 lands at j and the one in
// the high nibble at 16 + j (code 2j low for the uniform formats, code 2j + 1 low for NF4).
template <typename X>
inline void arrange_input(const X* x, int64_t B, int64_t K, const QuantMatrix& m, const int32_t* perm, float* xq) {
  const int64_t high = m.levels ? 0 : 1;  // the parity of the codes in the high nibbles
  for (int64_t b = 0; b < B; b++, x += K, xq += K)
    for (int64_t c0 = 0; c0 < K; c0 += kQuantBlock)
      for (int64_t j = 0; j < kQuantBlock; j++) {
        const int64_t c = c0 + j, at = m.bits == 4 ? c0 + (j % 2 == high ? 16 + j / 2 : j / 2) : c;
        xq[at] = static_cast<float>(x[perm ? perm[c] : c]);
      }
}

// code - zero for every 4-bit zero (row) and code (column), so a group's table costs one load and a multiply.
struct CodeMinusZero {
  alignas(64) float v[16][16];
  CodeMinusZero() {
    for (int z = 0; z < 16; z++)
      for (int c = 0; c < 16; c++) v[z][c] = static_cast<float>(c - z);
  }
};
inline const CodeMinusZero kCodeMinusZero;

// What one row of a group needs to decode its codes: for 8 bits the zero and the scale, for 4 bits the 16
// possible weights, scale * (code - zero) or scale * levels[code] (exact as dequantize() computes them),
// looked up by code.
template <int BITS>
struct GroupDecoder {
  __m512i zero;
  __m512 scale;  // BITS == 8: broadcast scale; BITS == 4: the table of the 16 weights
  GroupDecoder() = default;
  GroupDecoder(const QuantMatrix& m, int64_t n, int64_t g) {
    if constexpr (BITS == 4) {
      const float* values = m.levels ? m.levels : kCodeMinusZero.v[m.zero(n, g)];
      scale = _mm512_mul_ps(_mm512_set1_ps(m.scale(n, g)), _mm512_loadu_ps(values));
    } else {
      zero = _mm512_set1_epi32(m.zero(n, g));
      scale = _mm512_set1_ps(m.scale(n, g));
    }
  }
  // The 32 weights of a row from code c (a multiple of 32) as two fp32 vectors, in code order (for 4 bits:
  // the low nibbles' codes, then the high nibbles').
  void decode32(const uint8_t* row, int64_t c, __m512* w) const {
    if constexpr (BITS == 8) {
      const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c)));
      const __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c + 16)));
      w[0] = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, zero)));
      w[1] = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, zero)));
    } else {
      const __m512i both = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
      w[0] = _mm512_permutexvar_ps(_mm512_and_si512(both, _mm512_set1_epi32(15)), scale);  // low nibbles
      w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(both, 4), scale);                      // high nibbles
    }
  }
};

// R weight rows from r against BT rows of xq: each 32-code slice of a row is decoded once for the BT rows.
template <int BITS, int R, int BT, typename Out>
inline void qgemm_tile(const QuantMatrix& m, const float* xq, Out* y, int64_t r, int64_t ldy) {
  const int64_t K = m.K, group = m.group(), rb = m.row_bytes();
  const uint8_t* rows = m.codes + r * rb;
  __m512 acc[BT][R];
  for (int b = 0; b < BT; b++)
    for (int i = 0; i < R; i++) acc[b][i] = _mm512_setzero_ps();
  for (int64_t g = 0, c0 = 0; g < m.G; g++, c0 += group) {
    GroupDecoder<BITS> dec[R];
    for (int i = 0; i < R; i++) dec[i] = GroupDecoder<BITS>(m, r + i, g);
    // The rows inside the loop over codes: R independent accumulator chains hide the FMA latency.
    for (int64_t c = c0; c < c0 + group; c += kQuantBlock) {
      for (int i = 0; i < R; i++) {
        const uint8_t* row = rows + i * rb;
        _mm_prefetch(reinterpret_cast<const char*>(row + c * BITS / 8) + kPrefetchBytes, _MM_HINT_T0);
        __m512 w[2];
        dec[i].decode32(row, c, w);
        for (int b = 0; b < BT; b++) {
          acc[b][i] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xq + b * K + c), acc[b][i]);
          acc[b][i] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xq + b * K + c + 16), acc[b][i]);
        }
      }
    }
  }
  for (int b = 0; b < BT; b++) store_rows<R>(acc[b], y + b * ldy + r);
}

template <int BITS, typename Out>
inline void qgemm_rows_bits(const QuantMatrix& m, const float* xq, Out* y, int64_t r0, int64_t r1, int64_t B,
                            int64_t ldy) {
  const int64_t bulk = r0 + (r1 - r0) / kRows * kRows;
  const auto rows = [&](auto r_count, int64_t r) {  // R = kRows for the bulk, 1 for the last rows
    batch_tiles(B, [&](auto bt, int64_t b) {
      qgemm_tile<BITS, decltype(r_count)::value, decltype(bt)::value>(m, xq + b * m.K, y + b * ldy, r, ldy);
    });
  };
  for (int64_t r = r0; r < bulk; r += kRows) rows(std::integral_constant<int, kRows>{}, r);
  for (int64_t r = bulk; r < r1; r++) rows(std::integral_constant<int, 1>{}, r);
}

// Rows [r0, r1) of Y = X @ W^T for B rows of xq (from arrange_input); row b of Y starts at y + b * ldy.
template <typename Out>
inline void qgemm_rows(const QuantMatrix& m, const float* xq, Out* y, int64_t r0, int64_t r1, int64_t B,
                       int64_t ldy) {
  if (m.bits == 8)
    qgemm_rows_bits<8>(m, xq, y, r0, r1, B, ldy);
  else
    qgemm_rows_bits<4>(m, xq, y, r0, r1, B, ldy);
}

}  // namespace llamalab
