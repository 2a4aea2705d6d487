// How the native decode step stores a layer's new keys and values and attends over the past: one layout per
// cache format the step can read in place (the dense cache, dense_layout.cpp; KIVI's packed codes,
// kivi_layout.cpp). From Python a layout is a name, its tensors (a fixed number per layer) and its integer
// settings (llamalab.kv.base.NativeKV).

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace llamalab {

// One layer of one decode step, as a layout sees it.
template <typename T>
struct LayerPass {
  const T* qkv;                     // B x (H + 2 Hkv) x D: each sequence's new q, k and v heads, before RoPE
  const T *cos, *sin;               // B x D: each sequence's rotation
  const int64_t *rows, *positions;  // each sequence's cache row and the position of its new token
  int64_t B, H, Hkv, D;
  float scale;  // of the attention scores
  T* out;       // B x H x D: the attention output of each query head
};

template <typename T>
struct KVLayout {
  virtual ~KVLayout() = default;
  int64_t n_layers = 0, rows = 0, max_len = 0, Hkv = 0, D = 0;  // what the step checks its inputs against
  // Stores layer l's new keys and values and writes attention's output. Called by every worker inside the
  // step's parallel region: only worksharing loops (`omp for`) inside, each worker with its own scratch.
  virtual void attend(int64_t l, const LayerPass<T>& pass) const = 0;
};

// The dense cache: a k and a v tensor (rows, Hkv, max_len, D) of T per layer, written in place.
template <typename T>
std::unique_ptr<KVLayout<T>> dense_layout(const std::vector<at::Tensor>& tensors);

// KIVI (llamalab/kv/kivi.py): eight tensors per layer and the settings {bits, group, residual, max_len}.
template <typename T>
std::unique_ptr<KVLayout<T>> kivi_layout(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& ints);

template <typename T>
std::unique_ptr<KVLayout<T>> make_layout(const std::string& name, const std::vector<at::Tensor>& tensors,
                                         const std::vector<int64_t>& ints) {
  if (name == "dense") {
    TORCH_CHECK(ints.empty(), "decode_step: the dense layout takes no settings");
    return dense_layout<T>(tensors);
  }
  TORCH_CHECK(name == "kivi", "decode_step: no cache layout named '", name, "'");
  return kivi_layout<T>(tensors, ints);
}

}  // namespace llamalab
