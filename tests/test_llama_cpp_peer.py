"""The llama.cpp peer loads the best CPU backend variant this CPU runs, never the AMX one unless asked (its
AMX products die with SIGILL in the bundled llama.cpp; see llamalab/llama_cpp_peer.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")


def _variant(env: dict[str, str]) -> str:
    code = "from llamalab import llama_cpp_peer as p; v = p.best_variant(); print(v.stem if v else '')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().removeprefix("libggml-cpu-")


def test_the_amx_variant_only_when_asked():
    import os

    from llamalab.llama_cpp_peer import AMX_VARIANTS

    base = {k: v for k, v in os.environ.items() if k != "LLAMALAB_LLAMA_CPP_AMX"}
    chosen = _variant(base)
    assert chosen and chosen not in AMX_VARIANTS
    with_amx = _variant({**base, "LLAMALAB_LLAMA_CPP_AMX": "1"})
    amx_here = "amx_int8" in Path("/proc/cpuinfo").read_text()
    # an AMX CPU gets the AMX build when asked; any other CPU gets the same variant either way
    assert (with_amx in AMX_VARIANTS) if amx_here else (with_amx == chosen)
