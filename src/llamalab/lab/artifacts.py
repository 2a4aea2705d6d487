"""Products built once and shared by every cell that needs them, stored by the content hash of what made them.

Three kinds, built in this order when a cell needs more than one:

- `trained`: a `llamalab train` run of the cell's recipe (`train.recipe` with `train.KEY` overrides) from
  the cell's model, kept as the run's exported HF directory (`model/`, and `adapter/` for LoRA runs) with its
  `metrics.jsonl`. What made it: the base model's fingerprint, the training config (with its data files'
  sha256; not where it writes, its thread count, checkpoint or evaluation intervals), the llamalab version.
  Relative data paths in a recipe are relative to the working directory, as for `llamalab train`.
- `quantized`: a weight-quantized model directory (what `llamalab quantize` writes). What made it: the
  base model's file contents (sha256 of the checkpoint file, or of every file of a directory; a trained
  artifact's key when the cell trains first), the method,
  bits, group size, method options, calibration settings and the llamalab version. Quantization always
  starts from the fp32 load of the base model, whatever dtype a cell evaluates in.
- `kv_predictors`: a KV-cache method's fitted parameters (AQUA-KV's predictors, what `llamalab kv
  calibrate` writes), fitted on the weights the cell runs (the quantized artifact's key, or the base
  model's fingerprint), in fp32, with the cell's RoPE settings, the calibration (`kv_calib.*`) and the
  cache's bits, group and grid dimension.

Cells that differ only in what is done with the product (dtype at evaluation, evaluations, and for a
quantized model the KV cache and RoPE scaling) share it; a changed checkpoint or setting gets a new key.

A build writes into a hidden staging folder beside the store, then renames it to `<kind>-<key>/` with a
`lab-artifact.json` marker inside, so a folder under that name is always complete; a killed build leaves
only a `.building-*` folder that the next run removes. A new kind adds a spec function, a build function
and a line in `BUILDERS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalab.lab.settings import content_hash, kv_calibration, quant_spec, train_config

MARKER = "lab-artifact.json"
PREDICTORS_FILE = "predictors.safetensors"
TRAINED_MODEL = "model"  # the run's exported HF directory inside a trained artifact
# Model options that change the activations a KV calibration sees (dtype does not: it fits in fp32).
ROPE_OPTIONS = ("rope_scaling", "rope_factor", "rope_original_max", "rope_config", "context")
_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


@dataclass
class ArtifactSpec:
    key: str
    kind: str
    made_of: dict[str, Any]  # everything that determines the artifact (hashed into the key)
    path: Path
    base_model: str  # path or alias of the model the build starts from

    def task(self, threads: int | None) -> dict[str, Any]:
        """What a worker needs to build it (plain data: it crosses process and Ray boundaries)."""
        return {
            "key": self.key,
            "kind": self.kind,
            "made_of": self.made_of,
            "path": str(self.path),
            "base_model": self.base_model,
            "threads": threads,
        }


def fingerprint(model: str) -> str:
    """sha256 of a checkpoint's bytes (file, or every file of a directory in name order); a name that is
    not local (a hub id) is its own fingerprint."""
    from llamalab.io.registry import resolve_alias

    path = resolve_alias(model) or Path(model).expanduser()
    if not path.exists():
        return f"name:{model}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        stat = f.stat()
        cache_key = (str(f.resolve()), stat.st_size, stat.st_mtime_ns)
        if cache_key not in _FINGERPRINTS:
            fh = hashlib.sha256()
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    fh.update(block)
            _FINGERPRINTS[cache_key] = fh.hexdigest()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{_FINGERPRINTS[cache_key]}\n".encode())
    return h.hexdigest()


def quantized_spec(
    settings: dict[str, Any], model_path: str, root: Path, model_id: Any = None
) -> ArtifactSpec | None:
    """The quantized-model artifact a cell needs (None: it evaluates the base model's own weights);
    `model_id` names weights that are an artifact themselves (default: `model_path`'s fingerprint)."""
    import llamalab
    from llamalab.lab.grid import _calib
    from llamalab.quant.methods import get_method

    spec = quant_spec(settings)
    if spec is None:
        return None
    cls = get_method(str(spec["method"]))
    made_of = {
        "kind": "quantized",
        "model": model_id or fingerprint(model_path),
        "method": cls.name,
        "bits": spec.get("bits", cls.default_bits),
        "group_size": spec.get("group_size", cls.default_group_size),
        "options": spec["options"],
        "calib": _calib(spec, cls) if cls.calibrated else None,
        "llamalab": llamalab.__version__,
    }
    if cls.revision > 1:  # a revised method builds a new artifact (earlier ones keep their keys)
        made_of["revision"] = cls.revision
    key = content_hash(made_of, 24)
    return ArtifactSpec(key, "quantized", made_of, root / f"quantized-{key}", model_path)


def kv_predictors_spec(
    settings: dict[str, Any], model_path: str, model_id: Any, root: Path
) -> ArtifactSpec | None:
    """The fitted KV parameters a cell needs (None: its KV method fits nothing, or it names a file), fitted
    on the weights at `model_path` (`model_id`: their artifact, if they are one)."""
    import dataclasses

    import llamalab

    calibration = kv_calibration(settings)
    if calibration is None:
        return None
    made_of = {
        "kind": "kv_predictors",
        "model": model_id or fingerprint(model_path),
        "load": {k: settings[k] for k in ROPE_OPTIONS if settings.get(k) is not None},
        "calibration": dataclasses.asdict(calibration),
        "llamalab": llamalab.__version__,
    }
    key = content_hash(made_of, 24)
    return ArtifactSpec(key, "kv_predictors", made_of, root / f"kv_predictors-{key}", model_path)


def trained_spec(settings: dict[str, Any], model_path: str, root: Path, base: Path) -> ArtifactSpec | None:
    """The training run a cell starts from (None: it trains nothing)."""
    import llamalab

    cfg = train_config(settings, base, model_path)
    if cfg is None:
        return None
    config = cfg.to_dict()
    for where_and_how in ("model", "out", "threads", "checkpoint", "eval", "tensorboard", "distributed"):
        config.pop(where_and_how)
    data = cfg.data
    local = [s.source for s in [*data.train, *([data.replay] if data.replay else [])]]
    local += [data.eval, data.eval_pairs, cfg.tokenizer]
    made_of = {
        "kind": "trained",
        "model": None if cfg.init is not None else fingerprint(model_path),
        "config": config,
        "files": {f: fingerprint(f) for f in local if f and Path(f).expanduser().exists()},
        "llamalab": llamalab.__version__,
    }
    key = content_hash(made_of, 24)
    return ArtifactSpec(key, "trained", made_of, root / f"trained-{key}", model_path)


def cell_artifacts(settings: dict[str, Any], model_path: str, root: Path, base: Path) -> list[ArtifactSpec]:
    """The artifacts a cell needs, each after the ones it is built from; `base` is the grid's folder."""
    trained = trained_spec(settings, model_path, root, base)
    weights, weights_id = (
        (str(trained.path / TRAINED_MODEL), {"trained": trained.key}) if trained else (model_path, None)
    )
    quantized = quantized_spec(settings, weights, root, weights_id)
    if quantized is not None:
        weights, weights_id = str(quantized.path), {"quantized": quantized.key}
    predictors = kv_predictors_spec(settings, weights, weights_id, root)
    return [a for a in (trained, quantized, predictors) if a is not None]


def cell_inputs(artifacts: list[ArtifactSpec], model_path: str) -> tuple[str, str | None]:
    """What a cell loads (its quantized model, else its trained one, else its own model) and the KV
    predictors file it reads (None: it has none from the lab)."""
    paths = {a.kind: a.path for a in artifacts}
    weights = str(paths["trained"] / TRAINED_MODEL) if "trained" in paths else model_path
    weights = str(paths["quantized"]) if "quantized" in paths else weights
    predictors = str(paths["kv_predictors"] / PREDICTORS_FILE) if "kv_predictors" in paths else None
    return weights, predictors


def read_marker(path: Path) -> dict[str, Any] | None:
    """The build record of a finished artifact folder (None if the folder is not a finished artifact)."""
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def clean_staging(root: Path) -> None:
    """Remove folders of builds that were killed (only the driver schedules builds, one driver per store)."""
    if root.is_dir():
        for p in root.glob(".building-*"):
            shutil.rmtree(p, ignore_errors=True)


def build_quantized(task: dict[str, Any]) -> dict[str, Any]:
    """Quantize the base model and store it; returns the build record (also written as the marker)."""
    from llamalab.model_options import ModelOptions, load_model
    from llamalab.quant import CalibConfig, quantize_model, save_quantized

    m = task["made_of"]
    llm = load_model(ModelOptions(model=task["base_model"], dtype="fp32", threads=task.get("threads")))
    calib = CalibConfig(**m["calib"]) if m["calib"] else None
    report = quantize_model(
        llm, m["method"], m["bits"], m["group_size"], calib, progress=False, **m["options"]
    )
    errors = [b.get("rel_out_error", b.get("rel_weight_error", 0.0)) for b in report.blocks]
    record = {
        "key": task["key"],
        "kind": "quantized",
        "made_of": m,
        "bits_per_weight": report.bits_per_weight,
        "seconds": report.seconds,
        "quantized_bytes": report.quantized_bytes,
        "settings": report.settings,
        "calibration": report.calibration,
        "mean_block_error": sum(errors) / max(len(errors), 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    staging = _staging(task)
    # fp32 as before bf16 became save_quantized's default: the artifact key does not name the stored dtype,
    # and the results recorded so far were measured on fp32 embeddings and norms
    save_quantized(llm, report, staging, "fp32")
    return _publish(staging, Path(task["path"]), record)


def build_kv_predictors(task: dict[str, Any]) -> dict[str, Any]:
    """Fit a KV method's parameters on the cell's weights and store them; returns the build record."""
    from llamalab.kv.calibration import KVCalibration, fit_kv_parameters, held_out_bits
    from llamalab.model_options import ModelOptions, load_model

    m = task["made_of"]
    calibration = KVCalibration(**m["calibration"])
    opts = ModelOptions.from_kwargs(
        model=task["base_model"], dtype="fp32", threads=task.get("threads"), **m["load"]
    )
    predictors = fit_kv_parameters(load_model(opts), calibration, progress=False)
    record = {
        "key": task["key"],
        "kind": "kv_predictors",
        "made_of": m,
        "seconds": predictors.meta["seconds"],
        "held_out_bits": held_out_bits(predictors),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    staging = _staging(task)
    staging.mkdir()
    predictors.save(staging / PREDICTORS_FILE)
    return _publish(staging, Path(task["path"]), record)


def build_trained(task: dict[str, Any]) -> dict[str, Any]:
    """Run the training config on the base model into the staging folder; keep what a cell loads (the
    exported model, the adapter) and the metrics, not the checkpoints."""
    from llamalab.train.config import TrainConfig, from_dict
    from llamalab.train.loop import train

    m = task["made_of"]
    staging = _staging(task)
    raw = {**m["config"], "out": str(staging), "threads": task.get("threads")}
    raw["model"] = None if m["model"] is None else task["base_model"]
    cfg = from_dict(TrainConfig, raw, "train config").validate()
    cfg.checkpoint.every = cfg.steps  # one checkpoint, at the end (the run is never resumed by the lab)
    t0 = time.perf_counter()
    result = train(cfg)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    record = {
        "key": task["key"],
        "kind": "trained",
        "made_of": m,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": time.perf_counter() - t0,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return _publish(staging, Path(task["path"]), record)


BUILDERS = {"trained": build_trained, "quantized": build_quantized, "kv_predictors": build_kv_predictors}


def _staging(task: dict[str, Any]) -> Path:
    return Path(task["path"]).parent / f".building-{task['key']}-{os.getpid()}"


def _publish(staging: Path, final: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write the marker into a finished build and move it to its final name (the one step a reader sees)."""
    from llamalab.eval.report import atomic_write

    atomic_write(staging / MARKER, (json.dumps(record, indent=1) + "\n").encode())
    record["bytes"] = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    try:
        os.rename(staging, final)
    except OSError:  # already there (built by an earlier run whose record was lost): keep that one
        shutil.rmtree(staging, ignore_errors=True)
        record = {**(read_marker(final) or record), "bytes": record["bytes"]}
    return record
