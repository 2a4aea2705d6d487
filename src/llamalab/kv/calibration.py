"""Fitting the parameters of the KV-cache methods that need them, for `llamalab kv calibrate` and the lab.

Today one method has them: AQUA-KV's inter-layer predictors (`parts/aquakv_calibrate.py`). `check_settings`
rejects bad settings before a model is loaded; `fit_kv_parameters` fits on calibration text and returns
the predictors with their calibration recorded in `meta`, ready to `save`. The lab builds the same thing as
an artifact (`llamalab.lab.artifacts`), so a grid's AQUA-KV cells calibrate once per model and setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamalab.errors import LlamalabError

CALIBRATED_KV = ("aquakv",)


@dataclass(frozen=True)
class KVCalibration:
    """What a fit depends on besides the model (the `kv calibrate` options; the lab's `kv_calib.*`)."""

    method: str = "aquakv"
    bits: float = 2.0  # bits per value of the residual quantizer the predictors are fitted with
    grid_dim: int = 2  # dimension d of the HIGGS grid points
    group_size: int | None = None  # HIGGS group (None: the token's KV width, at most 1024)
    source: str = "alice"
    nsamples: int = 16
    seq_len: int = 2048
    seed: int = 0
    ridge: float = 1e-3  # this fraction of mean diag(X^T X) is added to the normal equations

    def check_settings(self) -> KVCalibration:
        """One-line errors for settings that cannot work, before any model is loaded."""
        from llamalab.kv.parts.higgs import grid_for_bits
        from llamalab.quant.calib import check_source

        if self.method not in CALIBRATED_KV:
            raise LlamalabError(
                f"--method {self.method!r}: only {', '.join(CALIBRATED_KV)} has parameters to calibrate"
            )
        if self.nsamples < 2:
            raise LlamalabError("--nsamples must be at least 2 (one window is held out to report the fit)")
        self.calib_config().validate()
        check_source(self.source)
        grid_for_bits(self.bits, self.grid_dim)
        return self

    def calib_config(self):
        from llamalab.quant.calib import CalibConfig

        return CalibConfig(self.source, self.nsamples, self.seq_len, self.seed)


def fit_kv_parameters(llm, cal: KVCalibration, progress: bool = True):
    """AQUA-KV predictors of `llm` fitted as `cal` says (see parts/aquakv_calibrate.py)."""
    from llamalab.kv.parts.aquakv_calibrate import calibrate
    from llamalab.quant.calib import calibration_ids

    cal.check_settings()
    ids = calibration_ids(llm.tokenizer, cal.calib_config())  # `calibrate` rejects a group that does not fit
    predictors = calibrate(
        llm,
        ids,
        bits=cal.bits,
        grid_dim=cal.grid_dim,
        group=cal.group_size,
        ridge=cal.ridge,
        seed=cal.seed,
        progress=progress,
    )
    predictors.meta["calibration"] = cal.calib_config().to_dict()
    return predictors


def held_out_bits(predictors) -> dict[str, float]:
    """Mean over layers >= 1 of each predictor's held-out quality in equivalent bits (-log4 relative MSE)."""
    layers = predictors.meta["layers"][1:]
    return {kind: sum(r[kind]["equiv_bits_valid"] for r in layers) / len(layers) for kind in ("key", "value")}
