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
// the scales: W[n, k] = scales[n, k / group] * levels[codes[n, k]]. GGUF's Q4_0 / Q4_1 / Q8_0 blocks
// (llamalab/quant/gguf_linear.py) are the same layout with groups of 32 and fp16 scales: no zeros (Q4_0's
// zero is 8), fp16 mins in their place (Q4_1: W = scale * code + min), or signed 8-bit codes (Q8_0); Q4_K
// (its codes in this pairs order) holds its scales and mins two-level (ScaleType::kSuperU8 below), and Q6_K
// (its codes widened to signed bytes) its scales of groups of 16 (kSuperI8).
//
// Two paths: the exact one first (below), and the integer path (8-bit activations, further down), which the
// callers choose by default for decode.
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

namespace llamalab {

constexpr int64_t kQuantBlock = 32;  // codes decoded per step: K and the group size must be multiples of it,
constexpr int64_t kHalfBlock = 16;   // except GGUF Q6_K's groups of 16 (8-bit codes only: two groups a step)

// How a matrix's (N, G) per-group scales (and mins) are held: fp32, bf16, fp16 (GGUF's block scales, as
// stored), or as GGUF's K-quants hold them, two-level: per row the G 8-bit group values, then the fp16 scale
// of each super-block of 256 weights; a group's value is super * sub, exact in fp32 (an fp16 times an
// integer of at most 8 bits). kSuperU8: unsigned values, 8 groups of 32 a super-block (Q4_K); kSuperI8:
// signed values, 16 groups of 16 (Q6_K).
enum class ScaleType : uint8_t { kF32, kBF16, kF16, kSuperU8, kSuperI8 };
constexpr int64_t kSuperGroups = 8;  // Q4_K: super-blocks of 256 weights, 8 groups of 32
constexpr int64_t super_groups(ScaleType t) { return t == ScaleType::kSuperI8 ? 16 : kSuperGroups; }

struct QuantMatrix {
  const uint8_t* codes;
  const void* scales;  // of ScaleType
  ScaleType scale_type;
  const uint8_t* zeros;   // uniform formats: packed integer zeros per group (or null, then `const_zero`)
  const float* levels;    // NF4: the 16 code values (then zeros is null and codes come high nibble first)
  const void* mins;       // GGUF Q4_1: W = scale * code + min per group, min of the scales' type
  int64_t N, K, G, bits;
  int32_t const_zero = 0;     // the zero of every group when `zeros` is null (GGUF Q4_0: 8)
  bool signed_codes = false;  // 8-bit two's-complement codes (GGUF Q8_0): W = scale * code

  int64_t row_bytes() const { return K * bits / 8; }
  int64_t zero_row_bytes() const { return bits == 8 ? G : (G + 1) / 2; }
  int64_t group() const { return K / G; }
  // Groups decoded per step of kQuantBlock codes on the exact path: 2 for groups of 16, else 1.
  int64_t groups_per_step() const { return std::max<int64_t>(1, kQuantBlock / group()); }
  // Bytes of a row of two-level scales: G group values, then one fp16 super-scale per super-block.
  static int64_t super_row_bytes(int64_t G, ScaleType t) { return G + 2 * (G / super_groups(t)); }
  // Group g's value in row n of (N, G) scales or mins `p` of type t.
  static float read(const void* p, ScaleType t, int64_t G, int64_t n, int64_t g) {
    switch (t) {
      case ScaleType::kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[n * G + g]);
      case ScaleType::kF16: return _cvtsh_ss(static_cast<const uint16_t*>(p)[n * G + g]);
      case ScaleType::kSuperU8:
      case ScaleType::kSuperI8: {
        const uint8_t* row = static_cast<const uint8_t*>(p) + n * super_row_bytes(G, t);
        uint16_t super;
        std::memcpy(&super, row + G + 2 * (g / super_groups(t)), 2);
        const float sub = t == ScaleType::kSuperI8 ? static_cast<int8_t>(row[g]) : row[g];
        return _cvtsh_ss(super) * sub;
      }
      default: return static_cast<const float*>(p)[n * G + g];
    }
  }
  float scale(int64_t n, int64_t g) const { return read(scales, scale_type, G, n, g); }
  float min(int64_t n, int64_t g) const { return read(mins, scale_type, G, n, g); }
  int32_t zero(int64_t n, int64_t g) const {
    if (!zeros) return const_zero;
    const uint8_t* z = zeros + n * zero_row_bytes();
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
template <int BITS, bool SIGNED = false>
struct GroupDecoder {
  __m512i zero;
  __m512 scale;     // BITS == 8: broadcast scale; BITS == 4: the table of the 16 weights
  __m512 scale_hi;  // BITS == 8: the scale of codes 16..31 of a step (g's, or g + 1's for groups of 16)
  GroupDecoder() = default;
  GroupDecoder(const QuantMatrix& m, int64_t n, int64_t g, int64_t g_hi) {
    if constexpr (BITS == 4) {
      const __m512 s = _mm512_set1_ps(m.scale(n, g));
      if (m.mins)  // scale * code + min, one rounding as GGUFLinear.dequantize() (scale * code is exact)
        scale = _mm512_fmadd_ps(s, _mm512_loadu_ps(kCodeMinusZero.v[0]), _mm512_set1_ps(m.min(n, g)));
      else
        scale = _mm512_mul_ps(s, _mm512_loadu_ps(m.levels ? m.levels : kCodeMinusZero.v[m.zero(n, g)]));
    } else {
      zero = _mm512_set1_epi32(m.zero(n, g));
      scale = _mm512_set1_ps(m.scale(n, g));
      scale_hi = g_hi == g ? scale : _mm512_set1_ps(m.scale(n, g_hi));
    }
  }
  // The 32 weights of a row from code c (a multiple of 32) as two fp32 vectors, in code order (for 4 bits:
  // the low nibbles' codes, then the high nibbles').
  void decode32(const uint8_t* row, int64_t c, __m512* w) const {
    if constexpr (BITS == 8) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c + 16));
      const __m512i lo = SIGNED ? _mm512_cvtepi8_epi32(a) : _mm512_cvtepu8_epi32(a);
      const __m512i hi = SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
      w[0] = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, zero)));
      w[1] = _mm512_mul_ps(scale_hi, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, zero)));
    } else {
      const __m512i both = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
      w[0] = _mm512_permutexvar_ps(_mm512_and_si512(both, _mm512_set1_epi32(15)), scale);  // low nibbles
      w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(both, 4), scale);                      // high nibbles
    }
  }
};

// R weight rows from r against BT rows of xq: each 32-code slice of a row is decoded once for the BT rows.
template <int BITS, bool SIGNED, int R, int BT, typename Out>
inline void qgemm_tile(const QuantMatrix& m, const float* xq, Out* y, int64_t r, int64_t ldy) {
  const int64_t K = m.K, group = m.group(), rb = m.row_bytes();
  const uint8_t* rows = m.codes + r * rb;
  __m512 acc[BT][R];
  for (int b = 0; b < BT; b++)
    for (int i = 0; i < R; i++) acc[b][i] = _mm512_setzero_ps();
  const int64_t per = m.groups_per_step(), span = per * group;
  for (int64_t g = 0, c0 = 0; g < m.G; g += per, c0 += span) {
    GroupDecoder<BITS, SIGNED> dec[R];
    for (int i = 0; i < R; i++) dec[i] = GroupDecoder<BITS, SIGNED>(m, r + i, g, g + per - 1);
    // The rows inside the loop over codes: R independent accumulator chains hide the FMA latency.
    for (int64_t c = c0; c < c0 + span; c += kQuantBlock) {
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

// Calls tile(R, BT, r, b), R and BT as std::integral_constant, over the weight rows [r0, r1) in blocks of R =
// kRows (then R = 1 for the last rows), each over the batch's tiles of BT rows of X from row b.
template <typename Tile>
inline void row_tiles(int64_t r0, int64_t r1, int64_t B, Tile&& tile) {
  const int64_t bulk = r0 + (r1 - r0) / kRows * kRows;
  const auto rows = [&](auto r_count, int64_t r) {
    batch_tiles(B, [&](auto bt, int64_t b) { tile(r_count, bt, r, b); });
  };
  for (int64_t r = r0; r < bulk; r += kRows) rows(std::integral_constant<int, kRows>{}, r);
  for (int64_t r = bulk; r < r1; r++) rows(std::integral_constant<int, 1>{}, r);
}

template <int BITS, bool SIGNED, typename Out>
inline void qgemm_rows_bits(const QuantMatrix& m, const float* xq, Out* y, int64_t r0, int64_t r1, int64_t B,
                            int64_t ldy) {
  row_tiles(r0, r1, B, [&](auto R, auto BT, int64_t r, int64_t b) {
    qgemm_tile<BITS, SIGNED, decltype(R)::value, decltype(BT)::value>(m, xq + b * m.K, y + b * ldy, r, ldy);
  });
}

// Rows [r0, r1) of Y = X @ W^T for B rows of xq (from arrange_input); row b of Y starts at y + b * ldy.
template <typename Out>
inline void qgemm_rows(const QuantMatrix& m, const float* xq, Out* y, int64_t r0, int64_t r1, int64_t B,
                       int64_t ldy) {
  if (m.bits == 4)
    qgemm_rows_bits<4, false>(m, xq, y, r0, r1, B, ldy);
  else if (m.signed_codes)
    qgemm_rows_bits<8, true>(m, xq, y, r0, r1, B, ldy);
  else
    qgemm_rows_bits<8, false>(m, xq, y, r0, r1, B, ldy);
}

// ---- The integer path: 8-bit activations, integer dot products (VPDPBUSD) --------------------------------
//
// As llama.cpp multiplies Q4_0/Q8_0 weights: each 32 codes of x (in code order) are quantized to int8 with
// their own scale, sx = max|x| / 127 (Q8_0's activation blocks, rounded to nearest even). Per block of 32,
//   sum(w * x) ~ scale * sx * sum((code - zero) * xq)         (integer zeros, Q4_0's 8, Q8_0's signed codes)
//             or scale * sx * sum(code * xq) + min * sx * sum(xq)                                 (Q4_1)
// The codes are never converted to floats: one VPDPBUSD multiplies 64 unsigned codes with 64 int8
// activations into 16 int32 sums of 4, starting from -zero * sum(xq) where one zero serves every group (Q4_0's
// 8, symmetric formats; one multiply a chunk for all the rows of a tile), else with a second VPDPBUSD adding
// zero times -xq (integer zeros per group); then each lane is converted and scaled. Signed 8-bit codes enter
// as code + 128 with zero 128 (VPDPBUSD multiplies unsigned by signed bytes). It is not exact: the
// activations' rounding costs about what llama.cpp's does (reported by benchmarks/quant_decode.py as
// teacher-forced agreement); the float path above stays the exact one.
// A group's scale, zero or min is taken from a vector of 16 groups' values loaded once per row (a lane
// permute per group instead of scalar loads, conversions and broadcasts, which had cost as much as the dot
// products). benchmarks/quant_gemv.py, one 12288 x 1536 matrix, 1 thread: int8 per channel 36 G weights/s
// against 16 on the exact path, int4 g64 26 against 17, GGUF Q4_0 27 against 10.
//
// x is prepared once per call (`quantize_input`) into, per row and per 64 codes ("chunk"): the per-lane
// activation scale sx of the block each int32 lane sums; the 64 int8 activations in the order the weight
// bytes come out of a row (4 bits: the low nibbles of 32 bytes, then their high nibbles) and their negations;
// per lane sx * (the sum of its 4 activations), which a min multiplies; and that sum itself, which a zero
// shared by every group (Q4_0's 8, Q8_0's 128 after the sign flip) multiplies once per chunk for all rows.

constexpr int64_t kChunk = 64;  // codes per VPDPBUSD

// Whether the integer path takes a matrix: not NF4 (its levels are not integers), and groups that tile the
// 64-code chunks (16 with 8-bit codes, 32, or multiples of 64) so a chunk never straddles groups unevenly;
// the rest (e.g. per channel over 160 columns) takes the exact path.
inline bool integer_path_fits(const QuantMatrix& m) {
  return !m.levels && ((m.group() == kHalfBlock && m.bits == 8) || m.group() == kQuantBlock ||
                       m.group() % kChunk == 0);
}

inline int64_t chunks(int64_t K) { return (K + kChunk - 1) / kChunk; }
// xs, xq, -xq, xl and the lanes' sums of xq (int32): 16 floats a chunk each
inline int64_t q8_row_floats(int64_t K) { return chunks(K) * 80; }

// The chunk-relative code at byte p of the vector a chunk's weights are loaded into.
constexpr int64_t chunk_code(int64_t bits, int64_t p) { return bits == 8 ? p : (p < 32 ? 2 * p : 2 * (p - 32) + 1); }

// The int32 lanes whose 4 products come from the chunk's second block of 32 codes.
constexpr __mmask16 second_block_lanes(int64_t bits) {
  __mmask16 m = 0;
  for (int l = 0; l < 16; l++)
    if (chunk_code(bits, 4 * l) >= 32) m |= static_cast<__mmask16>(1u << l);
  return m;
}

inline __m512 load_floats(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_floats(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <typename X>
inline void quantize_input(const X* x, int64_t B, const QuantMatrix& m, const int32_t* perm, float* out) {
  const int64_t K = m.K, nc = chunks(K);
  const __mmask16 second = second_block_lanes(m.bits);
  // 4 bits: the even codes of a chunk's 2 x 16 int32 lanes, then the odd ones (see chunk_code)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t b = 0; b < B; b++, x += K, out += q8_row_floats(K)) {
    float *xs = out, *xl = out + nc * 48;
    int8_t* xq = reinterpret_cast<int8_t*>(out + nc * 16);
    int8_t* neg = reinterpret_cast<int8_t*>(out + nc * 32);
    int32_t* sums = reinterpret_cast<int32_t*>(out + nc * 64);
    for (int64_t ch = 0; ch < nc; ch++) {
      const int64_t c0 = ch * kChunk, n = std::min<int64_t>(kChunk, K - c0);  // n: 64, or 32 at the end
      __m512 v[4];
      for (int j = 0; j < 4; j++) {
        if (16 * j >= n) {
          v[j] = _mm512_setzero_ps();
        } else if (perm) {
          alignas(64) float g[16];
          for (int e = 0; e < 16; e++) g[e] = static_cast<float>(x[perm[c0 + 16 * j + e]]);
          v[j] = _mm512_load_ps(g);
        } else {
          v[j] = load_floats(x + c0 + 16 * j);
        }
      }
      float sx[2];
      __m512i q[4];
      for (int blk = 0; blk < 2; blk++) {
        const float amax = _mm512_reduce_max_ps(
            _mm512_max_ps(_mm512_abs_ps(v[2 * blk]), _mm512_abs_ps(v[2 * blk + 1])));
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        sx[blk] = amax / 127.f;
        for (int j = 2 * blk; j < 2 * blk + 2; j++) q[j] = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], inv));  // nearest even
      }
      __m128i bytes[4];
      if (m.bits == 4) {
        bytes[0] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[0], even, q[1]));
        bytes[1] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[2], even, q[3]));
        bytes[2] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[0], odd, q[1]));
        bytes[3] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[2], odd, q[3]));
      } else {
        for (int j = 0; j < 4; j++) bytes[j] = _mm512_cvtsepi32_epi8(q[j]);
      }
      const __m512i packed = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set_m128i(bytes[1], bytes[0])), _mm256_set_m128i(bytes[3], bytes[2]), 1);
      _mm512_storeu_si512(xq + ch * kChunk, packed);
      _mm512_storeu_si512(neg + ch * kChunk, _mm512_sub_epi8(_mm512_setzero_si512(), packed));
      const __m512 scales = _mm512_mask_blend_ps(second, _mm512_set1_ps(sx[0]), _mm512_set1_ps(sx[1]));
      _mm512_storeu_ps(xs + ch * 16, scales);
      const __m512i lane_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), packed);
      _mm512_storeu_ps(xl + ch * 16, _mm512_mul_ps(scales, _mm512_cvtepi32_ps(lane_sums)));
      _mm512_storeu_si512(sums + ch * 16, lane_sums);
    }
  }
}

// The 64 codes of a row's chunk from code c0 as unsigned bytes in chunk order (see chunk_code); past K (a
// last chunk of 32) the bytes read as 0.
template <int BITS, bool SIGNED>
inline __m512i load_chunk(const uint8_t* row, int64_t c0, int64_t K) {
  const bool full = c0 + kChunk <= K;
  if constexpr (BITS == 4) {
    // the 32 bytes in both halves of the vector, the high nibbles shifted down in the upper half
    const uint8_t* p = row + c0 / 2;
    const __m512i bytes = full ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
                               : _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(0xFFFF, p));
    const __m512i shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
    return _mm512_and_si512(_mm512_srlv_epi64(bytes, shift), _mm512_set1_epi8(15));
  } else {
    const uint8_t* p = row + c0;
    const __m512i bytes = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p);
    return SIGNED ? _mm512_xor_si512(bytes, _mm512_set1_epi8(static_cast<char>(0x80))) : bytes;
  }
}

// 16 consecutive groups' scales (or mins) of row n from group g0, as fp32 lanes (lanes past G read 0).
inline __m512 load_group_values(const void* base, ScaleType type, int64_t n, int64_t G, int64_t g0) {
  const int64_t count = std::min<int64_t>(16, G - g0);
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  const int64_t at = n * G + g0;
  switch (type) {
    case ScaleType::kSuperI8: {  // g0 is a multiple of 16: the 16 groups are super-block g0 / 16
      const uint8_t* row = static_cast<const uint8_t*>(base) + n * QuantMatrix::super_row_bytes(G, type);
      const __m512 sub = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row + g0)));
      uint16_t super;
      std::memcpy(&super, row + G + 2 * (g0 / super_groups(type)), 2);
      return _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(super)), sub);
    }
    case ScaleType::kSuperU8: {  // g0 is a multiple of 16: the 16 groups lie in super-blocks g0 / 8 and the next
      const uint8_t* row = static_cast<const uint8_t*>(base) + n * QuantMatrix::super_row_bytes(G, type);
      const __m512 sub = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, row + g0)));
      const int64_t s0 = g0 / kSuperGroups, supers = std::min<int64_t>(2, G / kSuperGroups - s0);
      const __m128i raw = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << supers) - 1), row + G + 2 * s0);
      const __m512 super = _mm512_cvtph_ps(_mm256_castsi128_si256(raw));
      const __m512i which = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      return _mm512_mul_ps(_mm512_permutexvar_ps(which, super), sub);
    }
    case ScaleType::kF32: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + at);
    case ScaleType::kBF16: {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + at);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    default: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + at));
  }
}

// 16 consecutive groups' integer zeros of row n from group g0, each lane the zero's byte 4 times (so that a
// lane broadcast gives the zero in every byte).
inline __m512i load_group_zeros(const QuantMatrix& m, int64_t n, int64_t g0) {
  const int64_t count = std::min<int64_t>(16, m.G - g0);
  const uint8_t* z = m.zeros + n * m.zero_row_bytes();
  __m512i lanes;
  if (m.bits == 8) {
    lanes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << count) - 1), z + g0));
  } else {  // two zeros a byte, the even group's in the low nibble (g0 is a multiple of 16)
    const __m512i bytes = _mm512_cvtepu8_epi32(
        _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((count + 1) / 2)) - 1), z + g0 / 2));
    const __m512i half = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    lanes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(half, bytes), shift), _mm512_set1_epi32(15));
  }
  return _mm512_mullo_epi32(lanes, _mm512_set1_epi32(0x01010101));
}

// What a row adds to its codes' products: a zero shared by every group (subtracted as zero * sum(xq), once a
// chunk for all the tile's rows), integer zeros per group (a second VPDPBUSD with -xq), or GGUF Q4_1's mins.
enum class Offset { kSharedZero, kGroupZeros, kMins };

// R weight rows from r against BT rows of prepared activations (quantize_input, row stride q8_row_floats).
// A step covers one group (groups of 64 codes or more share a row's scale and zero over their chunks) or, for
// groups of 32, one chunk holding two groups (their scales, zeros or mins blended by lane).
template <int BITS, bool SIGNED, Offset OFFSET, int R, int BT, typename Out>
inline void qgemm_q8_tile(const QuantMatrix& m, const float* xa, Out* y, int64_t r, int64_t ldy) {
  constexpr bool MINS = OFFSET == Offset::kMins, GROUP_ZEROS = OFFSET == Offset::kGroupZeros;
  const int64_t K = m.K, nc = chunks(K), group = m.group(), rb = m.row_bytes(), stride = q8_row_floats(K);
  // Groups of 32: two per chunk (a lane's block says which); of 16 (8-bit codes in element order): four, lane
  // l holding codes 4l..4l+3 of group l / 4.
  const bool pairs = group == kQuantBlock, quads = group == kHalfBlock;
  const int64_t step_groups = quads ? 4 : pairs ? 2 : 1, step_chunks = pairs || quads ? 1 : group / kChunk;
  constexpr __mmask16 second = second_block_lanes(BITS);
  const __m512i minus_zero = _mm512_set1_epi32(-(m.const_zero + (SIGNED ? 128 : 0)));
  const uint8_t* rows = m.codes + r * rb;
  __m512 acc[BT][R];
  for (int b = 0; b < BT; b++)
    for (int i = 0; i < R; i++) acc[b][i] = _mm512_setzero_ps();
  __m512 window_scales[R], window_mins[R];  // 16 groups' values per row, from the multiple of 16 below g
  __m512i window_zeros[R];
  for (int64_t g = 0, ch = 0; g < m.G; g += step_groups) {
    if (g % 16 == 0)
      for (int i = 0; i < R; i++) {
        window_scales[i] = load_group_values(m.scales, m.scale_type, r + i, m.G, g);
        if constexpr (MINS) window_mins[i] = load_group_values(m.mins, m.scale_type, r + i, m.G, g);
        if constexpr (GROUP_ZEROS) window_zeros[i] = load_group_zeros(m, r + i, g);
      }
    // each lane takes its block's group: g, or for groups of 32 in the chunk's second block g + 1
    __m512i lane_group = _mm512_set1_epi32(static_cast<int>(g % 16));
    if (pairs && g + 1 < m.G) lane_group = _mm512_mask_add_epi32(lane_group, second, lane_group, _mm512_set1_epi32(1));
    if (quads) lane_group = _mm512_add_epi32(lane_group, _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3,
                                                                           3, 3));
    __m512 scale[R], mins[R];
    __m512i zero[R];
    for (int i = 0; i < R; i++) {
      scale[i] = _mm512_permutexvar_ps(lane_group, window_scales[i]);
      if constexpr (MINS) mins[i] = _mm512_permutexvar_ps(lane_group, window_mins[i]);
      if constexpr (GROUP_ZEROS) zero[i] = _mm512_permutexvar_epi32(lane_group, window_zeros[i]);
    }
    for (const int64_t ch_end = std::min(nc, ch + step_chunks); ch < ch_end; ch++) {
      const int64_t c0 = ch * kChunk;
      __m512i start[BT];  // where each lane's integer sum starts: -zero * sum(xq) for a shared zero
      for (int b = 0; b < BT; b++)
        start[b] = GROUP_ZEROS || MINS
                       ? _mm512_setzero_si512()
                       : _mm512_mullo_epi32(minus_zero, _mm512_loadu_si512(xa + b * stride + nc * 64 + ch * 16));
      for (int i = 0; i < R; i++) {
        const uint8_t* row = rows + i * rb;
        if (BITS == 8 || ch % 2 == 0)  // once per 64-byte line
          _mm_prefetch(reinterpret_cast<const char*>(row + c0 * BITS / 8) + kPrefetchBytes, _MM_HINT_T0);
        const __m512i w = load_chunk<BITS, SIGNED>(row, c0, K);
        for (int b = 0; b < BT; b++) {
          const float* xb = xa + b * stride + ch * 16;
          __m512i dot = _mm512_dpbusd_epi32(start[b], w, _mm512_loadu_si512(xb + nc * 16));
          if constexpr (GROUP_ZEROS) dot = _mm512_dpbusd_epi32(dot, zero[i], _mm512_loadu_si512(xb + nc * 32));
          const __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(xb));
          acc[b][i] = _mm512_fmadd_ps(part, scale[i], acc[b][i]);
          if constexpr (MINS) acc[b][i] = _mm512_fmadd_ps(mins[i], _mm512_loadu_ps(xb + nc * 48), acc[b][i]);
        }
      }
    }
  }
  for (int b = 0; b < BT; b++) store_rows<R>(acc[b], y + b * ldy + r);
}

template <int BITS, bool SIGNED, Offset OFFSET, typename Out>
inline void qgemm_q8_rows_bits(const QuantMatrix& m, const float* xa, Out* y, int64_t r0, int64_t r1, int64_t B,
                               int64_t ldy) {
  const int64_t stride = q8_row_floats(m.K);
  row_tiles(r0, r1, B, [&](auto R, auto BT, int64_t r, int64_t b) {
    qgemm_q8_tile<BITS, SIGNED, OFFSET, decltype(R)::value, decltype(BT)::value>(m, xa + b * stride, y + b * ldy,
                                                                                r, ldy);
  });
}

// Rows [r0, r1) of Y = X @ W^T on the integer path, for B rows prepared by quantize_input. Not for NF4.
template <typename Out>
inline void qgemm_q8_rows(const QuantMatrix& m, const float* xa, Out* y, int64_t r0, int64_t r1, int64_t B,
                          int64_t ldy) {
  if (m.bits == 4 && m.mins)
    qgemm_q8_rows_bits<4, false, Offset::kMins>(m, xa, y, r0, r1, B, ldy);
  else if (m.bits == 4 && m.zeros)
    qgemm_q8_rows_bits<4, false, Offset::kGroupZeros>(m, xa, y, r0, r1, B, ldy);
  else if (m.bits == 4)
    qgemm_q8_rows_bits<4, false, Offset::kSharedZero>(m, xa, y, r0, r1, B, ldy);
  else if (m.signed_codes)
    qgemm_q8_rows_bits<8, true, Offset::kSharedZero>(m, xa, y, r0, r1, B, ldy);
  else if (m.zeros)
    qgemm_q8_rows_bits<8, false, Offset::kGroupZeros>(m, xa, y, r0, r1, B, ldy);
  else
    qgemm_q8_rows_bits<8, false, Offset::kSharedZero>(m, xa, y, r0, r1, B, ldy);
}

}  // namespace llamalab
