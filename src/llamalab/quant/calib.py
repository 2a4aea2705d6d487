"""The calibration pipeline every calibrated method shares.

1. **Data** (`CalibConfig`, `calibration_ids`), `nsamples` windows of `seq_len` tokens cut by the rule of
   the reference that used the source:
   - a stream (the shipped text `alice`: the first 75% of "Alice's Adventures in Wonderland", the last 25%
     kept for evaluation; a UTF-8 text file; `wikitext2`, its train split joined by blank lines): random
     windows drawn with `random.Random(seed)`, as GPTQ's `datautils.get_wikitext2` does;
   - documents (`c4`, its first train shard; a `.jsonl` file of {"text": ...} lines): GPTQ's `get_c4`, each
     window inside one random document longer than `seq_len` tokens, at a random start
     (`stream_windows`, `document_windows`);
   - `pile-val` (AWQ's `get_calib_dataset`): the validation split shuffled by `datasets` with seed 42,
     lines of at most `seq_len` tokens
     kept in that order, concatenated and cut into consecutive `seq_len` blocks; AWQ takes 128 lines and
     uses every block they make, we take lines until they make `nsamples` blocks (`awq_blocks`).
   Hub sets need the `datasets` package and a network and fail with one line when either is missing.
   Source, seed, samples and length are recorded in every checkpoint.
2. **Layer-sequential capture** (`run_layerwise`): the calibration windows are embedded once; then for
   each decoder block in turn, its inputs are run through it with hooks that collect what the method
   needs (Hessians, mean |x|, max |x| or the inputs themselves), the method quantizes the block in place,
   and the block is run again so block i+1 sees the *quantized* block i's outputs (IST-DASLab/gptq
   `llama_sequential`). Methods whose reference propagates float outputs (AWQ, SmoothQuant) say so.
   Only one block's activations are held at a time. A progress bar per block shows the block's relative
   output error ||Y_q - Y||^2 / ||Y||^2 on the calibration data.
3. **True-sequential order**: inside a block, its linear groups in order (`Block.linear_groups()`: for
   LLaMA [q, k, v] -> [o] -> [gate, up] -> [down]), re-capturing inputs after each group is quantized.
   Which linears a block has, and which share an input, is the block's to say, not this file's.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab.data import alice_split
from llamalab.errors import LlamalabError
from llamalab.model.attention import AttnContext
from llamalab.model.rope import rope_cos_sin

HUB_DATASETS = ("wikitext2", "c4", "pile-val")


@dataclass
class CalibConfig:
    """Where calibration text comes from and how it is cut (all recorded in the checkpoint)."""

    source: str = "alice"
    nsamples: int = 32
    seq_len: int = 512
    seed: int = 0

    def validate(self) -> CalibConfig:
        if self.nsamples < 1:
            raise LlamalabError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seq_len < 16:
            raise LlamalabError(f"--seq-len must be at least 16 tokens, got {self.seq_len}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_text(source: str) -> str:
    """The raw text of a stream source (see module docstring)."""
    if source == "alice":
        return alice_split()[0]
    if source == "wikitext2":
        return "\n\n".join(_hub_documents(source))
    path = _source_file(source)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlamalabError(f"{path}: calibration text must be UTF-8") from None


def calibration_documents(source: str) -> list[str]:
    """The documents of a document source: a hub set, or a JSONL file's "text" fields in file order."""
    if source in ("c4", "pile-val"):
        return _hub_documents(source)
    import json

    path, docs = _source_file(source), []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LlamalabError(f'{path}:{n}: not a JSON object with a "text" field') from None
    if not docs:
        raise LlamalabError(f"{path}: no documents")
    return docs


def _source_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise LlamalabError(
            f"calibration source {source!r} is not a file, 'alice', or one of {', '.join(HUB_DATASETS)}"
        )
    return path


def check_source(source: str) -> None:
    """Fail fast (before a model is loaded) on a calibration source that cannot be read."""
    if source in HUB_DATASETS:
        _hub_check(source)
    elif source != "alice":
        _source_file(source)


def _hub_check(name: str) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise LlamalabError(
            f"calibration set {name!r} needs `pip install datasets` and a network; "
            "use --calib alice or --calib FILE.txt offline"
        ) from None
    if not _hub_reachable():
        raise LlamalabError(
            f"calibration set {name!r} must be downloaded from the Hugging Face Hub, which cannot be reached "
            "(offline?); use --calib alice or --calib FILE.txt"
        )


def _hub_documents(name: str) -> list[str]:
    import datasets

    _hub_check(name)
    repo, config, split, kwargs = {
        "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", {}),
        "c4": ("allenai/c4", "en", "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
        "pile-val": ("mit-han-lab/pile-val-backup", None, "validation", {}),
    }[name]
    try:
        ds = datasets.load_dataset(repo, config, split=split, **kwargs)
    except Exception as e:
        raise LlamalabError(
            f"could not load calibration set {name!r} ({type(e).__name__}); offline?"
        ) from None
    if name == "pile-val":
        ds = ds.shuffle(seed=42)  # AWQ's order, drawn by `datasets` itself
    return list(ds["text"])


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def calibration_ids(tokenizer, calib: CalibConfig) -> torch.Tensor:
    """`nsamples` windows of `seq_len` tokens (nsamples, seq_len), cut by the source's reference rule."""
    calib.validate()
    source = calib.source
    if source in ("c4", "pile-val") or source.endswith(".jsonl"):
        docs = calibration_documents(source)
        tokenize = lambda text: tokenizer.encode(text, add_special_tokens=True)  # noqa: E731  (`tokenizer(text)`)
        rule = awq_blocks if source == "pile-val" else document_windows
        return rule(docs, tokenize, calib)
    return stream_windows(tokenizer.encode(calibration_text(source), add_special_tokens=False), calib)


def stream_windows(ids: list[int], calib: CalibConfig) -> torch.Tensor:
    """GPTQ's `get_wikitext2`: random windows of one token stream."""
    if len(ids) < calib.seq_len + 1:
        raise LlamalabError(
            f"calibration text {calib.source!r} has {len(ids)} tokens, too little for one window of "
            f"--seq-len {calib.seq_len}; give more text or a shorter --seq-len"
        )
    rng = random.Random(calib.seed)
    rows = []
    for _ in range(calib.nsamples):
        i = rng.randint(0, len(ids) - calib.seq_len - 1)
        rows.append(ids[i : i + calib.seq_len])
    return torch.tensor(rows)


def document_windows(
    docs: list[str], tokenize: Callable[[str], list[int]], calib: CalibConfig
) -> torch.Tensor:
    """GPTQ's `get_c4`: per window, random documents until one has more than `seq_len` tokens, then a
    random window inside it."""
    rng, L, rows, tried = random.Random(calib.seed), calib.seq_len, [], set()
    for _ in range(calib.nsamples):
        while True:
            k = rng.randint(0, len(docs) - 1)
            ids = tokenize(docs[k])
            if len(ids) > L:
                break
            tried.add(k)
            if len(tried) == len(docs):  # the reference would loop for ever
                raise LlamalabError(
                    f"calibration source {calib.source!r}: no document is longer than --seq-len {L} tokens"
                )
        i = rng.randint(0, len(ids) - L - 1)
        rows.append(ids[i : i + L])
    return torch.tensor(rows)


def awq_blocks(docs: list[str], tokenize: Callable[[str], list[int]], calib: CalibConfig) -> torch.Tensor:
    """AWQ's `get_calib_dataset` on lines in their (already shuffled) order: the stripped lines of at most
    `seq_len` tokens, concatenated and cut into consecutive `seq_len`-token blocks, until there are
    `nsamples` of them."""
    L, need, stream = calib.seq_len, calib.nsamples * calib.seq_len, []
    for doc in docs:
        ids = tokenize(doc.strip())
        if 0 < len(ids) <= L:
            stream.extend(ids)
            if len(stream) >= need:
                return torch.tensor(stream[:need]).view(calib.nsamples, L)
    raise LlamalabError(
        f"calibration source {calib.source!r}: its lines of at most {L} tokens make only "
        f"{len(stream) // L} blocks of --seq-len {L}, fewer than --nsamples {calib.nsamples}"
    )


# --- capture -------------------------------------------------------------------------------------------


class Stats:
    """What the hooks collected for one linear's input over all calibration tokens."""

    def __init__(self) -> None:
        self.n = 0
        self.xtx: torch.Tensor | None = None  # sum x x^T, fp64
        self.abs_sum: torch.Tensor | None = None  # sum |x| per channel
        self.abs_max: torch.Tensor | None = None  # max |x| per channel
        self.inputs: list[torch.Tensor] = []

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/N sum x x^T (fp32)."""
        return (2.0 / self.n * self.xtx).float()

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.n).float()

    def all_inputs(self) -> torch.Tensor:
        return torch.cat(self.inputs).float()


def capture(
    block: nn.Module, x: torch.Tensor, ctx: BlockContext, names: list[str], kinds: set[str]
) -> tuple[torch.Tensor, dict[str, Stats]]:
    """Run `block` on `x` (n, L, d) with hooks on the linears `names`; return its output and their Stats.
    Linears that read the same tensor (q/k/v, gate/up) share one computation of x x^T."""
    stats = {n: Stats() for n in names}
    last: dict[str, Any] = {"input": None, "deltas": None}  # holding the tensor keeps its identity unique

    def hook(name):
        def fn(_module, args, _out):
            if last["input"] is not args[0]:
                inp = args[0].detach().reshape(-1, args[0].shape[-1])
                last["input"], last["deltas"] = args[0], _deltas(inp, kinds)
            _merge(stats[name], last["deltas"])

        return fn

    handles = [block.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        out = ctx.run(block, x)
    finally:
        for h in handles:
            h.remove()
    return out, stats


def _deltas(inp: torch.Tensor, kinds: set[str]) -> dict[str, Any]:
    d: dict[str, Any] = {"n": inp.shape[0]}
    if "hessian" in kinds:
        x = inp.double()
        d["xtx"] = x.T @ x
    if "absmean" in kinds:
        d["abs_sum"] = inp.abs().double().sum(0)
    if "absmax" in kinds:
        d["abs_max"] = inp.abs().float().amax(0)
    if "inputs" in kinds:
        d["inputs"] = inp.clone()
    return d


def _merge(st: Stats, d: dict[str, Any]) -> None:
    st.n += d["n"]
    for key in ("xtx", "abs_sum"):
        if key in d:
            cur = getattr(st, key)
            setattr(st, key, d[key].clone() if cur is None else cur + d[key])
    if "abs_max" in d:
        st.abs_max = d["abs_max"].clone() if st.abs_max is None else torch.maximum(st.abs_max, d["abs_max"])
    if "inputs" in d:
        st.inputs.append(d["inputs"])


class BlockContext:
    """RoPE tables for the calibration windows, and chunked block execution (bounded memory)."""

    def __init__(self, model: nn.Module, seq_len: int, dtype: torch.dtype, chunk: int = 8) -> None:
        self.chunk = chunk
        positions = torch.arange(seq_len)[None].expand(chunk, -1)
        self.cos, self.sin = rope_cos_sin(model.inv_freq, positions, model.attention_factor, dtype)

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`module` on the windows `x` (n, L, d), chunk by chunk: a block or a mixer gets the windows' RoPE
        (plain causal attention), any other module (an MLP, a linear) only `x`."""
        outs = []
        for i in range(0, x.shape[0], self.chunk):
            xc = x[i : i + self.chunk]
            if isinstance(module, nn.Linear) or not _takes_context(module):
                outs.append(module(xc))
            else:
                ctx = AttnContext(self.cos[: xc.shape[0]], self.sin[: xc.shape[0]])
                outs.append(module(xc, ctx))
        return torch.cat(outs)


def _takes_context(module: nn.Module) -> bool:
    return "ctx" in inspect.signature(module.forward).parameters


@torch.inference_mode(False)
@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    ids: torch.Tensor,
    handler: Callable[[int, nn.Module, torch.Tensor, torch.Tensor, dict[str, Stats], BlockContext], None],
    kinds: set[str],
    propagate: str = "quantized",
    layers: list[int] | None = None,
    progress: bool = True,
    desc: str = "quantize",
) -> list[dict[str, float]]:
    """Quantize `model` block by block on calibration `ids` (n, L). `handler(i, block, x, fp_out, stats,
    ctx)` quantizes block i in place; `kinds` says which Stats it needs. Returns per-block errors."""
    from tqdm import tqdm

    model.unfuse()  # hooks must see every linear
    dtype = model.model.embed_tokens.weight.dtype
    ctx = BlockContext(model, ids.shape[1], dtype)
    x = model.model.embed_tokens(ids).to(dtype)  # (n, L, d)
    blocks = model.model.layers
    todo = set(range(len(blocks)) if layers is None else layers)
    last = max(todo) if todo else -1
    records = []
    bar = tqdm(range(last + 1), desc=desc, unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        if i not in todo:
            x = ctx.run(block, x)
            continue
        fp_out, stats = capture(block, x, ctx, block.linear_names(), kinds)
        handler(i, block, x, fp_out, stats, ctx)
        del stats
        q_out = ctx.run(block, x)
        err = float((q_out - fp_out).float().pow(2).sum() / fp_out.float().pow(2).sum().clamp(min=1e-30))
        records.append({"block": i, "rel_out_error": err})
        bar.set_postfix(layer=i, rel_err=f"{err:.2e}")
        x = q_out if propagate == "quantized" else fp_out
    return records
