// Batch-1 matrix-vector products for CPU decode: y = W @ x with a bf16 (or fp32) weight W (N x K, row-major).
// Shared by the GEMV op (gemv.cpp) and the fused decode step (decode_step.cpp).
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

#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace llamalab {

constexpr int64_t kRows = 4;                  // rows per step (shares each load of x)
constexpr int64_t kPrefetchBytes = 12 * 1024; // how far ahead in W to prefetch (see above)
constexpr int64_t kGrainBytes = 32 * 1024;    // a thread's smallest share of W: below it a fork costs more

inline void store(float v, c10::BFloat16* y) { *y = c10::BFloat16(v); }  // round to nearest even
inline void store(float v, float* y) { *y = v; }

// The horizontal sums of four accumulators, stored to y[0..3]. One `_mm512_reduce_add_ps` per row costs
// ~12 instructions, as much as the dot product itself when rows are short (attention's 64-wide keys);
// summing four at once through hadd costs ~5 a row.
template <typename Out>
inline void store_sums(const __m512* acc, Out* y) {
  __m256 half[4];
  for (int i = 0; i < 4; i++)
    half[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1)));
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
  alignas(16) float sums[4];
  _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  for (int i = 0; i < 4; i++) store(sums[i], y + i);
}

template <int R, typename Out>
inline void store_rows(const __m512* acc, Out* y) {
  if constexpr (R == 4) {
    store_sums(acc, y);
  } else {
    for (int i = 0; i < R; i++) store(_mm512_reduce_add_ps(acc[i]), y + i);
  }
}

// What differs between a bf16 weight (its bits as uint16_t) and an fp32 one, x always of the same type: how
// many values fill a 64-byte vector, how the last partial vector is masked and loaded, and the multiply-add
// (VDPBF16PS on pairs of bf16 with fp32 accumulation, or FMA).
template <typename W>
struct Lanes;

template <>
struct Lanes<uint16_t> {
  static constexpr int64_t kStep = 32;
  using Vec = __m512bh;
  using Mask = __mmask32;
  static Mask tail(int64_t n) { return static_cast<Mask>((1ull << n) - 1); }
  static Vec load(const uint16_t* p) { return (Vec)_mm512_loadu_si512(p); }
  static Vec load(Mask m, const uint16_t* p) { return (Vec)_mm512_maskz_loadu_epi16(m, p); }
  static __m512 madd(__m512 acc, Vec w, Vec x) { return _mm512_dpbf16_ps(acc, w, x); }
};

template <>
struct Lanes<float> {
  static constexpr int64_t kStep = 16;
  using Vec = __m512;
  using Mask = __mmask16;
  static Mask tail(int64_t n) { return static_cast<Mask>((1u << n) - 1); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 madd(__m512 acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
};

// y[r0:r1] = W[r0:r1] @ x with R rows per step (R = kRows for the bulk, 1 for the last N % kRows rows), W and
// x both bf16 (uint16_t bits) or both fp32. K need not be a multiple of the vector: the last partial slice is
// read with a mask, so it loads zeros past the end of the row instead of the next row's first elements.
template <int R, typename W, typename Out>
inline void gemv_rows(const W* w, const W* x, Out* y, int64_t r0, int64_t r1, int64_t K) {
  using L = Lanes<W>;
  const int64_t Kv = K / L::kStep * L::kStep;
  const typename L::Mask tail = L::tail(K - Kv);
  for (int64_t r = r0; r + R <= r1; r += R) {
    const W* wr = w + r * K;
    __m512 acc[R];
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < Kv; k += L::kStep) {
      const typename L::Vec xv = L::load(x + k);
      for (int i = 0; i < R; i++) {
        const W* p = wr + i * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
        acc[i] = L::madd(acc[i], L::load(p), xv);
      }
    }
    if (tail) {
      const typename L::Vec xv = L::load(tail, x + k);
      for (int i = 0; i < R; i++) acc[i] = L::madd(acc[i], L::load(tail, wr + i * K + k), xv);
    }
    store_rows<R>(acc, y + r);
  }
}

// Tiles of gemm_rows: kRows weight rows against BT rows of X, each weight slice loaded once for the BT rows
// (16 accumulators for BT = 4). Per (weight row, X row) the sums run in exactly gemv_rows<kRows>' order.
template <int BT, typename W, typename Out>
inline void gemm_tile(const W* w, const W* x, Out* y, int64_t r, int64_t K, int64_t ldy) {
  using L = Lanes<W>;
  const int64_t Kv = K / L::kStep * L::kStep;
  const typename L::Mask tail = L::tail(K - Kv);
  const W* wr = w + r * K;
  __m512 acc[BT][kRows];
  for (int b = 0; b < BT; b++)
    for (int i = 0; i < kRows; i++) acc[b][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < Kv; k += L::kStep) {
    typename L::Vec wv[kRows];
    for (int i = 0; i < kRows; i++) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + i * K + k) + kPrefetchBytes, _MM_HINT_T0);
      wv[i] = L::load(wr + i * K + k);
    }
    for (int b = 0; b < BT; b++) {
      const typename L::Vec xv = L::load(x + b * K + k);
      for (int i = 0; i < kRows; i++) acc[b][i] = L::madd(acc[b][i], wv[i], xv);
    }
  }
  if (tail) {
    typename L::Vec wv[kRows];
    for (int i = 0; i < kRows; i++) wv[i] = L::load(tail, wr + i * K + k);
    for (int b = 0; b < BT; b++) {
      const typename L::Vec xv = L::load(tail, x + b * K + k);
      for (int i = 0; i < kRows; i++) acc[b][i] = L::madd(acc[b][i], wv[i], xv);
    }
  }
  for (int b = 0; b < BT; b++) store_sums(acc[b], y + b * ldy + r);
}

// Calls tile(std::integral_constant<int, BT>{}, b) over the rows of a batch of B: tiles of BT = 4 rows from
// b = 0, then one tile of the 3, 2 or 1 left (the tile functions take BT as a template argument, so their
// accumulators stay in registers).
template <typename Tile>
inline void batch_tiles(int64_t B, Tile&& tile) {
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) tile(std::integral_constant<int, 4>{}, b);
  switch (B - b) {
    case 3: tile(std::integral_constant<int, 3>{}, b); break;
    case 2: tile(std::integral_constant<int, 2>{}, b); break;
    case 1: tile(std::integral_constant<int, 1>{}, b); break;
    default: break;
  }
}

// Rows [r0, r1) of Y = X @ W^T for a few rows of X (B x K) at once (a batch of decode tokens); row b of Y
// starts at y + b * ldy. Each block of kRows weight rows is read once and used for every row of X, so a
// batch costs about one GEMV's memory traffic; each output is summed exactly as `gemv` sums it, so a row's
// result does not depend on the batch it is in.
template <typename W, typename Out>
inline void gemm_rows(const W* w, const W* x, Out* y, int64_t r0, int64_t r1, int64_t K, int64_t B, int64_t ldy) {
  const int64_t bulk = r0 + (r1 - r0) / kRows * kRows;
  for (int64_t r = r0; r < bulk; r += kRows)
    batch_tiles(B, [&](auto bt, int64_t b) {
      gemm_tile<decltype(bt)::value>(w, x + b * K, y + b * ldy, r, K, ldy);
    });
  for (int64_t b = 0; b < B; b++) gemv_rows<1>(w, x + b * K, y + b * ldy, bulk, r1, K);
}

// y = W @ x over all N rows, split in contiguous row ranges between threads. W and x are uint16_t (bf16 bits)
// or float. (A batch of one through gemm_rows: gemm_tile<1> sums exactly as gemv_rows<kRows>.)
template <typename W, typename Out>
inline void gemv(const W* w, const W* x, Out* y, int64_t N, int64_t K) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (kRows * K * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    gemm_rows(w, x, y, b0 * kRows, std::min(N, b1 * kRows), K, 1, N);
  });
}

}  // namespace llamalab
