"""The one option system: which model a command runs, and how.

Every command (generate, chat, info, bench, convert, serve, eval, quant, the lab) and every Python caller that
takes options reaches its model through this module:

- `ModelOptions`: the model path or alias, dtype, threads, device, RoPE scaling (`rope_scaling`,
  `rope_factor`, `rope_original_max`), the context length (`context`) and the KV-cache method (`kv`,
  `kv_bits`, `kv_group_size`, free-form `kv_args`: see `llamalab.kv.registry`).
- `load_model(opts)`: `llamalab.load` (quantized directories load through its load hook), then RoPE scaling
  through the core seam (`config.rope_scaling` + `model.refresh_rope()`), the context, and the KV method
  that the model's generation uses (`llm.kv`).
- `model_options`: a decorator that adds the shared `--model/--dtype/--threads/--device/--rope-*/--context/
  --kv*` options to a typer command and hands them to it as one `opts: ModelOptions` argument, so a new
  option reaches every command at once (`@model_options(kv=False)` for commands that run no cache).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.io.registry import DEFAULT_MODEL
from llamalab.kv.registry import CacheSpec

if TYPE_CHECKING:
    from llamalab.api import LLM
    from llamalab.kv.base import KVCache
    from llamalab.model.config import ModelConfig


@dataclass
class ModelOptions:
    """Which model to run and how: weights, numerics, RoPE scaling, KV cache."""

    model: str = DEFAULT_MODEL
    dtype: str = "fp32"
    threads: int | None = None
    device: str = "cpu"
    # RoPE scaling (HF `rope_type` names; context-extension methods register more of them).
    rope_scaling: str | None = None
    rope_factor: float | None = None
    rope_original_max: int | None = None  # original_max_position_embeddings (default: the model's context)
    # A rope_scaling dict, as JSON text or a file (longrope's factor lists), or the dict itself (a lab grid's
    # nested YAML arrives as one).
    rope_config: str | dict[str, Any] | None = None
    context: int | None = None  # after scaling: default original x factor; without: a cap on the model's
    # KV-cache method.
    kv: str = "dense"
    kv_bits: float | None = None
    kv_group_size: int | None = None
    kv_args: dict[str, str] = field(default_factory=dict)
    kv_predictors: str | None = None  # a file of fitted KV parameters (AQUA-KV's `llamalab kv calibrate`)

    @property
    def kv_spec(self) -> CacheSpec:
        return CacheSpec(self.kv, self.kv_bits, self.kv_group_size, dict(self.kv_args), self.kv_predictors)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, for reports (unset ones included, so two reports are comparable field by field)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ModelOptions:
        """Build from loose keyword arguments (lm-eval `--model_args`, Python callers); unknown keys are an
        error naming them. `pretrained` is accepted as a synonym of `model` (lm-eval's spelling)."""
        if "pretrained" in kwargs:
            kwargs["model"] = kwargs.pop("pretrained")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise LlamalabError(f"unknown model option(s): {', '.join(unknown)}; known: {', '.join(names)}")
        out: dict[str, Any] = {}
        for key, value in kwargs.items():
            if value is None:
                continue
            kind = names[key].type
            try:
                if "int" in kind and not isinstance(value, int):
                    value = int(value)
                elif "float" in kind and not isinstance(value, float):
                    value = float(value)
            except (TypeError, ValueError):
                raise LlamalabError(f"model option {key}={value!r} is not a number") from None
            out[key] = value
        return cls(**out)


def load_model(opts: ModelOptions) -> LLM:
    """Load the model `opts` describes, with its RoPE scaling, context and KV-cache method applied."""
    from llamalab.api import load

    llm = load(opts.model, dtype=opts.dtype, device=opts.device, threads=opts.threads, kv=opts.kv_spec)
    apply_rope_scaling(llm, opts)
    return llm


# --- RoPE scaling -------------------------------------------------------------------------------------


def apply_rope_scaling(llm: LLM, opts: ModelOptions) -> None:
    """Set `rope_scaling` on the model config and recompute its frequencies (HF semantics: the new context
    is original x factor unless `context` says otherwise). Without scaling, `context` may only shorten the
    model's own context (e.g. to bound a server's KV cache)."""
    if scale_config(llm.model.config, opts):
        llm.model.refresh_rope()


def read_rope_config(text: str | dict[str, Any]) -> dict[str, Any]:
    """A rope_scaling dict from JSON text, a JSON file or a dict: the dict itself, or a `config.json` holding
    `rope_scaling` / `rope_parameters` (what `llamalab longrope search` writes is such a dict)."""
    import json
    from pathlib import Path

    if isinstance(text, dict):
        text = json.dumps(text)  # one path for both: the same unwrapping and the same checks
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise LlamalabError(f"--rope-config {text!r} is neither a JSON object nor a file")
        source = path.read_text(encoding="utf-8")
    try:
        data = json.loads(source)
    except json.JSONDecodeError as e:
        raise LlamalabError(f"--rope-config {text!r} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise LlamalabError("--rope-config must be a JSON object (a rope_scaling dict)")
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(data.get(key), dict):
            data = data[key]
            break
    data = {k: v for k, v in data.items() if k != "rope_theta"}
    if "type" in data:
        data.setdefault("rope_type", data.pop("type"))
    return data


def scale_config(config: ModelConfig, opts: ModelOptions) -> bool:
    """Apply `opts`' RoPE scaling and context to `config` (a ModelConfig) in place; True when the RoPE
    changed. Every problem is one clear error: an unknown type, a factor below 1, a key the type needs, a
    context beyond what the setting supports."""
    from llamalab.errors import CheckpointError
    from llamalab.model.rope import check_scaling, rope_scaling_types

    base = read_rope_config(opts.rope_config) if opts.rope_config else {}
    rope_type = opts.rope_scaling or base.get("rope_type")
    if not rope_type or rope_type == "default":
        if opts.rope_factor is not None:
            raise LlamalabError("--rope-factor needs --rope-scaling TYPE (e.g. --rope-scaling linear)")
        if opts.context is not None:
            if not 2 <= opts.context <= config.max_position_embeddings:
                raise LlamalabError(
                    f"--context {opts.context} is outside 2..{config.max_position_embeddings} (the model's "
                    "context); extend it with --rope-scaling TYPE --rope-factor F"
                )
            config.max_position_embeddings = opts.context
        return False
    known = rope_scaling_types()
    if rope_type not in known:
        raise LlamalabError(f"unknown --rope-scaling {rope_type!r}; known: {', '.join(known)}")
    # L0: what the user says, else the model's own pretraining length (kept from an earlier scaling).
    own = (config.rope_scaling or {}).get("original_max_position_embeddings")
    own = own or config.max_position_embeddings
    original = int(opts.rope_original_max or base.get("original_max_position_embeddings") or own)
    scaling = {**base, "rope_type": rope_type, "original_max_position_embeddings": original}
    if opts.rope_factor is not None:
        scaling["factor"] = float(opts.rope_factor)
    factor = scaling.get("factor")
    if factor is None and rope_type == "longrope" and opts.context:
        scaling["factor"] = factor = opts.context / original  # transformers' max_pos / original
    if factor is None:
        raise LlamalabError(f"--rope-scaling {rope_type} needs --rope-factor F (the extension ratio, >= 1)")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise LlamalabError(f"--rope-factor must be >= 1 (the context extension ratio), got {factor}")
    try:
        check_scaling(scaling, config.head_dim)
    except CheckpointError as e:
        raise LlamalabError(f"{e} (give it in --rope-config JSON)") from None
    supported = int(round(original * factor))
    context = int(opts.context or supported)
    if not 2 <= context <= supported:
        raise LlamalabError(
            f"--context {context} is beyond what {rope_type} x{factor:g} supports ({supported} = {original} x "
            f"{factor:g}); raise --rope-factor"
        )
    config.rope_scaling = scaling
    config.max_position_embeddings = context
    return True


def context_length(llm: LLM) -> int:
    """The longest sequence the (possibly scaled) model accepts."""
    return int(llm.model.config.max_position_embeddings)


def check_length(llm: LLM, n_tokens: int, what: str) -> None:
    """Raise a one-line error when `n_tokens` does not fit the model's context."""
    ctx = context_length(llm)
    if n_tokens > ctx:
        raise ContextLengthError(
            f"{what} needs {n_tokens} tokens, beyond the model's context of {ctx}; shorten it or extend the "
            f"context with --rope-scaling TYPE --rope-factor F"
        )


def make_cache(llm: LLM, opts: ModelOptions, max_len: int, max_batch: int = 1) -> KVCache:
    """A fresh KV cache of the kind `opts` names, for `max_batch` sequences of up to `max_len` tokens."""
    return opts.kv_spec.make(llm.model.config, max_len, max_batch, llm.dtype, llm.device)


# --- the shared CLI options ---------------------------------------------------------------------------


def _parse_kv_args(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LlamalabError(f"--kv-arg {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _cli_parameters(kv: bool, dtype: str) -> list[inspect.Parameter]:
    import typer

    def opt(name: str, annotation: Any, default: Any, *flags: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[annotation, typer.Option(*flags, help=help, rich_help_panel="Model")],
        )

    params = [
        opt(
            "model",
            str,
            DEFAULT_MODEL,
            "--model",
            "-m",
            help="Alias (smollm2-135m), HF model directory (also weight-quantized), .gguf file or hub id.",
        ),
        opt(
            "dtype",
            str,
            dtype,
            "--dtype",
            help="Weight and compute dtype: fp32, bf16 (or fp16); stored: a GGUF file's Q4_0/Q4_1/Q8_0/"
            "Q4_K weights run as stored on the native kernels (fp32 activations); auto: stored for such a "
            "GGUF file where the native kernels run, else fp32.",
        ),
        opt("threads", int | None, None, "--threads", help="CPU threads (default: PyTorch's choice)."),
        opt("device", str, "cpu", "--device", help="Torch device (cpu, cuda)."),
        opt(
            "rope_scaling",
            str | None,
            None,
            "--rope-scaling",
            help="RoPE scaling type: linear, dynamic, yarn, longrope (needs --rope-config), llama3, ...",
        ),
        opt("rope_factor", float | None, None, "--rope-factor", help="RoPE scaling factor (e.g. 4)."),
        opt(
            "rope_original_max",
            int | None,
            None,
            "--rope-original-max",
            help="original_max_position_embeddings (default: the model's context).",
        ),
        opt(
            "rope_config",
            str | None,
            None,
            "--rope-config",
            help="A rope_scaling dict as JSON text or a JSON file (longrope's short_factor/long_factor, yarn's "
            "beta_fast, ...); --rope-scaling/--rope-factor override its keys.",
        ),
        opt(
            "context",
            int | None,
            None,
            "--context",
            help="Context length (prompt + answer per sequence): after --rope-scaling, default original x "
            "factor; without, at most the model's own (default).",
        ),
    ]
    if not kv:
        return params
    return params + [
        opt("kv", str, "dense", "--kv", help="KV-cache method: dense, or one registered in llamalab/kv."),
        opt(
            "kv_bits",
            float | None,
            None,
            "--kv-bits",
            help="Bits per KV value, for quantized KV caches (e.g. 2, 4; 2.5 for AQUA-KV's vector grids).",
        ),
        opt(
            "kv_group_size",
            int | None,
            None,
            "--kv-group-size",
            help="Quantization group size of the KV cache.",
        ),
        opt(
            "kv_args",
            list[str] | None,
            None,
            "--kv-arg",
            help="Extra KV-method setting KEY=VALUE (repeatable).",
        ),
        opt(
            "kv_predictors",
            str | None,
            None,
            "--kv-predictors",
            help="Fitted KV parameters for methods that need them (AQUA-KV: `llamalab kv calibrate`).",
        ),
    ]


_OPTION_NAMES = [f.name for f in dataclasses.fields(ModelOptions)]


def model_options(fn: Callable[..., Any] | None = None, *, kv: bool = True, dtype: str = "fp32") -> Any:
    """Decorate a typer command whose last parameter is `opts: ModelOptions`: the command gets the shared
    model options (`--model`, `--dtype`, `--threads`, `--device`, `--rope-*`, `--context`, and `--kv*` unless
    `kv=False`) and receives them as `opts`. `dtype` is the command's default `--dtype` (the inference
    commands use "auto": a GGUF file runs as stored where the native kernels can)."""
    if fn is None:
        return functools.partial(model_options, kv=kv, dtype=dtype)
    sig = inspect.signature(fn)
    own = [p for name, p in sig.parameters.items() if name != "opts"]
    extra = _cli_parameters(kv, dtype)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _OPTION_NAMES if name in kwargs}
        if "kv_args" in values:
            values["kv_args"] = _parse_kv_args(values["kv_args"])
        return fn(*args, **kwargs, opts=ModelOptions(**values))

    # typer reads the signature and the resolved annotations; give it the command's own options + ours.
    own_hints = _resolved_hints(fn)
    own = [p.replace(annotation=own_hints.get(p.name, p.annotation)) for p in own]
    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    del wrapper.__wrapped__  # so that inspect/typer use __signature__, not the inner function's
    return wrapper


def _resolved_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(fn, include_extras=True)
