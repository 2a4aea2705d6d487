"""Weight quantization: the methods of the low-bit LLaMA3 study, packed for real, fast on the CPU.

    import llamalab
    from llamalab.quant import quantize_model, save_quantized, prepare_model, CalibConfig

    llm = llamalab.load("smollm2-135m")
    report = quantize_model(llm, "gptq", bits=4, group_size=64, calib=CalibConfig("alice", 32, 512, 0))
    save_quantized(llm, report, "smollm-gptq-w4g64")   # loads anywhere with llamalab.load(DIR)
    prepare_model(llm.model)                            # int8/int4 CPU kernels for this process

Files: `pack.py` (bit packing), `quantizer.py` (affine conventions), `base.py` (QuantLinear formats and
kernels), `calib.py` (calibration data and layer-sequential capture), `methods.py` (registry and driver),
one file per method, `checkpoint.py` (save/load), `gguf_export.py`, `cli.py`.
"""

from llamalab.quant.base import FORMATS, QuantLinear
from llamalab.quant.calib import CalibConfig
from llamalab.quant.checkpoint import prepare_model, save_quantized
from llamalab.quant.methods import METHOD_MODULES, QuantReport, quantize_model

__all__ = [
    "FORMATS",
    "METHOD_MODULES",
    "CalibConfig",
    "QuantLinear",
    "QuantReport",
    "prepare_model",
    "quantize_model",
    "save_quantized",
]
