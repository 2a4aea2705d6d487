"""The evaluation harness: perplexity, multiple choice, passkey and needle retrieval, an lm-eval adapter.

Every evaluation loads its model through `llamalab.model_options` (one place for dtype, RoPE scaling, KV
cache and later weight-quantized models), feeds tokens through `eval.forward`, and writes its report with
`eval.report` (JSON with settings, metrics, library versions and machine; a markdown row; PNG plots).
"""
