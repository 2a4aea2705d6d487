// One linear layer as the native kernels read it, dense or weight-only quantized, and products of a batch of
// rows with a group of them (q/k/v, gate/up) in one parallel pass.
//
// From Python a projection is four tensors (weight, scales, zeros, perm):
//   * dense: the (N, K) weight in the activations' dtype, the other three empty;
//   * quantized (qgemm.h): uint8 codes (N, K * bits / 8), scales (N, G) fp32 or bf16, packed uint8 zeros and
//     an int32 act-order permutation of the K columns (empty when there is none);
//   * NF4: uint8 codes (N, K / 2), the per-block absmax (N, G) fp32 or bf16 as scales, and in place of the
//     zeros the 16 fp32 NF4 values;
//   * GGUF blocks as stored (llamalab/quant/gguf_linear.py), groups of 32 with fp16 scales: Q4_0 uint8 4-bit
//     codes and no zeros (zero 8), Q4_1 the same with fp16 mins (N, G) in place of the zeros (W = d * q + m),
//     Q8_0 int8 codes and no zeros (W = d * q). GGUF's nibble order (element j low, j + 16 high in each 16
//     bytes) is the portable pairs order under a column permutation within each block of 32, passed as perm.
//     Q4_K: 4-bit codes in the pairs order, and K-quant scales and mins (uint8 rows of the G group values and
//     the G / 8 fp16 super-scales, qgemm.h's kSuperU8): W = d * sc * q + (-dmin) * m. Q6_K: its 6-bit codes
//     widened to int8 (q - 32), groups of 16, int8 scales under fp16 super-scales (kSuperI8): W = d * sc * q.
// `int_dot` chooses the integer path for the quantized projections (8-bit activations, qgemm.h) where it fits.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gemv.h"
#include "qgemm.h"

namespace llamalab {

template <typename T>
struct Projection {
  const T* dense = nullptr;  // set for a dense weight, else `quant` is
  QuantMatrix quant{};
  const int32_t* perm = nullptr;
  int64_t N = 0, K = 0;

  int64_t row_bytes() const { return dense ? K * static_cast<int64_t>(sizeof(T)) : quant.row_bytes(); }
};

// The projection held by t[0..3], checked to be an (N, K) layer ("what" names it in errors).
template <typename T>
Projection<T> projection(const at::Tensor* t, int64_t N, int64_t K, const char* what) {
  const at::Tensor &w = t[0], &scales = t[1], &zeros = t[2], &perm = t[3];
  Projection<T> p;
  p.N = N;
  p.K = K;
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2 && w.size(0) == N,
              "native kernels: ", what, " must be a contiguous CPU matrix with ", N, " rows");
  if (w.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    TORCH_CHECK(w.size(1) == K && scales.numel() == 0, "native kernels: ", what, " must be ", N, " x ", K);
    p.dense = w.const_data_ptr<T>();
    return p;
  }
  const bool signed_codes = w.scalar_type() == at::kChar;
  TORCH_CHECK(w.scalar_type() == at::kByte || signed_codes, "native kernels: ", what,
              " is neither the model's dtype nor uint8/int8 codes");
  const int64_t bits = w.size(1) * 8 / K;
  TORCH_CHECK((bits == 4 || bits == 8) && w.size(1) * 8 == bits * K && (bits == 8 || !signed_codes),
              "native kernels: ", what, "'s codes are not 4- or 8-bit codes of ", K, " columns");
  const auto type = scales.scalar_type();
  // K-quant two-level scales (qgemm.h): uint8 for Q4_K (4-bit codes, groups of 32), int8 for Q6_K (codes
  // widened to signed bytes, groups of 16); rows of G group values, then one fp16 super-scale per 256 weights
  const bool super = type == at::kByte || type == at::kChar;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && scales.is_contiguous() &&
                  (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf || super),
              "native kernels: ", what, "'s scales must be a contiguous fp32/bf16/fp16 (N, groups) matrix, or "
              "uint8/int8 K-quant scales");
  const ScaleType scale_type = type == at::kByte ? ScaleType::kSuperU8
                               : type == at::kChar ? ScaleType::kSuperI8
                               : type == at::kFloat ? ScaleType::kF32
                               : type == at::kBFloat16 ? ScaleType::kBF16 : ScaleType::kF16;
  const int64_t per = super ? super_groups(scale_type) : 1;  // group values per super-scale
  const int64_t G = super ? scales.size(1) * per / (per + 2) : scales.size(1);
  const int64_t kquant_group = scale_type == ScaleType::kSuperI8 ? kHalfBlock : kQuantBlock;
  TORCH_CHECK(!super || (G % per == 0 && QuantMatrix::super_row_bytes(G, scale_type) == scales.size(1) &&
                         K / kquant_group == G && bits == (scale_type == ScaleType::kSuperI8 ? 8 : 4)),
              "native kernels: ", what, "'s K-quant scales must be (N, groups + 2 * groups / ", per, ") bytes for "
              "groups of ", kquant_group, " in super-blocks of 256 (", per == 8 ? "4" : "8", "-bit codes)");
  TORCH_CHECK(K % G == 0 && ((K / G) % kQuantBlock == 0 || scale_type == ScaleType::kSuperI8),
              "native kernels: ", what, "'s group size must be a multiple of ", kQuantBlock, " dividing ", K);
  const bool nf4 = zeros.numel() && zeros.scalar_type() == at::kFloat && zeros.dim() == 1;
  const bool mins = !nf4 && zeros.numel() && zeros.scalar_type() == type;
  if (nf4) {
    TORCH_CHECK(bits == 4 && zeros.is_contiguous() && zeros.numel() == 16, "native kernels: ", what,
                "'s NF4 levels must be 16 fp32 values");
  } else if (mins) {
    TORCH_CHECK(bits == 4 && zeros.is_contiguous() && zeros.sizes() == scales.sizes(), "native kernels: ", what,
                "'s mins must be a (N, groups) matrix of the scales' type (4-bit codes)");
  } else if (zeros.numel()) {
    TORCH_CHECK(!signed_codes && zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.dim() == 2 &&
                    zeros.size(0) == N && zeros.size(1) == (G * bits + 7) / 8,
                "native kernels: ", what, "'s zeros must be packed uint8 (N, ceil(groups * bits / 8))");
  }
  if (perm.numel()) {
    TORCH_CHECK(perm.scalar_type() == at::kInt && perm.is_contiguous() && perm.numel() == K,
                "native kernels: ", what, "'s permutation must be ", K, " int32 column indices");
    p.perm = perm.const_data_ptr<int32_t>();
  }
  p.quant = {static_cast<const uint8_t*>(w.const_data_ptr()), scales.const_data_ptr(), scale_type,
             nf4 || mins || !zeros.numel() ? nullptr : zeros.const_data_ptr<uint8_t>(),
             nf4 ? zeros.const_data_ptr<float>() : nullptr, mins ? zeros.const_data_ptr() : nullptr,
             N, K, G, bits};
  // Without zeros the codes are symmetric: signed int8 (Q8_0), or unsigned with the zero mid-range (Q4_0's 8).
  p.quant.signed_codes = signed_codes;
  p.quant.const_zero = signed_codes ? 0 : 1 << (bits - 1);
  return p;
}

inline const uint16_t* raw(const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }  // gemv.h
inline const float* raw(const float* p) { return p; }

// The first of projections 0..i whose prepared input is projection i's: quantized the same way (path, bits,
// width, permutation; for the exact path NF4's nibble order too).
template <typename T>
int first_same_input(const Projection<T>* p, int i, const std::vector<bool>& integer) {
  for (int j = 0; j < i; j++)
    if (!p[j].dense && integer[j] == integer[i] && p[j].quant.bits == p[i].quant.bits && p[j].K == p[i].K &&
        p[j].perm == p[i].perm && (p[j].quant.levels == nullptr) == (p[i].quant.levels == nullptr))
      return j;
  return i;
}

// Where each projection of a group Y = X @ [W_1; ...; W_n]^T sits: its first block of kRows rows, its first
// output column (row b of Y holds the outputs of every projection side by side, stride the sum of their N),
// and the offset of its prepared input in the scratch buffer (x in its code order, shared by the projections
// that read x the same way, e.g. q, k and v), per row of x: for B rows it is B times that. It does not depend
// on the batch, so the decode step builds each group's layout once (decode_step.cpp).
template <typename T>
struct GroupLayout {
  std::vector<int64_t> first_block, column, x_at;
  std::vector<int> prepared_by;  // the projection whose prepared input projection i reads
  std::vector<bool> integer;     // which projections take the integer path
  int64_t bytes = 0, scratch_floats = 0;  // scratch_floats: per row of x

  GroupLayout() = default;
  GroupLayout(const Projection<T>* p, int n, bool int_dot)
      : first_block(n + 1, 0), column(n + 1, 0), x_at(n, 0), prepared_by(n, 0), integer(n, false) {
    for (int i = 0; i < n; i++) integer[i] = !p[i].dense && int_dot && integer_path_fits(p[i].quant);
    for (int i = 0; i < n; i++) {
      first_block[i + 1] = first_block[i] + (p[i].N + kRows - 1) / kRows;
      column[i + 1] = column[i] + p[i].N;
      bytes += p[i].N * p[i].row_bytes();
      if (p[i].dense) continue;
      prepared_by[i] = first_same_input(p, i, integer);
      if (prepared_by[i] < i) {
        x_at[i] = x_at[prepared_by[i]];
        continue;
      }
      x_at[i] = scratch_floats;
      scratch_floats += integer[i] ? q8_row_floats(p[i].K) : p[i].K;
    }
  }
  int64_t blocks() const { return first_block.back(); }
};

// Prepares the inputs of the group's quantized projections in `scratch`, each preparation once.
template <typename T>
void prepare_inputs(const Projection<T>* p, int n, const GroupLayout<T>& at, const T* x, int64_t B, float* scratch) {
  for (int i = 0; i < n; i++) {
    if (p[i].dense || at.prepared_by[i] < i) continue;
    if (at.integer[i])
      quantize_input(x, B, p[i].quant, p[i].perm, scratch + B * at.x_at[i]);
    else
      arrange_input(x, B, p[i].K, p[i].quant, p[i].perm, scratch + B * at.x_at[i]);
  }
}

// The output rows of row blocks [b0, b1) of the group, from the prepared inputs.
template <typename T>
void compute_blocks(const Projection<T>* p, int n, const GroupLayout<T>& at, const T* x, T* y, int64_t B,
                    const float* scratch, int64_t b0, int64_t b1) {
  const int64_t ldy = at.column[n];
  for (int i = 0; i < n; i++) {
    const int64_t lo = std::max(b0, at.first_block[i]), hi = std::min(b1, at.first_block[i + 1]);
    if (lo >= hi) continue;
    const int64_t r0 = (lo - at.first_block[i]) * kRows, r1 = std::min(p[i].N, (hi - at.first_block[i]) * kRows);
    if (p[i].dense)
      gemm_rows(raw(p[i].dense), raw(x), y + at.column[i], r0, r1, p[i].K, B, ldy);
    else if (at.integer[i])
      qgemm_q8_rows(p[i].quant, scratch + B * at.x_at[i], y + at.column[i], r0, r1, B, ldy);
    else
      qgemm_rows(p[i].quant, scratch + B * at.x_at[i], y + at.column[i], r0, r1, B, ldy);
  }
}

// Y = X @ [W_1; ...; W_n]^T for B rows of x (B x K, shared by the group), in one parallel pass over the row
// blocks of all n projections, so a group costs one fork and streams its weights one after another.
template <typename T>
void matmul_group(const Projection<T>* p, int n, const T* x, T* y, int64_t B, std::vector<float>& scratch,
                  bool int_dot) {
  const GroupLayout<T> at(p, n, int_dot);
  const int64_t blocks = at.blocks();
  if (blocks == 0) return;
  scratch.resize(B * at.scratch_floats);
  prepare_inputs(p, n, at, x, B, scratch.data());
  const int64_t grain = std::max<int64_t>(1, kGrainBytes * blocks / std::max<int64_t>(1, at.bytes));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    compute_blocks(p, n, at, x, y, B, scratch.data(), b0, b1);
  });
}

// The same product computed by the workers of an enclosing parallel region (decode_step.cpp), every one of
// which must call it, with the group's layout for this step's path (built once per model): each prepares the
// inputs in its own `scratch` (cheaper than waiting for one copy), takes a contiguous share of the row blocks,
// and waits for the others at the worksharing loop's barrier before Y is read. The blocks go out as kTasks
// near-equal runs, so up to kTasks workers get shares within a block of each other (runs of 16 blocks had
// split o_proj's 144 blocks 80/64 on 2 workers; a call per block measured slower, 5.4 against 4.6 ms a step).
constexpr int64_t kTasks = 64;

template <typename T>
void matmul_group_in_region(const Projection<T>* p, int n, const GroupLayout<T>& at, const T* x, T* y, int64_t B,
                            std::vector<float>& scratch) {
  const int64_t blocks = at.blocks(), tasks = std::min(blocks, kTasks);
  scratch.resize(B * at.scratch_floats);
  prepare_inputs(p, n, at, x, B, scratch.data());
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tasks; t++)
    compute_blocks(p, n, at, x, y, B, scratch.data(), blocks * t / tasks, blocks * (t + 1) / tasks);
}

}  // namespace llamalab
