"""`llamalab longrope search`: LongRoPE2's factor search from the command line (`longrope_search.py`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from llamalab.errors import LlamalabError
from llamalab.model_options import ModelOptions, load_model, model_options

longrope_app = typer.Typer(
    name="longrope",
    help="LongRoPE2: search per-frequency RoPE rescale factors for a longer context.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def register(app: typer.Typer) -> None:
    app.add_typer(longrope_app, name="longrope")


def set_scaling(llm, scaling: dict, context: int) -> None:
    """Give the loaded model another RoPE scaling (the search tries one per genome)."""
    llm.model.config.rope_scaling = scaling
    llm.model.config.max_position_embeddings = context
    llm.model.refresh_rope()


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


@longrope_app.command()
@model_options(kv=False)
def search(
    target_len: Annotated[int, typer.Option("--target-len", help="The context to extend to (tokens).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the longrope rope_scaling JSON here.")],
    data: Annotated[
        str, typer.Option("--data", "-d", help="Haystack text: a file, a folder of text files, or 'alice'.")
    ] = "alice",
    samples: Annotated[int, typer.Option(help="Needle documents the fitness averages over.")] = 5,
    population: Annotated[int, typer.Option(help="Population size (LongRoPE: 64).")] = 64,
    iterations: Annotated[int, typer.Option(help="Evolution iterations (LongRoPE: 40).")] = 40,
    parents: Annotated[int, typer.Option(help="Parents kept per iteration (LongRoPE: 32).")] = 32,
    mutations: Annotated[int, typer.Option(help="Mutations per iteration (LongRoPE: 16).")] = 16,
    crossovers: Annotated[int, typer.Option(help="Crossovers per iteration (LongRoPE: 16).")] = 16,
    step: Annotated[float, typer.Option(help="Grid step of the factors (LongRoPE: 0.01).")] = 0.01,
    critical_pair: Annotated[
        int | None, typer.Option(help="First freely searched pair (default: theoretical critical pair - 1).")
    ] = None,
    max_scale: Annotated[
        float | None, typer.Option(help="Largest factor (default: 2 x target/original).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the search and of the needle documents.")] = 0,
    space: Annotated[
        str,
        typer.Option(
            help="v2: LongRoPE2's space (a geometric ramp below the critical pair, free pairs from it on between "
            "s and 2s); v1: LongRoPE's (every pair free between 1 and 1+s, starting from YaRN's ramp)."
        ),
    ] = "v2",
    mscale: Annotated[
        str,
        typer.Option(help="Attention factor: su (sqrt(1 + ln s / ln L0)), yarn (0.1 ln s + 1) or a number."),
    ] = "su",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file (default: OUT.checkpoint.json); rerun to resume.")
    ] = None,
    compare_yarn: Annotated[
        bool, typer.Option("--compare-yarn/--no-compare-yarn", help="Also score plain yarn on the fitness.")
    ] = True,
    *,
    opts: ModelOptions,
) -> None:
    """Evolutionary search (LongRoPE2, arXiv 2502.20082) of per-pair RoPE factors for TARGET_LEN, with
    needle-driven perplexity as fitness. Resumable: rerun the same command after an interruption."""
    from llamalab.longctx.longrope_search import Checkpoint, Search, SearchSettings, longrope_scaling
    from llamalab.longctx.needle_ppl import needle_ppl, needle_samples

    if opts.rope_scaling or opts.rope_config or opts.context:
        raise LlamalabError("longrope search sets the RoPE itself; drop --rope-* and --context")
    text = _read_data(data)
    llm = load_model(opts)
    config = llm.model.config
    settings = SearchSettings(
        target_len, config.max_position_embeddings, config.head_dim, config.rope_theta, population, iterations,
        parents, mutations, crossovers, step=step, critical=critical_pair, max_scale=max_scale, seed=seed,
        space=space, mscale=mscale,
    )  # fmt: skip
    docs = needle_samples(llm.tokenizer, text, target_len, samples, seed)
    ckpt = Checkpoint(checkpoint or out.with_name(out.name + ".checkpoint.json"), settings)

    def fitness(factors: list[float]) -> float:
        set_scaling(llm, longrope_scaling(factors, settings), target_len)
        return needle_ppl(llm.model, docs)

    print(
        f"searching {settings.head_dim // 2} pairs ({settings.space}, free from pair {settings.critical}), "
        f"s = {settings.scale:g}, attention factor {settings.attention_factor:.4f}, "
        f"{settings.evaluations} evaluations of {samples} needle documents x {target_len} tokens"
        + (f"; {len(ckpt.known)} already in {ckpt.path}" if ckpt.known else "")
    )
    result = Search(settings, fitness, ckpt).run()
    report = {"rope_scaling": longrope_scaling(result.factors, settings), "longrope_search": {
        "fitness": "needle-driven perplexity (answer tokens only)", "best": result.fitness,
        "curve": result.curve, "settings": {**settings.__dict__, "samples": samples, "data": data},
        "evaluations": len(result.history), "evaluated_in_this_run": result.evaluated,
    }}  # fmt: skip
    if compare_yarn:
        yarn = {
            "rope_type": "yarn",
            "factor": settings.scale,
            "original_max_position_embeddings": settings.original,
        }
        set_scaling(llm, yarn, target_len)
        report["longrope_search"]["yarn"] = needle_ppl(llm.model, docs)
    write_json_atomic(out, report)
    line = f"best needle perplexity {result.fitness:.4g}"
    if compare_yarn:
        line += f" (plain yarn: {report['longrope_search']['yarn']:.4g})"
    print(f"{line}; wrote {out} (use it with --rope-config {out})")


def _read_data(source: str) -> str:
    if source.lower() == "alice":
        from llamalab.data import sample_text

        return sample_text()
    from llamalab.eval.data import read_source_text

    if not Path(source).expanduser().exists():
        raise LlamalabError(f"{source}: no such text file or folder (or use --data alice)")
    return read_source_text(source)[0]
