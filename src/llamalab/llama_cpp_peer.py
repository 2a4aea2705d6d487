"""llama.cpp (llama-cpp-python), the peer the tests and benchmarks compare with, ready to run on any x86-64 CPU.

`make setup` builds llama-cpp-python with llama.cpp's runtime CPU dispatch (`GGML_BACKEND_DL`,
`GGML_CPU_ALL_VARIANTS`): the CPU backend is compiled once per instruction-set level (x86-64 baseline, SSE4.2,
AVX, AVX2, AVX-512, VNNI, BF16, AMX ...) into `bin/libggml-cpu-<variant>.so` beside the package, and the best
variant this CPU can execute is picked when it is loaded (AMX code only where the kernel grants AMX state). One
build therefore runs on an AMD or Intel CPU with or without AVX-512, VNNI or AMX, where a build for fixed
instructions dies with "Illegal instruction" on a CPU that lacks them.

llama-cpp-python does not load such backends itself (its `llama_backend_init` searches only the Python
executable's directory and the working directory), so `load()` loads the best variant from where the wheel put
them. Builds with the CPU backend linked in (the default build) already have a backend and are left as they are.

The AMX variant (`sapphirerapids`) is skipped unless `LLAMALAB_LLAMA_CPP_AMX=1`: in the llama.cpp this
llama-cpp-python bundles, its AMX matrix products die with SIGILL at their first `tileloadd` on Sapphire
Rapids (seen on a 2-core Xeon VM with AMX granted to the process; ggml-org/llama.cpp PR #26954: the tile
configuration, built on the stack, is optimised away and worker threads lack the XTILEDATA permission).
The next variant down (AVX-512 with VNNI and BF16) is what llama.cpp runs there instead.
"""

from __future__ import annotations

import ctypes
import os
from importlib import metadata
from pathlib import Path
from types import ModuleType

from llamalab.errors import LlamalabError

_DIST = "llama_cpp_python"
AMX_VARIANTS = ("sapphirerapids",)  # ggml's CPU variants built with AMX (GGML_CPU_ALL_VARIANTS)


def load() -> ModuleType:
    """`import llama_cpp`, with a CPU backend registered; a LlamalabError where it is missing or unusable."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamalabError(f"llama-cpp-python is not installed ({e}); `make setup` builds it") from e
    # ggml's functions as libllama resolves them: the wheel holds libggml.so and libggml.so.0 as two files,
    # and loading the first by path would give a second ggml whose registry libllama never sees.
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count() == 0:
        best = best_variant()
        if best is not None:
            ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load.restype = ctypes.c_void_p
            ggml.ggml_backend_load(str(best).encode())
        if ggml.ggml_backend_reg_count() == 0:
            raise LlamalabError(f"llama.cpp found no CPU backend this CPU can run in {backend_dir()}")
    return llama_cpp


def best_variant() -> Path | None:
    """The CPU backend variant with ggml's highest score on this CPU (0: it cannot run here), AMX variants
    left out unless LLAMALAB_LLAMA_CPP_AMX=1 (see the module docstring)."""
    import llama_cpp  # noqa: F401  (loads libggml-base, which every variant links against by soname)

    allow_amx = os.environ.get("LLAMALAB_LLAMA_CPP_AMX") == "1"
    scored = []
    for path in sorted(backend_dir().glob("libggml-cpu*.so")):
        variant = path.stem.removeprefix("libggml-cpu-")
        if variant in AMX_VARIANTS and not allow_amx:
            continue
        score_fn = getattr(ctypes.CDLL(str(path)), "ggml_backend_score", None)  # checks CPUID only
        score = score_fn() if score_fn is not None else 1
        if score > 0:
            scored.append((score, path))
    return max(scored)[1] if scored else None


def backend_dir() -> Path:
    """Where the wheel installed the CPU backend variants (`bin/` beside the package's site directory)."""
    for f in metadata.files(_DIST) or []:
        if f.name.startswith("libggml-cpu"):
            return Path(str(f.locate())).parent
    raise LlamalabError(
        "llama-cpp-python was built without loadable CPU backends (see llamalab/llama_cpp_peer.py)"
    )


def system_info() -> str:
    """llama.cpp's own line on the instructions its loaded CPU backend uses (e.g. `AVX512 = 1 | ...`)."""
    return load().llama_print_system_info().decode()


# `python -m llamalab.llama_cpp_peer ARGS` is `python -m llama_cpp.server ARGS` with the CPU backend loaded.
if __name__ == "__main__":
    import runpy

    load()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
