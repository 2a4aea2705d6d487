"""The one training loop: pretraining, continued pretraining, SFT and DPO, with or without adapters, on one
process or many (torchrun), resumable from its checkpoints.

One optimizer step: take the step's rows from the data mixture (each process its share), count the step's
global denominator (labelled tokens, or pairs for DPO) before any forward, then for each micro-batch run
the objective (a sum), scale it by processes / denominator and backpropagate (gradient sync only on the
last micro-batch), clip the global gradient norm, set the learning rate from the step, step AdamW. The
random state of each micro-batch (dropout) is seeded from (seed, step, micro-batch), so a resumed run draws
exactly what an uninterrupted one does. Evaluation (held-out loss every `eval.every` steps) and
checkpoints (every `checkpoint.every` steps and at the end) happen between steps.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.train import checkpoint as ckpt
from llamalab.train.build import build_model
from llamalab.train.config import TrainConfig
from llamalab.train.data import build_mixture, collate
from llamalab.train.distributed import World, full_model_state, full_state, load_full_state, no_sync, wrap
from llamalab.train.metrics import MetricsLog
from llamalab.train.objectives import dpo_loss, lm_loss, sequence_logprobs
from llamalab.train.schedule import learning_rate


class Objective(nn.Module):
    """The model and its objective as one module, so DDP and FSDP see the whole loss computation."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.ce_chunk, self.beta = model, cfg.ce_chunk, cfg.dpo.beta

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(summed loss, summed statistics) of a micro-batch: DPO's for pairs (a batch with reference
        log-probabilities), else next-token loss (training rows, and held-out text for every objective)."""
        if "reference" not in batch:
            return lm_loss(self.model, batch, self.ce_chunk), {}
        policy = sequence_logprobs(self.model, batch, self.ce_chunk)
        return dpo_loss(policy, batch["reference"].to(policy.dtype), self.beta)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    export: Path | None


def settings_fingerprint(cfg: TrainConfig, processes: int) -> dict[str, str]:
    """What a checkpoint must agree on to be resumed: not the step count, intervals or output place, and
    not how the global batch is split (micro-batches, accumulation, processes), only its size."""
    d = cfg.to_dict()
    d["batch"] = {"global": cfg.batch.micro * cfg.batch.accumulate * processes}
    keys = ("model", "init", "tokenizer", "objective", "data", "optim", "schedule", "batch", "lora", "qlora", "dpo",
            "autocast", "ce_chunk", "seed")  # fmt: skip
    return {
        k: hashlib.sha256(json.dumps(d[k], sort_keys=True, default=str).encode()).hexdigest()[:16]
        for k in keys
    }


def train(
    cfg: TrainConfig, resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Run `cfg` to its last step (continuing from the newest checkpoint with `resume`). `on_step` is called
    on every process after each optimizer step with the step's record (what rank 0 logs to metrics.jsonl),
    before evaluation and checkpointing: a place to watch a run from Python."""
    world = World.from_env(cfg.distributed)
    try:
        return _Run(cfg, world, resume, on_step).run()
    finally:
        world.close()


class _Run:
    def __init__(self, cfg: TrainConfig, world: World, resume: bool, on_step=None) -> None:
        self.cfg, self.world, self.on_step = cfg, world, on_step
        self.run_dir = cfg.out_dir
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        found = ckpt.latest(self.run_dir) if self.run_dir.exists() else None
        if found is not None and not resume:
            raise LlamalabError(
                f"{self.run_dir} already holds checkpoints; pass --resume, or choose another out"
            )
        if resume and found is None and world.main:
            print(f"llamalab train: no checkpoint in {self.run_dir}; starting from step 0")
        self.resume_from = found if resume else None
        torch.manual_seed(cfg.seed)
        self.built = build_model(cfg)
        self.model = self.built.model
        context = self.model.config.max_position_embeddings
        if cfg.data.seq_len > context:
            raise LlamalabError(
                f"data.seq_len {cfg.data.seq_len} is beyond the model's context of {context}; lower data.seq_len"
            )
        tokenizer = self.built.tokenizer
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        template = None
        if cfg.objective in ("sft", "dpo"):
            from llamalab.train.chat_format import ChatFormat

            template = ChatFormat(tokenizer)
        self.data = build_mixture(cfg.data, cfg.objective, tokenizer, template, pad)
        self.eval_pairs = None
        if cfg.objective == "dpo":
            self._prepare_pairs(tokenizer, template, pad)
        self.eval_tokens = self._eval_tokens(tokenizer)
        self.choice_docs = self._choice_docs()
        self.objective = Objective(self.model, cfg)
        blocks = list(self.model.model.layers)
        self.wrapped = wrap(self.objective, world, blocks)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps,
        )  # fmt: skip
        self.step, self.tokens = 0, 0
        self.fingerprint = settings_fingerprint(cfg, world.size)
        if self.resume_from is not None:
            self._restore(self.resume_from)

    # --- data -----------------------------------------------------------------------------------------

    def _prepare_pairs(self, tokenizer, template, pad: int) -> None:
        """Training sources as pairs, and the held-out pairs (`data.eval_pairs`), each with the reference
        model's log-probabilities."""
        from llamalab.train.config import SourceConfig
        from llamalab.train.data import load_source

        self.data.sources = [self._pair_source(r.src, r.seed, pad) for r in self.data.sources]
        if self.cfg.data.eval_pairs:
            held_out = load_source(SourceConfig(self.cfg.data.eval_pairs), "pairs", tokenizer, template)
            self.eval_pairs = self._pair_source(held_out, 0, pad)

    def _pair_source(self, tokenized, seed: int, pad: int):
        from llamalab.train.pairs import PairSource, reference_logprobs

        source = PairSource(tokenized, self.cfg.data.seq_len, self.cfg.dpo.max_prompt_tokens, seed, pad)
        model_id = self.cfg.model or json.dumps(self.cfg.init, sort_keys=True)
        tokens_hash = hashlib.sha256(tokenized.tokens.tobytes()).hexdigest()
        fp = f"{model_id}|{self.cfg.qlora}|{tokens_hash}|{self.cfg.autocast}"
        with self._autocast():
            reference_logprobs(self.model, source, fp, self.cfg.ce_chunk)
        return source

    def _eval_tokens(self, tokenizer) -> torch.Tensor | None:
        if not self.cfg.data.eval:
            return None
        from llamalab.train.config import SourceConfig
        from llamalab.train.data import load_source

        src = load_source(SourceConfig(self.cfg.data.eval), "text", tokenizer, None)
        return torch.from_numpy(src.tokens[: self.cfg.data.eval_tokens + 1])

    def _choice_docs(self) -> list | None:
        task = self.cfg.eval.choice_task
        if not task:
            return None
        if self.world.strategy == "fsdp":
            raise LlamalabError("eval.choice_task runs on whole models: use it with ddp or one process")
        from llamalab.eval.choice import load_task

        return load_task(task)[0][: self.cfg.eval.choice_limit]

    def _step_batches(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the next step."""
        b = self.cfg.batch
        per_process = b.micro * b.accumulate
        rows = self.data.next_rows(per_process * self.world.size)
        mine = rows[self.world.rank * per_process : (self.world.rank + 1) * per_process]
        chunks = [mine[i : i + b.micro] for i in range(0, per_process, b.micro)]
        if self.cfg.objective == "dpo":
            from llamalab.train.pairs import collate_pairs

            return [collate_pairs(c) for c in chunks]
        return [collate(c) for c in chunks]

    # --- the loop ---------------------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.cfg.autocast == "bf16"
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    def run(self) -> RunResult:
        cfg, world = self.cfg, self.world
        if world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        log = MetricsLog(self.run_dir, self.step, cfg.steps, world.main, cfg.tensorboard)
        loss = float("nan")
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                loss, extra, n_tokens = self._one_step()
                self.step += 1
                self.tokens += n_tokens
                record = {"step": self.step, "loss": loss, "lr": self.lr, "grad_norm": self.grad_norm,
                          "tokens": self.tokens, "tokens_per_s": n_tokens / (time.perf_counter() - t0), **extra}  # fmt: skip
                if self.on_step is not None:
                    self.on_step(dict(record))
                last = self.step == cfg.steps
                if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                    record.update(self.evaluate())
                log.log(record)
                if self.step % cfg.checkpoint.every == 0 or last:
                    self.save()
        finally:
            log.close()
        export = self.export()
        world.barrier()
        return RunResult(self.run_dir, self.step, loss, export)

    def _one_step(self) -> tuple[float, dict, int]:
        cfg, world = self.cfg, self.world
        batches = self._step_batches()
        dpo = cfg.objective == "dpo"
        local = sum(
            b["input_ids"].shape[0] // 2 if dpo else int((b["labels"] != -100).sum()) for b in batches
        )
        denominator = world.all_sum(local)
        if denominator == 0:
            raise LlamalabError("a training step has no labelled token (check the data and seq_len)")
        self.lr = learning_rate(self.step, cfg.steps, cfg.optim.lr, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        total, extra_sums = 0.0, {}
        for i, batch in enumerate(batches):
            torch.manual_seed(hash((cfg.seed, self.step, world.rank, i)) % (2**63))
            with no_sync(self.wrapped, i < len(batches) - 1), self._autocast():
                loss_sum, extra = self.wrapped(batch)
            (loss_sum * (world.size / denominator)).backward()
            total += float(loss_sum.detach())
            for k, v in extra.items():
                extra_sums[k] = extra_sums.get(k, 0.0) + v
        params = [p for p in self.objective.parameters() if p.requires_grad]
        # The global norm (over shards too); an infinite bound measures without clipping.
        bound = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, bound))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = world.all_sum(total) / denominator
        extra = {}
        if dpo:
            extra = {"reward_margin": world.all_sum(extra_sums["margin_sum"]) / denominator,
                     "reward_accuracy": world.all_sum(extra_sums["correct"]) / denominator}  # fmt: skip
        n_tokens = int(world.all_sum(sum(int(b["input_ids"].numel()) for b in batches)))
        return loss, extra, n_tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out next-token loss and perplexity on `data.eval` (windows of seq_len), and DPO's held-out
        loss, reward margin and accuracy on `data.eval_pairs`, through the wrapped objective, so every process
        takes part as DDP and FSDP require."""
        out: dict[str, float] = {}
        self.model.eval()
        try:
            with self._autocast():
                if self.eval_tokens is not None:
                    out.update(self._heldout_text())
                if self.eval_pairs is not None:
                    out.update(self._heldout_pairs())
        finally:
            self.model.train()
        if self.choice_docs:
            out.update(self._choice())
        return out

    def _heldout_text(self) -> dict[str, float]:
        ids, L = self.eval_tokens, self.cfg.data.seq_len
        total, count = 0.0, 0
        for s in range(0, len(ids) - 1, L):
            y = ids[s + 1 : s + L + 1][None]
            x = ids[s : s + y.shape[1]][None]
            loss, _ = self.wrapped({"input_ids": x, "labels": y, "doc_ids": torch.zeros_like(x)})
            total, count = total + float(loss), count + y.numel()
        mean = total / count
        return {"eval_loss": mean, "eval_ppl": float(torch.exp(torch.tensor(mean)))}

    def _heldout_pairs(self) -> dict[str, float]:
        """DPO's loss, reward margin and accuracy on the held-out pairs (TRL's `eval_rewards/*`)."""
        from llamalab.train.pairs import collate_pairs

        source, step = self.eval_pairs, self.cfg.batch.micro
        sums = {"loss": 0.0, "margin_sum": 0.0, "correct": 0.0}
        for s in range(0, source.n, step):
            batch = collate_pairs([source.pair(i) for i in range(s, min(s + step, source.n))])
            loss, extra = self.wrapped(batch)
            sums["loss"] += float(loss)
            sums["margin_sum"] += extra["margin_sum"]
            sums["correct"] += extra["correct"]
        n = source.n
        return {"eval_dpo_loss": sums["loss"] / n, "eval_reward_margin": sums["margin_sum"] / n,
                "eval_reward_accuracy": sums["correct"] / n}  # fmt: skip

    def _choice(self) -> dict[str, float]:
        """Accuracy on the multiple-choice task, through the evaluation harness on the model as it is."""
        from llamalab.api import LLM
        from llamalab.eval.choice import evaluate_choice
        from llamalab.io.load import Checkpoint

        model = self.model
        ckpt = Checkpoint(
            model.config, {}, self.built.tokenizer, self.built.generation, Path("."), "training"
        )
        model.eval()
        try:
            result = evaluate_choice(LLM(model, ckpt, "training"), self.choice_docs, progress=False)
        finally:
            model.train()
        return {"choice_acc": result.acc, "choice_acc_norm": result.acc_norm}

    def export(self) -> Path | None:
        """The run's HF directory (and adapter files), written by rank 0 from the full weights."""
        from llamalab.train.export import export_run

        model = self.model
        if self.world.strategy == "fsdp":  # gather the shards into a plain copy of the model
            state = full_model_state(self.wrapped)
            model = build_model(self.cfg).model if self.world.main else None
            if model is not None:
                model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
        return export_run(model, self.built, self.cfg, self.run_dir) if self.world.main else None

    # --- checkpoints --------------------------------------------------------------------------------------

    def _trainable_only(self) -> bool:
        return any(not p.requires_grad for p in self.objective.parameters())

    def save(self) -> None:
        model_state, optim_state = full_state(self.wrapped, self.optimizer, self._trainable_only())
        if self.world.main:
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "data": self.data.state(),
                "settings": self.fingerprint,
            }
            ckpt.save(self.run_dir, self.step, model_state, optim_state, state, self.cfg.checkpoint.keep_last)
        self.world.barrier()

    def _restore(self, path: Path) -> None:
        params, optim, state = ckpt.load(path)
        ckpt.check_same_run(state["settings"], self.fingerprint, path)
        only = self._trainable_only()
        expected = {
            k for k, v in self.objective.state_dict(keep_vars=True).items() if v.requires_grad or not only
        }
        if set(params) != expected:
            raise LlamalabError(f"{path} holds other parameters than this run trains")
        load_full_state(self.wrapped, self.optimizer, params, optim)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.data.load_state(state["data"])
