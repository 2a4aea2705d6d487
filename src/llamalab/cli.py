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
from llamalab.io.registry import DEFAULT_MODEL

app = typer.Typer(
    name="llamalab",
    help="Load, run, serve, compress, extend, train and evaluate LLaMA-family models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Alias (smollm2-135m), HF model directory, .gguf file or hub id.")
]
DtypeOpt = Annotated[str, typer.Option(help="Compute dtype: fp32 or bf16.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (default: PyTorch's choice).")]

# Sub-command groups that live next to the feature they drive; each module exposes `register(app)`.
EXTENSIONS: list[str] = ["llamalab.serve.cli", "llamalab.eval.cli", "llamalab.quant.cli", "llamalab.lab.cli"]


def _load(model: str, dtype: str = "fp32", threads: int | None = None):
    from llamalab.api import load

    return load(model, dtype=dtype, threads=threads)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text (used raw unless --chat).")],
    model: ModelOpt = DEFAULT_MODEL,
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
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = None,
) -> None:
    """Generate a continuation of PROMPT and print only the generated text."""
    llm = _load(model, dtype, threads)
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
    pieces = llm.chat(prompt, stream=True, **kw) if chat else llm.stream(prompt, **kw)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    model: ModelOpt = DEFAULT_MODEL,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = None,
) -> None:
    """Interactive multi-turn chat with streaming. Commands: /reset clears the history, /exit quits."""
    from llamalab.chat_repl import run_repl

    llm = _load(model, dtype, threads)
    run_repl(
        llm, system, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    )


@app.command()
def info(
    model: ModelOpt = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dtype: DtypeOpt = "fp32",
) -> None:
    """Architecture, parameter count, bytes in memory, context length, tokenizer and chat template."""
    from llamalab.inspect import model_info

    data = model_info(_load(model, dtype))
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
def convert(
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory to write the HF model into.")],
    model: ModelOpt = DEFAULT_MODEL,
    dtype: Annotated[str, typer.Option(help="Stored weight dtype: fp32, bf16 or fp16.")] = "fp32",
) -> None:
    """Write any loadable model as an HF directory (safetensors, config.json, tokenizer files) that
    transformers' AutoModelForCausalLM.from_pretrained loads with the same logits."""
    from llamalab.convert import convert_to_hf

    convert_to_hf(model, out, dtype)
    print(f"wrote {out}")


@app.command()
def bench(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the prefill measurement.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens to decode for the decode measurement.")] = 128,
    batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed repetitions (the best is reported).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Prefill and decode tokens/s, GB/s of weights read, peak memory (llama-bench's pp/tg shape)."""
    from llamalab.bench import bench_model, format_bench

    result = bench_model(_load(model, dtype, threads), prompt_tokens, new_tokens, batch, repeats)
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
