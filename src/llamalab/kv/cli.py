"""`llamalab kv ...`: commands of the KV-cache methods (today: fitting AQUA-KV's predictors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamalab.model_options import ModelOptions, load_model, model_options
from llamalab.quant.cli import CalibSource

kv_app = typer.Typer(
    help="KV-cache methods: calibration of the ones that need fitted parameters.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    kv_app.command()(model_options(calibrate, kv=False))
    app.add_typer(kv_app, name="kv")


def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="The predictors file to write (safetensors).")],
    method: Annotated[str, typer.Option(help="The KV method to calibrate: aquakv.")] = "aquakv",
    bits: Annotated[
        float, typer.Option(help="Bits per value of the residual quantizer (2, 2.5, 3, 4 with --grid-dim 2).")
    ] = 2.0,
    grid_dim: Annotated[int, typer.Option(help="Dimension d of the HIGGS grid points.")] = 2,
    group_size: Annotated[
        int | None, typer.Option(help="HIGGS group (default: the token's KV width, at most 1024).")
    ] = None,
    calib: CalibSource = "alice",
    nsamples: Annotated[int, typer.Option(help="Calibration windows (1/8 of them held out).")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for drawing windows and the held-out split.")] = 0,
    ridge: Annotated[float, typer.Option(help="Ridge: this fraction of mean diag(X^T X) is added.")] = 1e-3,
    *,
    opts: ModelOptions,
) -> None:
    """Fit a KV method's parameters on calibration text and save them for `--kv-predictors FILE`.

    AQUA-KV: layer-by-layer ridge predictors of keys (from the previous layer's reconstructed keys) and
    values (from this layer's reconstructed keys and the previous layer's reconstructed values), fitted with
    the residual quantizer of `--bits` in the loop, as arXiv 2501.19392's train_predictors.py."""
    from llamalab.kv.calibration import KVCalibration, fit_kv_parameters, held_out_bits

    cal = KVCalibration(method, bits, grid_dim, group_size, calib, nsamples, seq_len, seed, ridge)
    cal.check_settings()  # bad settings fail before the model loads
    predictors = fit_kv_parameters(load_model(opts), cal)
    predictors.save(out)
    layers = predictors.meta["layers"][1:]
    mean_bits = held_out_bits(predictors)
    typer.echo(
        f"wrote {out}: AQUA-KV predictors for {len(layers)} layers, {bits:g}-bit residuals, "
        f"{nsamples} windows of {seq_len} tokens from {calib}; held-out predictor quality "
        f"(equivalent bits, mean over layers): keys {mean_bits['key']:.2f}, values {mean_bits['value']:.2f}; "
        f"{predictors.meta['seconds']:.0f} s"
    )
