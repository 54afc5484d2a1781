"""Parity of the fused row-wise kernels of the decode step with their plain versions in reference.ops, and of those
plain versions with the reference decoder itself.

Two layers of proof:
1. The plain ops (reference.ops, section "fused row-wise chains") composed like the decode step give bit-for-bit
   the reference decoder layers' results (reference/text.py: DecoderLayer.forward) in fp32 and bf16: they are the
   reference's arithmetic, only regrouped. The chains the reference calls itself (stream creation, collapse,
   per-layer inputs, embeddings, injection, RoPE) are pinned to HF by tests/test_reference_text.py.
2. Each kernel against its plain op by the 2x rule: max |kernel - fp64| <= 2 * max |torch same dtype - fp64| + ATOL,
   with NaN-poisoned outputs (an unwritten element fails), odd widths, several rows (batch > 1, a few tokens), in
   fp32, fp16 and bf16 (row-wise kernels: no tl.dot, so bf16 runs under the interpreter too).
``gpu`` tests run the compiled kernels at Gemma 3n's real shapes and inside one CUDA graph.
"""
from __future__ import annotations

import functools
import math
import os
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gemma3n_fast.reference import ops
from kernel_checks import CUDA, DEVICE, DTYPES, assert_2x_torch, nans, randn, spy  # noqa: F401 (spy: fixture)

# Absolute slack on top of 2x torch's own error: a few fp32 ulps at |y| ~ 10 (summation order); a fraction of an ulp
# at |y| ~ 1 for the 16-bit types (as in test_kernels_rowwise).
ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)


def _seed(*parts) -> int:
    """A per-case seed that is the same in every process (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _f64(*ts):
    return tuple(None if t is None else t.double() for t in ts)


def _inv_freq(D, base):
    """The reference's RoPE inverse frequencies, fp32 [D/2]."""
    from gemma3n_fast.reference.text import rope_inv_freq

    return rope_inv_freq(D, base, DEVICE)


def _altup_params(H, dtype, seed):
    """(router_norm_weight, router_weight): the router's matvec is O(1), tanh neither saturated nor linear."""
    return randn((H,), dtype, seed, scale=0.3, shift=1.0), randn((4, H), dtype, seed + 1, scale=math.sqrt(H))


# ---------------------------------------------------------------------------------------------- 1. plain == reference
def _tiny_text_config(**kw):
    from gemma3n_fast.reference.config import TextConfig

    base = dict(vocab_size=64, vocab_size_per_layer_input=48, hidden_size=40, hidden_size_per_layer_input=12,
                intermediate_size=72, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_kv_shared_layers=1, laurel_rank=6, sliding_window=4,
                layer_types=["sliding_attention", "full_attention", "full_attention"],
                activation_sparsity_pattern=[0.95, 0.0, 0.0])
    base.update(kw)
    return TextConfig(**base)


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5)
                    + (1.0 if p.dim() == 1 else 0.0))


def _layer_by_plain_ops(layer, streams, proj_raw_prev, ppl_w_prev, pli, q_pos, inv_freq, shared_kv):
    """One decoder layer as the fused decode step runs it, with the plain ops -> (corrected, gate-input, proj_raw)."""
    at, au, lau = layer.self_attn, layer.altup, layer.laurel
    eps, active = at.eps, layer.active
    pred, an = ops.altup_predict_fused(streams, proj_raw_prev, ppl_w_prev, au.router_norm.weight,
                                       au.modality_router.weight, au.prediction_coefs.weight,
                                       layer.input_layernorm.weight, eps, active)
    B, T, _ = an.shape
    if at.is_consumer:
        qkv = at.q_proj(an)
        q = ops.qkv_norm_rope_cache(qkv, at.q_norm.weight, None, inv_freq, q_pos, eps=eps)
        k, v, k_pos = shared_kv[at.kv_source]
    else:
        qkv = torch.cat([at.q_proj(an), at.k_proj(an), at.v_proj(an)], dim=-1)
        k = torch.full((B, at.n_kv_heads, T, at.head_dim), float("nan"), dtype=an.dtype)
        v = torch.full_like(k, float("nan"))
        q = ops.qkv_norm_rope_cache(qkv, at.q_norm.weight, at.k_norm.weight, inv_freq, q_pos, k, v,
                                    torch.arange(T), eps)
        k_pos = q_pos
        shared_kv[layer.self_attn.layer] = (k, v, k_pos)
    o = ops.sliding_window_attention(q, k, v, q_pos, k_pos, window=at.window, scaling=1.0)
    o = at.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    h, hn = ops.post_attention_chain(o, pred[active], lau.linear_right(lau.linear_left(an)), an,
                                     layer.post_attention_layernorm.weight, lau.post_laurel_norm.weight,
                                     layer.pre_feedforward_layernorm.weight, eps)
    mlp = layer.mlp
    m = mlp.down_proj(ops.gaussian_topk_gelu_mul(mlp.gate_proj(hn), mlp.up_proj(hn), mlp.std_multiplier))
    corrected, scaled = ops.altup_correct_fused(pred, m, h, layer.post_feedforward_layernorm.weight,
                                                au.router_norm.weight, au.modality_router.weight,
                                                au.correction_coefs.weight, au.correct_output_scale, eps, active)
    g = F.gelu(layer.per_layer_input_gate(scaled), approximate="tanh") * pli
    return corrected, layer.per_layer_projection(g)


@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
def test_plain_ops_are_the_reference_decoder(dtype_id):
    """Bit-for-bit: the plain fused ops, composed like the decode step (the injection moved into the next layer's
    predict, attention's norms and RoPE fused with the cache write, the post-attention and post-FFN chains), equal
    reference/text.py's own decoder layers."""
    from gemma3n_fast.reference.text import Gemma3nTextModel, positions_from_mask, rope_cos_sin

    dtype = DTYPES[dtype_id]
    cfg = _tiny_text_config()
    model = Gemma3nTextModel(cfg)
    _randomize(model, 0)
    model = model.to(dtype)
    B, T = 2, 5
    ids = torch.randint(0, cfg.vocab_size_per_layer_input, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    q_pos = positions_from_mask(mask)

    with torch.no_grad():
        x0, token_part = model.token_embeddings(ids)
        per_layer = model.per_layer_inputs(x0, token_part)
        streams = model.make_streams(x0)

        # The reference's layers, then the same layers by the plain fused ops.
        ref, shared = streams, {}
        for i, layer in enumerate(model.layers):
            cos, sin = rope_cos_sin(q_pos, cfg.head_dim, cfg.rope_base[cfg.layer_types[i]], dtype)
            ref = layer(ref, per_layer[:, :, i], cos, sin, q_pos, shared, None)
        ours, shared, proj_raw, ppl_w = streams, {}, None, None
        for i, layer in enumerate(model.layers):
            inv_freq = _inv_freq(cfg.head_dim, cfg.rope_base[cfg.layer_types[i]]).cpu()
            ours, proj_raw_i = _layer_by_plain_ops(layer, ours, proj_raw, ppl_w, per_layer[:, :, i], q_pos,
                                                   inv_freq, shared)
            proj_raw, ppl_w = proj_raw_i, layer.post_per_layer_input_norm.weight
        ours = ops.altup_inject(ours, proj_raw, ppl_w, cfg.rms_norm_eps, cfg.altup_active_idx)
        assert torch.equal(ours, ref), (ours - ref).abs().max()


# ---------------------------------------------------------------------------------------------- 2. kernels
def test_kernels_run_through_triton():
    import triton

    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1", "CPU tests must run the kernels in the Triton interpreter"
    import importlib

    for mod, kernel in KERNELS:
        m = importlib.import_module(f"gemma3n_fast.kernels.{mod}")
        k = getattr(m, kernel)
        assert isinstance(k, triton.runtime.JITFunction) or type(k).__name__ == "InterpretedFunction", (mod, type(k))
        assert "gemma3n_fast.reference" not in open(m.__file__).read(), f"{mod} imports the reference"
        assert getattr(m, mod).__module__ == f"gemma3n_fast.kernels.{mod}"


KERNELS = [("qkv_norm_rope_cache", "_qkv_norm_rope_cache_kernel"),
           ("post_attention_chain", "_post_attention_chain_kernel"),
           ("altup_predict_fused", "_altup_predict_fused_kernel"), ("altup_inject", "_altup_inject_kernel"),
           ("altup_correct_fused", "_altup_correct_fused_kernel"),
           ("altup_make_streams", "_altup_make_streams_kernel"),
           ("altup_collapse_norm", "_altup_collapse_norm_kernel"),
           ("per_layer_inputs_combine", "_per_layer_inputs_combine_kernel")]


# (id, B, T, Hq, Hkv, D, base, positions row 0, slots): D not a power of two, D/2 odd; positions with padding (-1)
# and large angles (30000 * inv_freq[0]); slots with a skipped (-1) column; a KV-shared layer (Hkv = 0, no cache).
QKV_CASES = {
    "owner_D50": (2, 3, 4, 2, 50, 10_000.0, [5, 6, 30_000], [3, -1, 10]),
    "owner_decode_D64": (1, 1, 8, 2, 64, 1_000_000.0, [777], [5]),
    "shared_D50": (2, 3, 4, 0, 50, 1_000_000.0, [-1, 0, 1], None),
}
QKV_GRID = [(d, c) for d in DTYPES for c in QKV_CASES]


@pytest.mark.parametrize("dtype_id,case_id", QKV_GRID, ids=[f"{d}-{c}" for d, c in QKV_GRID])
def test_qkv_norm_rope_cache_parity(dtype_id, case_id, spy):
    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache

    dtype = DTYPES[dtype_id]
    B, T, Hq, Hkv, D, base, pos0, slots = QKV_CASES[case_id]
    seed = _seed("qkv", dtype_id, case_id)
    S = 11
    qkv = randn((B, T, (Hq + 2 * Hkv) * D), dtype, seed, scale=3.0, shift=0.3)
    qw, kw = randn((D,), dtype, seed + 1, shift=1.0), randn((D,), dtype, seed + 2, shift=1.0)
    inv_freq = _inv_freq(D, base)
    positions = torch.tensor([pos0] + [[p + 3 for p in pos0]] * (B - 1), device=DEVICE)
    if Hkv:
        slots = torch.tensor(slots, device=DEVICE)
        caches = [nans((B, Hkv, S, D), dtype) for _ in range(4)]  # ours k, v; the plain op's k, v (fp64 below)
        k64, v64 = (nans((B, Hkv, S, D), torch.float64) for _ in range(2))
    else:
        slots, caches, k64, v64 = None, [None] * 4, None, None
    s = spy("qkv_norm_rope_cache", "_qkv_norm_rope_cache_kernel")
    q = qkv_norm_rope_cache(qkv, qw, kw if Hkv else None, inv_freq, positions, caches[0], caches[1], slots,
                            out=nans((B, Hq, T, D), dtype))
    assert s.launches == 1
    q_ref = ops.qkv_norm_rope_cache(qkv, qw, kw if Hkv else None, inv_freq, positions, caches[2], caches[3], slots)
    q64 = ops.qkv_norm_rope_cache(*_f64(qkv, qw, kw if Hkv else None), inv_freq, positions, k64, v64, slots)
    what = f"qkv_norm_rope_cache {dtype_id} {case_id}"
    assert_2x(q, q_ref, q64, what + " q")
    if Hkv:
        written = slots[slots >= 0]
        for ours, ref, ref64, name in ((caches[0], caches[2], k64, "k"), (caches[1], caches[3], v64, "v")):
            assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: {name} cache written in other slots"
            assert_2x(ours[:, :, written], ref[:, :, written], ref64[:, :, written], f"{what} {name} cache")


def test_qkv_norm_rope_cache_views_and_out_layout():
    """qkv as a row-strided view (a wider GEMV output), out as a [B, T, Hq, D] buffer seen as [B, Hq, T, D]."""
    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache

    B, T, Hq, Hkv, D = 2, 2, 2, 1, 24
    wide = randn((B, T, (Hq + 2 * Hkv) * D + 40), torch.float16, 3)
    qkv = wide[..., 40:]  # e.g. [laurel_left | q | k | v] from one GEMV
    qw, kw, inv_freq = randn((D,), torch.float16, 4), randn((D,), torch.float16, 5), _inv_freq(D, 10_000.0)
    pos = torch.tensor([[3, 4], [0, 1]], device=DEVICE, dtype=torch.int32)
    kc, vc = nans((B, Hkv, 6, D), torch.float16), nans((B, Hkv, 6, D), torch.float16)
    out = nans((B, T, Hq, D), torch.float16).transpose(1, 2)
    qkv_norm_rope_cache(qkv, qw, kw, inv_freq, pos, kc, vc, torch.tensor([4, 5], device=DEVICE), out=out)
    kr, vr = kc.clone().fill_(float("nan")), vc.clone().fill_(float("nan"))
    ref = ops.qkv_norm_rope_cache(qkv, qw, kw, inv_freq, pos, kr, vr, torch.tensor([4, 5], device=DEVICE))
    assert torch.equal(out, ref) and torch.equal(kc[:, :, 4:], kr[:, :, 4:]) and torch.equal(vc[:, :, 4:], vr[:, :, 4:])


# (B, T, H): a decode row at Gemma's width, a few odd-width rows over 2 batch rows.
ROW_SHAPES = {"1x1x2048": (1, 1, 2048), "2x3x137": (2, 3, 137)}
ROW_GRID = [(d, s) for d in DTYPES for s in ROW_SHAPES]


@pytest.mark.parametrize("dtype_id,shape_id", ROW_GRID, ids=[f"{d}-{s}" for d, s in ROW_GRID])
def test_post_attention_chain_parity(dtype_id, shape_id, spy):
    from gemma3n_fast.kernels.post_attention_chain import post_attention_chain

    dtype, (B, T, H) = DTYPES[dtype_id], ROW_SHAPES[shape_id]
    seed = _seed("chain", dtype_id, shape_id)
    o, br = randn((B, T, H), dtype, seed, scale=3.0, shift=0.5), randn((B, T, H), dtype, seed + 1, scale=0.2)
    a, an = randn((B, T, H), dtype, seed + 2), randn((B, T, H), dtype, seed + 3)
    ws = [randn((H,), dtype, seed + 4 + i, scale=0.5, shift=1.0) for i in range(3)]
    s = spy("post_attention_chain", "_post_attention_chain_kernel")
    h, hn = post_attention_chain(o, a, br, an, *ws, 1e-6, out=nans(o.shape, dtype), normed_out=nans(o.shape, dtype))
    assert s.launches == 1
    h_ref, hn_ref = ops.post_attention_chain(o, a, br, an, *ws, 1e-6)
    h64, hn64 = ops.post_attention_chain(*_f64(o, a, br, an, *ws), 1e-6)
    assert_2x(h, h_ref, h64, f"post_attention_chain {dtype_id} {shape_id} h")
    assert_2x(hn, hn_ref, hn64, f"post_attention_chain {dtype_id} {shape_id} hn")


# (dtype, shape, active, inject): every dtype with and without the injection; active 0 (Gemma) and another stream.
PREDICT_GRID = [(d, s, a, inj) for d in DTYPES for s, a, inj in (("1x1x2048", 0, True), ("2x3x137", 2, True),
                                                                  ("2x3x137", 0, False))]


@pytest.mark.parametrize("dtype_id,shape_id,active,inject", PREDICT_GRID,
                         ids=[f"{d}-{s}-active{a}-{'inject' if i else 'layer0'}" for d, s, a, i in PREDICT_GRID])
def test_altup_predict_fused_parity(dtype_id, shape_id, active, inject, spy):
    from gemma3n_fast.kernels.altup_predict_fused import altup_predict_fused

    dtype, (B, T, H) = DTYPES[dtype_id], ROW_SHAPES[shape_id]
    seed = _seed("predict_fused", dtype_id, shape_id, active, inject)
    streams = randn((4, B, T, H), dtype, seed)
    proj = randn((B, T, H), dtype, seed + 1, scale=5.0) if inject else None
    ppl_w = randn((H,), dtype, seed + 2, scale=0.3, shift=0.5)
    nw, rw = _altup_params(H, dtype, seed + 3)
    coefs, in_w = randn((16, 4), dtype, seed + 5, scale=0.5), randn((H,), dtype, seed + 6, scale=0.5, shift=1.0)
    s = spy("altup_predict_fused", "_altup_predict_fused_kernel")
    pred, an = altup_predict_fused(streams, proj, ppl_w, nw, rw, coefs, in_w, 1e-6, active,
                                   out=nans(streams.shape, dtype), normed_out=nans((B, T, H), dtype))
    assert s.launches == 1
    pred_ref, an_ref = ops.altup_predict_fused(streams, proj, ppl_w, nw, rw, coefs, in_w, 1e-6, active)
    pred64, an64 = ops.altup_predict_fused(*_f64(streams, proj, ppl_w, nw, rw, coefs, in_w), 1e-6, active)
    what = f"altup_predict_fused {dtype_id} {shape_id} active={active} inject={inject}"
    assert_2x(pred, pred_ref, pred64, what + " pred")
    assert_2x(an, an_ref, an64, what + " an")


@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_altup_inject_parity_in_place(dtype_id, spy):
    from gemma3n_fast.kernels.altup_inject import altup_inject

    dtype, (B, T, H) = DTYPES[dtype_id], ROW_SHAPES["2x3x137"]
    seed = _seed("inject", dtype_id)
    streams, proj = randn((4, B, T, H), dtype, seed), randn((B, T, H), dtype, seed + 1, scale=5.0)
    w = randn((H,), dtype, seed + 2, scale=0.3, shift=0.5)
    ref = ops.altup_inject(streams, proj, w, 1e-6, 1)
    ref64 = ops.altup_inject(*_f64(streams, proj, w), 1e-6, 1)
    s = spy("altup_inject", "_altup_inject_kernel")
    ours = nans(streams.shape, dtype)
    assert altup_inject(streams, proj, w, 1e-6, 1, out=ours) is ours
    assert_2x(ours, ref, ref64, f"altup_inject {dtype_id}")
    altup_inject(streams, proj, w, 1e-6, 1, out=streams)  # in place
    assert s.launches == 2 and torch.equal(streams, ours)


# (dtype, shape, active, scale): the scale as None / activation dtype / fp32 (a different rounding chain).
CORRECT_GRID = ([(d, "1x1x2048", 0, "scale") for d in DTYPES] + [(d, "2x3x137", 2, "fp32scale") for d in DTYPES]
                + [("fp32", "2x3x137", 0, "noscale"), ("bf16", "2x3x137", 3, "noscale")])


@pytest.mark.parametrize("dtype_id,shape_id,active,scale", CORRECT_GRID,
                         ids=[f"{d}-{s}-active{a}-{c}" for d, s, a, c in CORRECT_GRID])
def test_altup_correct_fused_parity(dtype_id, shape_id, active, scale, spy):
    from gemma3n_fast.kernels.altup_correct_fused import altup_correct_fused

    dtype, (B, T, H) = DTYPES[dtype_id], ROW_SHAPES[shape_id]
    seed = _seed("correct_fused", dtype_id, shape_id, active, scale)
    preds, m = randn((4, B, T, H), dtype, seed), randn((B, T, H), dtype, seed + 1, scale=4.0, shift=0.2)
    h, ffn_w = randn((B, T, H), dtype, seed + 2), randn((H,), dtype, seed + 3, scale=0.5, shift=1.0)
    nw, rw = _altup_params(H, dtype, seed + 4)
    coefs = randn((4, 4), dtype, seed + 6, scale=0.5)
    out_scale = {"noscale": None, "scale": randn((H,), dtype, seed + 7),
                 "fp32scale": randn((H,), torch.float32, seed + 7)}[scale]
    s = spy("altup_correct_fused", "_altup_correct_fused_kernel")
    ours, ours_scaled = altup_correct_fused(preds, m, h, ffn_w, nw, rw, coefs, out_scale, 1e-6, active,
                                            out=nans(preds.shape, dtype), scaled_out=nans((B, T, H), dtype))
    assert s.launches == 1
    ref, ref_scaled = ops.altup_correct_fused(preds, m, h, ffn_w, nw, rw, coefs, out_scale, 1e-6, active)
    ref64, ref64_scaled = ops.altup_correct_fused(*_f64(preds, m, h, ffn_w, nw, rw, coefs, out_scale), 1e-6, active)
    what = f"altup_correct_fused {dtype_id} {shape_id} active={active} {scale}"
    assert_2x(ours, ref, ref64, what)
    if out_scale is None:
        assert ours_scaled is None
    else:
        assert_2x(ours_scaled, ref_scaled, ref64_scaled, what + " scaled")


@pytest.mark.parametrize("dtype_id,shape_id", ROW_GRID, ids=[f"{d}-{s}" for d, s in ROW_GRID])
def test_altup_make_streams_and_collapse_parity(dtype_id, shape_id, spy):
    """Both read the A-1 projections as a view of one [..., (A-1) * H] GEMV output (stream stride H)."""
    from gemma3n_fast.kernels.altup_collapse_norm import altup_collapse_norm
    from gemma3n_fast.kernels.altup_make_streams import altup_make_streams

    dtype, (B, T, H) = DTYPES[dtype_id], ROW_SHAPES[shape_id]
    seed = _seed("streams", dtype_id, shape_id)
    x0 = randn((B, T, H), dtype, seed, scale=6.0)
    fused = randn((B, T, 3 * H), dtype, seed + 1, scale=0.3)
    projected = fused.unflatten(-1, (3, H)).movedim(-2, 0)  # [3, B, T, H], strides (H, T*3H, 3H, 1)
    s = spy("altup_make_streams", "_altup_make_streams_kernel")
    streams = altup_make_streams(x0, projected, out=nans((4, B, T, H), dtype))
    assert s.launches == 1
    assert_2x(streams, ops.altup_make_streams(x0, projected), ops.altup_make_streams(*_f64(x0, projected)),
              f"altup_make_streams {dtype_id} {shape_id}")

    w = randn((H,), dtype, seed + 2, scale=0.5, shift=1.0)
    s = spy("altup_collapse_norm", "_altup_collapse_norm_kernel")
    hidden = altup_collapse_norm(x0, projected, w, 1e-6, out=nans((B, T, H), dtype))
    assert s.launches == 1
    assert_2x(hidden, ops.altup_collapse_norm(x0, projected, w, 1e-6),
              ops.altup_collapse_norm(*_f64(x0, projected, w), 1e-6), f"altup_collapse_norm {dtype_id} {shape_id}")


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("with_tokens", [True, False], ids=["tokens", "projection_only"])
def test_per_layer_inputs_combine_parity(dtype_id, with_tokens, spy):
    from gemma3n_fast.kernels.per_layer_inputs_combine import per_layer_inputs_combine

    dtype, (B, T, L, D, H) = DTYPES[dtype_id], (2, 3, 5, 24, 2000)
    seed = _seed("ple", dtype_id, with_tokens)
    proj = randn((B, T, L * D), dtype, seed, scale=40.0)  # ~ sqrt(H) before the H^-1/2 scale
    tokens = randn((B, T, L, D), dtype, seed + 1) if with_tokens else None
    w = randn((D,), dtype, seed + 2, scale=0.5, shift=1.0)
    s = spy("per_layer_inputs_combine", "_per_layer_inputs_combine_kernel")
    ours = per_layer_inputs_combine(proj, tokens, w, H, 1e-6, out=nans((B, T, L, D), dtype))
    assert s.launches == 1
    assert_2x(ours, ops.per_layer_inputs_combine(proj, tokens, w, H, 1e-6),
              ops.per_layer_inputs_combine(*_f64(proj, tokens, w), H, 1e-6),
              f"per_layer_inputs_combine {dtype_id} tokens={with_tokens}")


def test_fused_bad_inputs():
    from gemma3n_fast.kernels.altup_correct_fused import altup_correct_fused
    from gemma3n_fast.kernels.altup_make_streams import altup_make_streams
    from gemma3n_fast.kernels.altup_predict_fused import altup_predict_fused
    from gemma3n_fast.kernels.per_layer_inputs_combine import per_layer_inputs_combine
    from gemma3n_fast.kernels.post_attention_chain import post_attention_chain
    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache

    f32 = torch.float32
    H, D = 40, 8
    x, w = randn((3, H), f32, 0), randn((H,), f32, 1)
    with pytest.raises(ValueError, match="post_attention_chain: an must have shape"):
        post_attention_chain(x, x, x, x[:2], w, w, w)
    with pytest.raises(TypeError, match="laurel_branch dtype"):
        post_attention_chain(x, x, x.half(), x, w, w, w)
    with pytest.raises(ValueError, match="pre_ffn_norm_weight must be"):
        post_attention_chain(x, x, x, x, w, w, w[:-1])
    with pytest.raises(ValueError, match="H must be <= 8192"):
        post_attention_chain(*(randn((1, 9000), f32, 2),) * 4, *(randn((9000,), f32, 3),) * 3)
    s = randn((4, 3, H), f32, 4)
    nw, rw = _altup_params(H, f32, 5)
    with pytest.raises(ValueError, match="needs its per_layer_norm_weight"):
        altup_predict_fused(s, x, None, nw, rw, randn((16, 4), f32, 6), w)
    with pytest.raises(ValueError, match="prediction_coefs"):
        altup_predict_fused(s, None, None, nw, rw, randn((4, 4), f32, 6), w)
    with pytest.raises(ValueError, match="active must be"):
        altup_correct_fused(s, x, x, w, nw, rw, randn((4, 4), f32, 7), active=4)
    with pytest.raises(ValueError, match="mlp_out must have shape"):
        altup_correct_fused(s, x[:1], x, w, nw, rw, randn((4, 4), f32, 7))
    with pytest.raises(ValueError, match="projected must have shape"):
        altup_make_streams(x, randn((3, 3, H + 1), f32, 8))
    with pytest.raises(ValueError, match="D = 8"):
        per_layer_inputs_combine(randn((2, 20), f32, 9), None, randn((D,), f32, 10), 64)
    qkv = randn((1, 2, 4 * D), f32, 11)
    qw, inv = randn((D,), f32, 12), _inv_freq(D, 10_000.0)
    pos = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    kc = randn((1, 1, 5, D), f32, 13)
    with pytest.raises(ValueError, match="even"):
        qkv_norm_rope_cache(randn((1, 2, 4 * 7), f32, 11), randn((7,), f32, 12), None, inv[:3], pos)
    with pytest.raises(ValueError, match="together"):
        qkv_norm_rope_cache(qkv, qw, qw, inv, pos, kc, None, None)
    with pytest.raises(ValueError, match="slots must be"):
        qkv_norm_rope_cache(qkv, qw, qw, inv, pos, kc, kc.clone(), torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="inv_freq must be"):
        qkv_norm_rope_cache(qkv, qw, None, inv.double(), pos)
    with pytest.raises(ValueError, match="positions must be"):
        qkv_norm_rope_cache(qkv, qw, None, inv, pos[:, :1])
    with pytest.raises(ValueError, match="is not \\(Hq \\+ 2"):
        qkv_norm_rope_cache(qkv[..., :-1], qw, None, inv, pos)


# ---------------------------------------------------------------------------------------------- GPU (compiled)
def _decode_step_inputs(T, dtype):
    """Gemma 3n E2B widths: hidden 2048, 8 q heads / 2 KV heads of 256, 30 layers of 256 per-layer inputs."""
    H, Hq, Hkv, D, L, P = 2048, 8, 2, 256, 30, 256
    r = lambda shape, seed, **kw: randn(shape, dtype, seed, **kw)  # noqa: E731
    nw, rw = _altup_params(H, dtype, 1)
    return SimpleNamespace(
        H=H, Hq=Hq, Hkv=Hkv, D=D, T=T, streams=r((4, 1, T, H), 2), proj_raw=r((1, T, H), 3, scale=5.0),
        w=[r((H,), 10 + i, scale=0.5, shift=1.0) for i in range(8)], nw=nw, rw=rw,
        pc=r((16, 4), 4, scale=0.5), cc=r((4, 4), 5, scale=0.5), scale=r((H,), 6),
        qkv=r((1, T, (Hq + 2 * Hkv) * D), 7, scale=3.0), qw=r((D,), 8, shift=1.0), kw=r((D,), 9, shift=1.0),
        inv_freq=_inv_freq(D, 10_000.0), positions=torch.arange(5000, 5000 + T, device=DEVICE)[None],
        slots=torch.arange(100, 100 + T, device=DEVICE), o=r((1, T, H), 20, scale=3.0), br=r((1, T, H), 21, scale=0.2),
        m=r((1, T, H), 22, scale=4.0), x0=r((1, T, H), 23, scale=6.0), projected=r((3, 1, T, H), 24, scale=0.3),
        ple_proj=r((1, T, L * P), 25, scale=40.0), ple_tok=r((1, T, L, P), 26), ple_w=r((P,), 27, shift=1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 512], ids=["decode1", "decode8", "prefill512"])
@pytest.mark.parametrize("dtype_id", ["bf16", "fp32"])
def test_gpu_fused_real_shapes(dtype_id, T):
    from gemma3n_fast.kernels.altup_collapse_norm import altup_collapse_norm
    from gemma3n_fast.kernels.altup_correct_fused import altup_correct_fused
    from gemma3n_fast.kernels.altup_make_streams import altup_make_streams
    from gemma3n_fast.kernels.altup_predict_fused import altup_predict_fused
    from gemma3n_fast.kernels.per_layer_inputs_combine import per_layer_inputs_combine
    from gemma3n_fast.kernels.post_attention_chain import post_attention_chain
    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache

    dtype = DTYPES[dtype_id]
    x = _decode_step_inputs(T, dtype)
    w = x.w

    def check(kernel, plain, args, what):
        ours = kernel(*args)
        ref, ref64 = plain(*args), plain(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                           and a is not x.inv_freq else a for a in args])
        for o, r_, r64 in zip(*(t if isinstance(t, tuple) else (t,) for t in (ours, ref, ref64))):
            assert_2x(o, r_, r64, f"gpu {what} {dtype_id} T={T}")

    check(altup_predict_fused, ops.altup_predict_fused,
          (x.streams, x.proj_raw, w[0], x.nw, x.rw, x.pc, w[1], 1e-6, 0), "altup_predict_fused")
    check(post_attention_chain, ops.post_attention_chain,
          (x.o, x.streams[0], x.br, x.streams[1], w[2], w[3], w[4], 1e-6), "post_attention_chain")
    check(altup_correct_fused, ops.altup_correct_fused,
          (x.streams, x.m, x.streams[2], w[5], x.nw, x.rw, x.cc, x.scale, 1e-6, 0), "altup_correct_fused")
    check(altup_make_streams, ops.altup_make_streams, (x.x0, x.projected), "altup_make_streams")
    check(altup_collapse_norm, ops.altup_collapse_norm, (x.x0, x.projected, w[6], 1e-6), "altup_collapse_norm")
    check(per_layer_inputs_combine, ops.per_layer_inputs_combine, (x.ple_proj, x.ple_tok, x.ple_w, x.H, 1e-6),
          "per_layer_inputs_combine")
    caches = [torch.zeros(1, x.Hkv, 1024, x.D, device=DEVICE, dtype=d) for d in (dtype, dtype, torch.float64,
                                                                                   torch.float64, dtype, dtype)]
    q = qkv_norm_rope_cache(x.qkv, x.qw, x.kw, x.inv_freq, x.positions, caches[0], caches[1], x.slots)
    q_ref = ops.qkv_norm_rope_cache(x.qkv, x.qw, x.kw, x.inv_freq, x.positions, caches[4], caches[5], x.slots)
    q64 = ops.qkv_norm_rope_cache(*_f64(x.qkv, x.qw, x.kw), x.inv_freq, x.positions, caches[2], caches[3], x.slots)
    assert_2x(q, q_ref, q64, f"gpu qkv_norm_rope_cache q {dtype_id} T={T}")
    for i, name in ((0, "k"), (1, "v")):
        assert_2x(caches[i], caches[i + 4], caches[i + 2], f"gpu qkv_norm_rope_cache {name} cache {dtype_id} T={T}")


@pytest.mark.gpu
def test_gpu_fused_cuda_graph_capture():
    """Every fused launcher captures into one CUDA graph (out= given: no allocation, no sync) and a replay reads the
    new inputs (values at replay time, pointers from the capture)."""
    from gemma3n_fast.kernels.altup_collapse_norm import altup_collapse_norm
    from gemma3n_fast.kernels.altup_correct_fused import altup_correct_fused
    from gemma3n_fast.kernels.altup_inject import altup_inject
    from gemma3n_fast.kernels.altup_make_streams import altup_make_streams
    from gemma3n_fast.kernels.altup_predict_fused import altup_predict_fused
    from gemma3n_fast.kernels.per_layer_inputs_combine import per_layer_inputs_combine
    from gemma3n_fast.kernels.post_attention_chain import post_attention_chain
    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache

    dtype, T = torch.bfloat16, 1
    x = _decode_step_inputs(T, dtype)
    w = x.w
    kc = torch.zeros(1, x.Hkv, 1024, x.D, device=DEVICE, dtype=dtype)
    vc = torch.zeros_like(kc)
    e = lambda t: torch.empty_like(t)  # noqa: E731
    outs = SimpleNamespace(pred=e(x.streams), an=e(x.o), q=torch.empty(1, x.Hq, T, x.D, device=DEVICE, dtype=dtype),
                           h=e(x.o), hn=e(x.o), corr=e(x.streams), scaled=e(x.o), inj=e(x.streams), st=e(x.streams),
                           hid=e(x.o), ple=e(x.ple_tok))

    def step():
        altup_predict_fused(x.streams, x.proj_raw, w[0], x.nw, x.rw, x.pc, w[1], out=outs.pred, normed_out=outs.an)
        qkv_norm_rope_cache(x.qkv, x.qw, x.kw, x.inv_freq, x.positions, kc, vc, x.slots, out=outs.q)
        post_attention_chain(x.o, outs.pred[0], x.br, outs.an, w[2], w[3], w[4], out=outs.h, normed_out=outs.hn)
        altup_correct_fused(outs.pred, x.m, outs.h, w[5], x.nw, x.rw, x.cc, x.scale, out=outs.corr,
                            scaled_out=outs.scaled)
        altup_inject(outs.corr, x.proj_raw, w[0], out=outs.inj)
        altup_make_streams(x.x0, x.projected, out=outs.st)
        altup_collapse_norm(x.x0, x.projected, w[6], out=outs.hid)
        per_layer_inputs_combine(x.ple_proj, x.ple_tok, x.ple_w, x.H, out=outs.ple)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.streams.copy_(randn(x.streams.shape, dtype, 100))
    x.positions.fill_(7000)
    x.slots.fill_(333)
    x.ple_proj.copy_(randn(x.ple_proj.shape, dtype, 101, scale=40.0))
    graph.replay()
    torch.cuda.synchronize()
    pred, _ = ops.altup_predict_fused(x.streams, x.proj_raw, w[0], x.nw, x.rw, x.pc, w[1])
    assert torch.equal(outs.pred, altup_predict_fused(x.streams, x.proj_raw, w[0], x.nw, x.rw, x.pc, w[1])[0])
    assert (outs.pred.double() - pred.double()).abs().max().item() <= 0.1
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    q = ops.qkv_norm_rope_cache(x.qkv, x.qw, x.kw, x.inv_freq, x.positions, kr, vr, x.slots)
    assert (outs.q.double() - q.double()).abs().max().item() <= 0.05
    assert (kc[:, :, 333].double() - kr[:, :, 333].double()).abs().max().item() <= 0.05
    ple = ops.per_layer_inputs_combine(x.ple_proj, x.ple_tok, x.ple_w, x.H)
    assert (outs.ple.double() - ple.double()).abs().max().item() <= 0.05
