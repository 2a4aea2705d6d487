"""A training run's configuration: one YAML file (or dict) of typed sections, with `key.sub=value` overrides.

Every setting has a default, so a recipe names only what it changes; an unknown key is an error naming it
(with the known keys), never silently ignored. The sections:

- `model`: the checkpoint to start from (alias, HF directory, .gguf: continued pretraining, SFT, DPO), or
  `init` (a model config for pretraining from scratch) with `tokenizer` (a model whose tokenizer to use).
- `objective`: `clm` (next-token loss on every token), `sft` (chat JSONL, loss on assistant tokens only),
  `dpo` (prompt / chosen / rejected JSONL; `dpo.beta`, reference log-probabilities cached).
- `data`: sources (`train`: a list of {source, weight, format, field}), `replay` of another source,
  `eval` (held-out text for perplexity), `eval_pairs` (held-out preference pairs, dpo), `seq_len`,
  `packing`, `seed`.
- `optim`, `schedule`, `batch` (micro-batch, accumulation; global batch = micro x accumulation x processes),
  `steps`, `precision` (fp32 master weights; `autocast: bf16`), `activation_checkpointing`, `ce_chunk`.
- `lora` (rank, alpha, dropout, targets, rslora), `qlora` (NF4 base), `checkpoint`, `eval`, `distributed`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError

OBJECTIVES = ("clm", "sft", "dpo")


@dataclass
class SourceConfig:
    source: str = "alice"  # a text file, a folder of .txt files, a .jsonl file, or "alice" (shipped text)
    weight: float = 1.0
    format: str = "auto"  # text | chat | pairs | auto (from the objective)
    field: str = "text"  # the JSONL field holding a document, for format text


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    replay: SourceConfig | None = None  # mixed in at `replay_fraction` of the rows (continued pretraining)
    replay_fraction: float = 0.0
    eval: str | None = "alice-heldout"  # held-out text for perplexity during training (None: none)
    eval_tokens: int = 4096
    eval_pairs: str | None = None  # dpo: held-out preference pairs (JSONL) for held-out loss, margin, accuracy
    seq_len: int = 512
    packing: bool = True  # documents concatenated with document masks; False: one document per row, padded
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm (0: off)


@dataclass
class ScheduleConfig:
    warmup: int = 0  # steps of linear warmup from 0
    decay: str = "cosine"  # cosine | linear | constant, from the peak to min_lr_ratio x peak at the last step
    min_lr_ratio: float = 0.1


@dataclass
class BatchConfig:
    micro: int = 4  # sequences per forward pass on one process
    accumulate: int = 1  # micro-batches per optimizer step


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # names or fnmatch patterns
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)


@dataclass
class QLoRAConfig:
    block_size: int = 64
    double_quant: bool = True
    icq: bool = False  # IR-QLoRA's information calibration quantization of the NF4 base
    iec: bool = False  # IR-QLoRA's information elastic connection around the adapters


@dataclass
class DPOConfig:
    beta: float = 0.1
    max_prompt_tokens: int = 256


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (and at the last step)
    keep_last: int = 2


@dataclass
class EvalConfig:
    every: int = 100  # steps between evaluations (0: only at the end)
    choice_task: str | None = None  # a multiple-choice task of the eval harness (e.g. alice_cloze)
    choice_limit: int = 50


@dataclass
class TrainConfig:
    model: str | None = None
    init: dict[str, Any] | None = None  # ModelConfig fields: pretrain from scratch instead of `model`
    tokenizer: str | None = None  # with `init`: the model whose tokenizer (and chat template) to use
    objective: str = "clm"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    steps: int = 100
    autocast: str | None = None  # bf16: compute in bf16 autocast (master weights stay fp32)
    activation_checkpointing: bool = False
    ce_chunk: int = 1024  # tokens per chunk of the head + cross-entropy (the full logits never exist)
    lora: LoRAConfig | None = None
    qlora: QLoRAConfig | None = None
    dpo: DPOConfig = field(default_factory=DPOConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: str = "ddp"  # ddp | fsdp, when started by torchrun with more than one process
    out: str = "runs/train"
    threads: int | None = None
    seed: int = 0
    tensorboard: bool = False

    def validate(self) -> TrainConfig:
        checks = [
            (
                self.objective in OBJECTIVES,
                f"objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}",
            ),
            (bool(self.model) != bool(self.init), "set exactly one of `model` (a checkpoint) and `init`"),
            (self.init is None or bool(self.tokenizer), "`init` needs `tokenizer` (a model to take it from)"),
            (self.steps >= 1, f"steps must be at least 1, not {self.steps}"),
            (self.batch.micro >= 1 and self.batch.accumulate >= 1, "batch.micro and batch.accumulate >= 1"),
            (self.data.seq_len >= 8, f"data.seq_len must be at least 8, not {self.data.seq_len}"),
            (0 <= self.data.replay_fraction < 1, "data.replay_fraction must be in [0, 1)"),
            (
                self.data.replay_fraction == 0 or self.data.replay is not None,
                "replay_fraction needs data.replay",
            ),
            (bool(self.data.train), "data.train names no source"),
            (all(s.weight > 0 for s in self.data.train), "data source weights must be positive"),
            (
                self.schedule.decay in ("cosine", "linear", "constant"),
                "schedule.decay: cosine, linear or constant",
            ),
            (self.autocast in (None, "bf16"), f"autocast {self.autocast!r}; use bf16 or leave it unset"),
            (self.distributed in ("ddp", "fsdp"), f"distributed {self.distributed!r}; use ddp or fsdp"),
            (
                self.qlora is None or self.lora is not None,
                "qlora needs a lora section (the adapters it trains)",
            ),
            (self.ce_chunk >= 1, "ce_chunk must be at least 1"),
            (
                self.data.eval_pairs is None or self.objective == "dpo",
                "data.eval_pairs (held-out preference pairs) is for objective dpo",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamalabError(f"train config: {message}")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config in the YAML file `path` (defaults if None), with `key.sub=value` overrides applied."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LlamalabError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LlamalabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise LlamalabError(f"{path}: the config must be a mapping of settings")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LlamalabError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=1e-4)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return from_dict(TrainConfig, raw, "config").validate()


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        if node.get(p) is True:  # `lora=true` then `lora.r=4`: the section with one setting changed
            node[p] = {}
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LlamalabError(f"override {key}: {p} is not a section")
    node[last] = value


def from_dict(cls: type, raw: Any, where: str):
    """Build dataclass `cls` from a dict, recursively, refusing unknown keys and values of the wrong type."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise LlamalabError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise LlamalabError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in raw.items()})


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None:
        if origin in (typing.Union, _union_type()) and type(None) in args:
            return None
        raise LlamalabError(f"{where}: a value is required")
    if origin in (typing.Union, _union_type()):
        inner = [a for a in args if a is not type(None)]
        if dataclasses.is_dataclass(inner[0]) and value is True:
            return inner[0]()  # `lora: true` takes every default
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if origin is dict or kind is Any:
        return value
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind in (int, float):
            if isinstance(value, bool):
                raise TypeError
            converted = kind(value)
            if kind is int and converted != value:
                raise TypeError
            return converted
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise LlamalabError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    return value


def _union_type():
    import types

    return types.UnionType
