"""A llama.cpp Q4_K_M file of the default model, run as stored: the same text as its dequantized model?

llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python) turns our f16 export of
SmolLM2-135M-Instruct into Q4_K_M. K-quants need widths in multiples of 256, so on this 576-wide model
llama.cpp falls back for most tensors (Q5_0, Q8_0) and keeps Q4_K and Q6_K for the 1536-wide ffn_down; the
script prints the mix. Loaded with `dtype="stored"`, its Q4_K, Q6_K and Q8_0 layers run as stored (Q5_0
loads dense). Checks, on the prompt of the default-model test:
  * the exact path: 64 greedy tokens against the fp32 model of the same file (every weight dequantized);
  * the integer path: teacher-forced argmax agreement with those 64 tokens;
  * llama.cpp on the same file: its 32 greedy tokens against ours, and our argmax teacher-forced on its text
    (llama.cpp quantizes the activations of every layer, ours only where the layer runs as stored).

    python experiments/k_quant_check.py      # ~1 minute; docs/results/quant_kernels/k_quant_check.log
"""

from __future__ import annotations

import ctypes
import tempfile
from collections import Counter
from pathlib import Path

PROMPT = "The history of Paris begins"


def make_q4_k_m(out: Path) -> Path:
    import llamalab
    from llamalab import llama_cpp_peer
    from llamalab.io.gguf_export import export_gguf

    f16 = out / "smollm-f16.gguf"
    export_gguf(llamalab.load("smollm2-135m", dtype="fp32"), f16, "f16")
    ll = llama_cpp_peer.load()
    params = ll.llama_model_quantize_default_params()
    params.ftype = ll.LLAMA_FTYPE_MOSTLY_Q4_K_M
    path = out / "smollm-Q4_K_M.gguf"
    if ll.llama_model_quantize(str(f16).encode(), str(path).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama.cpp's quantizer failed")
    return path


def main() -> None:
    import llamalab
    from llamalab import kernels
    from llamalab.bench import decode_argmax
    from llamalab.io.gguf import GGUFFile
    from llamalab.quant.gguf_linear import GGUFLinear

    with tempfile.TemporaryDirectory() as tmp:
        path = make_q4_k_m(Path(tmp))
        mix = Counter(t.tensor_type.name for t in GGUFFile(path).reader.tensors if len(t.shape) == 2)
        print(f"tensor types in the file: {dict(mix)}")
        stored = llamalab.load(str(path), dtype="stored")
        dense = llamalab.load(str(path), dtype="fp32")
        ran = Counter(m.qtype for m in stored.model.modules() if isinstance(m, GGUFLinear))
        print(f"run as stored: {dict(ran)}")
        prompt = dense.encode(PROMPT, add_special_tokens=False)
        want = dense.generate_sequences([prompt], max_new_tokens=64)[0].output_ids
        with kernels.exact_quant():
            got = stored.generate_sequences([prompt], max_new_tokens=64)[0].output_ids
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        print(f"exact path: {same}/64 greedy tokens equal to the dequantized model")
        agree = sum(int(a == b) for a, b in zip(decode_argmax(stored, prompt, want), want))
        print(f"integer path: {agree}/64 teacher-forced argmax equal")
        from llamalab import llama_cpp_peer

        ll = llama_cpp_peer.load().Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2)
        theirs = []
        for tok in ll.generate(prompt, top_k=1, temp=0.0):
            theirs.append(int(tok))
            if len(theirs) == 32:
                break
        ours = stored.generate_sequences([prompt], max_new_tokens=32)[0].output_ids
        prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), 32)
        forced = sum(int(a == b) for a, b in zip(decode_argmax(stored, prompt, theirs), theirs))
        print(f"llama.cpp on the same file: identical greedy prefix {prefix}/32; our argmax teacher-forced on "
              f"its text {forced}/32 (integer path)")  # fmt: skip


if __name__ == "__main__":
    main()
