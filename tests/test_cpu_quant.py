"""gemma3n_fast.cpu_quant: every GEMV-family op on a CpuPackedWeight equals the plain op (reference.ops) on its
QuantizedWeight by the 2x rule and rounds like it (fp32 and bf16 x; int8, int4 G=32/64; odd N, odd K, partial
last groups; 1, 3 and 20 rows), on the packed route and on the forced fallback; bad input gets a clear error."""
import functools
import subprocess
import sys

import pytest
import torch

from gemma3n_fast import cpu_quant as cq
from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import QuantizedWeight, quantize
from kernel_checks import assert_2x_torch, randn

# fp32: the packed fp32 op sums in another order than F.linear (O(1) outputs, K <= 83); bf16: the plain op's own
# rounding dominates (its error is in the bound)
ATOL = {torch.float32: 4e-6 * 8, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (kind, G, N, K): odd N, odd K, a partial last group (K=80 with G=64, K=72 with G=32)
WEIGHTS = [("int8", 0, 37, 83), ("int8", 0, 21, 64), ("int4", 64, 37, 80), ("int4", 32, 21, 72),
           ("int4", 32, 19, 37)]
ROWS = [1, 3, 20]


def _qweight(kind, G, N, K, seed, bf16_scales=True):
    w = randn((N, K), torch.float32, seed, scale=K ** -0.5, device="cpu")
    q = quantize(w, kind, G or 64)  # int8: bf16-valued scales, which the bf16 packed op reads exactly
    if kind == "int8" and not bf16_scales:  # fp32 scales that are no bf16 value (a QuantizedWeight built by hand)
        q = QuantizedWeight("int8", q.data, q.scales * (1 + 2 ** -12), q.shape)
    return q


def _check(fn_fast, fn_plain, args_fast, args_plain, args_64, what):
    out, ref, ref64 = fn_fast(*args_fast), fn_plain(*args_plain), fn_plain(*args_64)
    outs, refs, ref64s = [(o if isinstance(o, tuple) else (o,)) for o in (out, ref, ref64)]
    for o, r, r64 in zip(outs, refs, ref64s):
        assert_2x(o, r, r64.double(), what)


def _as64(q: QuantizedWeight) -> torch.Tensor:
    return q.dequantize().double()  # the fp64 reference: the exact dequantized weight, fp64 sums


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("spec", WEIGHTS, ids=lambda s: f"{s[0]}G{s[1]}N{s[2]}K{s[3]}")
def test_project_and_linear(spec, dtype_id, rows):
    kind, G, N, K = spec
    dt = DTYPES[dtype_id]
    q = _qweight(kind, G, N, K, seed=rows)
    p = cq.prepack(q)
    assert p.scales_bf16 is not None, p.why_not  # the packed route exists: the test is not trivially the fallback
    assert p.route(torch.bfloat16, rows) == cq.PACKED_BF16
    x = randn((rows, K), dt, seed=100 + rows, device="cpu")
    _check(cq.linear, ops.linear, (x, p), (x, q), (x.double(), _as64(q)), f"linear {spec} {dtype_id} rows={rows}")
    x3 = randn((2, rows, K), dt, seed=200 + rows, device="cpu")  # leading dims
    _check(cq.project, ops.project, (x3, p), (x3, q), (x3.double(), _as64(q)), f"project 3-D {spec} {dtype_id}")


@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("spec", [("int8", 0, 42, 83), ("int4", 64, 38, 80), ("int4", 32, 42, 37)],
                         ids=lambda s: f"{s[0]}G{s[1]}N{s[2]}K{s[3]}")
def test_epilogue_ops(spec, dtype_id):
    kind, G, N, K = spec  # N even: gate|up halves
    dt = DTYPES[dtype_id]
    q = _qweight(kind, G, N, K, seed=7)
    p, q64 = cq.prepack(q), _as64(q)
    for rows in (1, 3):
        x = randn((rows, K), dt, seed=rows, device="cpu")
        aux = randn((rows, N), dt, seed=50 + rows, device="cpu")
        x64, aux64 = x.double(), aux.double()
        tag = f"{spec} {dtype_id} rows={rows}"
        _check(cq.linear_gelu_mul, ops.linear_gelu_mul, (x, p), (x, q), (x64, q64), "gelu_mul " + tag)
        _check(cq.linear_gelu_aux, ops.linear_gelu_aux, (x, p, aux), (x, q, aux), (x64, q64, aux64), "gelu_aux " + tag)
        _check(cq.linear_softcap, ops.linear_softcap, (x, p, 0.5), (x, q, 0.5), (x64, q64, 0.5), "softcap " + tag)
        _check(cq.linear_softcap, ops.linear_softcap, (x, p, None), (x, q, None), (x64, q64, None), "nocap " + tag)
        q2 = _qweight(kind, G, N, K + 3, seed=8)
        x2 = randn((rows, K + 3), dt, seed=9, device="cpu")
        _check(cq.dual_linear, ops.dual_linear, (x, p, x2, cq.prepack(q2)), (x, q, x2, q2),
               (x64, q64, x2.double(), _as64(q2)), "dual " + tag)


@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("spec", [("int8", 0, 37, 83), ("int4", 64, 37, 80)], ids=lambda s: f"{s[0]}G{s[1]}")
def test_qkv_projection_norm_rope_cache(spec, dtype_id):
    """The q|k|v|LAuReL-left projection (2 q heads, 1 k / v head of D = 8, rank 5: N = 37) with its norms, RoPE
    and cache write: q, LAuReL's left projection and the written cache slots by the 2x rule."""
    from gemma3n_fast.reference.text import rope_inv_freq

    kind, G, N, K = spec
    dt = DTYPES[dtype_id]
    D, S = 8, 4
    q = _qweight(kind, G, N, K, seed=11)
    x = randn((1, 3, K), dt, seed=12, device="cpu")
    qw, kw = randn((D,), dt, seed=13, shift=1.0, device="cpu"), randn((D,), dt, seed=14, shift=1.0, device="cpu")
    rope = (rope_inv_freq(D, 10_000.0, "cpu"), torch.tensor([[5, 6, -1]]))
    slots = torch.tensor([2, 3, -1])
    caches = [[torch.zeros(1, 1, S, D, dtype=d) for _ in range(2)] for d in (dt, dt, torch.float64)]
    out = cq.qkv_projection_norm_rope_cache(x, cq.prepack(q), 32, qw, kw, *rope, *caches[0], slots)
    ref = ops.qkv_projection_norm_rope_cache(x, q, 32, qw, kw, *rope, *caches[1], slots)
    ref64 = ops.qkv_projection_norm_rope_cache(x.double(), _as64(q), 32, qw.double(), kw.double(), *rope,
                                               *caches[2], slots)
    for o, r, r64, name in zip((*out, *caches[0]), (*ref, *caches[1]), (*ref64, *caches[2]), ("q", "laurel", "k", "v")):
        assert_2x(o, r, r64, f"qkv_projection_norm_rope_cache {name} {spec} {dtype_id}")


@pytest.mark.parametrize("dtype_id", DTYPES)
def test_one_column_qkv_norm_rope_cache_and_its_per_step_memo(dtype_id):
    """A decode column (T = 1, 2 rows): q and the written K/V slots equal the plain op's by the 2x rule, for an owner
    layer and a KV-shared one (q only), over three steps whose positions and slots change in place (the RoPE memo
    must follow them; so must the fp32 head-norm weights when the last step writes the norm weights in place); a
    negative slot (nothing written) takes the plain op."""
    from gemma3n_fast.reference.text import rope_inv_freq

    dt = DTYPES[dtype_id]
    D, S, Hq, Hkv = 8, 6, 2, 1
    inv_freq = rope_inv_freq(D, 10_000.0, "cpu")
    qw, kw = randn((D,), dt, seed=61, shift=1.0, device="cpu"), randn((D,), dt, seed=62, shift=1.0, device="cpu")
    positions, slots = torch.tensor([[3], [7]], dtype=torch.int32), torch.tensor([2])
    caches = [[torch.zeros(2, Hkv, S, D, dtype=d) for _ in range(2)] for d in (dt, dt, torch.float64)]
    for step in range(3):
        qkv = randn((2, 1, (Hq + 2 * Hkv) * D), dt, seed=63 + step, device="cpu")
        if step == 2:  # norm weights written in place: the per-layer fp32 head weights must follow
            qw.mul_(1.5), kw.mul_(0.75)
        for owner in (True, False):
            x, kv = (qkv, [c + [slots] for c in caches]) if owner else (qkv[..., :Hq * D], [[None, None, None]] * 3)
            out = cq.qkv_norm_rope_cache(x, qw, kw, inv_freq, positions, *kv[0])
            ref = ops.qkv_norm_rope_cache(x, qw, kw, inv_freq, positions, *kv[1])
            ref64 = ops.qkv_norm_rope_cache(x.double(), qw.double(), kw.double(), inv_freq, positions, *kv[2])
            assert_2x(out, ref, ref64, f"q step {step} owner={owner} {dtype_id}")
        for o, r, r64, name in zip(caches[0], caches[1], caches[2], "kv"):
            assert_2x(o, r, r64, f"{name} cache step {step} {dtype_id}")
        positions += 1
        slots += 1
    skip = torch.tensor([-1])
    before = caches[0][0].clone()
    out = cq.qkv_norm_rope_cache(qkv, qw, kw, inv_freq, positions, *caches[0], skip)
    assert torch.equal(out, ops.qkv_norm_rope_cache(qkv, qw, kw, inv_freq, positions, *caches[1], skip))
    assert torch.equal(caches[0][0], caches[1][0]) and not torch.equal(before, torch.zeros_like(before))


# H = 72 with G = 32: a partial last group (the int4 rows take the definition); H = 96 / 128: whole groups (the
# int4 rows dequantized as low and high nibbles apart, ``times_rows``)
@pytest.mark.parametrize("kind,G,H", [("int8", 0, 72), ("int4", 32, 72), ("int4", 32, 96), ("int4", 64, 128)])
def test_sparse_ffn(kind, G, H):
    I = 106
    dt = torch.bfloat16
    gate, up = (_qweight(kind, G, I, H, seed=s) for s in (1, 2))
    down_t = _qweight(kind, G, I, H, seed=3)  # [I, H]: quantized along H
    x = randn((3, H), dt, seed=4, device="cpu")
    z = 1.6448535919189453
    out = cq.sparse_ffn(x, cq.prepack(gate), cq.prepack(up), cq.prepack(down_t), z)
    ref = ops.sparse_ffn(x, gate, up, down_t, z)
    ref64 = ops.sparse_ffn(x.double(), _as64(gate), _as64(up), _as64(down_t), z)
    assert_2x(out, ref, ref64, f"sparse_ffn {kind} G={G} H={H}")


@pytest.mark.parametrize("kind,G,K", [("int8", 0, 83), ("int4", 64, 128), ("int4", 32, 96), ("int4", 64, 80)])
def test_times_rows_is_the_product_with_the_rows(kind, G, K):
    """``times_rows(a, w, idx)`` = a @ w's rows idx dequantized, fp32, by the 2x rule against fp64 (any order,
    repeats, none; 1 and 3 rows of a; K = 80 with G = 64, a partial group, takes the definition)."""
    q = _qweight(kind, G, 50, K, seed=22)
    for idx in (torch.tensor([7, 0, 49, 7, 3]), torch.arange(50), torch.zeros(0, dtype=torch.long)):
        for R in (1, 3):
            a = randn((R, idx.numel()), torch.float32, seed=23 + R, device="cpu")
            rows = q.take_rows(idx)
            assert_2x(cq.times_rows(a, q, idx), a @ rows, a.double() @ rows.double(), f"times_rows {kind} {K} {R}")


@pytest.mark.parametrize("kind,G,K", [("int8", 0, 83), ("int4", 64, 128), ("int4", 32, 96), ("int4", 64, 80)])
def test_take_rows_is_the_definition(kind, G, K):
    """The sparse down projection's row gather equals ``QuantizedWeight.take_rows`` bit for bit (any order, repeats,
    none; K = 80 with G = 64, a partial group, takes the definition itself)."""
    q = _qweight(kind, G, 50, K, seed=21)
    for idx in (torch.tensor([7, 0, 49, 7, 3]), torch.arange(50), torch.zeros(0, dtype=torch.long)):
        assert torch.equal(cq.take_rows(q, idx), q.take_rows(idx))


# (B, Hq, Hkv, S, D, window, last column): a long full cache read to column 40, a ring not yet full, a wrapped
# ring, one KV head per query head
ATTENTION_CASES = [(1, 8, 2, 300, 64, None, 40), (2, 4, 2, 64, 32, 64, 20), (1, 4, 1, 64, 32, 64, 150),
                   (1, 2, 2, 48, 16, None, 47)]


@pytest.mark.parametrize("upcast", [True, False], ids=["fp32-matmuls", "bf16-matmuls"])
@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}Hq{}Hkv{}S{}W{}last{}".format(*c[:4], *c[5:]))
def test_attention_decode_reads_the_live_slots(case, dtype_id, upcast, monkeypatch):
    """Decode attention (GQA by a view, only the slots up to ``last_slot`` read; bf16 operands upcast to fp32 up to
    ``FP32_ATTENTION_MAX_SLOTS`` live slots, both routes forced) equals the plain op on the clean cache by the 2x
    rule; the slots past the bound hold NaN, so reading one would show."""
    monkeypatch.setattr(cq, "FP32_ATTENTION_MAX_SLOTS", 10 ** 6 if upcast else 0)
    B, Hq, Hkv, S, D, W, last = case
    dt = DTYPES[dtype_id]
    live = min(last + 1, S)
    k, v = (randn((B, Hkv, S, D), dt, seed=s, device="cpu") for s in (31, 32))
    k[:, :, live:], v[:, :, live:] = float("nan"), float("nan")
    k_pos = torch.full((B, S), -1, dtype=torch.int32)
    cols = torch.arange(last + 1 - live, last + 1, dtype=torch.int32)
    k_pos[:, :live] = cols[cols % S] if W is None else cols[torch.argsort(cols % S)]  # ring: slot = column % S
    k_pos[1:, :2] = -1  # a left-padded row
    q_pos = torch.full((B, 1), last, dtype=torch.int32)
    q = randn((B, Hq, 1, D), dt, seed=33, device="cpu")
    kw = dict(window=W, scaling=D ** -0.5)
    out = cq.sliding_window_attention_decode(q, k, v, q_pos, k_pos, last_slot=torch.tensor([last]), **kw)
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    ref = ops.sliding_window_attention_decode(q, k0, v0, q_pos, k_pos, **kw)
    ref64 = ops.sliding_window_attention_decode(q.double(), k0.double(), v0.double(), q_pos, k_pos, **kw)
    assert_2x(out, ref, ref64, f"attention decode {case} {dtype_id}", rounds_like=False)
    k_pos[:, :1] = -1  # in place, as a decode step writes the cache's position table: the mask memo must follow
    out = cq.sliding_window_attention_decode(q, k, v, q_pos, k_pos, last_slot=torch.tensor([last]), **kw)
    ref = ops.sliding_window_attention_decode(q, k0, v0, q_pos, k_pos, **kw)
    ref64 = ops.sliding_window_attention_decode(q.double(), k0.double(), v0.double(), q_pos, k_pos, **kw)
    assert_2x(out, ref, ref64, f"attention decode, slot 0 emptied, {case} {dtype_id}", rounds_like=False)


def test_fp32_weight_copies_follow_in_place_writes():
    """The fp32 copies made once per weight (the router's, the per-head norm weights) are rebuilt when the weight
    is written in place, and a new weight gets its own."""
    w = randn((4, 24), torch.bfloat16, seed=71, device="cpu")
    assert torch.equal(cq._fp32(w), w.float())
    w.mul_(3.0)
    assert torch.equal(cq._fp32(w), w.float())
    other = w.clone().add_(1.0)
    assert torch.equal(cq._fp32(other), other.float()) and torch.equal(cq._fp32(w), w.float())
    qw, kw = (randn((8,), torch.bfloat16, seed=s, shift=1.0, device="cpu") for s in (72, 73))
    expect = lambda: torch.cat([qw.float().expand(3, 8), kw.float().expand(2, 8), torch.ones(2, 8)])  # noqa: E731
    assert torch.equal(cq._head_norm_weights(qw, kw, 3, 2), expect())
    kw.mul_(0.5)
    assert torch.equal(cq._head_norm_weights(qw, kw, 3, 2), expect())
    assert torch.equal(cq._head_norm_weights(qw, None, 3, 0), qw.float().expand(3, 8))


def test_the_per_step_memo_keeps_one_entry_per_layer_type():
    """A generation's steps each read one more slot: the masks of past steps are replaced, not kept (a long
    generation would otherwise hold a mask per step)."""
    cq._memo_store.clear()
    B, H, S, D = 1, 2, 40, 16
    q, k, v = (randn(shape, torch.float32, seed=s, device="cpu") for s, shape in
               ((41, (B, H, 1, D)), (42, (B, H, S, D)), (43, (B, H, S, D))))
    k_pos = torch.full((B, S), -1, dtype=torch.int32)
    for col in range(S):
        k_pos[:, col] = col
        q_pos = torch.tensor([[col]], dtype=torch.int32)
        for window in (None, 8):  # two layer types per step
            cq.sliding_window_attention_decode(q, k, v, q_pos, k_pos, window=window, last_slot=torch.tensor([col]))
    assert len(cq._memo_store) == 2


@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("H", [72, 2048])
def test_altup_chains_equal_the_plain_ops(H, dtype_id):
    """The CPU AltUp chains (inject, predict + input norm, post-FFN norm + correct; the router's linear in fp32, the
    4x4 mix as a bmm) equal the plain ops by the 2x rule and round like them, at one and three rows."""
    dt, A = DTYPES[dtype_id], 4
    for T in (1, 3):
        streams = randn((A, 1, T, H), dt, seed=41 + T, device="cpu")
        proj, mlp_out, h = (randn((1, T, H), dt, seed=s + T, device="cpu") for s in (44, 45, 46))
        nw = [randn((H,), dt, seed=s, scale=0.1, shift=1.0, device="cpu") for s in (47, 48, 49, 50)]
        router = randn((A, H), dt, seed=51, scale=H ** -0.5, device="cpu")
        pcoefs, ccoefs = randn((A * A, A), dt, seed=52, scale=0.5, device="cpu"), randn((A, A), dt, seed=53,
                                                                                      scale=0.5, device="cpu")
        scale = randn((H,), dt, seed=54, scale=0.1, shift=1.0, device="cpu")
        args = {"predict": (streams, proj, nw[0], nw[1], router, pcoefs, nw[2], 1e-6, 1),
                "predict layer 0": (streams, None, None, nw[1], router, pcoefs, nw[2], 1e-6, 0),
                "inject": (streams, proj, nw[0], 1e-6, 2),
                "correct": (streams, mlp_out, h, nw[3], nw[1], router, ccoefs, scale, 1e-6, 0),
                "correct unscaled": (streams, mlp_out, h, nw[3], nw[1], router, ccoefs, None, 1e-6, 0)}
        fns = {"predict": "altup_predict_fused", "predict layer 0": "altup_predict_fused", "inject": "altup_inject",
               "correct": "altup_correct_fused", "correct unscaled": "altup_correct_fused"}
        for what, a in args.items():
            a64 = tuple(x.double() if isinstance(x, torch.Tensor) else x for x in a)
            out, ref, ref64 = getattr(cq, fns[what])(*a), getattr(ops, fns[what])(*a), getattr(ops, fns[what])(*a64)
            outs, refs, ref64s = [(o if isinstance(o, tuple) else (o,)) for o in (out, ref, ref64)]
            for o, r, r64 in zip(outs, refs, ref64s):
                assert (o is None) == (r is None), what
                if o is not None:
                    assert_2x(o, r, r64, f"{what} H={H} T={T} {dtype_id}")


def test_int4_packing_is_bit_exact():
    """x = the identity gives back each dequantized weight element (one product per sum, exact in fp32; bf16 x:
    the weight rounded once): the packed nibbles and scales are our format's, bit for bit."""
    q = _qweight("int4", 32, 21, 71, seed=3)
    p = cq.prepack(q)
    eye = torch.eye(71, dtype=torch.bfloat16)
    assert torch.equal(cq.project(eye, p), q.dequantize().t().to(torch.bfloat16))
    fp32_sz = p.scales_bf16.float()  # the fp32 op reads fp32 (scale, zero) pairs; bf16 -> fp32 is exact
    x = torch.nn.functional.pad(torch.eye(71), (0, p.k_padded - 71))
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, p.packed, 32, fp32_sz)[:, :21]
    assert torch.equal(got, q.dequantize().t())


def test_int8_fp32_scales_keep_the_definition_exact():
    """Scales that are not bf16 values cannot go to the bf16 op: bf16 rows take the fp32 op (one row) or the
    definition, and still round like the plain op."""
    q = _qweight("int8", 0, 37, 83, seed=5, bf16_scales=False)
    p = cq.prepack(q)
    assert p.scales_bf16 is None and p.route(torch.bfloat16, 1) == cq.PACKED_FP32
    assert p.route(torch.bfloat16, 3) == cq.DEQUANTIZE
    for rows in (1, 3):
        x = randn((rows, 83), torch.bfloat16, seed=rows, device="cpu")
        _check(cq.linear, ops.linear, (x, p), (x, q), (x.double(), _as64(q)), f"int8 fp32 scales rows={rows}")


def test_unsupported_group_size_uses_the_definition():
    q = _qweight("int4", 16, 21, 40, seed=6)
    p = cq.prepack(q)
    assert p.packed is None and "group size 16" in p.why_not and p.route(torch.bfloat16, 1) == cq.DEQUANTIZE
    x = randn((3, 40), torch.bfloat16, seed=1, device="cpu")
    assert torch.equal(cq.linear(x, p), ops.linear(x, q))


@pytest.mark.parametrize("kind,G", [("int8", 0), ("int4", 64)])
def test_missing_op_falls_back_loudly_and_stays_correct(kind, G, monkeypatch, caplog):
    def gone(*a, **k):
        raise RuntimeError("no such op in this torch")
    if kind == "int8":
        monkeypatch.setattr(torch, "_weight_int8pack_mm", gone)
    else:
        monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", gone, raising=False)
    monkeypatch.setattr(cq, "_op_cache", {})
    monkeypatch.setattr(cq, "_warned", set())
    q = _qweight(kind, G, 37, 80, seed=2)
    with caplog.at_level("WARNING", logger="gemma3n_fast.cpu_quant"):
        p = cq.prepack(q)
        cq.prepack(q)
    assert p.packed is None and "no usable" in p.why_not
    assert sum("no usable" in r.getMessage() for r in caplog.records) == 1  # once, not per weight
    for dt in DTYPES.values():
        x = randn((3, 80), dt, seed=3, device="cpu")
        assert torch.equal(cq.linear(x, p), ops.linear(x, q))


def test_bad_inputs():
    q = _qweight("int4", 32, 21, 72, seed=1)
    p = cq.prepack(q)
    with pytest.raises(ValueError, match="does not match the weight's K = 72"):
        cq.project(torch.randn(2, 71), p)
    with pytest.raises(TypeError, match="x must be a float tensor"):
        cq.project(torch.ones(2, 72, dtype=torch.int32), p)
    with pytest.raises(TypeError, match="expected a float tensor, QuantizedWeight or CpuPackedWeight"):
        cq.project(torch.randn(2, 72), [1, 2])
    with pytest.raises(TypeError, match="expected a QuantizedWeight"):
        cq.prepack(torch.randn(4, 4))
    float_w = torch.randn(5, 72)
    assert torch.equal(cq.project(torch.ones(2, 72), float_w), torch.nn.functional.linear(torch.ones(2, 72), float_w))


def test_bench_smoke():
    """The benchmark runs end to end on tiny shapes (so it cannot rot); no timing is checked."""
    r = subprocess.run([sys.executable, "-m", "bench.bench_cpu_quant", "--smoke"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| shape" in r.stdout and "per token" in r.stdout


def test_cpu_decode_bench_smoke():
    """``bench.cpu_decode`` (decode tok/s at E2B's widths) runs end to end on one layer (a sparse one), int8 and
    int4, two repeats; no timing is checked."""
    r = subprocess.run([sys.executable, "-m", "bench.cpu_decode", "--layers", "1", "--new-tokens", "2", "--threads",
                        "1", "--repeats", "2", "--variants", "ours-int8,ours-int4"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| gemma3n_fast | bfloat16 | int8 |" in r.stdout and "int4 (G 64)" in r.stdout and "best of 2" in r.stdout
