"""llama.cpp (llama-cpp-python), the peer the tests and benchmarks compare with, ready to run on any x86-64 CPU.

`make setup` builds llama-cpp-python with llama.cpp's runtime CPU dispatch (`GGML_BACKEND_DL`,
`GGML_CPU_ALL_VARIANTS`): the CPU backend is compiled once per instruction-set level (x86-64 baseline, SSE4.2,
AVX, AVX2, AVX-512, VNNI, BF16, AMX ...) into `bin/libggml-cpu-<variant>.so` beside the package, and the best
variant this CPU can execute is picked when it is loaded (AMX code only where the kernel grants AMX state). One
build therefore runs on an AMD or Intel CPU with or without AVX-512, VNNI or AMX, where a build for fixed
instructions dies with "Illegal instruction" on a CPU that lacks them.

llama-cpp-python does not load such backends itself (its `llama_backend_init` searches only the Python
executable's directory and the working directory), so `load()` asks ggml to load them from where the wheel put
them. Builds with the CPU backend linked in (the default build) already have a backend and are left as they are.
"""

from __future__ import annotations

import ctypes
from importlib import metadata
from pathlib import Path
from types import ModuleType

from llamalab.errors import LlamalabError

_DIST = "llama_cpp_python"


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
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(backend_dir()).encode())
        if ggml.ggml_backend_reg_count() == 0:
            raise LlamalabError(f"llama.cpp found no CPU backend this CPU can run in {backend_dir()}")
    return llama_cpp


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
