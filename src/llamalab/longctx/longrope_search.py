"""LongRoPE2's evolutionary search over per-pair RoPE rescale factors.

Paper: "LongRoPE2: Near-Lossless LLM Context Window Scaling", Shang et al., arXiv 2502.20082 (ICML 2025), on
top of "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens", Ding et al., arXiv 2402.13753.
Reference code read: microsoft/LongRoPE `evolution/` (v1: `genetic_base.py`, `dim_mono.py`, `search.py`) and
the LongRoPE2 search in the J-shang/LongRoPE fork (critical-dimension search space, NTK-style initial
population, needle data); the released LLaMA3-8B LongRoPE2 factors (microsoft/nnscaler
`examples/longrope2/llama3_8b_longrope2_config.json`).

The genome and its constraints (what is reproduced):
- Factors lambda_i, one per frequency pair, inv_freq_i = 1 / (lambda_i * theta^(2i/d)), monotone
  non-decreasing over i (v1's hard constraint), on a 0.01 grid (`list_step`).
- The critical-dimension parametrisation: below the critical pair r the factors are the NTK-like geometric
  ramp lambda_i = lambda_r^(i/r) (exactly what the released LLaMA3 factors show below pair 34); pairs >= r are
  searched freely in [s, max_scale], the lower bound s = target/original (LongRoPE2 lets low frequencies
  interpolate at least as much as PI, more if that helps: the LLaMA3 factors are 21.8-26 for s = 16). r
  defaults to the reference's ceil((d/2) log_theta(L/2pi)) - 1, one below the theoretical critical pair.
  max_scale defaults to 2s (the reference runs pass `--length-scale` 2s, e.g. 64 for a 32x extension).
- Initial population: up to 8 NTK-style individuals with critical factors s * (1 + 3k/32) (the reference's
  32 + 3k for s = 32), then mutations of them; v1's sizes: population 64, 40 iterations, 32 parents, 16
  mutations + 16 crossovers per iteration, 20 crossover tries.
- Mutation: every free pair is re-drawn with probability 0.3 uniformly on the grid between its neighbours
  (between s and the next for the first, up to max_scale for the last) until the genome is new (v2's
  per-pair form); crossover: up to 20 sweeps, each pair with probability 0.3 takes parent 2's value with
  probability 0.5, the first new monotone genome wins, else a mutation of parent 1. Duplicates are rejected
  against the whole history.
- Fitness: needle-driven perplexity (`needle_ppl`) at the target length; the attention factor (the scale of
  cos and sin) follows one of LongRoPE's `mscale` policies (`rope/longrope.py`): "su" sqrt(1 + ln s / ln L0),
  transformers' longrope default and this search's; "yarn" 0.1 ln s + 1; or a constant. It is written into the
  output as `attention_factor`.

LongRoPE v1's space (`space="v1"`, `evolution/algorithms/dim_mono.py` and `evolution/search.py`) is the other
choice: every pair free and monotone on the grid in [1, 1 + s], the initial population YaRN's ramp mask turned
into factors (lambda_i = s * ramp_i + (1 - ramp_i), betas 32 / 1 as the reference uses for LLaMA) and
mutations of it. v2's space cannot express YaRN's untouched middle frequencies (its ramp interpolates every
pair above 0), so on a model where they matter without fine-tuning only v1's space can start from YaRN and
improve on it.

Not reproduced: the paper's mixed context window fine-tuning (a training method), searching r itself (one
run per r here, as the reference's `--critical-dim` runs), the reference's multi-GPU evaluators.

Resumable by replay: the search is a deterministic function of its seed and of the fitness of the genomes it
evaluates, so the checkpoint file holds every evaluated genome with its fitness; a resumed run replays the
same random draws and takes each known fitness from the file, reaching the point where it stopped without
evaluating anything again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llamalab.errors import LlamalabError
from llamalab.model.rope import critical_pair
from llamalab.model.rope_types import yarn_ramp


@dataclass
class SearchSettings:
    target_len: int
    original: int  # L0, the model's pretraining length
    head_dim: int
    theta: float
    population: int = 64
    iterations: int = 40
    parents: int = 32
    mutations: int = 16
    crossovers: int = 16
    max_crossover_try: int = 20
    step: float = 0.01
    critical: int | None = None  # first freely searched pair (default: reference's theoretical - 1)
    max_scale: float | None = None  # upper bound of the free factors (default 2s; v1: 1 + s)
    seed: int = 0
    space: str = "v2"  # v2: LongRoPE2's critical-pair ramp + free pairs >= r; v1: every pair free, YaRN init
    mscale: str = "su"  # attention factor policy: su | yarn | a number

    def __post_init__(self) -> None:
        if self.target_len <= self.original:
            raise LlamalabError(
                f"--target-len {self.target_len} must exceed the model's original context {self.original}"
            )
        if self.space not in SPACES:
            raise LlamalabError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}")
        _ = self.attention_factor  # validates --mscale now, not after the first evaluation
        pairs = self.head_dim // 2
        if self.space == "v1":
            if self.critical not in (None, 0):
                raise LlamalabError("--critical-pair belongs to --space v2 (v1 searches every pair)")
            self.critical = 0
            self.max_scale = 1 + self.scale if self.max_scale is None else self.max_scale
        else:
            if self.critical is None:
                self.critical = max(1, critical_pair(self.head_dim, self.theta, self.original) - 1)
            self.max_scale = 2 * self.scale if self.max_scale is None else self.max_scale
            if not 1 <= self.critical < pairs:
                raise LlamalabError(f"--critical-pair must be in 1..{pairs - 1}, got {self.critical}")
        if self.max_scale <= self.scale:
            raise LlamalabError(f"--max-scale must exceed s = {self.scale:g}, got {self.max_scale:g}")
        if not (1 <= self.parents <= self.population) or self.iterations < 0:
            raise LlamalabError("the search needs 1 <= parents <= population and iterations >= 0")
        if self.mutations < 0 or self.crossovers < 0 or self.crossovers and self.parents < 2:
            raise LlamalabError("mutations and crossovers must be >= 0 (crossovers need 2 parents)")

    @property
    def scale(self) -> float:
        return self.target_len / self.original

    @property
    def low(self) -> float:
        """The smallest factor a free pair may take: 1 in v1 (extrapolation), s in v2."""
        return 1.0 if self.space == "v1" else self.scale

    @property
    def attention_factor(self) -> float:
        if self.mscale == "su":
            return math.sqrt(1 + math.log(self.scale) / math.log(self.original))
        if self.mscale == "yarn":
            return 0.1 * math.log(self.scale) + 1
        try:
            value = float(self.mscale)
        except ValueError:
            value = 0.0
        if not value > 0:
            raise LlamalabError(f"--mscale must be su, yarn or a positive number, got {self.mscale!r}")
        return value

    @property
    def evaluations(self) -> int:
        return self.population + self.iterations * (self.mutations + self.crossovers)


SPACES = ("v2", "v1")


@dataclass
class SearchResult:
    factors: list[float]  # all head_dim/2 long factors of the best genome
    fitness: float
    curve: list[float]  # best fitness after the initial population and after each iteration
    evaluated: int  # genomes whose fitness the model computed in this run (not taken from the checkpoint)
    history: list[tuple[list[float], float]] = field(default_factory=list)


def full_factors(genome: np.ndarray, critical: int) -> np.ndarray:
    """All pairs' factors from the free ones (pairs >= r): the geometric ramp lambda_r^(i/r) below r."""
    ramp = genome[0] ** (np.arange(critical) / critical)
    return np.concatenate([ramp, genome])


def longrope_scaling(factors: list[float], settings: SearchSettings) -> dict:
    """The `longrope` rope_scaling dict of a searched genome (short factors 1: the original RoPE within L0)."""
    return {
        "rope_type": "longrope",
        "factor": settings.scale,
        "original_max_position_embeddings": settings.original,
        "short_factor": [1.0] * (settings.head_dim // 2),
        "long_factor": [round(float(f), 6) for f in factors],
        "attention_factor": settings.attention_factor,
    }


class Checkpoint:
    """Evaluated genomes and their fitness, for one set of search settings, written atomically."""

    def __init__(self, path: Path, settings: SearchSettings) -> None:
        self.path, self.settings = path, asdict(settings)
        self.known: dict[tuple, float] = {}
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("settings") != self.settings:
                raise LlamalabError(
                    f"{path} is the checkpoint of another search (different settings); delete it or pass "
                    "another --checkpoint"
                )
            self.known = {_key(np.array(g)): f for g, f in data["evaluated"]}

    def get(self, genome: np.ndarray) -> float | None:
        return self.known.get(_key(genome))

    def put(self, genome: np.ndarray, fitness: float) -> None:
        self.known[_key(genome)] = fitness
        data = {"settings": self.settings, "evaluated": [[list(k), f] for k, f in self.known.items()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _key(genome: np.ndarray) -> tuple:
    return tuple(round(float(x), 6) for x in genome)


class Search:
    """The evolutionary loop; `fitness(all_factors) -> float` (lower is better) is the model's part."""

    def __init__(
        self,
        settings: SearchSettings,
        fitness: Callable[[list[float]], float],
        checkpoint: Checkpoint | None = None,
        progress: bool | None = None,
    ) -> None:
        self.s, self.fitness_fn, self.checkpoint = settings, fitness, checkpoint
        self.rng = np.random.default_rng(settings.seed)
        self.history: list[tuple[np.ndarray, float]] = []
        self.evaluated = 0
        self.bar = tqdm(total=settings.evaluations, unit="eval", desc="longrope search",
                        disable=None if progress is None else not progress)  # fmt: skip

    # --- genomes -----------------------------------------------------------------------------------------

    def _grid(self, low: float, high: float) -> np.ndarray:
        # Grid values in [low, high], the grid anchored at s so that s itself is always a value.
        step, s = self.s.step, self.s.scale
        first = s + math.ceil((low - s) / step - 1e-9) * step
        return np.arange(first, high + 1e-9, step)

    def _seen(self, genome: np.ndarray) -> bool:
        return any(np.allclose(genome, g) for g, _ in self.history)

    @staticmethod
    def _monotone(genome: np.ndarray) -> bool:
        return bool(np.all(np.diff(genome) >= 0))

    def initial_genomes(self) -> list[np.ndarray]:
        """v2: the reference's NTK-style individuals, the critical factor from s upward, the free pairs s + 0.1k
        style (here + step per pair, staying inside max_scale). v1: YaRN's ramp mask as factors."""
        if self.s.space == "v1":
            ramp = yarn_ramp(self.s.head_dim, self.s.theta, self.s.original, 32, 1).double().numpy()
            genome = np.minimum(self.s.scale * ramp + (1 - ramp), self.s.max_scale)
            return [np.round(genome / self.s.step) * self.s.step]
        free = self.s.head_dim // 2 - self.s.critical
        out = []
        for k in range(min(8, self.s.population)):
            start = min(self.s.scale * (1 + 3 * k / 32), self.s.max_scale)
            genome = np.minimum(start + 0.1 * np.arange(free), self.s.max_scale)
            out.append(np.round(genome / self.s.step) * self.s.step)
        return out

    def mutate(self, genome: np.ndarray) -> np.ndarray:
        new = genome.copy()
        for _ in range(1000):
            for i in range(len(new)):
                if self.rng.random() < 0.3:
                    low = new[i - 1] if i > 0 else self.s.low
                    high = new[i + 1] if i < len(new) - 1 else self.s.max_scale
                    values = self._grid(low, high)
                    if len(values):
                        new = new.copy()
                        new[i] = values[self.rng.integers(len(values))]
            if self._monotone(new) and not self._seen(new):
                return new
        raise LlamalabError("the mutation found no new genome in 1000 tries; the search space is exhausted")

    def crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        if np.allclose(a, b):
            return None
        new = a.copy()
        for _ in range(self.s.max_crossover_try):
            for i in range(len(new)):
                if self.rng.random() < 0.3:
                    new = new.copy()
                    if self.rng.random() < 0.5:
                        new[i] = b[i]
                    if self._monotone(new) and not self._seen(new):
                        return new
        return None

    # --- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, genome: np.ndarray) -> tuple[np.ndarray, float]:
        known = self.checkpoint.get(genome) if self.checkpoint else None
        if known is None:
            known = float(self.fitness_fn(full_factors(genome, self.s.critical).tolist()))
            self.evaluated += 1
            if self.checkpoint:
                self.checkpoint.put(genome, known)
        self.history.append((genome, known))
        self.bar.update(1)
        self.bar.set_postfix(best=f"{min(f for _, f in self.history):.4g}", new=self.evaluated)
        return genome, known

    def run(self) -> SearchResult:
        """Initial population, then `iterations` rounds of parents -> mutations + crossovers."""
        try:
            population = [self.evaluate(g) for g in self.initial_genomes()]
            first = len(population)
            while len(population) < self.s.population:  # mutations of the initial individuals in turn
                population.append(self.evaluate(self.mutate(population[len(population) % first][0])))
            curve = [min(f for _, f in population)]
            for _ in range(self.s.iterations):
                parents = sorted(population, key=lambda x: x[1])[: self.s.parents]
                population = list(parents)
                for _ in range(self.s.mutations):
                    parent = parents[self.rng.integers(len(parents))][0]
                    population.append(self.evaluate(self.mutate(parent)))
                for _ in range(self.s.crossovers):
                    i, j = sorted(self.rng.choice(len(parents), 2, replace=False))
                    child = self.crossover(parents[i][0], parents[j][0])
                    population.append(
                        self.evaluate(child if child is not None else self.mutate(parents[i][0]))
                    )
                curve.append(min(f for _, f in population))
        finally:
            self.bar.close()
        best, fitness = min(self.history, key=lambda x: x[1])
        return SearchResult(
            full_factors(best, self.s.critical).tolist(),
            fitness,
            curve,
            self.evaluated,
            [(full_factors(g, self.s.critical).tolist(), f) for g, f in self.history],
        )
