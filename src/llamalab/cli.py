"""The `llamalab` command line: one sub-command per user task.

Each command is a typed function; its signature and docstring are its `--help`. Errors the user can cause
are `LlamalabError`s: printed as one line on stderr with exit status 1, never as a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from llamalab.errors import LlamalabError
from llamalab.longctx.options import ReduceOptions, reducer_options
from llamalab.model.build import AUTO
from llamalab.model_options import ModelOptions, load_model, model_options

app = typer.Typer(
    name="llamalab",
    help="Load, run, serve, compress, extend, train and evaluate LLaMA-family models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Sub-command groups that live next to the feature they drive; each module exposes `register(app)`.
EXTENSIONS: list[str] = [
    "llamalab.serve.cli",
    "llamalab.eval.cli",
    "llamalab.quant.cli",
    "llamalab.train.cli",
    "llamalab.longctx.cli",
    "llamalab.longctx.rag_cli",
    "llamalab.kv.cli",
    "llamalab.lab.cli",
]


def _load_for_generation(opts: ModelOptions):
    """The model, with the native kernels built (or loaded) before any text is written: their one-time
    build message goes to stderr on its own line, never into the middle of the answer."""
    from llamalab import kernels

    llm = load_model(opts)
    kernels.unavailable_reason()
    return llm


@app.command()
@model_options(dtype=AUTO)
@reducer_options
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text (used raw unless --chat).")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1: off).")] = 1.0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="HF-style repetition penalty (1: off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")
    ] = False,
    *,
    reduce: ReduceOptions,
    opts: ModelOptions,
) -> None:
    """Generate a continuation of PROMPT and print only the generated text (--xl3m / --rag: from a prompt
    longer than the context, through XL3M's key context or the retrieved chunks)."""
    llm = _load_for_generation(opts)
    reducer = reduce.make(llm)
    kw = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop or [],
    )
    if reducer is not None:
        ids = llm.chat_ids([{"role": "user", "content": prompt}]) if chat else llm.encode(prompt)
        pieces = llm.stream(reducer(ids, max_new_tokens), **kw)
    else:
        pieces = llm.chat(prompt, stream=True, **kw) if chat else llm.stream(prompt, **kw)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
@model_options(dtype=AUTO)
def chat(
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    *,
    opts: ModelOptions,
) -> None:
    """Interactive multi-turn chat with streaming. Commands: /reset clears the history, /exit quits."""
    from llamalab.chat_repl import run_repl

    llm = _load_for_generation(opts)
    run_repl(
        llm, system, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    )


@app.command()
@model_options(kv=False)
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    *,
    opts: ModelOptions,
) -> None:
    """Architecture, parameter count, bytes in memory, context length, tokenizer and chat template."""
    from llamalab.model_info import model_info

    data = model_info(load_model(opts))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key == "chat_template":
            value = (value or "(none)").strip().replace("\n", "\n    ")
            print(f"{key}:\n    {value}")
        else:
            print(f"{key}: {value}")


@app.command()
@model_options(kv=False)
def convert(
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory to write the HF model into.")],
    *,
    opts: ModelOptions,
) -> None:
    """Write any loadable model as an HF directory (safetensors, config.json, tokenizer files) that
    transformers' AutoModelForCausalLM.from_pretrained loads with the same logits; `--dtype` is the stored
    weight dtype, and `--rope-*` / `--context` are saved into its config."""
    from llamalab.convert import convert_to_hf

    convert_to_hf(opts.model, out, opts.dtype, opts)
    print(f"wrote {out}")


@app.command()
@model_options(dtype=AUTO)
def bench(
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the prefill measurement.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens to decode for the decode measurement.")] = 128,
    batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed repetitions (the best is reported).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    *,
    opts: ModelOptions,
) -> None:
    """Prefill and decode tokens/s, GB/s of weights read, peak memory (llama-bench's pp/tg shape)."""
    from llamalab.bench import bench_model, format_bench

    result = bench_model(load_model(opts), prompt_tokens, new_tokens, batch, repeats)
    print(json.dumps(result) if as_json else format_bench(result))


def _register_extensions() -> None:
    for name in EXTENSIONS:
        importlib.import_module(name).register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    _register_extensions()
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except LlamalabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
