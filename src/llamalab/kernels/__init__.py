"""Optional native CPU kernels, compiled on first use; every caller falls back to PyTorch without them.

The ops, each returned by its function, or None where the kernels cannot be used:
  * `gemv_bf16()`: `op(weight, x) -> y`, a matrix-vector product for a contiguous bf16 weight (N, K) and a
    bf16 or fp32 x of K elements, with fp32 accumulation and the result in x's dtype.
    `llamalab.model.linear.Linear` uses it for batch-1 decode of bf16 models, where torch.mv reads bf16
    weights well below the memory bandwidth (benchmarks/gemv.py measures both).
  * `prepare_decode()`: reads a bf16 or fp32 model and its cache once into a step object, which runs one
    decode step (one new token for each of a batch of sequences) through every layer, head included, its
    projections dense or quantized (`decode_step.cpp`), attending over the cache in its own layout: dense, or
    KIVI's packed codes dequantized inside attention (`kv_layout.h`); `llamalab.generate.native_step` checks
    when a model can use it, and the engine calls it.
  * `quant_matmul()` and `quant_dequantize()`: products with, and the dequantized weight of, a weight-only
    int8/int4 layer in the portable packed layout or a GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q6_K one (`quant_linear.cpp`,
    `qgemm.h`), behind `llamalab.quant.base.UniformQuantLinear` and `llamalab.quant.gguf_linear.GGUFLinear`.

Quantized products with a few rows (decode) take one of two paths (`integer_dot()` says which):
  * the integer path (default): the activations are quantized to int8 in blocks of 32, as llama.cpp does for
    Q4_0/Q8_0, and multiplied with the codes by AVX512-VNNI integer dot products. Not exact: teacher-forced
    agreement with the exact path is reported in BENCHMARKS.md;
  * the exact path (`LLAMALAB_EXACT_QUANT=1`, or `with kernels.exact_quant():`): each weight dequantized in
    registers to exactly the fp32 value the module's `dequantize()` gives, activations kept in fp32; for
    measuring a method's accuracy exactly. NF4 always takes it (its 16 levels are not integers).

The sources (the `.cpp` and `.h` files beside this file) are built with `torch.utils.cpp_extension.load` the
first time a kernel is asked for (about 40 s on 2 cores), into `$XDG_CACHE_HOME/llamalab/kernels/<torch>-<hash>`
(`~/.cache/...` by default), keyed by the torch version and a hash of the source and flags, so later runs
only load it. An advisory lock (`flock`, released by the kernel when its holder dies) keeps concurrent
processes from building the same directory at once; torch's own lock file, which a build killed midway leaves
behind and which then makes every later build wait forever, is removed under it.

The kernels are used only when all of these hold, else callers silently use PyTorch:
  * the CPU has AVX512-BF16 and AVX512-VNNI (with AVX512F/BW/VL and FMA), read from /proc/cpuinfo (every
    CPU with AVX512-BF16 so far also has VNNI);
  * a C++ compiler (g++ with OpenMP) and ninja are available (a system `ninja`, or `pip install ninja`:
    the venv's own is found even when the venv is not activated) and the build succeeds: a failed build
    logs one warning and is not retried in this process;
  * the environment variable `LLAMALAB_KERNELS` is not `0` (read on first use; `reset()` re-reads it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger("llamalab.kernels")

_DIR = Path(__file__).parent
_SOURCES = [
    _DIR / name
    for name in (
        "gemv.cpp",
        "quant_linear.cpp",
        "decode_step.cpp",
        "dense_layout.cpp",
        "kivi_layout.cpp",
        "bindings.cpp",
    )
]
_HEADERS = [
    _DIR / name for name in ("gemv.h", "qgemm.h", "projection.h", "decode_step.h", "kv_layout.h", "simd.h")
]
# The whole extension is compiled for AVX-512, which is why it is only loaded after the CPU check.
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers, which runs serially
# without it. The extension then needs libgomp.so.1, which resolves to the copy torch already loaded (one
# thread pool, sized by torch.set_num_threads).
_CFLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mavx512vnni",
    "-mfma",
    "-mf16c",
    "-fopenmp",
]
_LDFLAGS = ["-fopenmp"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "fma", "f16c")

_UNRESOLVED = object()
_ext: object = _UNRESOLVED  # the extension module, or None once resolution failed
_reason: str | None = None  # why the kernels are unavailable
_lock = threading.Lock()

GemvOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DecodeStepOp = Callable[..., torch.Tensor]


def _extension():
    ext = _ext
    if ext is _UNRESOLVED:
        with _lock:
            if _ext is _UNRESOLVED:
                _resolve()
            ext = _ext
    return ext


def gemv_bf16() -> GemvOp | None:
    """The bf16 GEMV op, or None where it cannot be used (building the kernels on the first call)."""
    ext = _extension()
    return None if ext is None else ext.gemv_bf16


def prepare_decode() -> DecodeStepOp | None:
    """`op(layers, kv_layout, kv_tensors, kv_settings, n_heads, eps, scale, norm, head) -> step`, where
    `step(embedded, cos, sin, rows, positions, int_dot) -> logits` (see decode_step.cpp), or None where the
    kernels cannot be used."""
    ext = _extension()
    return None if ext is None else ext.prepare_decode


def quant_matmul() -> Callable[..., torch.Tensor] | None:
    """`op(x, codes, scales, zeros, perm, int_dot) -> y`: x (M, K) bf16/fp32 times a weight-only int8/int4
    weight in a native layout (quant_linear.cpp), or None where it cannot be used."""
    ext = _extension()
    return None if ext is None else ext.quant_matmul


def quant_dequantize() -> Callable[..., torch.Tensor] | None:
    """`op(codes, scales, zeros, in_features, dtype) -> weight`, or None where it cannot be used."""
    ext = _extension()
    return None if ext is None else ext.quant_dequantize


_exact = threading.local()


def integer_dot() -> bool:
    """Whether quantized decode products take the integer path (8-bit activations, VNNI): yes unless
    `LLAMALAB_EXACT_QUANT=1` or inside `exact_quant()`."""
    if getattr(_exact, "depth", 0):
        return False
    return os.environ.get("LLAMALAB_EXACT_QUANT", "0").strip().lower() in ("0", "false", "no", "off", "")


@contextlib.contextmanager
def exact_quant() -> Iterator[None]:
    """Within the block (this thread), quantized products dequantize each weight exactly (the exact path)."""
    _exact.depth = getattr(_exact, "depth", 0) + 1
    try:
        yield
    finally:
        _exact.depth -= 1


def unavailable_reason() -> str | None:
    """Why the kernels are unavailable (resolving them first), or None when they are in use."""
    _extension()
    return _reason


def reset() -> None:
    """Forget the resolution, so the next call re-reads `LLAMALAB_KERNELS` (a built extension stays cached
    on disk and in this process)."""
    global _ext, _reason
    with _lock:
        _ext, _reason = _UNRESOLVED, None


def unsupported_reason() -> str | None:
    """Why the kernels are not meant to run here (LLAMALAB_KERNELS=0, or a CPU without their instructions), or
    None where they must build and pass their self-check: then being unavailable is a fault (the tests fail)."""
    if os.environ.get("LLAMALAB_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by LLAMALAB_KERNELS=0"
    missing = _missing_cpu_flags()
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _resolve() -> None:
    global _ext, _reason
    _ext, _reason = None, None
    _reason = unsupported_reason()
    if _reason is not None:
        return
    try:
        ext = _build()
        _self_check(ext)
    except Exception as e:  # a kernel problem must never break the model: fall back to torch
        # A compiler failure's message starts with the whole command line; its `error:` line says more.
        lines = str(e).strip().splitlines() or [type(e).__name__]
        line = next((ln for ln in lines if "error:" in ln), lines[0])
        _reason = f"build or load failed: {line.strip()[:300]}"
        log.warning("llamalab: native kernels unavailable (%s); using PyTorch ops instead", _reason)
        log.debug("kernel build error", exc_info=True)
        return
    _ext = ext


def _missing_cpu_flags() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["x86-64"]
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["a readable /proc/cpuinfo"]
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return [f for f in _CPU_FLAGS if f not in flags]


def _cache_dir(digest: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "llamalab" / "kernels" / f"{torch.__version__}-{digest}"


def _build():
    from torch.utils.cpp_extension import load

    source = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    digest = hashlib.sha256(source + repr((_CFLAGS, _LDFLAGS)).encode()).hexdigest()[:16]
    build_dir = _cache_dir(digest)
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):  # say why the first bf16 decode pauses (stderr: stdout is the text)
        print(f"llamalab: building the native decode kernels once (~40 s) into {build_dir}", file=sys.stderr)
    with _exclusive_build(build_dir), _ninja_on_path():
        return load(
            name=f"llamalab_gemv_{digest[:12]}",  # a new name per source: one process can't reload a module
            sources=[str(p) for p in _SOURCES],
            extra_include_paths=[str(_DIR)],
            extra_cflags=list(_CFLAGS),  # copies: torch appends its libraries to the list it is given, which
            extra_ldflags=list(_LDFLAGS),  # changed the digest, so every re-resolution rebuilt the kernels
            build_directory=str(build_dir),
            verbose=False,
        )


@contextlib.contextmanager
def _exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold an flock on the build directory for the build. torch guards a build with a `lock` file that
    only its creator deletes, so a process killed while compiling (a test's timeout, Ctrl-C twice, the OOM
    killer) leaves one behind and every later process waits for it forever. The flock dies with its
    holder, so whoever holds it is the only builder: any `lock` file it finds is stale."""
    with open(build_dir.parent / f"{build_dir.name}.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; a venv used without being activated has a pip-installed ninja only in
    its bin/. Put that directory on PATH for the build alone."""
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") or not (venv_bin / "ninja").exists():
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = str(venv_bin) + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _self_check(ext) -> None:
    """Guard against a miscompiled or mis-dispatched kernel: compare small odd shapes with fp32 torch."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(13, 77, generator=g).bfloat16()
    x = torch.randn(77, generator=g).bfloat16()
    expected = w.float() @ x.float()
    got = ext.gemv_bf16(w, x).float()
    if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())):
        raise RuntimeError("self-check failed: gemv_bf16 disagrees with torch")
    # 4-bit codes, two per byte, groups of 32 over 64 columns: W = scale * (code - zero)
    codes = torch.randint(0, 16, (5, 64), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (5, 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(5, 2, generator=g)
    w4 = scales.repeat_interleave(32, 1) * (codes.float() - zeros.float().repeat_interleave(32, 1))
    x4 = torch.randn(3, 64, generator=g)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4), scales, zeros[:, :1] | (zeros[:, 1:] << 4),
              torch.empty(0, dtype=torch.int32))  # fmt: skip
    if not torch.allclose(ext.quant_matmul(x4, *packed, False), x4 @ w4.T, rtol=1e-4, atol=1e-4):
        raise RuntimeError("self-check failed: quant_matmul disagrees with torch")
    # the integer path rounds x to 8 bits per block of 32: within a few percent of the largest output
    expected = x4 @ w4.T
    if not torch.allclose(
        ext.quant_matmul(x4, *packed, True), expected, atol=0.03 * float(expected.abs().max())
    ):
        raise RuntimeError("self-check failed: quant_matmul's integer path disagrees with torch")
