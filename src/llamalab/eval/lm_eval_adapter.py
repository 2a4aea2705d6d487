"""llamalab as an lm-evaluation-harness model: `lm_eval --model llamalab --model_args pretrained=M ...`.

`LlamalabLM` subclasses lm-eval's `TemplateLM`, so the request encoding is lm-eval's own (context /
continuation split, empty-context prefix token); scoring and generation run on llamalab's model through
`eval.forward`, with the model options of `llamalab.model_options` (every `--model_args` key that is a
ModelOptions field: `dtype`, `threads`, `rope_scaling`, `rope_factor`, `kv`, `kv_bits`, ...), plus
`batch_size`, `max_length`, `chunk_size` and `max_gen_toks`.

- `loglikelihood`: log p(continuation | context) and is-greedy, left-truncated to `max_length` as lm-eval's
  HF model does;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (`get_rolling_token_windows`, context 1,
  prefix token BOS else EOS), summed;
- `generate_until`: llamalab's generation engine (greedy unless the task asks to sample), stopping at the
  task's `until` strings and EOS, context left-truncated to `max_length - max_gen_toks`.

Discovery: released lm-eval versions have no plugin mechanism, so the `llamalab_lm_eval.pth` hook installed
with llamalab registers this class when lm-eval fills its model registry (see `_llamalab_lm_eval.py`);
importing this module also registers it, for Python callers of `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    import lm_eval.models  # noqa: F401  (fills the registry first: get_model only does it when it is empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the eval extra
    from llamalab.errors import LlamalabError

    raise LlamalabError(
        f"the lm-eval adapter needs lm-evaluation-harness: pip install 'llamalab[eval]' ({e})"
    ) from None

from tqdm import tqdm

from llamalab.eval.forward import Forward, encode_pair, prefix_token_id
from llamalab.model_options import ModelOptions, load_model

_OPTION_FIELDS = {f.name for f in dataclasses.fields(ModelOptions)}


@register_model("llamalab")
class LlamalabLM(TemplateLM):
    """An lm-evaluation-harness LM backed by a llamalab model."""

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chunk_size: int | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        options = {k: v for k, v in kwargs.items() if k in _OPTION_FIELDS}
        ignored = sorted(set(kwargs) - _OPTION_FIELDS)
        if ignored:
            from llamalab.errors import LlamalabError

            raise LlamalabError(f"unknown llamalab model_args: {', '.join(ignored)}")
        if pretrained is not None:
            options["model"] = pretrained
        if device:
            # lm-eval's CLI passes --device (default "cuda") to every model; a CPU-only torch runs on the CPU.
            import torch

            if device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
            options["device"] = device
        self.opts = ModelOptions.from_kwargs(**options)
        self.llm = load_model(self.opts)
        self.tokenizer = self.llm.tokenizer
        # "auto" (lm-eval's batch-size search) has nothing to search on a CPU; it means 8 here.
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.fwd = Forward(self.llm, self.opts, int(chunk_size) if chunk_size else None)

    # --- what lm-eval asks of a model ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length or self.llm.model.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return str(self.llm.device)

    @property
    def tokenizer_name(self) -> str:
        return self.llm.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # None: the tokenizer's own default, as lm-eval's HF model does for causal models.
        return self.tokenizer.encode(
            string, add_special_tokens=True if add_special_tokens is None else add_special_tokens
        )

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tokenizer, context, continuation, self.prefix_token_id)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        out: list[tuple[float, bool]] = []
        step = self.batch_size * 8
        for s in tqdm(range(0, len(pairs), step), disable=disable_tqdm, desc="llamalab loglikelihood"):
            out.extend(self.fwd.score(pairs[s : s + step], self.batch_size, self.max_length))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="llamalab rolling"):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self.fwd.score(windows, self.batch_size, self.max_length) if windows else []
            total = sum(ll for ll, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        try:
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
        except ImportError:  # older lm-eval: the same normalisation by hand
            normalize_gen_kwargs = handle_stop_sequences = None
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], disable=disable_tqdm, desc="llamalab generate"
        ):
            if normalize_gen_kwargs is not None:
                kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            else:
                kw = dict(gen_kwargs)
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                if eos not in until:
                    until.append(eos)
                kw["max_gen_toks"] = kw.get("max_gen_toks", self.max_gen_toks)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0) or 0.0) > 0
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            params = self.llm.sampling(
                max_new_tokens=max_new,
                temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(kw.get("top_p", 1.0) or 1.0) if sample else 1.0,
                top_k=int(kw.get("top_k", 0) or 0) if sample else 0,
                stop=[s for s in until if s],
                seed=kw.get("seed"),
            )
            engine = self.llm.engine(max_batch=1, max_len=len(ids) + max_new, kv=self.opts.kv_spec)
            seq = None
            for event in engine.run([ids], [params]):
                seq = event.seq
            text = seq.text if seq is not None else ""
            for term in until:  # the engine already stops at them; cut as lm-eval does, to be exact
                if term:
                    text = text.split(term)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    # --- chat templates ---------------------------------------------------------------------------------

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.llm.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def get_model_info(self) -> dict[str, Any]:
        from llamalab.eval.report import model_info

        return {**model_info(self.llm), "model_options": self.opts.to_dict()}
