"""Parity of the row-wise Triton kernels (RMSNorm, AltUp predict/correct, Gaussian top-k GELU-mul) with reference.ops.

Rule for every comparison: ours may be off the fp64 reference by at most twice what PyTorch itself is off in the
same dtype, plus a small absolute term ``ATOL[dtype]`` (summation-order noise in fp32 reductions; one ulp
flips where torch's own error happens to be tiny). On CPU the kernels run through the Triton interpreter
(conftest sets TRITON_INTERPRET=1), on small shapes that still cross every boundary; the ``gpu`` tests run
compiled kernels in bf16 at the real Gemma 3n E2B/E4B shapes.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import zlib

import pytest
import torch

from gemma3n_fast.reference import ops
from kernel_checks import CUDA, DEVICE, DTYPES, assert_2x_torch, nans_like, randn, spy  # noqa: F401 (spy: fixture)


def _seed(*parts) -> int:
    """A seed fixed per case across processes (str hashes are salted per process; crc32 is not)."""
    return zlib.crc32(repr(parts).encode())


# bf16 runs under the interpreter too (DTYPES): the kernels cast to fp32 on load and round to bf16 explicitly.
# Absolute slack per dtype on top of 2x torch's own error: about 4 fp32 ulps at |y| ~ 10 for fp32
# (different summation order over H), a fraction of one ulp at |y| ~ 1 for the 16-bit types.
ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)
Z_95 = 1.6448535919189453  # Phi^-1(0.95), the model's sparsity (layers 0-9)
Z_60 = 0.25334715843200684  # Phi^-1(0.6), a mid sparsity: about 40 % of channels stay active
SPARSITY = {"dense": None, "p95": Z_95, "p60": Z_60}


def _kernel_module(name):
    return importlib.import_module(f"gemma3n_fast.kernels.{name}")


def test_kernels_run_through_triton():
    import triton

    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1", "CPU tests must run the kernels in the Triton interpreter"
    for mod, kernel in [("rms_norm", "_rms_norm_kernel"), ("altup_predict", "_altup_predict_kernel"),
                        ("altup_correct", "_altup_correct_kernel"),
                        ("gaussian_topk", "_gaussian_topk_gelu_mul_kernel")]:
        k = getattr(_kernel_module(mod), kernel)
        assert isinstance(k, triton.runtime.JITFunction) or type(k).__name__ == "InterpretedFunction", (mod, type(k))
        assert "gemma3n_fast.reference" not in open(_kernel_module(mod).__file__).read(), f"{mod} imports reference"


# ---------------------------------------------------------------------------------------------- RMSNorm
# (leading shape, H): 1 token, 7 tokens, 2 x 37 tokens, per-head [.., heads, 256], and a row too wide for one
# register block (the two-pass loop).
RMS_SHAPES = {"1x2048": ((1,), 2048), "7x1000": ((7,), 1000), "2x37x1539": ((2, 37), 1539),
              "2x3heads x256": ((2, 3, 4), 256), "2x9000loop": ((2,), 9000)}


# (dtype, shape, weight, residual): every dtype on every boundary, the full weight x residual grid in fp32;
# the 2 x 37-token rows only in two dtypes (the interpreter pays ~10-25 ms per program).
RMS_CASES = ([(d, "1x2048", True, True) for d in DTYPES] + [(d, "7x1000", False, False) for d in DTYPES]
             + [(d, "2x3heads x256", False, False) for d in DTYPES] + [(d, "2x9000loop", True, True) for d in DTYPES]
             + [("fp32", "7x1000", True, False), ("fp32", "7x1000", False, True), ("fp32", "7x1000", True, True)]
             + [("fp16", "2x37x1539", True, True), ("bf16", "2x37x1539", True, False)])


@pytest.mark.parametrize("dtype_id,shape_id,with_weight,residual", RMS_CASES,
                         ids=[f"{d}-{s}-{'w' if w else 'now'}-{'res' if r else 'plain'}" for d, s, w, r in RMS_CASES])
def test_rms_norm_parity(dtype_id, shape_id, with_weight, residual, spy):
    from gemma3n_fast.kernels.rms_norm import rms_norm

    dtype, (lead, H) = DTYPES[dtype_id], RMS_SHAPES[shape_id]
    seed = _seed(dtype_id, shape_id, with_weight, residual)
    x = randn((*lead, H), dtype, seed, scale=3.0, shift=0.5)
    w = randn((H,), dtype, seed + 1) if with_weight else None
    r = randn((*lead, H), dtype, seed + 2) if residual else None
    s = spy("rms_norm", "_rms_norm_kernel")
    ours = rms_norm(x, w, 1e-6, r, out=nans_like(x))
    assert s.launches == 1
    ref = ops.rms_norm(x, w, 1e-6, r)
    ref64 = ops.rms_norm(x.double(), None if w is None else w.double(), 1e-6, None if r is None else r.double())
    assert_2x(ours, ref, ref64, f"rms_norm {dtype_id} {shape_id}")


# Rows whose mean square sits around eps = 1e-6 (row scales 3e-4 .. 3e-3): there (ms + eps)^-1/2 differs from
# ms^-1/2 by up to ~50 %, so where eps enters (inside the square root, not added after it) is visible.
NEAR_EPS_ROW_SCALES = (3e-4, 7e-4, 1e-3, 1.5e-3, 3e-3, 1.0)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("H", [1000, 9000])  # one register block, and the two-pass loop
def test_rms_norm_rows_near_eps(dtype_id, H):
    from gemma3n_fast.kernels.rms_norm import rms_norm

    dtype = DTYPES[dtype_id]
    scales = torch.tensor(NEAR_EPS_ROW_SCALES, dtype=torch.float64)[:, None]
    x64 = randn((len(NEAR_EPS_ROW_SCALES), H), torch.float64, _seed("near-eps", dtype_id, H)) * scales.to(DEVICE)
    x, w = x64.to(dtype), randn((H,), dtype, _seed("near-eps-w", H))
    ms = x.double().pow(2).mean(-1)
    assert ((ms > 1e-7) & (ms < 1e-5)).sum() >= 3, ms  # the rows really straddle eps
    ours = rms_norm(x, w, 1e-6, out=nans_like(x))
    assert_2x(ours, ops.rms_norm(x, w, 1e-6), ops.rms_norm(x.double(), w.double(), 1e-6), f"rms_norm near eps {dtype_id}")


def test_rms_norm_strided_and_copied_inputs():
    from gemma3n_fast.kernels.rms_norm import rms_norm

    wide = randn((5, 3000), torch.float16, 11)
    x = wide[:, 1000:2539]  # row stride 3000, read in place
    w = randn((1539,), torch.float16, 12)
    xt = randn((1539, 5), torch.float16, 13).t()  # last dim not contiguous: copied once
    for inp in (x, xt):
        ours = rms_norm(inp, w, 1e-6, out=torch.full((5, 1539), float("nan"), dtype=torch.float16, device=DEVICE))
        assert_2x(ours, ops.rms_norm(inp, w), ops.rms_norm(inp.double(), w.double()), "rms_norm strided")


def test_rms_norm_bad_inputs():
    from gemma3n_fast.kernels.rms_norm import rms_norm

    x = randn((3, 64), torch.float32, 0)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(63, device=DEVICE))
    with pytest.raises(TypeError, match="unsupported dtype"):
        rms_norm(x.double())
    with pytest.raises(ValueError, match="non-empty"):
        rms_norm(x[:0])
    with pytest.raises(TypeError, match="residual dtype"):
        rms_norm(x, None, 1e-6, x.half())
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(x, None, 1e-6, x[:2])
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, out=torch.empty(3, 65, device=DEVICE))


# ---------------------------------------------------------------------------------------------- AltUp
# streams [A=4, B, T, H]. The interpreter is slow per program, so the big hiddens get few tokens.
ALTUP_SHAPES = {"1tok x2048": (1, 1, 2048), "7tok x1000": (1, 7, 1000), "2x37tok x136": (2, 37, 136),
                "1tok x1539": (1, 1, 1539)}


def _altup_params(H, dtype, seed):
    # Router weight scaled so router_weight @ (norm(x)/H) is O(1): tanh neither saturated nor linear.
    return (randn((H,), dtype, seed, scale=0.3, shift=1.0), randn((4, H), dtype, seed + 1, scale=math.sqrt(H)))


# (dtype, shape, active): every dtype at 1 and 7 tokens; 2 x 37 tokens in fp16 (~65 ms per program interpreted).
PREDICT_CASES = ([(d, "1tok x2048", 0) for d in DTYPES] + [(d, "7tok x1000", 2) for d in DTYPES]
                 + [("fp32", "1tok x1539", 1), ("fp16", "2x37tok x136", 0)])


@pytest.mark.parametrize("dtype_id,shape_id,active", PREDICT_CASES,
                         ids=[f"{d}-{s}-active{a}" for d, s, a in PREDICT_CASES])
def test_altup_predict_parity(dtype_id, shape_id, active, spy):
    from gemma3n_fast.kernels.altup_predict import altup_predict

    dtype, (B, T, H) = DTYPES[dtype_id], ALTUP_SHAPES[shape_id]
    seed = _seed("predict", dtype_id, shape_id, active)
    streams = randn((4, B, T, H), dtype, seed)
    norm_w, router_w = _altup_params(H, dtype, seed + 10)
    coefs = randn((16, 4), dtype, seed + 20, scale=0.5)
    s = spy("altup_predict", "_altup_predict_kernel")
    ours = altup_predict(streams, norm_w, router_w, coefs, 1e-6, active, out=nans_like(streams))
    assert s.launches == 1
    ref = ops.altup_predict(streams, norm_w, router_w, coefs, 1e-6, active)
    ref64 = ops.altup_predict(streams.double(), norm_w.double(), router_w.double(), coefs.double(), 1e-6, active)
    assert_2x(ours, ref, ref64, f"altup_predict {dtype_id} {shape_id} active={active}")


# (dtype, shape, active, scale): the scale as None / activation dtype / fp32 (a different rounding chain).
CORRECT_CASES = ([(d, "1tok x2048", 0, "scale") for d in DTYPES]
                 + [("fp32", "7tok x1000", 2, "noscale"), ("fp16", "7tok x1000", 2, "fp32scale"),
                    ("bf16", "7tok x1000", 3, "fp32scale"), ("bf16", "1tok x1539", 1, "noscale"),
                    ("fp16", "2x37tok x136", 0, "scale")])


@pytest.mark.parametrize("dtype_id,shape_id,active,scale", CORRECT_CASES,
                         ids=[f"{d}-{s}-active{a}-{c}" for d, s, a, c in CORRECT_CASES])
def test_altup_correct_parity(dtype_id, shape_id, active, scale, spy):
    from gemma3n_fast.kernels.altup_correct import altup_correct

    dtype, (B, T, H) = DTYPES[dtype_id], ALTUP_SHAPES[shape_id]
    seed = _seed("correct", dtype_id, shape_id, active, scale)
    preds = randn((4, B, T, H), dtype, seed)
    activated = randn((B, T, H), dtype, seed + 1)
    norm_w, router_w = _altup_params(H, dtype, seed + 10)
    coefs = randn((4, 4), dtype, seed + 20, scale=0.5)
    out_scale = {"noscale": None, "scale": randn((H,), dtype, seed + 30),
                 "fp32scale": randn((H,), torch.float32, seed + 30)}[scale]
    s = spy("altup_correct", "_altup_correct_kernel")
    ours, ours_scaled = altup_correct(preds, activated, norm_w, router_w, coefs, out_scale, 1e-6, active,
                                      out=nans_like(preds), scaled_out=nans_like(activated))
    assert s.launches == 1
    ref, ref_scaled = ops.altup_correct(preds, activated, norm_w, router_w, coefs, out_scale, 1e-6, active)
    ref64, ref64_scaled = ops.altup_correct(preds.double(), activated.double(), norm_w.double(), router_w.double(),
                                            coefs.double(), None if out_scale is None else out_scale.double(),
                                            1e-6, active)
    what = f"altup_correct {dtype_id} {shape_id} active={active} {scale}"
    assert_2x(ours, ref, ref64, what)
    if out_scale is None:
        assert ours_scaled is None
    else:
        assert_2x(ours_scaled, ref_scaled, ref64_scaled.to(torch.float64), what + " scaled")


def test_altup_bad_inputs():
    from gemma3n_fast.kernels.altup_correct import altup_correct
    from gemma3n_fast.kernels.altup_predict import altup_predict

    H = 40
    s = randn((4, 3, H), torch.float32, 0)
    nw, rw = _altup_params(H, torch.float32, 1)
    pc, cc = randn((16, 4), torch.float32, 2), randn((4, 4), torch.float32, 3)
    with pytest.raises(ValueError, match="router_weight must be"):
        altup_predict(s, nw, rw[:, :-1], pc)
    with pytest.raises(ValueError, match="prediction_coefs"):
        altup_predict(s, nw, rw, pc[:4])
    with pytest.raises(ValueError, match="active must be"):
        altup_predict(s, nw, rw, pc, active=4)
    with pytest.raises(TypeError, match="router_weight dtype"):
        altup_predict(s, nw, rw.half(), pc)
    with pytest.raises(ValueError, match="non-empty"):
        altup_predict(s[:, :0], nw, rw, pc)
    with pytest.raises(ValueError, match="activated must have shape"):
        altup_correct(s, s[0, :2], nw, rw, cc)
    with pytest.raises(TypeError, match="activated dtype"):
        altup_correct(s, s[0].half(), nw, rw, cc)
    with pytest.raises(ValueError, match="correction_coefs"):
        altup_correct(s, s[0], nw, rw, pc)
    with pytest.raises(ValueError, match="correct_output_scale"):
        altup_correct(s, s[0], nw, rw, cc, torch.ones(H + 1, device=DEVICE))


def test_altup_strided_streams():
    """Streams as a slice of a wider buffer (token stride != H) are read in place."""
    from gemma3n_fast.kernels.altup_correct import altup_correct
    from gemma3n_fast.kernels.altup_predict import altup_predict

    H = 300
    buf = randn((4, 5, 2 * H), torch.float16, 5)
    streams = buf[..., :H]
    nw, rw = _altup_params(H, torch.float16, 6)
    pc, cc = randn((16, 4), torch.float16, 7, scale=0.5), randn((4, 4), torch.float16, 8, scale=0.5)
    ours = altup_predict(streams, nw, rw, pc)
    assert_2x(ours, ops.altup_predict(streams, nw, rw, pc),
              ops.altup_predict(streams.double(), nw.double(), rw.double(), pc.double()), "predict strided")
    act = buf[0, :, H:]
    ours, _ = altup_correct(streams, act, nw, rw, cc)
    ref, _ = ops.altup_correct(streams, act, nw, rw, cc)
    ref64, _ = ops.altup_correct(streams.double(), act.double(), nw.double(), rw.double(), cc.double())
    assert_2x(ours, ref, ref64, "correct strided")


# ---------------------------------------------------------------------------------------------- Gaussian top-k
TOPK_SHAPES = {"1x2048": ((1,), 2048), "7x1000": ((7,), 1000), "2x37x1539": ((2, 37), 1539),
               "1x8192loop": ((1,), 8192)}


# (dtype, shape, sparsity): all sparsities in every dtype at 1 token; 7 tokens and the looped 8192 row in every
# dtype; 2 x 37 tokens in fp32 and fp16 (~35 ms per program interpreted).
TOPK_CASES = ([(d, "1x2048", sp) for d in DTYPES for sp in SPARSITY] + [(d, "7x1000", "p95") for d in DTYPES]
              + [(d, "1x8192loop", "p95") for d in DTYPES] + [("fp32", "7x1000", "dense"), ("bf16", "7x1000", "p60")]
              + [("fp32", "2x37x1539", "p95"), ("fp16", "2x37x1539", "p60")])


@pytest.mark.parametrize("dtype_id,shape_id,sparsity", TOPK_CASES, ids=[f"{d}-{s}-{z}" for d, s, z in TOPK_CASES])
def test_gaussian_topk_parity(dtype_id, shape_id, sparsity, spy):
    from gemma3n_fast.kernels.gaussian_topk import gaussian_topk_gelu_mul

    dtype, (lead, I) = DTYPES[dtype_id], TOPK_SHAPES[shape_id]
    z = SPARSITY[sparsity]
    seed = _seed("topk", dtype_id, shape_id, sparsity)
    gate = randn((*lead, I), dtype, seed, scale=2.0, shift=0.7)  # non-zero mean: the shifted statistics matter
    up = randn((*lead, I), dtype, seed + 1)
    count = torch.full(gate.shape[:-1], -1, dtype=torch.int32, device=DEVICE)
    s = spy("gaussian_topk", "_gaussian_topk_gelu_mul_kernel")
    ours = gaussian_topk_gelu_mul(gate, up, z, out=nans_like(gate), active_count=count)
    assert s.launches == 1
    ref = ops.gaussian_topk_gelu_mul(gate, up, z)
    ref64 = ops.gaussian_topk_gelu_mul(gate.double(), up.double(), z)
    assert_2x(ours, ref, ref64, f"gaussian_topk {dtype_id} {shape_id} {sparsity}")
    # The count is of non-zero activations gelu(gate') (before the product with up, which may underflow to 0);
    # a dense call counts every channel.
    if z is None:
        assert (count == I).all(), count
    else:
        activation = ops.gaussian_topk_gelu_mul(gate, torch.ones_like(up), z)
        assert torch.equal(count.long(), (activation != 0).sum(-1)), "active_count != non-zero activations"
    if sparsity == "p95":
        assert (count < 0.12 * I).all() and (count > 0).all(), count  # about 5 % active


def test_gaussian_topk_fused_gate_up_views():
    """gate and up as views of one fused [.., 2I] projection (row stride 2I): no copies, same numbers."""
    from gemma3n_fast.kernels.gaussian_topk import gaussian_topk_gelu_mul

    I = 1000
    fused = randn((2, 37, 2 * I), torch.float16, 21, scale=2.0)
    gate, up = fused[..., :I], fused[..., I:]
    assert gate.reshape(-1, I).data_ptr() == gate.data_ptr()  # the launcher's reshape is a view
    ours = gaussian_topk_gelu_mul(gate, up, Z_95, out=nans_like(gate))
    assert_2x(ours, ops.gaussian_topk_gelu_mul(gate, up, Z_95),
              ops.gaussian_topk_gelu_mul(gate.double(), up.double(), Z_95), "gaussian_topk fused views")


def test_gaussian_topk_bad_inputs():
    from gemma3n_fast.kernels.gaussian_topk import gaussian_topk_gelu_mul

    g = randn((3, 50), torch.float32, 0)
    with pytest.raises(ValueError, match="up shape"):
        gaussian_topk_gelu_mul(g, g[:, :-1], Z_95)
    with pytest.raises(TypeError, match="up dtype"):
        gaussian_topk_gelu_mul(g, g.half(), Z_95)
    with pytest.raises(TypeError, match="unsupported dtype"):
        gaussian_topk_gelu_mul(g.double(), g.double(), None)
    with pytest.raises(TypeError, match="std_multiplier"):
        gaussian_topk_gelu_mul(g, g, torch.tensor(Z_95))
    with pytest.raises(ValueError, match="non-empty"):
        gaussian_topk_gelu_mul(g[:0], g[:0], None)
    with pytest.raises(ValueError, match="active_count"):
        gaussian_topk_gelu_mul(g, g, Z_95, active_count=torch.zeros(3, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------------------------- GPU (compiled, bf16)
# Real Gemma 3n shapes: hidden 2048, head_dim 256 (8 q heads), intermediate 8192 (E2B) / 16384 (E4B).
GPU_TOKENS = {"decode1": 1, "decode8": 8, "prefill512": 512}


@pytest.mark.gpu
@pytest.mark.parametrize("tokens_id", list(GPU_TOKENS))
@pytest.mark.parametrize("dtype_id", ["bf16", "fp16", "fp32"])
def test_gpu_rowwise_real_shapes(dtype_id, tokens_id):
    from gemma3n_fast.kernels.altup_correct import altup_correct
    from gemma3n_fast.kernels.altup_predict import altup_predict
    from gemma3n_fast.kernels.gaussian_topk import gaussian_topk_gelu_mul
    from gemma3n_fast.kernels.rms_norm import rms_norm

    dtype, T, H = DTYPES[dtype_id], GPU_TOKENS[tokens_id], 2048
    x = randn((1, T, H), dtype, 1, scale=3.0)
    w = randn((H,), dtype, 2)
    r = randn((1, T, H), dtype, 3)
    assert_2x(rms_norm(x, w, 1e-6, r, out=nans_like(x)), ops.rms_norm(x, w, 1e-6, r),
              ops.rms_norm(x.double(), w.double(), 1e-6, r.double()), "gpu rms_norm")
    q = randn((1, T, 8, 256), dtype, 4)
    assert_2x(rms_norm(q, out=nans_like(q)), ops.rms_norm(q), ops.rms_norm(q.double()), "gpu v_norm heads")

    streams = randn((4, 1, T, H), dtype, 5)
    nw, rw = _altup_params(H, dtype, 6)
    pc, cc = randn((16, 4), dtype, 7, scale=0.5), randn((4, 4), dtype, 8, scale=0.5)
    assert_2x(altup_predict(streams, nw, rw, pc, out=nans_like(streams)), ops.altup_predict(streams, nw, rw, pc),
              ops.altup_predict(streams.double(), nw.double(), rw.double(), pc.double()), "gpu predict")
    act, sc = randn((1, T, H), dtype, 9), randn((H,), dtype, 10)
    ours, ours_s = altup_correct(streams, act, nw, rw, cc, sc, out=nans_like(streams), scaled_out=nans_like(act))
    ref, ref_s = ops.altup_correct(streams, act, nw, rw, cc, sc)
    ref64, ref64_s = ops.altup_correct(streams.double(), act.double(), nw.double(), rw.double(), cc.double(),
                                       sc.double())
    assert_2x(ours, ref, ref64, "gpu correct")
    assert_2x(ours_s, ref_s, ref64_s, "gpu correct scaled")

    for I in (8192, 16384):
        fused = randn((1, T, 2 * I), dtype, 11 + I, scale=2.0)
        gate, up = fused[..., :I], fused[..., I:]
        for z in (None, Z_95):
            assert_2x(gaussian_topk_gelu_mul(gate, up, z, out=nans_like(gate)),
                      ops.gaussian_topk_gelu_mul(gate, up, z),
                      ops.gaussian_topk_gelu_mul(gate.double(), up.double(), z), f"gpu topk I={I} z={z}")


@pytest.mark.gpu
def test_gpu_rowwise_cuda_graph_capture():
    """All four launchers capture into one CUDA graph (no sync, no allocation with out= given) and replay right."""
    from gemma3n_fast.kernels.altup_correct import altup_correct
    from gemma3n_fast.kernels.altup_predict import altup_predict
    from gemma3n_fast.kernels.gaussian_topk import gaussian_topk_gelu_mul
    from gemma3n_fast.kernels.rms_norm import rms_norm

    dtype, T, H, I = torch.bfloat16, 8, 2048, 8192
    x, w = randn((T, H), dtype, 1), randn((H,), dtype, 2)
    streams = randn((4, T, H), dtype, 3)
    nw, rw = _altup_params(H, dtype, 4)
    pc, cc, sc = randn((16, 4), dtype, 5, scale=0.5), randn((4, 4), dtype, 6, scale=0.5), randn((H,), dtype, 7)
    gate, up = randn((T, I), dtype, 8), randn((T, I), dtype, 9)
    outs = [torch.empty_like(x), torch.empty_like(streams), torch.empty_like(streams), torch.empty_like(x),
            torch.empty_like(gate), torch.empty(T, dtype=torch.int32, device=DEVICE)]

    def step():
        rms_norm(x, w, out=outs[0])
        altup_predict(streams, nw, rw, pc, out=outs[1])
        altup_correct(outs[1], x, nw, rw, cc, sc, out=outs[2], scaled_out=outs[3])
        gaussian_topk_gelu_mul(gate, up, Z_95, out=outs[4], active_count=outs[5])

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(randn((T, H), dtype, 100))
    gate.copy_(randn((T, I), dtype, 101))
    graph.replay()
    torch.cuda.synchronize()
    # The replay must see the new x and gate (pointers captured, values read at replay time).
    assert_2x(outs[0], ops.rms_norm(x, w), ops.rms_norm(x.double(), w.double()), "graph rms_norm")
    pred = ops.altup_predict(streams, nw, rw, pc)
    assert_2x(outs[1], pred, ops.altup_predict(streams.double(), nw.double(), rw.double(), pc.double()),
              "graph predict")
    assert_2x(outs[4], ops.gaussian_topk_gelu_mul(gate, up, Z_95),
              ops.gaussian_topk_gelu_mul(gate.double(), up.double(), Z_95), "graph topk")
    activation = ops.gaussian_topk_gelu_mul(gate, torch.ones_like(up), Z_95)
    assert torch.equal(outs[5].long(), (activation != 0).sum(-1))
