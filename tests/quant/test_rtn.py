"""RTN: both quantizer ranges against a slow per-element reference, and the --convention flag."""

import pytest
import torch

from llamalab.cli import main
from llamalab.quant.rtn import RTN


def rtn_reference(w, bits, group_size, convention):
    """Round-to-nearest written out element by element: per row and group of columns, lo/hi are the raw
    min/max ("minmax") or widened to contain 0 ("gptq"); scale = (hi - lo) / maxq as stored (fp16);
    zero = round(-lo / scale) kept in [0, maxq]; w -> scale * (clamp(round(w / scale) + zero) - zero)."""
    maxq = 2**bits - 1
    rows, cols = w.shape
    g = cols if group_size <= 0 else group_size
    out = torch.zeros(rows, cols)
    for r in range(rows):
        for start in range(0, cols, g):
            vals = w[r, start : start + g].tolist()
            lo, hi = min(vals), max(vals)
            if convention == "gptq":
                lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = float(torch.tensor((hi - lo) / maxq).half())
            zero = min(max(round(-lo / scale), 0), maxq)
            for c, v in enumerate(vals):
                q = min(max(round(v / scale) + zero, 0), maxq)
                out[r, start + c] = scale * (q - zero)
    return out


def random_linear(rows=12, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[::3] = w[::3].abs() + 0.01  # every third row entirely positive: there the two ranges differ
    lin = torch.nn.Linear(cols, rows, bias=False)
    lin.weight.data.copy_(w)
    return lin


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 16), (2, 32)])
def test_rtn_ranges_match_the_per_element_reference(bits, group_size):
    lin = random_linear()
    w = lin.weight.detach()
    got = {}
    for convention in ("minmax", "gptq"):
        m = RTN(bits, group_size, convention=convention)
        assert m.settings()["convention"] == convention  # recorded in the checkpoint's config
        got[convention] = m.quantize_linear("l", lin).dequantize().float()
        want = rtn_reference(w, bits, group_size, convention)
        assert torch.allclose(got[convention], want, atol=1e-6), convention
    # rows that straddle 0 have the same range either way; the all-positive rows do not
    straddle = torch.ones(w.shape[0], dtype=torch.bool)
    straddle[::3] = False
    assert torch.equal(got["minmax"][straddle], got["gptq"][straddle])
    assert not torch.equal(got["minmax"][~straddle], got["gptq"][~straddle])
    assert RTN(bits, group_size).options["convention"] == "minmax"  # the default: what the study measures


def test_cli_convention_reaches_the_method_and_is_checked_before_loading(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["quantize", "--method", "rtn", "--convention", "zero", "--out", str(out)]) == 1
    assert "convention must be 'minmax' or 'gptq'" in capsys.readouterr().err
    assert main(["quantize", "--method", "gptq", "--convention", "gptq", "--out", str(out)]) == 1
    assert "unknown option(s) convention" in capsys.readouterr().err
    assert not out.exists()
