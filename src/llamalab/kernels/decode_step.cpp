// One decode step of a whole bf16 or fp32 LLaMA decoder in one native call: every block, the final norm
// and the head, for one new token of each of B sequences (batch 1 to a serving batch), each at its own
// position in its own cache row.
//
// Why: at batch 1 a SmolLM2-135M token is ~120 GEMVs (~10 ms at ~25 GB/s on 2 cores) and ~600 small PyTorch
// ops (norms, RoPE, cache writes, attention, SiLU, residual adds), each a few microseconds of dispatch, which
// together cost as much again (benchmarks/gemv.py --decode). Here each of those is a loop over a few hundred
// values, so a step costs about its GEMVs. A batch shares each read of the weights (matmul_group in
// projection.h), and every sequence's result is the one it would get alone: the same sums in the same order.
// Each projection is dense (the model's dtype) or weight-only int8/int4 in the portable quantized layout
// (qgemm.h), so a quantized model streams 2 or 4 times fewer bytes per token.
//
// Numerics follow llamalab.model's PyTorch path (itself transformers', op for op). In bf16, rounding for
// rounding: RMSNorm normalises in fp32, rounds to bf16, multiplies by the bf16 weight and rounds again; RoPE
// rounds x*cos, rotate_half(x)*sin and their sum; SiLU, the gate product and the residual adds each round to
// bf16; a GEMV rounds its fp32 sum once. Attention keeps scores, softmax and the weighted sum of values in
// fp32 and rounds the output once, as SDPA's CPU kernel does. In fp32 nothing rounds in between. In both,
// only the order of summation differs from PyTorch's. Each piece is written once for T = bf16 or float:
// `rnd<T>(v)` is the rounding a PyTorch op on T tensors applies to its fp32 result (none for float).
//
// The caller (llamalab/generate/native_step.py) checks that the model is the plain architecture this covers
// and prepares it once with its cache (`prepare_decode`, below): every later step passes only the new tokens'
// embeddings, their RoPE rotation, cache rows and positions.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "decode_step.h"
#include "kv_layout.h"
#include "projection.h"
#include "simd.h"

namespace llamalab {
namespace {

template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; i++) ss += f(x[i]) * f(x[i]);
  const float r = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = T(f(w[i]) * rnd<T>(f(x[i]) * r));
}

// act = silu(gate) * up, with gate_up = [gate | up]; SiLU is x / (1 + e^-x) in fp32, as PyTorch's kernel.
template <typename T>
void silu_mul(const T* gate_up, T* act, int64_t F) {
  for (int64_t i = 0; i < F; i += 16) {
    const __mmask16 m = first(F - i);
    const __m512 g = load16(gate_up + i, m);
    alignas(64) float s[16];
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(s, _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
    for (int64_t j = 0; j < std::min<int64_t>(16, F - i); j++)
      act[i + j] = T(rnd<T>(s[j]) * f(gate_up[F + i + j]));
  }
}

template <typename T>
void add_into(T* x, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = T(f(x[i]) + f(y[i]));
}

constexpr int kProjections = 7;  // per layer, in this order: q, k, v, o, gate, up, down
constexpr int kLayerTensors = 2 + 4 * kProjections;  // input and post-attention norms, then the projections

// The products of a layer, each over a group of projections read from the same input: (first, count).
constexpr int kGroups = 4;
constexpr int kGroup[kGroups][2] = {{0, 3}, {3, 1}, {4, 2}, {6, 1}};  // q, k, v; o; gate, up; down

// A layer's weights as the step reads them, with each group's layout for the exact [0] and integer [1] path
// (built once: a layout per call was 4 x 5 small allocations a layer per worker and step).
template <typename T>
struct Layer {
  const T *ln1, *ln2;
  Projection<T> proj[kProjections];
  GroupLayout<T> layout[2][kGroups];

  void plan() {
    for (int path : {0, 1})
      for (int g = 0; g < kGroups; g++) layout[path][g] = GroupLayout<T>(&proj[kGroup[g][0]], kGroup[g][1], path);
  }
  void product(int g, bool int_dot, const T* x, T* y, int64_t B, std::vector<float>& scratch) const {
    matmul_group_in_region(&proj[kGroup[g][0]], kGroup[g][1], layout[int_dot][g], x, y, B, scratch);
  }
};

// The whole step runs in one parallel region: the workers share out every product by row blocks and
// attention by heads (static worksharing loops: equal contiguous shares), and meet at each loop's barrier, where
// one reads what the others wrote (6 a layer). Each worker keeps its own copy of the residual stream and of
// what only elementwise ops make of it (norms, SiLU), computed alike by all, which costs less than a barrier.
// A fork per product (~150 a step) had cost about a fifth of the step on 2 cores (waking the other thread,
// which then waited while one ran the elementwise ops). SmolLM2-135M Q4_0 as stored, 2 cores, best of 60 x 10
// steps, median of six alternating runs: 6.4 ms a step before, 5.0 after (with the integer path's
// shared-zero start, qgemm.h). Rows are split statically: libgomp's dynamic schedule cost more than the
// imbalance it removes (5.4 against 4.2 ms).
template <typename T>
at::Tensor run(const at::Tensor& embedded, const at::Tensor& cos_t, const at::Tensor& sin_t,
               const std::vector<Layer<T>>& layers, const KVLayout<T>& kv, const int64_t* rows,
               const int64_t* positions, int64_t H, double eps, double scale, const at::Tensor& norm,
               const Projection<T>& head, const GroupLayout<T>& head_layout, bool int_dot) {
  const int64_t n_layers = kv.n_layers, B = embedded.size(0), d = embedded.size(1), Hkv = kv.Hkv, D = kv.D;
  const int64_t F = layers[0].proj[4].N, Nqkv = (H + 2 * Hkv) * D;
  const float feps = static_cast<float>(eps);
  const T* e = embedded.const_data_ptr<T>();
  // What the workers write and the others read, one row per sequence of the batch.
  std::vector<T> qkv(B * Nqkv), attn(B * H * D), proj(B * d), gate_up(B * 2 * F);
  at::Tensor logits = at::empty({B, head.N}, embedded.options());
  T* out = logits.mutable_data_ptr<T>();
  const LayerPass<T> pass{qkv.data(), cos_t.const_data_ptr<T>(), sin_t.const_data_ptr<T>(), rows, positions, B, H,
                          Hkv, D, static_cast<float>(scale), attn.data()};
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> x(e, e + B * d), h(B * d), act(B * F);
    std::vector<float> scratch;  // the input in code order for quantized projections
    for (int64_t l = 0; l < n_layers; l++) {
      const Layer<T>& w = layers[l];
      for (int64_t b = 0; b < B; b++) rms_norm(&x[b * d], w.ln1, &h[b * d], d, feps);
      w.product(0, int_dot, h.data(), qkv.data(), B, scratch);  // q, k, v
      kv.attend(l, pass);  // the new keys and values stored, each q head attending (kv_layout.h)
      w.product(1, int_dot, attn.data(), proj.data(), B, scratch);  // o
      add_into(x.data(), proj.data(), B * d);
      for (int64_t b = 0; b < B; b++) rms_norm(&x[b * d], w.ln2, &h[b * d], d, feps);
      w.product(2, int_dot, h.data(), gate_up.data(), B, scratch);  // gate, up
      for (int64_t b = 0; b < B; b++) silu_mul(&gate_up[b * 2 * F], &act[b * F], F);
      w.product(3, int_dot, act.data(), proj.data(), B, scratch);  // down
      add_into(x.data(), proj.data(), B * d);
    }
    for (int64_t b = 0; b < B; b++) rms_norm(&x[b * d], norm.const_data_ptr<T>(), &h[b * d], d, feps);
    matmul_group_in_region(&head, 1, head_layout, h.data(), out, B, scratch);
  }
  return logits;
}

// A model and its cache as the step reads them, checked and parsed once.
template <typename T>
struct PreparedModel : PreparedStep {
  std::vector<at::Tensor> tensors, head;  // held: the parsed pointers point into them
  std::unique_ptr<KVLayout<T>> kv;
  at::Tensor norm;
  std::vector<Layer<T>> layers;
  Projection<T> head_proj;
  GroupLayout<T> head_layout[2];  // exact, integer path
  int64_t H = 0;
  double eps = 0, scale = 0;

  at::Tensor step(const at::Tensor& embedded, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& rows, const at::Tensor& positions, bool int_dot) const override;
};

template <typename T>
at::Tensor PreparedModel<T>::step(const at::Tensor& embedded, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& rows, const at::Tensor& positions, bool int_dot) const {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  const auto check = [dtype](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 2,
                "decode_step: ", what, " must be a contiguous 2-D CPU tensor of the model's dtype");
  };
  check(embedded, "the embedded tokens");
  const int64_t B = embedded.size(0), D = kv->D;
  TORCH_CHECK(embedded.size(1) == norm.numel(), "decode_step: the embedded tokens do not match the model");
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && rows.is_contiguous() &&
                  positions.is_contiguous() && rows.numel() == B && positions.numel() == B,
              "decode_step: rows and positions must be int64 vectors with one entry per sequence");
  const int64_t* row = rows.const_data_ptr<int64_t>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(0 <= row[b] && row[b] < kv->rows && 0 <= pos[b] && pos[b] < kv->max_len, "decode_step: row ", row[b],
                " position ", pos[b], " outside the cache (", kv->rows, " rows, ", kv->max_len, " positions)");
    for (int64_t c = 0; c < b; c++) TORCH_CHECK(row[c] != row[b], "decode_step: cache row ", row[b], " twice");
  }
  check(cos, "cos");
  check(sin, "sin");
  TORCH_CHECK(cos.size(0) == B && sin.size(0) == B && cos.size(1) == D && sin.size(1) == D,
              "decode_step: cos/sin must be (batch, head_dim)");
  return run<T>(embedded, cos, sin, layers, *kv, row, pos, H, eps, scale, norm, head_proj, head_layout[int_dot],
                int_dot);
}

// Reads and checks every layer's weights against the model's shapes (d, H, Hkv, D) and the cache.
template <typename T>
std::shared_ptr<PreparedStep> prepare(const std::vector<at::Tensor>& tensors, std::unique_ptr<KVLayout<T>> kv,
                                      int64_t H, double eps, double scale, const at::Tensor& norm,
                                      const std::vector<at::Tensor>& head) {
  auto m = std::make_shared<PreparedModel<T>>();
  const int64_t n_layers = kv->n_layers, d = norm.numel(), Hkv = kv->Hkv, D = kv->D;
  TORCH_CHECK(n_layers > 0 && tensors.size() == static_cast<size_t>(kLayerTensors * n_layers),
              "decode_step: need ", kLayerTensors, " weight tensors per layer of the cache");
  TORCH_CHECK(H > 0 && H % Hkv == 0 && D % 2 == 0 && D <= kMaxHeadDim, "decode_step: unsupported heads");
  m->tensors = tensors;
  m->kv = std::move(kv);
  m->head = head;
  m->norm = norm;
  m->H = H;
  m->eps = eps;
  m->scale = scale;
  const int64_t F = tensors[2 + 4 * 4].size(0);  // the gate projection's rows
  const int64_t N[kProjections] = {H * D, Hkv * D, Hkv * D, d, F, F, d};
  const int64_t K[kProjections] = {d, d, d, H * D, d, d, F};
  const char* names[kProjections] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  m->layers.resize(n_layers);
  for (int64_t l = 0; l < n_layers; l++) {
    const at::Tensor* t = &m->tensors[kLayerTensors * l];
    for (int i : {0, 1})
      TORCH_CHECK(t[i].scalar_type() == norm.scalar_type() && t[i].is_contiguous() && t[i].numel() == d,
                  "decode_step: layer ", l, "'s norm weights must be ", d, " values of the model's dtype");
    m->layers[l].ln1 = t[0].const_data_ptr<T>();
    m->layers[l].ln2 = t[1].const_data_ptr<T>();
    for (int i = 0; i < kProjections; i++) m->layers[l].proj[i] = projection<T>(t + 2 + 4 * i, N[i], K[i], names[i]);
    m->layers[l].plan();
  }
  m->head_proj = projection<T>(m->head.data(), m->head[0].size(0), d, "the head");
  for (int path : {0, 1}) m->head_layout[path] = GroupLayout<T>(&m->head_proj, 1, path);
  return m;
}

}  // namespace

// A model's weights and its cache, checked and parsed once for every later step (NativeDecoder keeps one): per
// layer the two norm weights, then q, k, v, o, gate, up and down as a projection's four tensors (projection.h);
// the cache as a layout's name, tensors and settings (kv_layout.h); the final norm; the head as a projection
// (dense or quantized).
std::shared_ptr<PreparedStep> prepare_decode(const std::vector<at::Tensor>& layers, const std::string& kv_layout,
                                             const std::vector<at::Tensor>& kv_tensors,
                                             const std::vector<int64_t>& kv_settings, int64_t n_heads, double eps,
                                             double scale, const at::Tensor& norm, const std::vector<at::Tensor>& head) {
  const auto dtype = norm.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "decode_step: bf16 or fp32 models only");
  TORCH_CHECK(norm.device().is_cpu() && norm.is_contiguous() && norm.dim() == 1,
              "decode_step: the final norm must be a contiguous 1-D CPU tensor of the model's dtype");
  TORCH_CHECK(head.size() == 4 && head[0].dim() == 2, "decode_step: the head must be a projection's 4 tensors");
  if (dtype == at::kFloat)
    return prepare<float>(layers, make_layout<float>(kv_layout, kv_tensors, kv_settings), n_heads, eps, scale, norm,
                          head);
  return prepare<bf16>(layers, make_layout<bf16>(kv_layout, kv_tensors, kv_settings), n_heads, eps, scale, norm, head);
}

}  // namespace llamalab
