"""Products built once and shared by every cell that needs them, stored by the content hash of what made them.

Today's kind is a weight-quantized model directory (what `llamalab quantize` writes). What made it: the
base model's file contents (sha256 of the checkpoint file, or of every file of a directory), the method,
bits, group size, method options, calibration settings and the llamalab version. Two cells that differ
only in what is done with the model (dtype at evaluation, KV cache, RoPE scaling, evaluations) share it;
a changed checkpoint or setting gets a new key. Quantization always starts from the fp32 load of the base
model, whatever dtype a cell evaluates in.

A build writes into a hidden staging folder beside the store, then renames it to `<kind>-<key>/` with a
`lab-artifact.json` marker inside, so a folder under that name is always complete; a killed build leaves
only a `.building-*` folder that the next run removes. Later kinds (calibrated KV predictors, trained
adapters) add a spec function and a build function here.
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

from llamalab.lab.settings import content_hash, quant_spec

MARKER = "lab-artifact.json"
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


def quantized_spec(settings: dict[str, Any], model_path: str, root: Path) -> ArtifactSpec | None:
    """The quantized-model artifact a cell needs (None: it evaluates the base model's own weights)."""
    import llamalab
    from llamalab.lab.grid import _calib
    from llamalab.quant.methods import get_method

    spec = quant_spec(settings)
    if spec is None:
        return None
    cls = get_method(str(spec["method"]))
    made_of = {
        "kind": "quantized",
        "model": fingerprint(model_path),
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
    from llamalab.eval.report import atomic_write
    from llamalab.model_options import ModelOptions, load_model
    from llamalab.quant import CalibConfig, quantize_model, save_quantized

    m = task["made_of"]
    final = Path(task["path"])
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
    staging = final.parent / f".building-{task['key']}-{os.getpid()}"
    # fp32 as before bf16 became save_quantized's default: the artifact key does not name the stored dtype,
    # and the results recorded so far were measured on fp32 embeddings and norms
    save_quantized(llm, report, staging, "fp32")
    atomic_write(staging / MARKER, (json.dumps(record, indent=1) + "\n").encode())
    record["bytes"] = sum(p.stat().st_size for p in staging.iterdir())
    try:
        os.rename(staging, final)
    except OSError:  # already there (built by an earlier run whose record was lost): keep that one
        shutil.rmtree(staging, ignore_errors=True)
        record = {**(read_marker(final) or record), "bytes": record["bytes"]}
    return record
