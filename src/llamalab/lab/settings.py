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

The cell key is a hash of the canonical JSON of the settings (with the method's `revision` once a fix
has raised it), so a cell is recognised across runs, machines and edits of the grid file that leave its
settings alone, and a method fixed since is computed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.model_options import ModelOptions

QUANT = "quant."
# quant.* keys the driver reads itself; any other quant.NAME is an option of the method.
QUANT_FIELDS = ("method", "bits", "group_size", "calib", "nsamples", "seq_len", "seed")
NO_QUANT = (None, "none", "fp", "")


def option_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(ModelOptions)}


def check_key(key: str, where: str) -> None:
    """A one-line error for a key that is neither a model option nor `quant.*`."""
    if key.startswith(QUANT) and len(key) > len(QUANT):
        return
    head, _, tail = key.partition(".")
    fields = option_fields()
    if head in fields and (not tail or head == "kv_args"):
        return
    known = ", ".join(
        [*fields, "kv_args.NAME", "quant.method", "quant.bits", "quant.group_size", "quant.NAME"]
    )
    raise LlamalabError(f"{where}: unknown option {key!r}; known: {known}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'quant': {'method': 'rtn'}} -> {'quant.method': 'rtn'} (YAML nesting and dotted keys both work)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (key in ("quant", "kv_args") or key.startswith(QUANT)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def normalize(settings: dict[str, Any]) -> dict[str, Any]:
    """Drop what does not apply: without a quantization method the other quant.* keys say nothing, so
    cells that differ only there collapse into one."""
    out = dict(settings)
    if out.get(QUANT + "method") in NO_QUANT:
        out = {k: v for k, v in out.items() if not k.startswith(QUANT)}
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
        if k.startswith(QUANT):
            continue
        if k.startswith("kv_args."):
            out.setdefault("kv_args", {})[k.split(".", 1)[1]] = str(v)
        else:
            out[k] = v
    return out


def model_options(settings: dict[str, Any], model_path: str | None = None, threads: int | None = None):
    """The ModelOptions a cell loads with; `model_path` replaces the model by a built artifact."""
    values = option_values(settings)
    if model_path is not None:
        values["model"] = model_path
    if threads is not None and values.get("threads") is None:
        values["threads"] = threads
    return ModelOptions.from_kwargs(**values)


def describe(settings: dict[str, Any], keys: list[str] | None = None) -> str:
    """A cell's default label: `key=value` for the given keys (the grid's varying ones), `quant.` dropped."""
    keys = keys if keys is not None else sorted(settings)
    return " ".join(f"{k.removeprefix(QUANT)}={settings[k]}" for k in keys if k in settings) or "base"
