"""AQUA-KV's predictors: per layer l >= 1 a linear map with bias from the previous layer's reconstructed keys
to this layer's keys, and one from [this layer's reconstructed keys, the previous layer's reconstructed
values] to this layer's values (AQUA-KV, arXiv 2501.19392; reference `train_predictors.py`).

Fitted in closed form (`fit_ridge`, the reference's `fit_linear_regression`): least squares with an
intercept, ridge `lam * mean(diag(X^T X))` on the augmented X (ones column included, intercept regularised
too, as the reference does), solved with a pseudo-inverse. We accumulate X^T X and X^T Y in float64 where
the reference uses float32 (better conditioned; same solution up to rounding).

Stored as safetensors (`layers.{l}.key.weight/bias`, `layers.{l}.value.weight/bias`) with JSON metadata: the
model's shape fingerprint (checked before use, so predictors of another model fail with one line), the
quantizer they were fitted with, the calibration data and per-layer errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.errors import LlamalabError

FORMAT = "llamalab-aquakv-predictors/1"
FINGERPRINT_FIELDS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "tie_word_embeddings",
)


def fingerprint(config) -> dict[str, Any]:
    """The fields of a model config that predictors depend on (a model of another shape cannot use them)."""
    return {f: getattr(config, f) for f in FINGERPRINT_FIELDS}


class Ridge:
    """Accumulated normal equations of a ridge regression with intercept, Y ~ X W^T + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        self.xtx = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(n_in + 1, n_out, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        self.xtx += xa.T @ xa
        self.xty += xa.T @ y.double()

    def solve(self, lam: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (n_out, n_in), b (n_out,)) in float32."""
        a = self.xtx.clone()
        a.diagonal().add_(lam * a.diagonal().abs().mean())
        w = torch.linalg.pinv(a) @ self.xty  # (n_in + 1, n_out)
        return w[:-1].T.float().contiguous(), w[-1].float().contiguous()


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares with intercept of y (N, n_out) on x (N, n_in): (W, b) with y ~ x W^T + b."""
    r = Ridge(x.shape[1], y.shape[1])
    r.add(x, y)
    return r.solve(lam)


@dataclass
class Predictors:
    """Key and value predictors of layers 1..L-1, and where they came from."""

    key: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    value: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def predict_keys(self, layer: int, prev_keys: torch.Tensor) -> torch.Tensor:
        w, b = self.key[layer]
        return torch.addmm(
            b.to(prev_keys.dtype), prev_keys.reshape(-1, w.shape[1]), w.T.to(prev_keys.dtype)
        ).reshape(*prev_keys.shape[:-1], w.shape[0])

    def predict_values(self, layer: int, keys: torch.Tensor, prev_values: torch.Tensor) -> torch.Tensor:
        w, b = self.value[layer]
        x = torch.cat([keys, prev_values], -1)
        return torch.addmm(b.to(x.dtype), x.reshape(-1, w.shape[1]), w.T.to(x.dtype)).reshape(
            *x.shape[:-1], w.shape[0]
        )

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file in the same directory, then a rename)."""
        from safetensors.torch import save

        from llamalab.eval.report import atomic_write

        tensors = {}
        for kind, table in (("key", self.key), ("value", self.value)):
            for layer, (w, b) in table.items():
                tensors[f"layers.{layer}.{kind}.weight"] = w.contiguous()
                tensors[f"layers.{layer}.{kind}.bias"] = b.contiguous()
        atomic_write(Path(path), save(tensors, metadata={"format": FORMAT, "meta": json.dumps(self.meta)}))

    @classmethod
    def load(cls, path: str | Path) -> Predictors:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LlamalabError(
                f"--kv-predictors {path}: no such file (make one with `llamalab kv calibrate`)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a truncated or foreign file
            raise LlamalabError(
                f"--kv-predictors {path}: not a predictors file ({type(e).__name__})"
            ) from None
        if header.get("format") != FORMAT:
            raise LlamalabError(f"--kv-predictors {path}: not an AQUA-KV predictors file of llamalab")
        out = cls(meta=json.loads(header["meta"]))
        for name, t in tensors.items():
            _, layer, kind, part = name.split(".")
            table = out.key if kind == "key" else out.value
            w, b = table.get(int(layer), (None, None))
            table[int(layer)] = (t, b) if part == "weight" else (w, t)
        return out

    def check_model(self, config, path: str) -> None:
        """Refuse predictors calibrated for a model of another shape, naming the first difference."""
        want = self.meta.get("model", {})
        have = fingerprint(config)
        for key, value in have.items():
            if key in want and want[key] != value:
                raise LlamalabError(
                    f"--kv-predictors {path} were calibrated for another model ({want.get('name', '?')}: "
                    f"{key}={want[key]}, this model has {value}); run `llamalab kv calibrate` for this model"
                )
        layers = config.num_hidden_layers
        if set(self.key) != set(range(1, layers)) or set(self.value) != set(range(1, layers)):
            raise LlamalabError(f"--kv-predictors {path} do not hold predictors for layers 1..{layers - 1}")
