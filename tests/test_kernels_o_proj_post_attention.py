"""``o_proj_post_attention``: o_proj and LAuReL's right projection in one dual GEMV launch whose last program runs
the post-attention chain over every row, against its pieces and its plain op.

1. Bit for bit against the unfused kernels composed (``dual_linear`` with the same settings, then the standalone
   ``post_attention_chain`` kernel): the same math in the same order, so h, hn and the o / LAuReL intermediates are
   torch.equal; 16-column tiles (18 programs, or 54 with 3 K slices) run in a shuffled order, twice (two orders,
   one counter: back at zero after each launch; a chain run before the last tile lands reads the NaN poison).
2. The 2x rule against ``reference.ops.o_proj_post_attention`` (dual_linear then post_attention_chain) in fp64, for
   fp32 and bf16, float / int8 / int4 weights (int4 with G = 32 and partial last groups: K1 = 72, K2 = 24), H = 136
   (a masked column tile and a masked row block), rows 1, 3 and 16, and 17 rows (prefill: torch, then the chain
   kernel); NaN-poisoned outputs; x2 a column slice of a wider tensor (the model's q|k|v|LAuReL-left output) and
   ``a`` one stream of a stack (the model's predictions).
3. A LaunchSpy: one launch for up to 16 rows, neither unfused kernel launched.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import quantize
from kernel_checks import DEVICE, assert_2x_torch, nans, randn, shuffled_programs, spy  # noqa: F401 (fixtures)

# As test_kernels_fused.py's chains: on top of 2x torch's own error, a few fp32 ulps at |y| ~ 10, a fraction of an
# ulp at |y| ~ 1 for bf16.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

H, K1, K2, WIDE = 136, 72, 24, 40  # x2: the last K2 columns of a [..., WIDE + K2] tensor
A, ACTIVE = 4, 1  # ``a``: stream ACTIVE of A


def _config(split, M):
    """16-column tiles (18 programs at H = 136: the order they finish in matters), K in 1 slice or, with ``split``,
    in 3 (the last slice of a tile to arrive finishes it)."""
    from gemma3n_fast.kernels.gemv import GemvConfig

    return GemvConfig(BLOCK_M=1 if M == 1 else 16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3 if split else 1, num_warps=4)


def _inputs(dtype, lead, quant, seed, H=H, K1=K1, K2=K2, group=32):
    """Keyword arguments of the op: x1, w1, x2 (a column slice), w2, a (a stream of a stack), an, norm weights."""
    def weight(n, k, s):
        w = randn((n, k), torch.float32, s, scale=1 / math.sqrt(k))
        return w.to(dtype) if quant is None else quantize(w, quant, group)

    wide = randn((*lead, WIDE + K2), dtype, seed + 1)
    return dict(x1=randn((*lead, K1), dtype, seed), w1=weight(H, K1, seed + 2), x2=wide[..., WIDE:],
                w2=weight(H, K2, seed + 3), a=randn((A, *lead, H), dtype, seed + 4)[ACTIVE],
                an=randn((*lead, H), dtype, seed + 5),
                post_attention_norm_weight=randn((H,), dtype, seed + 6, scale=0.5, shift=1.0),
                post_laurel_norm_weight=randn((H,), dtype, seed + 7, scale=0.5, shift=1.0),
                pre_ffn_norm_weight=randn((H,), dtype, seed + 8, scale=0.5, shift=1.0), eps=1e-6)


def _f64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v.dequantize().double() if hasattr(v, "dequantize")
                else v) for k, v in kw.items()}


def _poisoned(lead, dtype):
    return {name: nans((*lead, H), dtype) for name in ("out", "normed_out", "out1", "out2")}


# (rows as a leading shape, dtype, weights, split-K forced): every pair of values of any two of the four appears
# (13 cases; all 36 combinations cost the suite ~25 s more under the interpreter)
CASES = [((1, 1), "fp32", None, False), ((1, 1), "bf16", "int8", True), ((1, 1), "fp32", "int4", True),
         ((1, 1), "bf16", "int4", False), ((1, 3), "bf16", None, True), ((1, 3), "fp32", "int8", False),
         ((1, 3), "bf16", "int4", True), ((2, 8), "fp32", None, True), ((2, 8), "bf16", None, False),
         ((2, 8), "fp32", "int8", True), ((2, 8), "bf16", "int8", False), ((2, 8), "bf16", "int4", True),
         ((2, 8), "fp32", "int4", False)]
IDS = [f"{'x'.join(map(str, lead))}rows-{d}-{q or 'float'}-{'split' if s else 'tiles'}" for lead, d, q, s in CASES]


@pytest.mark.interpreter
@pytest.mark.parametrize("lead,dtype_id,quant,split", CASES, ids=IDS)
def test_fused_equals_the_unfused_kernels_and_the_2x_rule(lead, dtype_id, quant, split, shuffled_programs, spy):
    from gemma3n_fast.kernels.gemv import dual_linear, gemv_workspace
    from gemma3n_fast.kernels.o_proj_post_attention import o_proj_post_attention
    from gemma3n_fast.kernels.post_attention_chain import post_attention_chain

    case = CASES.index((lead, dtype_id, quant, split))
    dtype, M = DTYPES[dtype_id], math.prod(lead)
    kw = _inputs(dtype, lead, quant, seed=10 * case)
    cfg = _config(split, M)
    ws = gemv_workspace(DEVICE)
    ws.partials.fill_(float("nan"))
    fused = spy("o_proj_post_attention", "_o_proj_post_attention_kernel")
    gemv, chain = spy("gemv", "_gemv_kernel"), spy("post_attention_chain", "_post_attention_chain_kernel")
    for launch in range(2):  # two program orders; the first launch must leave the counters at zero for the second
        outs = _poisoned(lead, dtype)
        h, hn = o_proj_post_attention(**kw, **outs, config=cfg, workspace=ws)
        assert (fused.launches, gemv.launches, chain.launches) == (launch + 1, 0, 0), "one fused launch, nothing else"
        assert h is outs["out"] and hn is outs["normed_out"]
        assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0, "counters must be back at zero"
        grid = shuffled_programs.launches[-1][0]
        assert grid == (2 * math.ceil(H / 16), 3 if split else 1, 1)
        assert len(set(shuffled_programs.launches[-1][1])) == grid[0] * grid[1]
        if launch == 0:
            first = [t.clone() for t in outs.values()]
    assert all(torch.equal(x, y) for x, y in zip(first, outs.values())), "two launches, two results"

    # 1. the unfused kernels composed, the same settings: bit for bit, intermediates included
    o, br = dual_linear(kw["x1"], kw["w1"], kw["x2"], kw["w2"], config=cfg, workspace=ws)
    h_ref, hn_ref = post_attention_chain(o, kw["a"], br, kw["an"], kw["post_attention_norm_weight"],
                                         kw["post_laurel_norm_weight"], kw["pre_ffn_norm_weight"], kw["eps"])
    for name, ours, theirs in (("o", outs["out1"], o), ("laurel_branch", outs["out2"], br), ("h", h, h_ref),
                               ("hn", hn, hn_ref)):
        assert torch.equal(ours, theirs), f"{name}: the fused launch differs from the unfused kernels"

    # 2. the 2x rule against the plain op
    plain, exact = ops.o_proj_post_attention(**kw), ops.o_proj_post_attention(**_f64(kw))
    what = f"o_proj_post_attention {IDS[case]}"
    assert_2x(h, plain[0], exact[0], f"{what} h")
    assert_2x(hn, plain[1], exact[1], f"{what} hn")


@pytest.mark.parametrize("quant", [None, "int4"])
def test_prefill_rows_compose_torch_and_the_chain_kernel(quant, spy):
    from gemma3n_fast.kernels.o_proj_post_attention import o_proj_post_attention

    lead, dtype = (1, 17), torch.bfloat16
    kw = _inputs(dtype, lead, quant, seed=70 + (quant is None))
    fused = spy("o_proj_post_attention", "_o_proj_post_attention_kernel")
    chain = spy("post_attention_chain", "_post_attention_chain_kernel")
    outs = _poisoned(lead, dtype)
    h, hn = o_proj_post_attention(**kw, **outs)
    assert (fused.launches, chain.launches) == (0, 1)
    plain, exact = ops.o_proj_post_attention(**kw), ops.o_proj_post_attention(**_f64(kw))
    assert_2x(h, plain[0], exact[0], f"o_proj_post_attention 17 rows {quant} h")
    assert_2x(hn, plain[1], exact[1], f"o_proj_post_attention 17 rows {quant} hn")


def test_two_launches_back_to_back_share_the_counter():
    """The default workspace's counter: the first launch must leave it at zero for the second."""
    from gemma3n_fast.kernels.gemv import default_gemv_workspace
    from gemma3n_fast.kernels.o_proj_post_attention import o_proj_post_attention

    kw = _inputs(torch.float32, (1, 2), None, seed=90)
    first = o_proj_post_attention(**kw)
    second = o_proj_post_attention(**kw)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    ws = default_gemv_workspace(torch.device(DEVICE), "test")
    assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0


def test_bad_inputs_name_the_op_and_argument():
    from gemma3n_fast.kernels.o_proj_post_attention import o_proj_post_attention

    kw = _inputs(torch.float32, (1, 2), None, seed=95)
    with pytest.raises(ValueError, match="o_proj_post_attention: an must have shape"):
        o_proj_post_attention(**{**kw, "an": kw["an"][:, :1]})
    with pytest.raises(ValueError, match="o_proj_post_attention: w1 and w2 must have the same number of rows"):
        o_proj_post_attention(**{**kw, "w2": kw["w2"][:-1]})
    with pytest.raises(ValueError, match="o_proj_post_attention: pre_ffn_norm_weight must be"):
        o_proj_post_attention(**{**kw, "pre_ffn_norm_weight": kw["pre_ffn_norm_weight"][:-1]})
    with pytest.raises(TypeError, match="o_proj_post_attention: a dtype"):
        o_proj_post_attention(**{**kw, "a": kw["a"].half()})
    with pytest.raises(ValueError, match="o_proj_post_attention: w1 and w2 must be stored alike"):
        o_proj_post_attention(**{**kw, "w2": quantize(kw["w2"], "int8")})


# ---- on a GPU: the compiled kernel at E2B's shapes, bf16, eager and in a CUDA graph ---------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("quant", [None, "int4"])
def test_gpu_real_shapes_and_a_cuda_graph(M, quant):
    """o and the LAuReL branch bit for bit as the unfused GEMV stores them; h and hn by the 2x rule (the chain's
    row sums run on the GEMV's warps here, on their own in the standalone kernel: another fp32 reduction order);
    a captured launch replays to the eager result and leaves the counters at zero."""
    from gemma3n_fast.kernels.gemv import dual_linear, gemv_workspace
    from gemma3n_fast.kernels.o_proj_post_attention import o_proj_post_attention

    lead, dtype = (M, 1), torch.bfloat16
    kw = _inputs(dtype, lead, quant, seed=100 + M, H=2048, K1=2048, K2=64, group=64)
    ws = gemv_workspace(DEVICE)
    outs = {name: nans((*lead, 2048), dtype) for name in ("out", "normed_out", "out1", "out2")}
    h, hn = o_proj_post_attention(**kw, **outs, workspace=ws)
    o, br = dual_linear(kw["x1"], kw["w1"], kw["x2"], kw["w2"], workspace=ws)
    assert torch.equal(outs["out1"], o) and torch.equal(outs["out2"], br)
    plain, exact = ops.o_proj_post_attention(**kw), ops.o_proj_post_attention(**_f64(kw))
    assert_2x(h, plain[0], exact[0], f"E2B {M} rows {quant} h")
    assert_2x(hn, plain[1], exact[1], f"E2B {M} rows {quant} hn")
    eager = (h.clone(), hn.clone())
    for t in (h, hn):
        t.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_proj_post_attention(**kw, **outs, workspace=ws)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(h, eager[0]) and torch.equal(hn, eager[1])
    assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0
