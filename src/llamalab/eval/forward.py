"""How every evaluation feeds tokens to the model: whole windows or chunks through a KV cache.

A window is scored either in one causal forward pass (no cache: the reference protocol) or, with
`chunk_size`, in successive chunks that write to and read from the KV cache the model options name
(`--kv dense|kivi|...`). KV-cache papers need the chunked form: in one forward pass attention reads the
fresh keys/values, so a compressed cache is never read and its method cannot change the result (AQUA-KV,
arXiv 2501.19392, measures perplexity with 32-token chunks for this reason). With the dense cache both forms
give the same numbers, which the tests check.

Also here: lm-evaluation-harness' context/continuation encoding (`encode_pair`), batched continuation
scoring (log-likelihood and whether the continuation is the greedy one), and greedy generation through the
generation engine (its chunked prefill, prefix reuse and KV cache), shared by choice, passkey, needle and
the lm-eval adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llamalab.errors import LlamalabError
from llamalab.generate.engine import Engine
from llamalab.generate.sampling import SamplingParams
from llamalab.model_options import ModelOptions, check_length, make_cache


@dataclass
class Forward:
    """Runs token windows through `llm.model` whole or in `chunk_size` chunks via the options' KV cache."""

    llm: object
    opts: ModelOptions = field(default_factory=ModelOptions)
    chunk_size: int | None = None
    seconds: float = 0.0  # model time spent so far (forward passes + scoring), for tokens/s
    tokens: int = 0  # tokens fed through the model so far
    scores_need_cache: bool = True  # False for generation-only users (passkey, needle)
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the previous prompt's cache
    # Replaces a prompt before generation (XL3M's key context, retrieval: `llamalab.longctx.options`).
    reduce: Callable[[list[int], int], list[int]] | None = None
    _engine: Engine | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise LlamalabError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        self.opts.kv_spec.check()  # an unknown method fails here, before any work
        if self.opts.kv != "dense" and self.chunk_size is None and self.scores_need_cache:
            # Generation reads the cache at every decode step; scoring a window in one pass never does.
            raise LlamalabError(
                f"--kv {self.opts.kv} changes no score without --chunk-size: one forward pass never reads "
                "the cache; pass e.g. --chunk-size 32"
            )

    @property
    def model(self):
        return self.llm.model

    def logits_chunks(self, ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, logits (B, t, V)) covering positions 0..T-1 of `ids` (B, T)."""
        B, T = ids.shape
        check_length(self.llm, T, "a window")
        if self.chunk_size is None:
            yield 0, self.model(ids)
            return
        cache = make_cache(self.llm, self.opts, max_len=T, max_batch=B)
        rows = list(range(B))
        for s in range(0, T, self.chunk_size):
            yield s, self.model(ids[:, s : s + self.chunk_size], s, cache, rows)

    @torch.inference_mode()
    def target_logprobs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For `ids` (B, T): log p(ids[:, t+1] | ids[:, :t+1]) and whether ids[:, t+1] is the argmax, each
        (B, T-1), in fp32."""
        t0 = time.perf_counter()
        ids = ids.to(self.llm.device)
        B, T = ids.shape
        logps, greedy = [], []
        for s, logits in self.logits_chunks(ids):
            t = logits.shape[1]
            n = min(t, T - 1 - s)  # the last position of the window predicts nothing inside it
            if n <= 0:
                continue
            logits = logits[:, :n].float()
            targets = ids[:, s + 1 : s + 1 + n]
            lp = torch.log_softmax(logits, dim=-1)
            logps.append(lp.gather(-1, targets[..., None])[..., 0])
            greedy.append(logits.argmax(-1) == targets)
        self.seconds += time.perf_counter() - t0
        self.tokens += B * T
        return torch.cat(logps, dim=1), torch.cat(greedy, dim=1)

    # --- lm-evaluation-harness style continuation scoring ------------------------------------------------

    def score(
        self, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, max_len: int | None = None
    ) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context, and whether greedy decoding would have
        produced it (lm-eval's `(ll, is_greedy)`). Inputs are left-truncated to the context length exactly
        as lm-eval's HF model does; requests are batched by length, right-padded (padding after the last
        real token cannot affect it under causal attention)."""
        max_len = max_len or self.llm.model.config.max_position_embeddings
        prepared = []
        for ctx, cont in requests:
            if not cont:
                raise LlamalabError("a continuation encodes to 0 tokens")
            if len(cont) > max_len:
                raise LlamalabError(f"a continuation has {len(cont)} tokens, beyond the context of {max_len}")
            inp = (ctx + cont)[-(max_len + 1) :][:-1]
            prepared.append((inp, cont))
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(prepared[i][0]) for i in idx)
            # One more column so that the last input position has a "target" slot; its value is unused.
            batch = torch.zeros(len(idx), width + 1, dtype=torch.long)
            for r, i in enumerate(idx):
                inp, cont = prepared[i]
                full = inp + cont[-1:]
                batch[r, : len(full)] = torch.tensor(full)
            lp, greedy = self.target_logprobs(batch)  # (B, width)
            for r, i in enumerate(idx):
                inp, cont = prepared[i]
                end = len(inp)  # predictions for the continuation sit at input positions end-len(cont)..end-1
                sl = slice(end - len(cont), end)
                out[i] = (float(lp[r, sl].sum()), bool(greedy[r, sl].all()))
        return out

    # --- generation -------------------------------------------------------------------------------------

    def greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy continuation of `prompt` through the generation engine, with the options' KV cache: the
        prompt is prefilled in `chunk_size` chunks (whole, by default) and decoded one token at a time; the
        output ends with the stop token when one is met.

        One engine (one cache row) serves consecutive calls, so the longest token prefix a prompt shares
        with the previous one is not computed again (keys and values of a position depend only on the
        tokens before it). Passkey and needle prompts of one length share long prefixes, so this saves
        about a third of their prefill."""
        t0 = time.perf_counter()
        if self.reduce is not None:
            prompt = self.reduce(prompt, max_new_tokens)
        total = len(prompt) + max_new_tokens
        check_length(self.llm, total, f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens")
        if self._engine is None or self._engine.max_len < total:
            # Headroom, so that the next prompt of about the same length can reuse this cache.
            room = max(min(total + 256, self.llm.model.config.max_position_embeddings), total)
            if self.llm.model.rope_depends_on_length:
                room = total  # the cache's length decides the rotation: no headroom that would change it
            self._engine = self.llm.engine(
                max_batch=1, max_len=room, kv=self.opts.kv_spec, prefill_chunk=self.chunk_size or room
            )
        params = SamplingParams(
            max_new_tokens=max_new_tokens, stop_token_ids=sorted(stop_ids or ()), ignore_eos=True
        )
        seq = None
        for event in self._engine.run([prompt], [params]):
            seq = event.seq
        self.seconds += time.perf_counter() - t0
        self.tokens += len(prompt) - seq.reused + len(seq.output_ids)
        self.reused_tokens += seq.reused
        return list(seq.output_ids)


def encode_pair(
    tokenizer, context: str, continuation: str, prefix_token_id: int
) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness' encoding of a (context, continuation) request for a causal model: trailing
    whitespace of the context moves to the continuation, the whole string is encoded once and split at the
    context's token count; an empty context is replaced by the prefix token (BOS, else EOS)."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        if not cont:
            raise LlamalabError("an empty context with an empty continuation cannot be scored")
        return ([prefix_token_id], cont) if cont[0] != prefix_token_id else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval conditions on when there is no context: BOS if the model has one, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise LlamalabError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")
