"""The Python API: `llamalab.load(...)` returns an `LLM` with `generate`, `stream`, `chat` and `logits`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

import llamalab.quant.checkpoint  # noqa: F401  (registers the load hook that reads quantized directories)
from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.generate.engine import DEFAULT_PREFILL_CHUNK, Engine, Sequence
from llamalab.generate.sampling import SamplingParams
from llamalab.io.chat import Message, render_chat
from llamalab.io.load import Checkpoint, is_gguf, load_checkpoint, resolve
from llamalab.io.registry import DEFAULT_MODEL
from llamalab.kv.registry import CacheSpec
from llamalab.model.build import AUTO, STORED, build_model, check_dtype, parse_dtype
from llamalab.model.transformer import Transformer


class LLM:
    """A loaded model with its tokenizer, chat template, generation defaults and KV-cache choice (`kv`, used
    by `generate`, `stream`, `chat` and `engine`; dense unless set)."""

    def __init__(
        self, model: Transformer, checkpoint: Checkpoint, name: str, kv: CacheSpec | None = None
    ) -> None:
        self.model = model
        self.kv = kv or CacheSpec()
        self.tokenizer = checkpoint.tokenizer
        self.config = model.config
        self.checkpoint = checkpoint
        self.name = name
        self.eos_token_ids = checkpoint.eos_token_ids

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- text <-> tokens ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, **kw: Any
    ) -> str:
        """The prompt text for a conversation, rendered with the model's own chat template."""
        return render_chat(
            self.tokenizer.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokenizer.bos_token,
            eos_token=self.tokenizer.eos_token,
            **kw,
        )

    def chat_ids(self, messages: list[Message]) -> list[int]:
        # The template writes any BOS itself, so the tokenizer must not add another.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    # --- forward --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, text_or_ids: str | list[int]) -> torch.Tensor:
        """Next-token logits (T, V) in fp32 for every position of a text or token list."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        if len(ids) > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"input has {len(ids)} tokens, but the context is {self.config.max_position_embeddings}"
            )
        return self.model(torch.tensor([ids], device=self.device))[0].float()

    # --- generation -----------------------------------------------------------------------------------

    def sampling(self, **kw: Any) -> SamplingParams:
        """SamplingParams from keyword arguments (unknown names are an error, not silently ignored)."""
        fields = SamplingParams.__dataclass_fields__
        unknown = sorted(set(kw) - set(fields))
        if unknown:
            raise LlamalabError(f"unknown generation option(s): {', '.join(unknown)}")
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        return SamplingParams(**kw).validate()

    def engine(
        self,
        max_batch: int = 1,
        max_len: int | None = None,
        kv: CacheSpec | str | None = None,
        native: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> Engine:
        """The step-wise engine behind `generate`, `stream` and the server, for `max_batch` sequences of up
        to `max_len` tokens, with this model's KV cache (or `kv`). `native=False` keeps decode on the
        PyTorch path (e.g. to see module hooks run); `engine.decode_path` says which path it takes."""
        return Engine(
            self.model,
            self.tokenizer,
            max_batch,
            max_len,
            self.eos_token_ids,
            kv=self.kv if kv is None else kv,
            native=native,
            prefill_chunk=prefill_chunk,
        )

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate_sequences(self, prompts: list[str | list[int]], **kw: Any) -> list[Sequence]:
        """Generate every prompt in one batch; return the finished sequences (ids, text, finish reason), in order.

        With a `seed`, prompt i samples with seed + i (the server's rule for `n` choices), so a batch of one prompt
        repeated gives different samples and the whole batch is still reproducible."""
        params = self.sampling(**kw)
        ids = [self._prompt_ids(p) for p in prompts]
        max_len = max(len(i) for i in ids) + params.max_new_tokens
        engine = self.engine(max_batch=len(ids), max_len=max_len)
        for i in ids:  # refuse the whole batch before any prefill work if one prompt does not fit
            engine.check_fits(len(i))
        per_row = [dataclasses.replace(params) for _ in ids]
        if params.seed is not None:
            for i, p in enumerate(per_row):
                p.seed = (params.seed + i) % 2**64  # torch seeds are 64-bit
        seqs = [engine.add(i, p) for i, p in zip(ids, per_row)]
        while engine.active:
            for _ in engine.step():
                pass
        return seqs

    def generate(self, prompt: str | list[int] | list[str], **kw: Any) -> str | list[str]:
        """Continue `prompt` (raw text or token ids, no chat template); a list of texts is one batch."""
        single = isinstance(prompt, str) or all(isinstance(t, int) for t in prompt)
        batch = [prompt] if single else list(prompt)
        texts = [s.text for s in self.generate_sequences(batch, **kw)]
        return texts[0] if single else texts

    def stream(self, prompt: str | list[int], **kw: Any) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece, as soon as each piece is safe to show."""
        params = self.sampling(**kw)
        ids = self._prompt_ids(prompt)
        engine = self.engine(max_batch=1, max_len=len(ids) + params.max_new_tokens)
        for event in engine.run([ids], [params]):
            if event.text:
                yield event.text

    def chat(self, messages: str | list[Message], stream: bool = False, **kw: Any) -> str | Iterator[str]:
        """Answer a conversation (a list of {role, content}) or a single user message, with the chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = self.chat_ids(messages)
        return self.stream(ids, **kw) if stream else self.generate_sequences([ids], **kw)[0].text


def _kernels_run_on(device) -> bool:
    """Whether the native kernels that run GGUF blocks as stored run on `device` (`dtype="auto"`)."""
    from llamalab import kernels

    return torch.device(device).type == "cpu" and kernels.quant_matmul() is not None


def load(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    kv: CacheSpec | str | None = None,
) -> LLM:
    """Load a model by alias (`smollm2-135m`), HF directory, `.gguf` file or hub id, ready for inference
    (q/k/v and gate/up fused: `llm.model.unfuse()` before training or module surgery). `kv` picks the KV
    cache method its generation uses (a `CacheSpec` or a registered name; dense by default).

    `dtype="stored"` runs a GGUF file's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K linear layers (head and token embedding
    included) as they are stored, on the native kernels (`llamalab.quant.gguf_linear`), with fp32 activations
    and every other tensor in fp32; `dtype="auto"` is "stored" for such a file where the native kernels run,
    else fp32."""
    if threads:
        torch.set_num_threads(threads)
    check_dtype(dtype)  # a bad dtype or KV method fails before the checkpoint is read
    spec = CacheSpec.of(kv).check()
    gguf = is_gguf(source := resolve(name_or_path))
    if dtype == STORED and not gguf:
        raise LlamalabError(f"--dtype stored runs a GGUF file's quantized blocks; {source} is not a GGUF "
                            "file: choose fp32, bf16 or fp16")  # fmt: skip
    # The layers kept as stored are never dequantized (a file without such blocks loads as fp32).
    stored = dtype == STORED or (dtype == AUTO and gguf and _kernels_run_on(device))
    ckpt = load_checkpoint(name_or_path, dtype=torch.float32, stored=stored)
    torch_dtype = torch.float32 if dtype in (STORED, AUTO) else parse_dtype(dtype)
    model = build_model(
        ckpt.config,
        ckpt.state_dict,
        torch_dtype,
        device,
        source=str(ckpt.source),
        raw_config=ckpt.raw_config,
        modules=ckpt.stored,
    )
    ckpt.state_dict, ckpt.stored = {}, {}  # the model holds the weights now; do not keep a second copy
    model.fuse()
    return LLM(model, ckpt, name_or_path, spec)
