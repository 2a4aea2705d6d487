"""The native bf16 GEMV kernel (llamalab.kernels) against fp32 torch, and the Linear path that uses it.

Kernel tests skip, naming the reason, where the kernels are not supported (no AVX512-BF16, or
LLAMALAB_KERNELS=0), and fail where a supported CPU cannot build them (tests/conftest.py, `native_kernels`);
the fallback tests run everywhere.
"""

import subprocess
import sys

import pytest
import torch

from llamalab import kernels
from llamalab.kv.dense import DenseCache
from llamalab.model.linear import Linear
from tests.tiny import hf_model, ours_from_hf


@pytest.fixture
def gemv(native_kernels):
    return native_kernels.gemv_bf16()


def assert_within_bf16_rounding(got: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> None:
    expected = w.float() @ x.float()
    # fp32 accumulation in another order, then one rounding to bf16 (2^-8 relative): the error is bounded
    # by a bf16 ulp of each result plus accumulation noise relative to the terms' magnitude.
    scale = (w.float().abs() @ x.float().abs()).max().clamp_min(1e-6)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-4 * float(scale))


@pytest.mark.parametrize("K", [16, 33, 576, 1536])
@pytest.mark.parametrize("N", [1, 7, 64, 576, 1536, 3000])
def test_gemv_bf16_matches_fp32_reference(gemv, N, K):
    w, x = torch.randn(N, K).bfloat16(), torch.randn(K).bfloat16()
    y = gemv(w, x)
    assert y.dtype == torch.bfloat16 and y.shape == (N,)
    assert_within_bf16_rounding(y, w, x)


def test_gemv_bf16_fp32_input_gives_fp32_output(gemv):
    w, x = torch.randn(100, 70).bfloat16(), torch.randn(70)
    y = gemv(w, x)
    assert y.dtype == torch.float32
    # x is rounded to bf16 for the dot products; the sum is not rounded again.
    torch.testing.assert_close(y, w.float() @ x.bfloat16().float(), rtol=1e-5, atol=1e-4)


def test_gemv_bf16_same_result_for_any_thread_count(gemv):
    w, x = torch.randn(3001, 576).bfloat16(), torch.randn(576).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv(w, x)
        torch.set_num_threads(2)
        two = gemv(w, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each row is summed by one thread in one order


def test_gemv_bf16_rejects_what_it_cannot_handle(gemv):
    w = torch.randn(64, 96).bfloat16()
    with pytest.raises(RuntimeError, match="contiguous"):
        gemv(w.t(), torch.randn(64).bfloat16())
    with pytest.raises(RuntimeError, match="bf16"):
        gemv(w.float(), torch.randn(96))
    with pytest.raises(RuntimeError, match="elements"):
        gemv(w, torch.randn(95).bfloat16())


def test_gemv_bf16_empty_shapes(gemv):
    assert gemv(torch.empty(0, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)).shape == (0,)
    y = gemv(torch.empty(5, 0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.bfloat16))
    assert torch.equal(y, torch.zeros(5, dtype=torch.bfloat16))


def test_linear_single_row_uses_kernel_and_matches(gemv):
    lin = Linear(576, 1000, bias=True).bfloat16().requires_grad_(False)
    x = torch.randn(1, 1, 576).bfloat16()
    with torch.no_grad():
        y = lin(x)
    assert y.shape == (1, 1, 1000) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y[0, 0], gemv(lin.weight, x.reshape(-1)) + lin.bias, rtol=0, atol=0)
    assert_within_bf16_rounding(y[0, 0] - lin.bias, lin.weight, x.reshape(-1))


def test_linear_non_contiguous_weight_falls_back_to_torch_mv():
    lin = Linear(64, 48, bias=False).bfloat16().requires_grad_(False)
    lin.weight.data = torch.randn(64, 48).bfloat16().t()  # a transposed view: not contiguous
    x = torch.randn(64).bfloat16()
    with torch.no_grad():
        assert torch.equal(lin(x), torch.mv(lin.weight, x))


def test_linear_keeps_autograd_when_the_weight_needs_gradients():
    lin = Linear(32, 16, bias=False).bfloat16()
    y = lin(torch.randn(32).bfloat16())
    y.float().sum().backward()  # the kernel builds no graph, so this path must be torch.mv's
    assert lin.weight.grad is not None


def test_resolving_again_reuses_the_build(gemv):
    """torch's loader appends to the flag lists it is given; ours must not change, or the build's digest (and
    directory) would change and every re-resolution (e.g. after LLAMALAB_KERNELS is toggled) would rebuild."""
    digest_inputs = (list(kernels._CFLAGS), list(kernels._LDFLAGS))
    kernels.reset()
    assert kernels.gemv_bf16() is not None
    assert (kernels._CFLAGS, kernels._LDFLAGS) == digest_inputs


def test_env_var_disables_kernels(kernels_disabled):
    assert kernels.gemv_bf16() is None
    assert "LLAMALAB_KERNELS" in kernels.unavailable_reason()
    lin = Linear(40, 24, bias=False).bfloat16().requires_grad_(False)
    x = torch.randn(40).bfloat16()
    with torch.no_grad():
        assert torch.equal(lin(x), torch.mv(lin.weight, x))


def _decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a prefill of all but the last 8 tokens, then 8 single-token steps (the kernel's path)."""
    cache = DenseCache.for_model(model.config, 64, dtype=torch.bfloat16)
    P = ids.shape[1] - 8
    with torch.inference_mode():
        out = [model(ids[:, :P], 0, cache, last_only=True)[0]]
        out += [model(ids[:, t : t + 1], t, cache)[0] for t in range(P, ids.shape[1])]
    return torch.cat(out).float()


def test_tiny_bf16_model_decodes_the_same_with_and_without_kernel(gemv, monkeypatch):
    # Tied GQA config: the fused q/k/v and gate/up weights and the tied head all take the kernel path.
    hf = hf_model(dtype=torch.bfloat16, num_key_value_heads=2, tie_word_embeddings=True)
    model = ours_from_hf(hf, dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 24))
    with_kernel = _decode_logits(model, ids)
    monkeypatch.setenv("LLAMALAB_KERNELS", "0")
    kernels.reset()
    try:
        assert kernels.gemv_bf16() is None
        without = _decode_logits(model, ids)
    finally:
        monkeypatch.undo()
        kernels.reset()
    # Both sum in fp32 and round once per output; only the order differs, so logits agree to a bf16 ulp or
    # so through two layers.
    torch.testing.assert_close(with_kernel, without, atol=2e-2, rtol=2e-2)
    assert (with_kernel.argmax(-1) == without.argmax(-1)).float().mean() >= 0.8


def test_a_venv_ninja_is_put_on_path_for_the_build_only(tmp_path, monkeypatch):
    (tmp_path / "ninja").touch()
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.setattr(kernels.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/somewhere")
    with kernels._ninja_on_path():
        assert kernels.os.environ["PATH"].split(kernels.os.pathsep) == [str(tmp_path), "/somewhere"]
    assert kernels.os.environ["PATH"] == "/somewhere"


def test_a_build_killed_midway_does_not_block_later_builds(tmp_path):
    """A process killed while building leaves torch's `lock` file behind (which made every later build wait
    forever); the next builder finds it stale and removes it, and the killed one's flock is gone."""
    build_dir = tmp_path / "kernels"
    build_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_BUILD_LOCK, str(build_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "building"
    holder.kill()
    holder.wait(timeout=30)
    assert (build_dir / "lock").exists()
    with kernels._exclusive_build(build_dir):
        assert not (build_dir / "lock").exists()


HOLD_THE_BUILD_LOCK = """
import sys, time
from pathlib import Path
from llamalab import kernels
build_dir = Path(sys.argv[1])
with kernels._exclusive_build(build_dir):
    (build_dir / "lock").touch()  # as torch's FileBaton does
    print("building", flush=True)
    time.sleep(600)
"""
