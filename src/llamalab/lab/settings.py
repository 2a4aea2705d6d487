"""The setting keys a grid may use, and how one cell's settings become a model to load.

A cell's settings are one flat mapping of dotted keys:

- every field of `llamalab.model_options.ModelOptions` (`model`, `dtype`, `threads`, `rope_scaling`,
  `rope_factor`, `context`, `kv`, `kv_bits`, `kv_group_size`, ... and whatever fields it grows), with
  `kv_args.NAME` for its free-form KV settings. They reach `load_model` unchanged, so a KV-cache or
  context-extension method that registers under a name is sweepable by that name with no change here.
- `quant.*`, weight quantization: `quant.method` (a method of `llamalab.quant`, or `none`), `quant.bits`,
  `quant.group_size`, calibration `quant.calib` / `quant.nsamples` / `quant.seq_len` / `quant.seed`, and
  any other `quant.NAME` passed to the method as an option (`quant.act_order`, `quant.act_bits`, ...),
  which the method itself accepts or rejects. A quantized model is an artifact built once (artifacts.py).
- `kv_calib.*`, the calibration of a KV-cache method that fits parameters (AQUA-KV's predictors) when the
  cell names no `kv_predictors` file: `kv_calib.source` / `nsamples` / `seq_len` / `seed` / `ridge`, with
  `kv_bits`, `kv_group_size` and `kv_args.dim` as the cache will use them. The fitted predictors are an
  artifact too, built on the cell's (quantized) weights.
- `train.*`, a training run before everything else: `train.recipe` (a `llamalab train` config file,
  relative to the grid; `none` for no training) and any `train.KEY` as an override of it (`train.steps`,
  `train.lora.r`, `train.optim.lr`), applied as `llamalab train KEY=VALUE` would. The trained model is an
  artifact; a quantization or KV calibration of the cell starts from it.

The cell key is a hash of the canonical JSON of the settings (with the method's `revision` once a fix
has raised it), so a cell is recognised across runs, machines and edits of the grid file that leave its
settings alone, and a method fixed since is computed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.model_options import ModelOptions

QUANT = "quant."
# quant.* keys the driver reads itself; any other quant.NAME is an option of the method.
QUANT_FIELDS = ("method", "bits", "group_size", "calib", "nsamples", "seq_len", "seed")
NO_QUANT = (None, "none", "fp", "")
KV_CALIB = "kv_calib."
KV_CALIB_FIELDS = ("source", "nsamples", "seq_len", "seed", "ridge")
TRAIN = "train."
NO_TRAIN = (None, "none", "")


def option_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(ModelOptions)}


def check_key(key: str, where: str) -> None:
    """A one-line error for a key that is neither a model option nor `quant.*`."""
    if key.startswith(QUANT) and len(key) > len(QUANT):
        return
    if key.startswith(KV_CALIB) and key[len(KV_CALIB) :] in KV_CALIB_FIELDS:
        return
    if key.startswith(TRAIN) and len(key) > len(TRAIN):  # the training config itself checks the rest
        return
    head, _, tail = key.partition(".")
    fields = option_fields()
    if head in fields and (not tail or head == "kv_args"):
        return
    known = ", ".join(
        [
            *fields,
            "kv_args.NAME",
            "quant.method",
            "quant.bits",
            "quant.group_size",
            "quant.NAME",
            *(KV_CALIB + f for f in KV_CALIB_FIELDS),
            "train.recipe",
            "train.KEY",
        ]
    )
    raise LlamalabError(f"{where}: unknown option {key!r}; known: {known}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'quant': {'method': 'rtn'}} -> {'quant.method': 'rtn'} (YAML nesting and dotted keys both work)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        nested = key in ("quant", "kv_args", "kv_calib", "train") or key.startswith((QUANT, TRAIN))
        if isinstance(v, dict) and nested:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def normalize(settings: dict[str, Any]) -> dict[str, Any]:
    """Drop what does not apply: without a quantization method the other quant.* keys say nothing, nor do
    kv_calib.* without a KV method to calibrate or train.* without a recipe, so cells that differ only there
    collapse into one."""
    from llamalab.kv.calibration import CALIBRATED_KV

    out = dict(settings)
    if out.get(QUANT + "method") in NO_QUANT:
        out = {k: v for k, v in out.items() if not k.startswith(QUANT)}
    if out.get("kv") not in CALIBRATED_KV or out.get("kv_predictors"):
        out = {k: v for k, v in out.items() if not k.startswith(KV_CALIB)}
    if TRAIN + "recipe" in out and out[TRAIN + "recipe"] in NO_TRAIN:  # `train.recipe: none` in a sweep
        out = {k: v for k, v in out.items() if not k.startswith(TRAIN)}
    return out


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, n: int = 20) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def method_revision(settings: dict[str, Any]) -> int:
    """The revision of the cell's quantization method (1 when it quantizes nothing or was never revised)."""
    method = settings.get(QUANT + "method")
    if method is None or method in NO_QUANT:
        return 1
    from llamalab.quant.methods import get_method

    return get_method(str(method)).revision


def cell_key(settings: dict[str, Any]) -> str:
    """A cell's identity: its settings and, once a method has been revised, that revision, so a fixed
    method's cells are computed again rather than read back from before the fix."""
    revision = method_revision(settings)
    return content_hash(settings if revision == 1 else {**settings, "quant.revision": revision})


def quant_spec(settings: dict[str, Any]) -> dict[str, Any] | None:
    """The weight-quantization part of a cell (None: the model's own weights)."""
    q = {k[len(QUANT) :]: v for k, v in settings.items() if k.startswith(QUANT)}
    if q.get("method") in NO_QUANT:
        return None
    options = {k: v for k, v in q.items() if k not in QUANT_FIELDS}
    spec = {k: q[k] for k in QUANT_FIELDS if k in q}
    spec["options"] = options
    return spec


def option_values(settings: dict[str, Any]) -> dict[str, Any]:
    """The ModelOptions keyword arguments of a cell (kv_args.NAME gathered into kv_args)."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if k.startswith((QUANT, KV_CALIB, TRAIN)):
            continue
        if k.startswith("kv_args."):
            out.setdefault("kv_args", {})[k.split(".", 1)[1]] = str(v)
        else:
            out[k] = v
    return out


def kv_calibration(settings: dict[str, Any]):
    """The KV-cache calibration a cell needs (None: its KV method fits nothing, or it names a file)."""
    from llamalab.kv.calibration import CALIBRATED_KV, KVCalibration

    kv = settings.get("kv")
    if kv not in CALIBRATED_KV or settings.get("kv_predictors"):
        return None
    given = {k[len(KV_CALIB) :]: v for k, v in settings.items() if k.startswith(KV_CALIB)}
    cache = {
        "bits": settings.get("kv_bits"),
        "group_size": settings.get("kv_group_size"),
        "grid_dim": settings.get("kv_args.dim"),
    }
    values = {k: v for k, v in {**cache, **given}.items() if v is not None}
    kinds = {"bits": float, "ridge": float, "source": str}  # the others are counts and seeds
    try:
        values = {k: kinds.get(k, int)(v) for k, v in values.items()}
    except (TypeError, ValueError):
        raise LlamalabError(f"kv_calib: settings {values} are not all numbers where numbers go") from None
    return KVCalibration(method=str(kv), **values)


def train_config(settings: dict[str, Any], base: Path, model: str):
    """The training config of a cell (None: it trains nothing): its recipe, found relative to `base` (the
    grid's folder), with the other train.KEY settings as overrides. It trains the cell's `model` (the
    recipe's own `model` is replaced), unless it pretrains from scratch (`init`)."""
    recipe = settings.get(TRAIN + "recipe")
    if recipe in NO_TRAIN:
        stray = sorted(k for k in settings if k.startswith(TRAIN))
        if stray:
            raise LlamalabError(
                f"{', '.join(stray)}: train.* settings need a train.recipe (a train config file)"
            )
        return None
    import yaml

    from llamalab.train.config import load_config

    path = Path(str(recipe)).expanduser()
    path = path if path.is_absolute() else base / path
    overrides = [
        f"{k[len(TRAIN) :]}={json.dumps(v)}"  # JSON is YAML: lists, numbers and strings keep their types
        for k, v in sorted(settings.items())
        if k.startswith(TRAIN) and k != TRAIN + "recipe"
    ]
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        raw = {}  # load_config words the error
    from_scratch = (isinstance(raw, dict) and raw.get("init") is not None) or any(
        k == TRAIN + "init" or k.startswith(TRAIN + "init.") for k in settings
    )
    if not from_scratch:
        overrides.append(f"model={json.dumps(model)}")
    return load_config(path, overrides)


def model_options(
    settings: dict[str, Any],
    model_path: str | None = None,
    threads: int | None = None,
    kv_predictors: str | None = None,
):
    """The ModelOptions a cell loads with; `model_path` replaces the model by a built artifact and
    `kv_predictors` names the cell's fitted KV parameters when the lab built them."""
    values = option_values(settings)
    if model_path is not None:
        values["model"] = model_path
    if kv_predictors is not None:
        values["kv_predictors"] = kv_predictors
    if threads is not None and values.get("threads") is None:
        values["threads"] = threads
    return ModelOptions.from_kwargs(**values)


def describe(settings: dict[str, Any], keys: list[str] | None = None) -> str:
    """A cell's default label: `key=value` for the given keys (the grid's varying ones), `quant.` dropped."""
    keys = keys if keys is not None else sorted(settings)
    return " ".join(f"{k.removeprefix(QUANT)}={settings[k]}" for k in keys if k in settings) or "base"
