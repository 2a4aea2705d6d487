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

// y[r0:r1] = W[r0:r1] @ x with R rows per step (R = kRows for the bulk, 1 for the last N % kRows rows).
// K need not be a multiple of 32: the last partial slice is read with a mask, so it loads zeros past the
// end of the row instead of the next row's first elements.
template <int R, typename Out>
inline void gemv_rows(const uint16_t* w, const uint16_t* x, Out* y, int64_t r0, int64_t r1, int64_t K) {
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
    store_rows<R>(acc, y + r);
  }
}

// The same for an fp32 weight and x (the fp32 decode step): 16 values per 64-byte line, FMA.
template <int R>
inline void gemv_rows(const float* w, const float* x, float* y, int64_t r0, int64_t r1, int64_t K) {
  const int64_t K16 = K / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1);
  for (int64_t r = r0; r + R <= r1; r += R) {
    const float* wr = w + r * K;
    __m512 acc[R];
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int i = 0; i < R; i++) {
        const float* p = wr + i * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
        acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(p), xv, acc[i]);
      }
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + k);
      for (int i = 0; i < R; i++) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wr + i * K + k), xv, acc[i]);
    }
    store_rows<R>(acc, y + r);
  }
}

// y = W @ x over all N rows, split in contiguous row ranges between threads. W is uint16_t (bf16 bits) or
// float; X and Out follow the gemv_rows overloads above.
template <typename W, typename X, typename Out>
inline void gemv(const W* w, const X* x, Out* y, int64_t N, int64_t K) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (kRows * K * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kRows, r1 = std::min(N, b1 * kRows);
    const int64_t bulk = r0 + (r1 - r0) / kRows * kRows;
    gemv_rows<kRows>(w, x, y, r0, bulk, K);
    gemv_rows<1>(w, x, y, bulk, r1, K);
  });
}

// Tiles of gemm_rows: kRows weight rows against BT rows of X, each weight slice loaded once for the BT rows
// (16 accumulators for BT = 4). Per (weight row, X row) the sums run in exactly gemv_rows<kRows>' order.
template <int BT, typename Out>
inline void gemm_tile(const uint16_t* w, const uint16_t* x, Out* y, int64_t r, int64_t K, int64_t ldy) {
  const int64_t K32 = K / 32 * 32;
  const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1);
  const uint16_t* wr = w + r * K;
  __m512 acc[BT][kRows];
  for (int b = 0; b < BT; b++)
    for (int i = 0; i < kRows; i++) acc[b][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < K32; k += 32) {
    __m512bh wv[kRows];
    for (int i = 0; i < kRows; i++) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + i * K + k) + kPrefetchBytes, _MM_HINT_T0);
      wv[i] = (__m512bh)_mm512_loadu_si512(wr + i * K + k);
    }
    for (int b = 0; b < BT; b++) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + b * K + k);
      for (int i = 0; i < kRows; i++) acc[b][i] = _mm512_dpbf16_ps(acc[b][i], wv[i], xv);
    }
  }
  if (tail) {
    __m512bh wv[kRows];
    for (int i = 0; i < kRows; i++) wv[i] = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + i * K + k);
    for (int b = 0; b < BT; b++) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + b * K + k);
      for (int i = 0; i < kRows; i++) acc[b][i] = _mm512_dpbf16_ps(acc[b][i], wv[i], xv);
    }
  }
  for (int b = 0; b < BT; b++) store_sums(acc[b], y + b * ldy + r);
}

template <int BT>
inline void gemm_tile(const float* w, const float* x, float* y, int64_t r, int64_t K, int64_t ldy) {
  const int64_t K16 = K / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1);
  const float* wr = w + r * K;
  __m512 acc[BT][kRows];
  for (int b = 0; b < BT; b++)
    for (int i = 0; i < kRows; i++) acc[b][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < K16; k += 16) {
    __m512 wv[kRows];
    for (int i = 0; i < kRows; i++) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + i * K + k) + kPrefetchBytes, _MM_HINT_T0);
      wv[i] = _mm512_loadu_ps(wr + i * K + k);
    }
    for (int b = 0; b < BT; b++) {
      const __m512 xv = _mm512_loadu_ps(x + b * K + k);
      for (int i = 0; i < kRows; i++) acc[b][i] = _mm512_fmadd_ps(wv[i], xv, acc[b][i]);
    }
  }
  if (tail) {
    __m512 wv[kRows];
    for (int i = 0; i < kRows; i++) wv[i] = _mm512_maskz_loadu_ps(tail, wr + i * K + k);
    for (int b = 0; b < BT; b++) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + b * K + k);
      for (int i = 0; i < kRows; i++) acc[b][i] = _mm512_fmadd_ps(wv[i], xv, acc[b][i]);
    }
  }
  for (int b = 0; b < BT; b++) store_sums(acc[b], y + b * ldy + r);
}

// Rows [r0, r1) of Y = X @ W^T for a few rows of X (B x K) at once (a batch of decode tokens); row b of Y
// starts at y + b * ldy. Each block of kRows weight rows is read once and used for every row of X, so a
// batch costs about one GEMV's memory traffic; each output is summed exactly as `gemv` sums it, so a row's
// result does not depend on the batch it is in.
template <typename W, typename X, typename Out>
inline void gemm_rows(const W* w, const X* x, Out* y, int64_t r0, int64_t r1, int64_t K, int64_t B, int64_t ldy) {
  const int64_t bulk = r0 + (r1 - r0) / kRows * kRows;
  for (int64_t r = r0; r < bulk; r += kRows) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) gemm_tile<4>(w, x + b * K, y + b * ldy, r, K, ldy);
    switch (B - b) {
      case 3: gemm_tile<3>(w, x + b * K, y + b * ldy, r, K, ldy); break;
      case 2: gemm_tile<2>(w, x + b * K, y + b * ldy, r, K, ldy); break;
      case 1: gemm_tile<1>(w, x + b * K, y + b * ldy, r, K, ldy); break;
      default: break;
    }
  }
  for (int64_t b = 0; b < B; b++) gemv_rows<1>(w, x + b * K, y + b * ldy, bulk, r1, K);
}

}  // namespace llamalab
