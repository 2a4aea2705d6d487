"""The one place where the options that change *which* model an evaluation runs live.

Every evaluation (perplexity, multiple choice, passkey, needle, the lm-evaluation-harness adapter) and every
later method that changes the model reaches the model through this module:

- `ModelOptions`: a dataclass with the model path or alias, dtype, threads, device, RoPE scaling
  (`rope_scaling`, `rope_factor`, `rope_original_max`, `context`) and the KV-cache method (`kv`, `kv_bits`,
  `kv_group_size`, free-form `kv_args`).
- `load_model(opts)`: loads the model (through a registered loader, e.g. for weight-quantized directories,
  or `llamalab.load`), then applies RoPE scaling through the core seam (`config.rope_scaling` +
  `model.refresh_rope()`).
- `make_cache(llm, opts, max_len, max_batch)`: builds the KV cache the options name, from a registry of
  factories. Only `dense` is registered here; KV-cache methods register themselves with
  `@register_kv_cache("kivi")` in `llamalab/kv/<name>.py`, which is imported on first use of that name.
- `model_options`: a decorator that adds the shared `--model/--dtype/--threads/--rope-*/--kv*` options to a
  typer command and hands them to it as one `opts: ModelOptions` argument, so a new option reaches every
  command at once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import torch

from llamalab.errors import LlamalabError
from llamalab.io.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from llamalab.api import LLM
    from llamalab.kv.base import KVCache


@dataclass
class ModelOptions:
    """Which model to run and how: weights, numerics, RoPE scaling, KV cache."""

    model: str = DEFAULT_MODEL
    dtype: str = "fp32"
    threads: int | None = None
    device: str = "cpu"
    # RoPE scaling (HF `rope_type` names; the longctx methods register more of them).
    rope_scaling: str | None = None
    rope_factor: float | None = None
    rope_original_max: int | None = None  # original_max_position_embeddings (default: the model's context)
    context: int | None = None  # the context length after scaling (default: original x factor)
    # KV-cache method.
    kv: str = "dense"
    kv_bits: int | None = None
    kv_group_size: int | None = None
    kv_args: dict[str, str] = field(default_factory=dict)

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


# --- model loaders (weight-quantized directories and other formats register here) -------------------

# fn(opts) -> LLM, or None when the path is not theirs.
ModelLoader = Callable[[ModelOptions], "LLM | None"]
_LOADERS: list[ModelLoader] = []


def register_model_loader(fn: ModelLoader) -> ModelLoader:
    """Register a loader tried before `llamalab.load` (e.g. one that recognises a quantized directory)."""
    _LOADERS.append(fn)
    return fn


def load_model(opts: ModelOptions) -> LLM:
    """Load the model `opts` describes, with its RoPE scaling applied, ready for evaluation."""
    from llamalab.api import load

    if opts.threads:
        torch.set_num_threads(opts.threads)
    llm = None
    for loader in _LOADERS:
        llm = loader(opts)
        if llm is not None:
            break
    if llm is None:
        llm = load(opts.model, dtype=opts.dtype, device=opts.device, threads=opts.threads)
    apply_rope_scaling(llm, opts)
    cache_factory(opts.kv)  # an unknown KV method fails now, not after minutes of work
    return llm


# --- RoPE scaling -------------------------------------------------------------------------------------

# Modules that register RoPE scaling types when imported (the context-extension methods).
_ROPE_PLUGIN_MODULES = ["llamalab.longctx.scaling", "llamalab.longctx"]


def _import_optional(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):  # a missing dependency inside it is a real error
            raise


def apply_rope_scaling(llm: LLM, opts: ModelOptions) -> None:
    """Set `rope_scaling` on the model config and recompute its frequencies (HF semantics: the new context
    is original x factor unless `context` says otherwise)."""
    if not opts.rope_scaling or opts.rope_scaling == "default":
        if opts.rope_factor is not None or opts.context is not None:
            raise LlamalabError(
                "--rope-factor/--context need --rope-scaling TYPE (e.g. --rope-scaling linear)"
            )
        return
    from llamalab.model.rope import rope_scaling_types

    if opts.rope_scaling not in rope_scaling_types():
        for module in _ROPE_PLUGIN_MODULES:
            _import_optional(module)
    known = rope_scaling_types()
    if opts.rope_scaling not in known:
        raise LlamalabError(f"unknown --rope-scaling {opts.rope_scaling!r}; known: {', '.join(known)}")
    if opts.rope_factor is None or opts.rope_factor <= 0:
        raise LlamalabError(f"--rope-scaling {opts.rope_scaling} needs a positive --rope-factor")
    config = llm.model.config
    original = opts.rope_original_max or config.max_position_embeddings
    config.rope_scaling = {
        "rope_type": opts.rope_scaling,
        "factor": float(opts.rope_factor),
        "original_max_position_embeddings": int(original),
    }
    config.max_position_embeddings = int(opts.context or round(original * opts.rope_factor))
    llm.model.refresh_rope()


def context_length(llm: LLM) -> int:
    """The longest sequence the (possibly scaled) model accepts."""
    return int(llm.model.config.max_position_embeddings)


def check_length(llm: LLM, n_tokens: int, what: str) -> None:
    """Raise a one-line error when `n_tokens` does not fit the model's context."""
    ctx = context_length(llm)
    if n_tokens > ctx:
        from llamalab.errors import ContextLengthError

        raise ContextLengthError(
            f"{what} needs {n_tokens} tokens, beyond the model's context of {ctx}; shorten it or extend the "
            f"context with --rope-scaling TYPE --rope-factor F"
        )


# --- KV-cache methods ---------------------------------------------------------------------------------

# factory(config, max_len, max_batch, dtype, device, opts) -> KVCache
CacheFactory = Callable[[Any, int, int, torch.dtype, Any, ModelOptions], "KVCache"]
_KV_FACTORIES: dict[str, CacheFactory] = {}


def register_kv_cache(name: str) -> Callable[[CacheFactory], CacheFactory]:
    """Register a KV-cache factory under `name` (the value of `--kv`)."""

    def wrap(fn: CacheFactory) -> CacheFactory:
        _KV_FACTORIES[name] = fn
        return fn

    return wrap


def kv_cache_names() -> list[str]:
    """Registered KV-cache methods plus those `llamalab/kv/` holds but has not imported yet."""
    import llamalab.kv as kv_pkg

    found = {m.name for m in pkgutil.iter_modules(kv_pkg.__path__)} - {"base"}
    return sorted(set(_KV_FACTORIES) | found)


def cache_factory(name: str) -> CacheFactory:
    """The factory for KV method `name`, importing `llamalab.kv.<name>` if it has not registered yet."""
    if name not in _KV_FACTORIES and name.isidentifier():
        _import_optional(f"llamalab.kv.{name}")
    if name not in _KV_FACTORIES:
        raise LlamalabError(f"unknown --kv {name!r}; known: {', '.join(sorted(_KV_FACTORIES))}")
    return _KV_FACTORIES[name]


@register_kv_cache("dense")
def _dense(config, max_len, max_batch, dtype, device, opts: ModelOptions):
    from llamalab.kv.dense import DenseCache

    if opts.kv_bits is not None or opts.kv_group_size is not None or opts.kv_args:
        raise LlamalabError("--kv-bits/--kv-group-size/--kv-arg do not apply to --kv dense")
    return DenseCache.for_model(config, max_len, max_batch, dtype=dtype, device=device)


def make_cache(llm: LLM, opts: ModelOptions, max_len: int, max_batch: int = 1) -> KVCache:
    """A fresh KV cache of the kind `opts.kv` names, for `max_batch` sequences of up to `max_len` tokens."""
    return cache_factory(opts.kv)(llm.model.config, max_len, max_batch, llm.dtype, llm.device, opts)


# --- the shared CLI options ---------------------------------------------------------------------------


def _parse_kv_args(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LlamalabError(f"--kv-arg {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _cli_parameters() -> list[inspect.Parameter]:
    import typer

    def opt(name: str, annotation: Any, default: Any, *flags: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[annotation, typer.Option(*flags, help=help, rich_help_panel="Model")],
        )

    return [
        opt(
            "model",
            str,
            DEFAULT_MODEL,
            "--model",
            "-m",
            help="Alias (smollm2-135m), HF model directory (also weight-quantized), .gguf file or hub id.",
        ),
        opt("dtype", str, "fp32", "--dtype", help="Compute dtype: fp32 or bf16."),
        opt("threads", int | None, None, "--threads", help="CPU threads (default: PyTorch's choice)."),
        opt("device", str, "cpu", "--device", help="Torch device (cpu, cuda)."),
        opt(
            "rope_scaling",
            str | None,
            None,
            "--rope-scaling",
            help="RoPE scaling type: linear, llama3, and those context-extension methods register (yarn...).",
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
            "context",
            int | None,
            None,
            "--context",
            help="Context length after scaling (default: original x factor).",
        ),
        opt(
            "kv", str, "dense", "--kv", help="KV-cache method (dense; methods in llamalab/kv register more)."
        ),
        opt("kv_bits", int | None, None, "--kv-bits", help="Bits per KV entry, for quantized KV caches."),
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
    ]


_OPTION_NAMES = [f.name for f in dataclasses.fields(ModelOptions)]


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a typer command whose last parameter is `opts: ModelOptions`: the command gets the shared
    model options (`--model`, `--dtype`, `--threads`, `--rope-*`, `--kv*`) and receives them as `opts`."""
    sig = inspect.signature(fn)
    own = [p for name, p in sig.parameters.items() if name != "opts"]
    extra = _cli_parameters()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _OPTION_NAMES if name in kwargs}
        values["kv_args"] = _parse_kv_args(values.get("kv_args"))
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
