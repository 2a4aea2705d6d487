"""`llamalab quantize` and `llamalab export`: the command-line side of weight quantization."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamalab.model_options import ModelOptions, load_model, model_options

# The --calib option of every command that calibrates on text (quantize, kv calibrate): one spelling, one help.
CalibSource = Annotated[
    str,
    typer.Option(
        help="Calibration text: 'alice' (shipped), a UTF-8 .txt file (random windows of the whole text), a .jsonl "
        'file of {"text": ...} documents (each window inside one document, as GPTQ cuts C4), or '
        "wikitext2/c4/pile-val (downloaded; cut as GPTQ and AWQ cut them)."
    ),
]


def register(app: typer.Typer) -> None:
    app.command()(model_options(quantize, kv=False))
    app.command()(model_options(export, kv=False))


def quantize(
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory for the quantized model.")],
    method: Annotated[
        str,
        typer.Option(help="rtn, gptq, awq, nf4, smoothquant, quip, pbllm, billm, slimllm or dbllm."),
    ] = "rtn",
    bits: Annotated[
        float | None,
        typer.Option(help="Weight bits (method default if omitted; fractional for 1.x-bit methods)."),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            help="Input columns per scale group; -1 is per output channel. Must divide every width."
        ),
    ] = None,
    calib: CalibSource = "alice",
    nsamples: Annotated[
        int | None, typer.Option(help="Calibration windows (method default if omitted).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per calibration window.")] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for drawing calibration windows (and random rotations).")
    ] = 0,
    sym: Annotated[bool, typer.Option("--sym", help="Symmetric quantization (rtn, gptq).")] = False,
    convention: Annotated[
        str | None,
        typer.Option(
            help="RTN: the quantizer's range, minmax (raw min/max, the default and the study's RTN rows) "
            "or gptq (GPTQ's quantizer, the range forced to contain 0)."
        ),
    ] = None,
    act_order: Annotated[
        bool | None,
        typer.Option(
            "--act-order/--no-act-order",
            help="GPTQ: columns by decreasing Hessian diagonal. On by default for gptq (with static groups): it "
            "was the best GPTQ setting on both seeds in and out of the calibration domain "
            "(docs/results/quant_generalisation.md); --no-act-order is the reference's default.",
        ),
    ] = None,
    static_groups: Annotated[
        bool | None,
        typer.Option(
            "--static-groups/--no-static-groups",
            help="GPTQ: group parameters fixed up front (with --act-order; on by default with it for gptq, "
            "which also keeps the codes in column order, so no permutation is stored).",
        ),
    ] = None,
    true_sequential: Annotated[
        bool,
        typer.Option(
            "--true-sequential",
            help="Quantize each block's linear groups in turn (q,k,v; o; gate,up; down), re-capturing inputs.",
        ),
    ] = False,
    act_bits: Annotated[
        int | None, typer.Option(help="SmoothQuant: activation bits (default = --bits).")
    ] = None,
    search_samples: Annotated[
        int | None,
        typer.Option(
            help="AWQ: measure each scale candidate on the first N calibration windows (default: all, as the "
            "reference does; 4-bit g64 on 2 busy cores: all 16 windows ~14 minutes, 4 windows 152 s, the "
            "setting of docs/results/quant_study.md)."
        ),
    ] = None,
    npasses: Annotated[
        int | None,
        typer.Option(help="QuIP: greedy passes after LDLQ rounding (the reference's --npasses; default 0)."),
    ] = None,
    save_dtype: Annotated[
        str,
        typer.Option(
            help="dtype of the tensors stored unquantized (embedding, norms, head): bf16, or fp32 to keep "
            "them exactly as calibrated."
        ),
    ] = "bf16",
    *,
    opts: ModelOptions,
) -> None:
    """Quantize a model's decoder linears with one method and write a directory every command loads
    (`--model DIR`) without re-quantizing. `--dtype` is the dtype of calibration, `--save-dtype` the dtype
    in which the weights that stay unquantized are stored."""
    from llamalab.errors import LlamalabError
    from llamalab.model.build import parse_dtype
    from llamalab.quant.calib import CalibConfig, check_source
    from llamalab.quant.checkpoint import save_quantized
    from llamalab.quant.methods import get_method, quantize_model

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LlamalabError(f"{out}: exists and is not an empty directory; choose a new --out")
    cls = get_method(method)
    parse_dtype(save_dtype)  # a bad dtype fails before loading
    options: dict = {}
    if sym:
        options["sym"] = True
    if cls.name == "gptq":  # the defaults that generalised best (docs/results/quant_generalisation.md)
        act_order = True if act_order is None else act_order
        static_groups = act_order if static_groups is None else static_groups
    for flag, value in (
        ("act_order", act_order),
        ("static_groups", static_groups),
        ("true_sequential", true_sequential),
    ):
        if value:
            options[flag] = True
    if act_bits is not None:
        options["act_bits"] = act_bits
    if convention is not None:
        options["convention"] = convention
    if npasses is not None:
        options["npasses"] = npasses
    if search_samples is not None:
        options["search_samples"] = search_samples
    calib_cfg = None
    if cls.calibrated:
        base = {**CalibConfig().to_dict(), **cls.default_calib}
        calib_cfg = CalibConfig(
            calib, nsamples if nsamples is not None else base["nsamples"],
            seq_len if seq_len is not None else base["seq_len"], seed,
        )  # fmt: skip
        calib_cfg.validate()
        check_source(calib_cfg.source)
    cls(
        bits if bits is not None else cls.default_bits,
        group_size if group_size is not None else cls.default_group_size,
        **options,
    )  # bad settings fail before loading
    llm = load_model(opts)
    report = quantize_model(llm, method, bits, group_size, calib_cfg, **options)
    save_quantized(llm, report, out, save_dtype)
    typer.echo(
        f"wrote {out}: {report.method} {report.settings}, {report.bits_per_weight:.3f} bits/weight "
        f"(quantized linears, scales and zeros included), {report.seconds:.1f} s"
    )


def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file to write.")],
    fmt: Annotated[str, typer.Option("--format", help="Output format (gguf).")] = "gguf",
    qtype: Annotated[str, typer.Option("--type", help="Tensor type: f16, q8_0 or q4_0 (or f32).")] = "q8_0",
    *,
    opts: ModelOptions,
) -> None:
    """Write a model as a llama.cpp GGUF file (llama.cpp / llama-cpp-python load and run it)."""
    from llamalab.errors import LlamalabError
    from llamalab.io.gguf_export import check_gguf_type, export_gguf

    if fmt.lower() != "gguf":
        raise LlamalabError(f"unknown export format {fmt!r}; only gguf is supported")
    check_gguf_type(qtype)
    if out.exists():
        raise LlamalabError(f"{out}: file exists; choose a new --out")
    export_gguf(load_model(opts), out, qtype)
    typer.echo(f"wrote {out}")
