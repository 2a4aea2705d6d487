"""GPTQ: the mechanism against slow, obviously correct references."""

import pytest
import torch

from llamalab.quant.gptq import gptq_quantize
from llamalab.quant.quantizer import affine_params, fake_quantize, group_affine

from .helpers import hessian, layer_and_data, out_err


def _deq(r, bits, G, cols):
    g = cols if G <= 0 else G
    w = r["scales"].repeat_interleave(g, 1) * (r["codes"].float() - r["zeros"].repeat_interleave(g, 1))
    return w if r["perm"] is None else w[:, torch.argsort(r["perm"])]


def naive_gptq(w, H, bits, percdamp=0.01):
    """OBQ-style reference: quantize column j, spread its error with the full inverse Hessian, remove j
    from the inverse by Gaussian elimination; fp64, no blocks, no Cholesky."""
    W = w.double().clone()
    H = H.double().clone()
    H += percdamp * H.diag().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    p = affine_params(w, bits, convention="gptq")
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = fake_quantize(W[:, j : j + 1].float(), p).double()[:, 0]
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q.float()


def test_gptq_matches_the_naive_obq_reference():
    w, x = layer_and_data(rows=24, cols=64)
    H = hessian(x)
    r = gptq_quantize(w, H, 3, blocksize=16)  # several lazy blocks
    ours = _deq(r, 3, -1, 64)
    ref = naive_gptq(w, H, 3)
    assert (ours - ref).abs().max() < 1e-5  # the same codes: lazy blocks + Cholesky change nothing


def test_gptq_output_error_below_rtn_on_the_same_layer_and_data():
    w, x = layer_and_data()
    H = hessian(x)
    for bits, G in [(4, -1), (3, 32), (2, 32)]:
        q, s, z = group_affine(w, bits, G, convention="gptq")
        g = 128 if G <= 0 else G
        rtn = s.repeat_interleave(g, 1) * (q.float() - z.repeat_interleave(g, 1))
        for opts in [{}, {"act_order": True}, {"act_order": True, "static_groups": True}]:
            r = gptq_quantize(w, H, bits, G, **opts)
            gq = _deq(r, bits, G, 128)
            assert out_err(w, gq, x) < 0.8 * out_err(w, rtn, x), (bits, G, opts)


def test_gptq_static_groups_keep_original_order_and_dynamic_act_order_stores_perm():
    w, x = layer_and_data(cols=128)
    H = hessian(x)
    assert gptq_quantize(w, H, 4, 32, act_order=True, static_groups=True)["perm"] is None
    r = gptq_quantize(w, H, 4, 32, act_order=True)
    assert torch.equal(r["perm"], torch.argsort(torch.diag(H), descending=True))


@pytest.mark.parametrize(
    "flags,want",
    [
        ([], {"act_order": True, "static_groups": True}),  # the defaults that generalised best
        (["--no-act-order"], {"act_order": False, "static_groups": False}),  # the reference's
        (["--no-static-groups"], {"act_order": True, "static_groups": False}),
    ],
)
def test_cli_gptq_defaults_to_act_order_with_static_groups(tmp_path, capsys, monkeypatch, flags, want):
    from llamalab.cli import main
    from llamalab.errors import LlamalabError
    from llamalab.quant import cli, methods

    def stop(llm, method, bits, group, calib, **options):
        cls = methods.get_method(method)
        m = cls(bits or cls.default_bits, group or cls.default_group_size, **options)
        raise LlamalabError(f"options {m.options['act_order']} {m.options['static_groups']}")

    monkeypatch.setattr(cli, "load_model", lambda opts: None)
    monkeypatch.setattr(methods, "quantize_model", stop)
    assert main(["quantize", "--method", "gptq", *flags, "--out", str(tmp_path / "q")]) == 1
    assert f"options {want['act_order']} {want['static_groups']}" in capsys.readouterr().err
