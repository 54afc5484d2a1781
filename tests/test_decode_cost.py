"""The decode-step accounting (``bench/byte_model.py`` on ``bench/launch_recorder.py``, reported by
``bench/decode_cost.py``) at the real E2B / E4B structures, on the meta device (no weights, a few seconds): the
counts are consistent, every weight byte a step needs is accounted for exactly once (the roofline's rule), and the
launches per step stay under a ceiling that may only go down."""
import json

import pytest
import torch

from bench import byte_model, decode_cost, launch_recorder

# Launches per batch-1 decode step, at most. Measured 1,218 (E2B) and 1,373 (E4B) before the decode-step fusion
# (issue 11, whose target was 400 / 460), 396 / 456 after it; issue 20's target is 250 for E2B: lower these when a
# change lowers the count, never raise them.
E2B_LAUNCH_CEILING = 366  # measured 366: the per-layer projection runs the next layer's AltUp predict (issue 20)
E4B_LAUNCH_CEILING = 421  # measured 421
CEILING = {"e2b": E2B_LAUNCH_CEILING, "e4b": E4B_LAUNCH_CEILING}
BF16 = 2  # bytes per element


@pytest.fixture(scope="module", params=["e2b", "e4b"])
def cost(request):
    return byte_model.account(request.param, context=1024)


def test_launch_ceiling(cost):
    n = cost["launches"]["total"]
    assert n <= CEILING[cost["model"]], (
        f"{cost['model']}: {n} launches per decode step, above the ceiling {CEILING[cost['model']]}: "
        f"by kind {cost['launches']['by_kind']}; run `python -m bench.decode_cost` for the table")


def test_counts_are_consistent(cost):
    la, L = cost["launches"], cost["layers"]
    assert la["total"] > 0 and la["by_kind"]["GEMM"] > 0 and la["by_kind"]["Triton"] > 0
    assert sum(la["by_kind"].values()) == la["total"]
    assert sum(p["total"] for p in la["by_part"].values()) == la["total"]
    for part in la["by_part"].values():
        assert sum(part[k] for k in launch_recorder.KINDS) == part["total"]
    # per layer -> the layers' part; per kind too
    assert len(la["per_layer"]) == L and all(d["total"] > 0 for d in la["per_layer"])
    for k in (*launch_recorder.KINDS, "total"):
        assert sum(d[k] for d in la["per_layer"]) == la["by_part"]["layers"][k]
    # the layer types cover every layer once
    assert sorted(i for t in la["layer_types"] for i in t["layers"]) == list(range(L))
    # every Triton launch comes from an op-table op whose launcher really ran on meta
    assert sum(v["launches"] for v in la["op_table"].values()) == la["by_kind"]["Triton"]
    assert not cost["triton_outside_op_table"]
    assert not cost["plain_op_fallbacks"], (
        "op-table launchers failed on meta tensors, so their launches are assumed, not counted: "
        f"{cost['plain_op_fallbacks']}")
    assert not cost["host_reads"], f"the decode step reads device values on the host: {cost['host_reads']}"
    assert la["by_part"]["prologue"]["total"] > 0 and la["by_part"]["epilogue"]["total"] > 0


def test_weight_bytes_are_the_parameters_read_once(cost):
    """Every weight read once per step (tied LM head: the whole table once), the per-layer token table one row per
    token; only a sparse FFN's up / down weights may be read in part (their active channels)."""
    by = cost["bytes"]
    cfg = byte_model.text_config(cost["model"])
    roofline = byte_model.roofline_bytes(cfg, context=cost["context"], elem=BF16)
    expected, ple_row = roofline["weights"], roofline["ple_row"]
    assert not by["weights_not_read"], f"weights no launch reads: {by['weights_not_read']}"
    sparse_saving = 0.0
    for name in by["weights_partly_read"]:
        w = by["per_weight"][name]
        if name.endswith("embed_tokens_per_layer.weight"):
            assert w["read"] == ple_row
            continue
        assert w["group"] in ("gate|up", "down"), f"{name} is read in part ({w['read']} of {w['size']} bytes)"
        layer = int(name.split("layers.")[1].split(".")[0])
        assert cfg.activation_sparsity_pattern[layer] > 0, f"{name}: a dense layer's FFN weight read in part"
        assert w["read"] == pytest.approx(byte_model.sparse_fraction() * w["size"])
        sparse_saving += w["size"] - w["read"]
    # the parameters' bytes; tensors the fast model keeps beside them (buffers, attributes) come on top
    params = sum(min(w["read"], w["size"]) for w in by["per_weight"].values() if w["parameter"])
    assert params == pytest.approx(expected - sparse_saving, rel=1e-12)
    assert by["weights"] == pytest.approx(sum(min(w["read"], w["size"]) for w in by["per_weight"].values()),
                                          rel=1e-12)
    V, H = cfg.vocab_size, cfg.hidden_size
    assert by["by_group"]["LM head"] == V * H * BF16
    assert sum(by["by_group"][g] for g in byte_model.BYTE_GROUPS if g not in ("KV", "activations")) == \
        pytest.approx(by["weights"], rel=1e-12)
    assert by["total"] == pytest.approx(by["weights"] + by["kv"] + by["activations"], rel=1e-12)
    assert cost["floor_s"] == pytest.approx(by["total"] / cost["bandwidth_Bps"], rel=1e-12)


def test_kv_bytes(cost):
    """K/V: every attention layer reads its source's cache (sliding: the window's ring, full: every slot), the
    owners write one slot; the position tables add a little."""
    cfg = byte_model.text_config(cost["model"])
    reads = byte_model.roofline_bytes(cfg, context=cost["context"], elem=BF16)["kv"]
    writes = cfg.first_kv_shared_layer * 2 * cfg.num_key_value_heads * cfg.head_dim * BF16  # one slot of K and V
    assert reads + writes <= cost["bytes"]["kv"] <= 1.02 * (reads + writes)


def test_command_line(tmp_path, capsys):
    from triton.runtime import jit

    run = jit.JITFunction.run
    decode_cost.main(["--models", "smoke", "--context", "64", "--bandwidth-tbs", "2", "--json",
                      str(tmp_path / "cost.json")])
    assert jit.JITFunction.run is run  # Triton's launch is restored
    out = capsys.readouterr().out
    assert "| **SMOKE step** |" in out and "| **total** |" in out
    data = json.loads((tmp_path / "cost.json").read_text())
    (r,) = data["results"]
    assert r["model"] == "smoke" and r["bandwidth_Bps"] == 2e12 and r["launches"]["total"] > 0


def test_op_table_ops_are_counted_by_their_launchers():
    """Fused ops as the decode step will call them, on meta: the launcher's own Triton launches (the sparse FFN's 3,
    split decode attention's 2), the sparse FFN reading 5 % of its up / down rows, the K/V cache written one slot."""
    from torch import nn

    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache
    from gemma3n_fast.kernels.sliding_window_decode import sliding_window_attention_decode
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn
    from gemma3n_fast.reference import ops

    meta, bf16 = torch.device("meta"), torch.bfloat16
    H, I, Hq, Hkv, D, S = 2048, 8192, 8, 2, 256, 512
    holder = nn.Module()
    holder.device = meta
    for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down_t", (I, H)), ("q_norm", (D,)), ("k_norm", (D,))):
        holder.register_parameter(name, nn.Parameter(torch.empty(shape, device=meta, dtype=bf16), False))
    k_cache, v_cache = (torch.empty(1, Hkv, S, D, device=meta, dtype=bf16) for _ in range(2))
    lr = launch_recorder
    rec = lr.Recorder(meta, lr.WeightMap(holder), {lr.storage_key(k_cache), lr.storage_key(v_cache)}, tokens=1)
    rec.active = True
    wrap = {name: lr.wrap_op(rec, name, fn, getattr(ops, name), byte_model.op_rules(name)) for name, fn in (
        ("sparse_ffn", sparse_ffn), ("qkv_norm_rope_cache", qkv_norm_rope_cache),
        ("sliding_window_attention_decode", sliding_window_attention_decode))}
    x, qkv = torch.empty(1, 1, H, device=meta, dtype=bf16), torch.empty(1, 1, (Hq + 2 * Hkv) * D, device=meta,
                                                                         dtype=bf16)
    positions, k_pos = torch.zeros(1, 1, dtype=torch.int32, device=meta), torch.zeros(1, S, dtype=torch.int32,
                                                                                        device=meta)
    inv_freq, slots = torch.empty(D // 2, device=meta), torch.zeros(1, dtype=torch.long, device=meta)
    with lr.record_triton(rec), lr.CountAten(rec):
        wrap["sparse_ffn"](x, holder.gate, holder.up, holder.down_t, 1.6448)
        q = wrap["qkv_norm_rope_cache"](qkv, holder.q_norm, holder.k_norm, inv_freq, positions, k_cache, v_cache,
                                        slots)
        wrap["sliding_window_attention_decode"](q, k_cache, v_cache, positions, k_pos, window=S)
    assert [c.launches for c in rec.op_calls] == [3, 1, 2] and not any(c.plain_fallback for c in rec.op_calls)
    assert [l.name.split(":")[1] for l in rec.launches if l.kind == "Triton"] == [
        "_gemv_kernel", "_sparse_up_kernel", "_sparse_down_kernel", "_qkv_norm_rope_cache_kernel", "_swa_decode_kernel",
        "_swa_decode_reduce_kernel"]
    # besides, at most the sparse FFN's cached workspace, zeroed on its first call in the process (a warm-up's job)
    assert {l.name for l in rec.launches if l.kind != "Triton"} <= {"zeros"}
    read = {}
    for t in rec.traffic:
        read[t.weight or t.group] = read.get(t.weight or t.group, 0) + t.read + t.written
    w = I * H * BF16
    assert read["gate"] == w and read["up"] == pytest.approx(0.05 * w) and read["down_t"] == pytest.approx(0.05 * w)
    kv_written = sum(t.written for t in rec.traffic if t.group == "KV")
    assert kv_written == 2 * Hkv * D * BF16  # one slot of K and of V
    kv_read = sum(t.read for t in rec.traffic if t.group == "KV")
    assert kv_read >= 2 * Hkv * S * D * BF16  # attention reads both caches whole (plus their position table)


# ---- quantized weights (issue 19's targets) ----------------------------------------------------------------
# Bytes per batch-1 decode step at most, and the loaded text weights (E2B bf16: 4.25 GB per step, 8.87 GB loaded).
QUANTIZED_TARGETS = {("e2b", "int4"): 1.3e9, ("e2b", "int8"): 2.4e9, ("e4b", "int4"): 2.3e9}
E2B_INT4_LOADED_TARGET = 2.6e9


@pytest.fixture(scope="module", params=list(QUANTIZED_TARGETS), ids=lambda p: "-".join(p))
def quantized_cost(request):
    model, kind = request.param
    return byte_model.account(model, context=1024, quantize=kind, group_size=64)


def test_quantized_step_meets_its_byte_target_with_no_more_launches(quantized_cost):
    from gemma3n_fast.reference.quant import quantized_nbytes

    c = quantized_cost
    kind = c["quantize"].split()[0]
    assert not c["plain_op_fallbacks"], f"launchers refused the quantized weights: {c['plain_op_fallbacks']}"
    assert c["launches"]["total"] <= CEILING[c["model"]]
    by, cfg = c["bytes"], byte_model.text_config(c["model"])
    assert by["total"] <= QUANTIZED_TARGETS[(c["model"], kind)], f"{by['total'] / 1e9:.3f} GB per step"
    # the tied head reads the whole packed table once; every quantized weight is read, none as a float copy
    assert by["by_group"]["LM head"] == quantized_nbytes(cfg.vocab_size, cfg.hidden_size, kind, 64)
    assert not by["weights_not_read"], f"weights no launch reads: {by['weights_not_read']}"
    roofline = byte_model.roofline_bytes(cfg, context=c["context"], elem=BF16, quantize=kind, group_size=64)
    assert by["weights"] <= roofline["weights"] * (1 + 1e-9)  # less the sparse FFNs' inactive rows
    assert by["weights"] >= 0.8 * roofline["weights"]
    if (c["model"], kind) == ("e2b", "int4"):
        assert by["loaded_weights"] <= E2B_INT4_LOADED_TARGET, f"{by['loaded_weights'] / 1e9:.3f} GB loaded"
