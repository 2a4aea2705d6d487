"""The evaluations a grid names, each a thin adapter over the function `llamalab eval` / `bench` call.

An evaluation declares its parameters with defaults (anything else is an error naming the known ones),
checks what it can before any model is loaded (`check`: files exist, lengths parse), and `run`s on a loaded
model, returning a metrics dict. The numbers are those of the direct calls: the adapters add no
computation, only the choice of data. Offline data the lab names:

- `alice`: the whole shipped Alice text, tokenized as `llamalab eval ppl --data FILE` would;
- `alice_heldout`: its last 25% (the part no calibration window is drawn from), tokenized without special
  tokens, as the quantization study scores it; `alice_cloze_heldout`: the 111 sentence-ending questions
  built from that part (`cloze_docs(..., n=1000)`), the study's multiple-choice column;
- `python_reference`: the shipped second domain (sections of the Python Language Reference, technical prose
  that no calibration draws from), tokenized without special tokens: a second, independent text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError

OFFLINE_TEXTS = ("alice", "alice_heldout", "python_reference")
OFFLINE_TASKS = ("alice_cloze", "alice_cloze_heldout")


@dataclass
class Evaluation:
    name: str
    defaults: dict[str, Any]
    run: Callable[..., dict[str, Any]]  # (llm, opts, params) -> metrics
    check: Callable[[dict[str, Any], Path], dict[str, Any]] = lambda p, base: p
    paths: tuple[str, ...] = field(default_factory=tuple)  # params that name files, relative to the grid

    def prepare(self, params: dict[str, Any] | None, base: Path, where: str) -> dict[str, Any]:
        """Defaults filled in, unknown parameters refused, paths made absolute, cheap checks done."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise LlamalabError(
                f"{where}: unknown parameter(s) {', '.join(unknown)} of evaluation {self.name!r}; "
                f"known: {', '.join(self.defaults)}"
            )
        out = {**self.defaults, **params}
        for key in self.paths:
            value = out.get(key)
            if isinstance(value, str) and _looks_like_path(value) and not Path(value).is_absolute():
                out[key] = str((base / value).resolve())
        return self.check(out, base)


def _looks_like_path(value: str) -> bool:
    return "/" in value or "." in Path(value).name


def _need_file(value: str | None, what: str, allowed: tuple[str, ...]) -> None:
    if value is None or value in allowed:
        return
    if _looks_like_path(value) and not Path(value).exists():
        raise LlamalabError(f"{what} {value!r}: no such file or folder")


# --- perplexity -------------------------------------------------------------------------------------------


def _ppl_tokens(llm, data: str, seq_len: int, seed: int) -> list[int]:
    if data == "alice_heldout":
        from llamalab.quant.calib import alice_split

        return llm.encode(alice_split()[1], add_special_tokens=False)
    if data == "alice":
        from llamalab.data import sample_text

        return llm.tokenizer.encode(sample_text())
    if data == "python_reference":
        from llamalab.data import sample_text

        return llm.encode(sample_text("python_reference"), add_special_tokens=False)
    from llamalab.eval.data import prepare_source

    return prepare_source(data, seq_len, seed)(llm.tokenizer).ids


def _run_ppl(llm, opts, p: dict[str, Any]) -> dict[str, Any]:
    from llamalab.eval.perplexity import perplexity

    ids = _ppl_tokens(llm, p["data"], p["seq_len"], p["seed"])
    r = perplexity(
        llm, ids, p["seq_len"], p["stride"], p["chunk_size"], p["max_windows"], opts, progress=False
    )
    return r.metrics()


def _check_ppl(p: dict[str, Any], base: Path) -> dict[str, Any]:
    from llamalab.eval.data import NAMED

    _need_file(p["data"], "ppl data", (*OFFLINE_TEXTS, *NAMED))
    return p


# --- multiple choice --------------------------------------------------------------------------------------


def _choice_docs(task: str, delimiter: str):
    if task == "alice_cloze_heldout":
        from llamalab.eval.choice import cloze_docs
        from llamalab.quant.calib import alice_split

        return cloze_docs(alice_split()[1], n=1000)
    from llamalab.eval.choice import load_task

    return load_task(task, delimiter)[0]


def _run_choice(llm, opts, p: dict[str, Any]) -> dict[str, Any]:
    from llamalab.eval.choice import evaluate_choice
    from llamalab.eval.forward import Forward

    docs = _choice_docs(p["task"], p["delimiter"])
    if p["limit"] is not None:
        docs = docs[: p["limit"]]
    r = evaluate_choice(llm, docs, Forward(llm, opts, p["chunk_size"]), p["batch_size"], progress=False)
    return r.metrics()


def _check_choice(p: dict[str, Any], base: Path) -> dict[str, Any]:
    _need_file(p["task"], "choice task", OFFLINE_TASKS)
    return p


# --- passkey and needle -----------------------------------------------------------------------------------


def _lengths(value: Any) -> list[int]:
    from llamalab.eval.cli import parse_lengths

    return parse_lengths(",".join(map(str, value)) if isinstance(value, list) else str(value))


def _check_lengths(p: dict[str, Any], base: Path) -> dict[str, Any]:
    p = {**p, "lengths": _lengths(p["lengths"])}
    if isinstance(p.get("depths"), str):
        from llamalab.eval.cli import parse_floats

        p["depths"] = parse_floats(p["depths"])
    if "haystack" in p:
        _need_file(p["haystack"], "needle haystack", ())
    return p


def _run_passkey(llm, opts, p: dict[str, Any]) -> dict[str, Any]:
    from llamalab.eval.forward import Forward
    from llamalab.eval.passkey import evaluate_passkey

    fwd = Forward(llm, opts, p["chunk_size"], scores_need_cache=False)
    r = evaluate_passkey(llm, p["lengths"], p["trials"], p["seed"], p["max_new_tokens"], fwd, progress=False)
    return r.metrics()


def _run_needle(llm, opts, p: dict[str, Any]) -> dict[str, Any]:
    from llamalab.eval import needle as nd
    from llamalab.eval.forward import Forward

    text, _ = nd.read_haystack(p["haystack"])
    fwd = Forward(llm, opts, p["chunk_size"], scores_need_cache=False)
    r = nd.evaluate_needle(
        llm,
        text,
        p["lengths"],
        list(p["depths"]),
        nd.NEEDLE,
        nd.QUESTION,
        nd.ANSWER,
        p["max_new_tokens"],
        p["trials"],
        p["chat"],
        fwd,
        progress=False,
    )
    return r.metrics()


# --- speed and memory -------------------------------------------------------------------------------------


def _run_speed(llm, opts, p: dict[str, Any]) -> dict[str, Any]:
    from llamalab.bench import bench_model

    r = bench_model(llm, p["prompt_tokens"], p["new_tokens"], p["batch"], p["repeats"])
    return {k: v for k, v in r.items() if k not in ("model", "dtype")}


def _run_memory(llm, opts, p: dict[str, Any]) -> dict[str, Any]:
    from llamalab.model_options import context_length, make_cache

    context = p["context"] or context_length(llm)
    cache = make_cache(llm, opts, context, p["batch"])
    kv = int(cache.nbytes())
    weights = int(llm.model.weight_bytes())
    return {"weight_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv, "context": context}


def _run_kv_bytes(llm, opts, p: dict[str, Any]) -> dict[str, Any]:
    """The cache of exactly `tokens` slots, filled with that many tokens of real text in `chunk_size`
    chunks (so sinks, buffers, residual windows and retained tokens are all there), measured from its
    tensors; bits per value count everything it holds against the values it stands for."""
    import torch

    from llamalab.bench import bench_tokens
    from llamalab.model_options import check_length, make_cache

    tokens, config = p["tokens"], llm.model.config
    check_length(llm, tokens, "kv_bytes")
    ids = torch.tensor(bench_tokens(llm, tokens)).unsqueeze(0)
    cache = make_cache(llm, opts, tokens, 1)
    with torch.inference_mode():
        for s in range(0, tokens, p["chunk_size"]):
            llm.model(ids[:, s : s + p["chunk_size"]], s, cache, [0])
    kv = int(cache.nbytes())
    values = tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
    weights = int(llm.model.weight_bytes())
    out = {
        "tokens": tokens,
        "kv_cache_bytes": kv,
        "bits_per_value": 8 * kv / values,
        "weight_bytes": weights,
        "total_bytes": weights + kv,
    }
    if hasattr(cache, "predictor_bytes"):  # fitted parameters shared by every sequence, counted apart
        out["kv_parameter_bytes"] = int(cache.predictor_bytes())
    return out


EVALUATIONS: dict[str, Evaluation] = {
    e.name: e
    for e in [
        Evaluation(
            "ppl",
            {
                "data": "alice_heldout",
                "seq_len": 2048,
                "stride": None,
                "chunk_size": None,
                "max_windows": None,
                "seed": 0,
            },
            _run_ppl,
            _check_ppl,
            ("data",),
        ),
        Evaluation(
            "choice",
            {"task": "alice_cloze", "limit": None, "delimiter": " ", "batch_size": 8, "chunk_size": None},
            _run_choice,
            _check_choice,
            ("task",),
        ),
        Evaluation(
            "passkey",
            {"lengths": "1K,2K", "trials": 5, "seed": 42, "max_new_tokens": 10, "chunk_size": None},
            _run_passkey,
            _check_lengths,
        ),
        Evaluation(
            "needle",
            {
                "haystack": None,
                "lengths": "1K,2K",
                "depths": "0,50,100",
                "trials": 1,
                "max_new_tokens": 32,
                "chat": None,
                "chunk_size": None,
            },
            _run_needle,
            _check_lengths,
            ("haystack",),
        ),
        Evaluation("speed", {"prompt_tokens": 512, "new_tokens": 128, "batch": 1, "repeats": 3}, _run_speed),
        Evaluation("memory", {"context": None, "batch": 1}, _run_memory),
        Evaluation("kv_bytes", {"tokens": 4096, "chunk_size": 512}, _run_kv_bytes),
    ]
}

# `model` is not an evaluation a grid names: every finished cell records it (bits per weight, bytes in
# memory, parameters, quantization time), because every plot needs a cost axis.
MODEL = "model"


def get_evaluation(name: str, where: str) -> Evaluation:
    """The evaluation a grid entry names: `KIND`, or `KIND@LABEL` for a second one of the same kind (for
    example `ppl@docs` beside `ppl`: its metrics are `ppl@docs.*`)."""
    kind = name.partition("@")[0]
    if kind not in EVALUATIONS:
        raise LlamalabError(
            f"{where}: unknown evaluation {name!r}; known: {', '.join(EVALUATIONS)} (a second one of a kind: KIND@LABEL)"
        )
    return EVALUATIONS[kind]


def model_metrics(llm, artifacts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What every cell records about its model: the cost axes of every plot, and what its artifacts
    (build records by kind) cost to make."""
    import torch

    params = int(llm.model.num_parameters())
    out: dict[str, Any] = {"parameters": params, "weight_bytes": int(llm.model.weight_bytes())}
    quantized = artifacts.get("quantized")
    if quantized and quantized.get("bits_per_weight") is not None:
        out["bits_per_weight"] = quantized["bits_per_weight"]
        out["quantize_seconds"] = quantized.get("seconds")
    else:
        out["bits_per_weight"] = float(torch.finfo(llm.dtype).bits)
        out["quantize_seconds"] = 0.0
    trained = artifacts.get("trained")
    if trained:
        out["train_seconds"] = trained.get("seconds")
        out["train_final_loss"] = trained.get("final_loss")
    predictors = artifacts.get("kv_predictors")
    if predictors:
        out["kv_calibrate_seconds"] = predictors.get("seconds")
        out["kv_predictor_bits"] = predictors.get("held_out_bits")
    return out
