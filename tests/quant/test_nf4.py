"""NF4: the mechanism against slow, obviously correct references."""

import torch

from llamalab.quant.nf4 import NF4_TABLE, NF4Linear, create_normal_map, pack_nf4, unpack_nf4


def test_nf4_table_quantiles_nearest_and_high_nibble_first():
    assert torch.allclose(create_normal_map(), NF4_TABLE, atol=1e-6)
    assert len(set(NF4_TABLE.tolist())) == 16
    assert pack_nf4(torch.tensor([1, 2])).tolist() == [0x12]
    codes = torch.randint(0, 16, (256,), dtype=torch.uint8)
    assert torch.equal(unpack_nf4(pack_nf4(codes)), codes)
    w = torch.randn(32, 128) * 0.02
    m = NF4Linear.from_weight(w, None, 64, double_quant=False)
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    ref = NF4_TABLE[(blocks / absmax).unsqueeze(-1).sub(NF4_TABLE).abs().argmin(-1)] * absmax
    assert torch.allclose(m.dequantize().view(-1, 64), ref, atol=1e-7)
    dq = NF4Linear.from_weight(w, None, 64, double_quant=True)
    assert torch.allclose(dq.block_absmax(), absmax[:, 0], rtol=0.02)  # 8-bit dynamic map of the absmax
    assert dq.nbytes < m.nbytes and dq.bits_per_weight < 4.2  # 4 + 8/64 + tiny


def test_nearest_code_counts_midpoints_below_as_a_binary_search_does_ties_included():
    from llamalab.quant.nf4 import DYNAMIC_MAP, nearest_code

    for table in (NF4_TABLE, DYNAMIC_MAP):  # 15 midpoints: compare-and-add; 255: torch.bucketize
        mids = (table[1:] + table[:-1]) / 2
        x = torch.cat([torch.rand(10_000) * 2 - 1, mids, torch.nextafter(mids, mids + 1), table])
        expected = torch.tensor([int((mids < v).sum()) for v in x.tolist()], dtype=torch.uint8)
        assert torch.equal(nearest_code(x, table), expected)
