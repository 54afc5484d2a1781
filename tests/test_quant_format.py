"""The int8 / int4 weight format of ``reference.quant``: what the kernels read must dequantize to what the format
promises (half a step of error per element, the largest magnitude of an int4 group exact, row-wise so stacking
commutes), for odd K, partial last groups and all-zero rows."""
import pytest
import torch

from gemma3n_fast.reference.quant import QuantizedWeight, check_kind, quantize, unpack_int4


def _weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[3] = 0.0  # an all-zero row: scale 0, values 0, no NaN
    w[5, : min(K, 7)] *= 40  # an outlier row
    return w


@pytest.mark.parametrize("K", [37, 72, 80, 130])
def test_int8_per_channel_half_a_step(K):
    w = _weight(11, K)
    q = quantize(w, "int8")
    assert q.data.dtype == torch.int8 and q.data.shape == (11, K) and q.scales.shape == (11,)
    assert torch.equal(q.scales, (w.abs().amax(1) / 127).to(torch.bfloat16).float())  # bf16 values, fp32 storage
    err = (q.dequantize() - w).abs()
    # half a step, plus what the bf16 rounding of the scale can push the largest element past the clamp at 127
    assert (err <= q.scales[:, None] / 2 * (1 + 1e-6) + w.abs().amax(1, keepdim=True) * 2 ** -8 + 1e-12).all()
    assert torch.equal(q.dequantize()[3], torch.zeros(K))


@pytest.mark.parametrize("K,G", [(37, 8), (72, 64), (80, 64), (130, 32), (64, 64)])
def test_int4_groups_half_a_step_and_the_largest_exact(K, G):
    w = _weight(9, K).to(torch.bfloat16).float()  # bf16 weights: the group's largest magnitude is representable
    q = quantize(w, "int4", G)
    groups = -(-K // G)
    assert q.data.dtype == torch.uint8 and q.data.shape == (9, (K + 1) // 2)
    assert q.scales.dtype == torch.bfloat16 and q.scales.shape == (9, groups)
    d = q.dequantize()
    s = q.scales.float().repeat_interleave(G, 1)[:, :K].abs()
    # within [-8, 7] steps: half a step, except the one value clamped at +7 (at most one more step away)
    assert ((d - w).abs() <= s * 1.5 * (1 + 1e-6) + 1e-12).all()
    assert ((d - w).abs() <= s / 2 * (1 + 1e-6) + 1e-12).float().mean() > 0.95
    for n in range(9):
        for j in range(groups):
            seg = w[n, j * G:(j + 1) * G]
            i = seg.abs().argmax()
            assert d[n, j * G + i] == seg[i]  # m = -8 * (m / -8): exact (up to the bf16 rounding of m / -8)
    if K % 2:
        assert torch.equal(q.data[:, -1] >> 4, torch.full((9,), 8, dtype=torch.uint8))  # pad nibble = weight 0
    assert torch.equal(d[3], torch.zeros(K))


def test_unpack_order_low_nibble_first():
    packed = torch.tensor([[0x1F, 0x80]], dtype=torch.uint8)
    assert unpack_int4(packed).tolist() == [[15 - 8, 1 - 8, 0 - 8, 8 - 8]]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_stacking_rows_commutes_with_quantizing(kind):
    a, b = _weight(7, 80, seed=1), _weight(6, 80, seed=2)
    cat = QuantizedWeight.cat([quantize(a, kind, 32), quantize(b, kind, 32)])
    whole = quantize(torch.cat([a, b]), kind, 32)
    assert torch.equal(cat.data, whole.data) and torch.equal(cat.scales, whole.scales) and cat.shape == (13, 80)
    part = whole.rows(7, 6)
    assert torch.equal(part.dequantize(), quantize(b, kind, 32).dequantize())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="int8"):
        check_kind("int3")
    with pytest.raises(ValueError, match="even"):
        quantize(torch.randn(4, 8), "int4", 7)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize(torch.randn(8), "int8")
    with pytest.raises(ValueError, match="differ"):
        QuantizedWeight.cat([quantize(torch.randn(4, 8), "int4", 4), quantize(torch.randn(4, 8), "int4", 8)])
