"""The grid file: parse it, check every name before any work, expand it into cells.

    name: quant-demo                  # identifies the grid's cells in a (possibly shared) database
    description: RTN against GPTQ on the default model
    options:                          # settings every cell has (model options and quant.*)
      model: smollm2-135m
      dtype: fp32
    sweep:                            # axes whose values are crossed; a list of such mappings is a union
      quant.method: [rtn, gptq]
      quant.bits: [4, 3]
      quant.group_size: [64, -1]
    include:                          # extra cells, each with an optional label
      - {label: baseline, quant.method: none}
    exclude:                          # cells matching every key of one entry are dropped (a list = any of)
      - {quant.method: gptq, quant.group_size: -1}
    evals:                            # run on every cell
      ppl: {data: alice_heldout, seq_len: 2048, max_windows: 2}
      choice: {task: alice_cloze_heldout}
    references:                       # papers' figures the report shows beside ours
      - {match: {label: baseline}, source: "LLaMA3-8B (arXiv 2404.14047)", metrics: {ppl.ppl: 6.1}}
    report:                           # optional: markdown pages written from Jinja templates
      markdown: [{template: study.md.j2, out: ../docs/results/study.md}]
    database: results/quant-demo.db   # optional (default: GRID.db beside the file)
    artifacts: results/artifacts      # optional (default: GRID.artifacts/ beside the file)

Settings keys are described in settings.py. An unknown key, method, KV or RoPE method, evaluation or
evaluation parameter is a one-line error before anything runs. Settings that a known method rejects (bits
out of its range, a group size it does not take) make that cell fail with the method's message, recorded in
the database, while the others run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.io.registry import DEFAULT_MODEL
from llamalab.lab import settings as st
from llamalab.lab.evals import get_evaluation

TOP_LEVEL = (
    "name",
    "description",
    "options",
    "sweep",
    "include",
    "exclude",
    "evals",
    "references",
    "report",
    "database",
    "artifacts",
)


@dataclass
class Cell:
    key: str
    ordinal: int
    label: str
    settings: dict[str, Any]
    error: str | None = None  # the method rejected these settings; recorded without running


@dataclass
class EvalSpec:
    name: str
    key: str  # hash of the parameters as written, so moving the grid keeps its results
    params: dict[str, Any]  # with paths made absolute, for running


@dataclass
class Grid:
    name: str
    path: Path
    text: str
    description: str = ""
    cells: list[Cell] = field(default_factory=list)
    evals: list[EvalSpec] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    database: Path | None = None
    artifacts: Path | None = None

    @property
    def base(self) -> Path:
        return self.path.parent

    def default_db_url(self) -> str:
        return f"sqlite:///{self.database or self.path.with_suffix('.db')}"

    def artifact_root(self) -> Path:
        return self.artifacts or self.path.with_suffix(".artifacts")

    def model_path(self, model: str) -> str:
        """Where a cell's `model` setting points: relative paths are relative to the grid file."""
        local = self.base / model
        return str(local.resolve()) if not Path(model).is_absolute() and local.exists() else model


def load_grid(path: str | Path) -> Grid:
    """Read, check and expand a grid file (see the module docstring); any bad name is a one-line error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LlamalabError(f"{path}: no such grid file")
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise LlamalabError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise LlamalabError(f"{path}: a grid file is a YAML mapping with name, options, sweep, evals ...")
    unknown = sorted(set(doc) - set(TOP_LEVEL))
    if unknown:
        raise LlamalabError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL)}"
        )
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise LlamalabError(f"{path}: the grid needs a `name` (it identifies its cells in the database)")
    grid = Grid(name=name, path=path.resolve(), text=text, description=str(doc.get("description") or ""))
    grid.database = _optional_path(grid, doc.get("database"))
    grid.artifacts = _optional_path(grid, doc.get("artifacts"))
    grid.evals = _evals(doc.get("evals"), grid)
    grid.cells = expand(doc, str(path))
    for cell in grid.cells:
        check_cell(cell, str(path), grid.base)
    grid.references = _list(doc.get("references"), "references", str(path))
    grid.report = doc.get("report") or {}
    return grid


def _optional_path(grid: Grid, value: Any) -> Path | None:
    return None if value is None else (grid.base / str(value)).resolve()


def _list(value: Any, what: str, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise LlamalabError(f"{where}: `{what}` must be a list")
    return value


def _evals(value: Any, grid: Grid) -> list[EvalSpec]:
    where = str(grid.path.name)
    if not isinstance(value, dict) or not value:
        raise LlamalabError(
            f"{where}: `evals` must name at least one evaluation (e.g. ppl: {{seq_len: 512}})"
        )
    out = []
    for name, params in value.items():
        ev = get_evaluation(name, where)
        if params is not None and not isinstance(params, dict):
            raise LlamalabError(f"{where}: evaluation {name!r} takes a mapping of parameters")
        run_params = ev.prepare(params, grid.base, where)
        out.append(
            EvalSpec(name, st.content_hash({"eval": name, **ev.defaults, **(params or {})}), run_params)
        )
    return out


def _settings(d: Any, what: str, where: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise LlamalabError(f"{where}: `{what}` must be a mapping of setting: value")
    flat = st.flatten(d)
    for key in flat:
        if key != "label":
            st.check_key(key, f"{where} ({what})")
    return flat


def _clean(value: Any) -> Any:
    # 4.0 and 4 are one cell (YAML readers and hand edits differ)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def expand(doc: dict[str, Any], where: str) -> list[Cell]:
    """The grid's cells in a stable order: the sweep blocks' products, then `include`, minus `exclude`,
    duplicates (same settings) kept once."""
    options = _settings(doc.get("options"), "options", where)
    sweep = doc.get("sweep")
    blocks = sweep if isinstance(sweep, list) else [sweep] if sweep else []
    combos: list[tuple[str | None, dict[str, Any]]] = []
    for block in blocks:
        axes = _settings(block, "sweep", where)
        keys = list(axes)
        values = [v if isinstance(v, list) else [v] for v in axes.values()]
        for combo in itertools.product(*values):
            combos.append((None, dict(zip(keys, combo))))
    for inc in _list(doc.get("include"), "include", where):
        flat = _settings(inc, "include", where)
        combos.append((flat.pop("label", None), flat))
    if not combos:
        combos = [(None, {})]
    excludes = [_settings(e, "exclude", where) for e in _list(doc.get("exclude"), "exclude", where)]
    cells: list[Cell] = []
    seen: set[str] = set()
    for label, combo in combos:
        s = st.normalize({k: _clean(v) for k, v in {**options, **combo}.items()})
        if any(_matches(s, pattern) for pattern in excludes):
            continue
        key = st.cell_key(s)
        if key in seen:
            continue
        seen.add(key)
        cells.append(Cell(key, len(cells), label or "", s))
    varying = sorted(
        k for k in {k for c in cells for k in c.settings} if len({repr(c.settings.get(k)) for c in cells}) > 1
    )
    for c in cells:
        c.label = c.label or st.describe(c.settings, varying)
    return cells


def _matches(s: dict[str, Any], pattern: dict[str, Any]) -> bool:
    for key, want in pattern.items():
        options = [_clean(w) for w in want] if isinstance(want, list) else [_clean(want)]
        if s.get(key) not in options:
            return False
    return True


def check_cell(cell: Cell, where: str, base: Path) -> None:
    """Unknown names stop the grid; settings a known method rejects are this cell's error."""
    from llamalab.quant.calib import CalibConfig
    from llamalab.quant.methods import get_method

    s = cell.settings
    values = st.option_values(s)
    try:
        st.model_options(s)
    except LlamalabError as e:
        raise LlamalabError(f"{where}: cell {cell.label!r}: {e}") from None
    _check_names(values, where)
    _check_training(cell, where, base)
    try:
        calibration = st.kv_calibration(s)
        if calibration is not None:
            calibration.check_settings()
    except LlamalabError as e:
        cell.error = str(e)
    spec = st.quant_spec(s)
    if spec is None:
        return
    cls = get_method(str(spec["method"]))  # unknown method: the whole grid stops here
    try:
        bits = spec.get("bits", cls.default_bits)
        group = spec.get("group_size", cls.default_group_size)
        cls(bits, group, **spec["options"])
        if cls.calibrated:
            CalibConfig(**_calib(spec, cls)).validate()
        elif any(k in spec for k in ("calib", "nsamples", "seq_len")):
            raise LlamalabError(f"{cls.name} takes no calibration; drop quant.calib/nsamples/seq_len")
    except (LlamalabError, TypeError, ValueError) as e:
        # A misspelt quant.NAME is the grid's mistake, not a setting the method rejects: stop here. The
        # methods' base class words it "<method>: unknown option(s) ..." (quant/methods.py).
        if "unknown option" in str(e):
            raise LlamalabError(f"{where}: cell {cell.label!r}: {e}") from None
        cell.error = str(e)


def _check_training(cell: Cell, where: str, base: Path) -> None:
    """A missing recipe file or a setting the training config does not have stops the grid; a value it
    rejects is the cell's error."""
    try:
        st.train_config(cell.settings, base, str(cell.settings.get("model", DEFAULT_MODEL)))
    except LlamalabError as e:
        message = str(e)
        if "no such config file" in message or "unknown setting" in message or "train.recipe" in message:
            raise LlamalabError(f"{where}: cell {cell.label!r}: {message}") from None
        cell.error = message


def _calib(spec: dict[str, Any], cls) -> dict[str, Any]:
    from llamalab.quant.calib import CalibConfig

    base = {**CalibConfig().to_dict(), **cls.default_calib}
    names = {"calib": "source", "nsamples": "nsamples", "seq_len": "seq_len", "seed": "seed"}
    return {**base, **{names[k]: spec[k] for k in names if k in spec}}


def _check_names(values: dict[str, Any], where: str) -> None:
    kv = values.get("kv")
    if kv is not None and kv not in _kv_names():
        raise LlamalabError(f"{where}: unknown KV-cache method kv={kv!r}; known: {', '.join(_kv_names())}")
    rope = values.get("rope_scaling")
    if rope not in (None, "default") and rope not in _rope_names():
        raise LlamalabError(f"{where}: unknown rope_scaling {rope!r}; known: {', '.join(_rope_names())}")
    dtype = values.get("dtype")
    if dtype is not None:
        from llamalab.model.build import check_dtype

        check_dtype(dtype)


def _kv_names() -> list[str]:
    from llamalab.kv import kv_cache_names

    return list(kv_cache_names())


def _rope_names() -> list[str]:
    from llamalab.model.rope import rope_scaling_types

    return list(rope_scaling_types())
