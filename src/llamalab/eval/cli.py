"""`llamalab eval ...`: perplexity, multiple choice, passkey and needle from the command line.

Every command takes the shared model options (`--model`, `--dtype`, `--threads`, `--rope-scaling`,
`--rope-factor`, `--kv`, `--kv-bits`, ...) through `llamalab.model_options.model_options`, prints a short
summary, and writes `--output-json` (full report), `--results-md` (one row appended to a markdown table) and,
for passkey and needle, `--plot` (PNG).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from llamalab.errors import LlamalabError
from llamalab.longctx.options import ReduceOptions, reducer_options
from llamalab.model_options import ModelOptions, load_model, model_options

eval_app = typer.Typer(
    name="eval",
    help="Evaluate a model: perplexity, multiple choice, passkey and needle retrieval.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = Annotated[Path | None, typer.Option("--output-json", help="Write the full report (JSON) here.")]
MdOpt = Annotated[
    Path | None, typer.Option("--results-md", help="Append one row to this markdown results table.")
]
ChunkOpt = Annotated[
    int | None,
    typer.Option(
        "--chunk-size",
        help="Feed each window through the KV cache in chunks of this many tokens (KV methods need it).",
    ),
]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Draw the result as a PNG here.")]


def register(app: typer.Typer) -> None:
    """Add the `eval` command group to the main CLI."""
    app.add_typer(eval_app, name="eval")


def parse_lengths(text: str) -> list[int]:
    """'1K,2K,4096' -> [1024, 2048, 4096] (K = 1024)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", part)
        if not m:
            raise LlamalabError(
                f"cannot read length {part.strip()!r}; use numbers like 1024 or 1K, comma-separated"
            )
        value = float(m.group(1)) * (1024 if m.group(2) else 1)
        if value < 1 or value != int(value):
            raise LlamalabError(f"length {part.strip()!r} is not a positive whole number of tokens")
        out.append(int(value))
    return out


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LlamalabError(f"cannot read {text!r} as comma-separated numbers") from None


def _finish(report: dict, output_json: Path | None, results_md: Path | None, metric_keys: list[str]) -> None:
    from llamalab.eval.report import append_markdown, write_json

    if output_json:
        write_json(report, output_json)
        print(f"wrote {output_json}")
    if results_md:
        append_markdown(results_md, report, metric_keys)
        print(f"appended a row to {results_md}")


@eval_app.command()
@model_options
def ppl(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="A text file, a folder of text files, or wikitext2, c4, ptb (needs `datasets`, a network).",
        ),
    ],
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 2048,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Sliding-window protocol with this stride (transformers guide); default: GPTQ's "
            "non-overlapping windows, last partial one dropped."
        ),
    ] = None,
    chunk_size: ChunkOpt = None,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first K windows.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the C4 window draw.")] = 0,
    output_json: JsonOpt = None,
    results_md: MdOpt = None,
    *,
    opts: ModelOptions,
) -> None:
    """Perplexity on a text (non-overlapping windows, or a sliding window with --stride)."""
    from llamalab.eval.data import prepare_source
    from llamalab.eval.perplexity import perplexity
    from llamalab.eval.report import build_report

    tokenize = prepare_source(data, seq_len, seed)  # bad input fails before the model is loaded
    llm = load_model(opts)
    tokens = tokenize(llm.tokenizer)
    result = perplexity(llm, tokens.ids, seq_len, stride, chunk_size, max_windows, opts)
    settings = {
        "data": data,
        "data_description": tokens.description,
        "data_tokens": len(tokens.ids),
        "protocol": result.protocol,
        "seq_len": seq_len,
        "stride": stride,
        "chunk_size": chunk_size,
        "max_windows": max_windows,
        **({"seed": seed} if data.lower() == "c4" else {}),
    }
    report = build_report("ppl", llm, opts, settings, result.metrics(), window_nll=result.window_nll)
    print(
        f"ppl {result.ppl:.4f}  nll {result.nll:.5f}  ({result.tokens} tokens predicted in {result.windows} "
        f"windows, {result.protocol}; {result.tokens_per_s:.0f} tokens/s)"
    )
    _finish(report, output_json, results_md, ["ppl", "tokens", "windows", "tokens_per_s"])


@eval_app.command()
@model_options
def choice(
    task: Annotated[
        str,
        typer.Option(
            "--task",
            "-t",
            help="A JSONL file ({context, choices, gold} per line), alice_cloze (offline), or piqa, "
            "arc_easy, arc_challenge, hellaswag, winogrande (need `datasets` and a network).",
        ),
    ],
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N questions.")] = None,
    delimiter: Annotated[
        str, typer.Option(help="Text between context and choice (lm-eval: one space).")
    ] = " ",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    chunk_size: ChunkOpt = None,
    output_json: JsonOpt = None,
    results_md: MdOpt = None,
    *,
    opts: ModelOptions,
) -> None:
    """Multiple choice by continuation log-likelihood (lm-evaluation-harness acc / acc_norm)."""
    from llamalab.eval.choice import evaluate_choice, load_task
    from llamalab.eval.forward import Forward
    from llamalab.eval.report import build_report

    if batch_size < 1:
        raise LlamalabError(f"--batch-size must be at least 1, got {batch_size}")
    docs, description = load_task(task, delimiter)  # read before loading the model: bad input fails fast
    if limit is not None:
        if limit < 1:
            raise LlamalabError(f"--limit must be at least 1, got {limit}")
        docs = docs[:limit]
    llm = load_model(opts)
    result = evaluate_choice(llm, docs, Forward(llm, opts, chunk_size), batch_size)
    settings = {
        "task": task,
        "task_description": description,
        "limit": limit,
        "delimiter": delimiter,
        "chunk_size": chunk_size,
    }
    report = build_report("choice", llm, opts, settings, result.metrics(), predictions=result.predictions)
    print(
        f"acc {result.acc:.4f} ± {result.acc_stderr:.4f}  acc_norm {result.acc_norm:.4f} ± "
        f"{result.acc_norm_stderr:.4f}  ({result.docs} questions, {result.tokens_per_s:.0f} tokens/s)"
    )
    _finish(report, output_json, results_md, ["acc", "acc_norm", "docs"])


@eval_app.command()
@model_options
@reducer_options
def passkey(
    lengths: Annotated[
        str, typer.Option(help="Total lengths in tokens (prompt + answer), comma-separated; K = 1024.")
    ] = "1K,2K,4K",
    trials: Annotated[int, typer.Option(help="Prompts per length.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed (LongRoPE uses 42).")] = 42,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per answer.")] = 10,
    chunk_size: Annotated[int | None, typer.Option(help="Prefill in chunks of this many tokens.")] = None,
    plot: PlotOpt = None,
    output_json: JsonOpt = None,
    results_md: MdOpt = None,
    *,
    reduce: ReduceOptions,
    opts: ModelOptions,
) -> None:
    """Passkey retrieval accuracy per length (LongRoPE's prompt), with a PNG curve; with --xl3m or --rag the
    prompt may be longer than the context (the model reads a key context / the retrieved chunks)."""
    from llamalab.eval.forward import Forward
    from llamalab.eval.passkey import evaluate_passkey
    from llamalab.eval.report import build_report, plot_curve

    lens = parse_lengths(lengths)
    llm = load_model(opts)
    reducer = reduce.make(llm)
    for n in lens:  # fail before any work, not after the shorter lengths ran
        from llamalab.model_options import check_length

        if reducer is None:
            check_length(llm, n, f"passkey length {n}")
    fwd = Forward(llm, opts, chunk_size, scores_need_cache=False, reduce=reducer)
    result = evaluate_passkey(llm, lens, trials, seed, max_new_tokens, fwd, check=reducer is None)
    settings = {
        "lengths": result.lengths,
        "trials": trials,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "chunk_size": chunk_size,
        **reduce.settings(),
    }
    report = build_report("passkey", llm, opts, settings, result.metrics(), records=result.records)
    for n, acc, toks in zip(result.lengths, result.accuracy, result.prompt_tokens):
        print(f"length {n:>6}: accuracy {acc:.2f}  (prompt ~{toks:.0f} tokens, {trials} trials)")
    if plot:
        plot_curve(
            result.lengths,
            {llm.name: result.accuracy},
            plot,
            f"Passkey retrieval ({trials} trials/length)",
            "context length (tokens)",
            "accuracy",
        )
        print(f"wrote {plot}")
    _finish(report, output_json, results_md, ["accuracy", "mean_accuracy"])


@eval_app.command()
@model_options
@reducer_options
def needle(
    haystack: Annotated[
        str | None, typer.Option(help="Haystack text file or folder (default: the shipped Alice text).")
    ] = None,
    lengths: Annotated[
        str, typer.Option(help="Total lengths in tokens, comma-separated; K = 1024.")
    ] = "1K,2K,4K",
    depths: Annotated[
        str, typer.Option(help="Needle depths in percent, comma-separated.")
    ] = "0,25,50,75,100",
    needle_text: Annotated[str | None, typer.Option("--needle", help="The needle sentence.")] = None,
    question: Annotated[str | None, typer.Option(help="The question asked about it.")] = None,
    answer: Annotated[str | None, typer.Option(help="The phrase a right reply contains.")] = None,
    trials: Annotated[int, typer.Option(help="Trials per cell (each starts further into the haystack).")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per reply.")] = 32,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Use the chat template (default: if the model has one)."),
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Prefill in chunks of this many tokens.")] = None,
    plot: PlotOpt = None,
    output_json: JsonOpt = None,
    results_md: MdOpt = None,
    *,
    reduce: ReduceOptions,
    opts: ModelOptions,
) -> None:
    """Needle-in-a-haystack over a grid of lengths x depths, with a PNG heat map (--xl3m / --rag: lengths
    beyond the context)."""
    from llamalab.eval import needle as nd
    from llamalab.eval.forward import Forward
    from llamalab.eval.report import build_report, plot_heatmap

    if needle_text is not None and (question is None or answer is None):
        raise LlamalabError("--needle needs --question and --answer to go with it")
    lens, deps = parse_lengths(lengths), parse_floats(depths)
    text, description = nd.read_haystack(haystack)
    llm = load_model(opts)
    reducer = reduce.make(llm)
    from llamalab.model_options import check_length

    for n in lens:
        if reducer is None:
            check_length(llm, n, f"needle length {n}")
    fwd = Forward(llm, opts, chunk_size, scores_need_cache=False, reduce=reducer)
    result = nd.evaluate_needle(
        llm,
        text,
        lens,
        deps,
        needle_text or nd.NEEDLE,
        question or nd.QUESTION,
        answer or nd.ANSWER,
        max_new_tokens,
        trials,
        chat,
        fwd,
        check=reducer is None,
    )
    settings = {
        "haystack": description,
        "lengths": result.lengths,
        "depths": result.depths,
        "needle": needle_text or nd.NEEDLE,
        "question": question or nd.QUESTION,
        "answer": answer or nd.ANSWER,
        "trials": trials,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
        "chunk_size": chunk_size,
        **reduce.settings(),
    }
    report = build_report("needle", llm, opts, settings, result.metrics(), records=result.records)
    print("depth \\ length " + " ".join(f"{n:>7}" for n in result.lengths))
    for d, row in zip(result.depths, result.hit):
        print(f"{d:>14g} " + " ".join(f"{v:>7.2f}" for v in row))
    if plot:
        plot_heatmap(
            result.hit,
            [f"{d:g}%" for d in result.depths],
            [str(n) for n in result.lengths],
            plot,
            "Needle in a haystack: hit rate",
            "context length (tokens)",
            "needle depth",
        )
        print(f"wrote {plot}")
    _finish(report, output_json, results_md, ["accuracy", "recall"])
