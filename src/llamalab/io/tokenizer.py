"""Tokenizers: HF `tokenizer.json`, or a GGUF vocabulary rebuilt as a `tokenizers` tokenizer.

GGUF stores the vocabulary as metadata. Two families matter for LLaMA models:

- `gpt2`: byte-level BPE (Llama 3, SmolLM, ...). Tokens are already in the byte-to-unicode alphabet; merges
  are stored. The text is split before BPE by the regexes llama.cpp associates with `tokenizer.ggml.pre`
  (llama.cpp's `llama-vocab.cpp`), so e.g. SmolLM splits every digit as its original `tokenizer.json` does.
- `llama`: SentencePiece BPE (LLaMA 1/2, TinyLlama): `▁` for spaces, byte-fallback tokens `<0xNN>`, and
  per-token scores from which the merge order is recovered (higher score merges first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llamalab.errors import CheckpointError

# GPT-2's split, as in `tokenizers`' ByteLevel(use_regex=True).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DIGITS = r"\p{N}"  # every digit on its own: tokenizers' Digits(individual_digits=True), as the HF files say
# tokenizer.ggml.pre -> the splits applied before byte-level BPE, in order (llama.cpp's llama-vocab.cpp).
# "smollm" is its original tokenizer.json: every digit on its own, then GPT-2's split.
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "default": [GPT2_SPLIT],
    "gpt-2": [GPT2_SPLIT],
    "smollm": [_DIGITS, GPT2_SPLIT],
    "starcoder": [_DIGITS, GPT2_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "llama-v3": [LLAMA3_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "smaug-bpe": [LLAMA3_SPLIT],
}

# GGUF token types (llama.cpp `llama_token_type`)
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """Text <-> token ids, with the special tokens and chat template a model ships with."""

    def __init__(
        self,
        backend: HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_special: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (extra_special or {}).items() if v}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special_tokens`, the BOS the model expects (if any) is added."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos
            and self.bos_token_id is not None
            and ids[:1] != [self.bos_token_id]
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """From `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) in an HF directory."""
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise CheckpointError(f"{path}: no tokenizer.json (llamalab reads fast-tokenizer files only)")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise CheckpointError(f"{tj}: not a valid tokenizer.json ({e})") from None
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # `add_bos_token` in tokenizer_config only matters when tokenizer.json has no post-processor doing it.
        add_bos = bool(cfg.get("add_bos_token", False)) and backend.post_processor is None
        return cls(
            backend,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            add_bos=add_bos,
            chat_template=template,
            extra_special={
                "unk_token": _token_str(cfg.get("unk_token")),
                "pad_token": _token_str(cfg.get("pad_token")),
            },
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], source: str = "gguf") -> Tokenizer:
        """From GGUF `tokenizer.ggml.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise CheckpointError(f"{source}: no tokenizer.ggml.tokens in the metadata")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(
                tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre")
            )
        elif kind == "llama":
            backend = _sentencepiece_bpe(
                tokens, meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.merges")
            )
        else:
            raise CheckpointError(f"{source}: tokenizer model {kind!r} is not supported (gpt2 or llama)")
        special = [
            AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
        backend.add_special_tokens(special)
        backend.add_tokens(user)

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(
            backend,
            bos_token=tok("bos_token_id"),
            eos_token=tok("eos_token_id"),
            add_bos=bool(kind == "llama" if add_bos is None else add_bos),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_special={"unk_token": tok("unknown_token_id"), "pad_token": tok("padding_token_id")},
        )

    def save_hf(self, out: Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` that transformers' AutoTokenizer reads."""
        self.backend.save(str(out / "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            **self.special_tokens,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(
            json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8"
        )


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    splits = PRE_TOKENIZER_SPLITS.get(pre or "default", PRE_TOKENIZER_SPLITS["default"])
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True)
            if r == _DIGITS
            else pre_tokenizers.Split(Regex(r), behavior="isolated")
            for r in splits
        ]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, merges: list[str] | None
) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores or [0.0] * len(tokens))))
    unk = next((t for t in ("<unk>",) if t in vocab), None)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece: a space before the text, every space as "▁" (LLaMA's `add_dummy_prefix`).
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tk


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), then by the pieces' lengths."""
    ranked = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked.extend((score, left, right) for left, right in local)
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
