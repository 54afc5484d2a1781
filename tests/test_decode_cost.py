"""The decode-step accounting (``bench/byte_model.py`` on ``bench/launch_recorder.py``, reported by
``bench/decode_cost.py``) at the real E2B / E4B structures, on the meta device (no weights, a few seconds): the
counts are consistent, every weight byte a step needs is accounted for exactly once (the roofline's rule), and the
launches per step stay under a ceiling that may only go down; the time model's estimate adds up."""
import functools
import json

import pytest
import torch

from bench import byte_model, decode_cost, launch_recorder

# Launches per batch-1 decode step, at most. Measured 1,218 (E2B) and 1,373 (E4B) before the decode-step fusion
# (issue 11, whose target is 400 / 460): lower these when a change lowers the count, never raise them.
# Issue 20 folded the row-wise chains into the launches before them (target: 250 for E2B, 290 for E4B): the decode
# attention merge, the q|k|v tail, the post-attention chain, AltUp correct and the next layer's predict.
E2B_LAUNCH_CEILING = 246  # issue 11: at most 400 (measured 396); issue 20: at most 250 (measured 246)
E4B_LAUNCH_CEILING = 281  # issue 11: at most 460 (measured 456); issue 20: at most 290 (measured 281)
CEILING = {"e2b": E2B_LAUNCH_CEILING, "e4b": E4B_LAUNCH_CEILING}
BF16 = 2  # bytes per element


@functools.lru_cache(maxsize=None)
def _account(model: str, quantize: str | None = None) -> dict:
    return byte_model.account(model, context=1024, quantize=quantize, group_size=64)


@pytest.fixture(scope="module", params=["e2b", "e4b"])
def cost(request):
    return _account(request.param)


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
    the q|k|v projection with its norms, RoPE and K/V write 1, split decode attention's 1: its last split merges),
    the sparse FFN reading 5 % of its up / down rows, the K/V cache written one slot."""
    from torch import nn

    from gemma3n_fast.kernels.qkv_projection_norm_rope_cache import qkv_projection_norm_rope_cache
    from gemma3n_fast.kernels.sliding_window_decode import sliding_window_attention_decode
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn
    from gemma3n_fast.reference import ops

    meta, bf16 = torch.device("meta"), torch.bfloat16
    H, I, Hq, Hkv, D, S, R = 2048, 8192, 8, 2, 256, 512, 64
    holder = nn.Module()
    holder.device = meta
    qkv_width = (Hq + 2 * Hkv) * D
    for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down_t", (I, H)), ("qkv_laurel_left", (qkv_width + R, H)),
                        ("q_norm", (D,)), ("k_norm", (D,))):
        holder.register_parameter(name, nn.Parameter(torch.empty(shape, device=meta, dtype=bf16), False))
    k_cache, v_cache = (torch.empty(1, Hkv, S, D, device=meta, dtype=bf16) for _ in range(2))
    lr = launch_recorder
    rec = lr.Recorder(meta, lr.WeightMap(holder), {lr.storage_key(k_cache), lr.storage_key(v_cache)}, tokens=1)
    rec.active = True
    wrap = {name: lr.wrap_op(rec, name, fn, getattr(ops, name), byte_model.op_rules(name)) for name, fn in (
        ("sparse_ffn", sparse_ffn), ("qkv_projection_norm_rope_cache", qkv_projection_norm_rope_cache),
        ("sliding_window_attention_decode", sliding_window_attention_decode))}
    x = torch.empty(1, 1, H, device=meta, dtype=bf16)
    positions, k_pos = torch.zeros(1, 1, dtype=torch.int32, device=meta), torch.zeros(1, S, dtype=torch.int32,
                                                                                        device=meta)
    inv_freq, slots = torch.empty(D // 2, device=meta), torch.zeros(1, dtype=torch.long, device=meta)
    with lr.record_triton(rec), lr.CountAten(rec):
        wrap["sparse_ffn"](x, holder.gate, holder.up, holder.down_t, 1.6448)
        q, _ = wrap["qkv_projection_norm_rope_cache"](x, holder.qkv_laurel_left, qkv_width, holder.q_norm,
                                                      holder.k_norm, inv_freq, positions, k_cache, v_cache, slots)
        wrap["sliding_window_attention_decode"](q, k_cache, v_cache, positions, k_pos, window=S)
    assert [c.launches for c in rec.op_calls] == [3, 1, 1] and not any(c.plain_fallback for c in rec.op_calls)
    assert [l.name.split(":")[1] for l in rec.launches if l.kind == "Triton"] == [
        "_gemv_kernel", "_sparse_up_kernel", "_sparse_down_kernel", "_qkv_projection_norm_rope_cache_kernel",
        "_swa_decode_kernel"]
    # besides, at most the sparse FFN's cached workspace, zeroed on its first call in the process (a warm-up's job)
    assert {l.name for l in rec.launches if l.kind != "Triton"} <= {"zeros"}
    read = {}
    for t in rec.traffic:
        read[t.weight or t.group] = read.get(t.weight or t.group, 0) + t.read + t.written
    w = I * H * BF16
    assert read["gate"] == w and read["up"] == pytest.approx(0.05 * w) and read["down_t"] == pytest.approx(0.05 * w)
    assert read["qkv_laurel_left"] == (qkv_width + R) * H * BF16  # the fused projection's weight, once
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
    return _account(model, kind)


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


# ---- the time model (issue 20's yardstick) ------------------------------------------------------------------
# The E2B bf16 step's estimate, ms, at most (the held-out model gave 1.99 ms for the 396-launch step; this
# account measured 2.00 then, 1.64 at 246 launches): fewer launches at the floor only lower it, so lower this
# ceiling with them.
E2B_TIME_CEILING_MS = 1.8


def _check_time_model(c):
    t, la = c["time"], c["launches"]
    rows = t["per_launch"]
    assert len(rows) == t["launches"] == la["total"]
    assert t["unattributed_bytes"] == 0, "bytes moved by no recorded launch"
    # the launches carry the step's bytes; beyond them only re-reads of weights counted once per step
    assert c["bytes"]["total"] <= t["launch_bytes"] <= c["bytes"]["total"] + c["bytes"]["weights_read_by_launches"] \
        - c["bytes"]["weights"] + 1
    # each launch: the max of the floor and its bytes at its grid's share of the bandwidth; the class follows it
    for r in rows:
        share = min(r["programs"], t["sms"]) / t["sms"] if r["programs"] is not None else 1.0
        streaming = r["bytes"] / (t["bandwidth_Bps"] * share)
        assert r["s"] == max(t["launch_floor_s"], streaming)
        assert r["bound"] == ("floor" if t["launch_floor_s"] >= streaming else "bandwidth")
    # the sums
    assert t["step_s"] == pytest.approx(sum(r["s"] for r in rows), rel=1e-12)
    assert t["floor_launches"] + t["bandwidth_launches"] == t["launches"]
    assert t["floor_launches"] == sum(r["bound"] == "floor" for r in rows)
    assert t["floor_s"] == pytest.approx(t["launch_floor_s"] * t["floor_launches"], rel=1e-12)
    assert t["floor_s"] + t["bandwidth_s"] == pytest.approx(t["step_s"], rel=1e-12)
    assert sum(p["s"] for p in t["by_part"].values()) == pytest.approx(t["step_s"], rel=1e-12)
    assert sum(p["launches"] for p in t["by_part"].values()) == t["launches"]
    assert sum(k["s"] for k in t["by_kernel"].values()) == pytest.approx(t["step_s"], rel=1e-12)
    assert sum(lt["us_per_layer"] * len(lt["layers"]) for lt in t["layer_types"]) * 1e-6 == pytest.approx(
        t["by_part"]["layers"]["s"], rel=1e-12)
    for lt in t["layer_types"]:
        assert lt["launches_per_layer"] == sum(la["per_layer"][i]["total"] for i in lt["layers"]) / len(lt["layers"])
    assert t["tok_s"] == pytest.approx(c["batch"] / t["step_s"]) and t["per_token_s"] == t["step_s"] / c["batch"]
    # never under either floor: the memory one and the launches'
    assert t["step_s"] >= max(c["floor_s"] * (1 - 1e-9), t["launches"] * t["launch_floor_s"])


def test_time_model_adds_up(cost):
    _check_time_model(cost)


def test_time_model_quantized_adds_up(quantized_cost):
    _check_time_model(quantized_cost)


def test_time_model_estimates():
    """E2B bf16 lands near the issue's 1.99 ms per token; int4 weights (a quarter of the bytes) take less; E4B more."""
    e2b, e2b_int4, e4b = _account("e2b"), _account("e2b", "int4"), _account("e4b")
    ms = e2b["time"]["step_s"] * 1e3
    # 1.3 ms: under the 1.42 ms memory floor, so fusing launches away never trips it
    assert 1.3 <= ms <= E2B_TIME_CEILING_MS, f"E2B bf16: {ms:.3f} ms per step"
    assert e2b_int4["time"]["step_s"] < 0.7 * e2b["time"]["step_s"]
    assert e4b["time"]["step_s"] > e2b["time"]["step_s"]
    # the GPU's grids, whether or not this process runs the interpreter: the GEMVs fill the SMs
    assert max(v["max"] for k, v in e2b["launches"]["triton_programs"].items() if "gemv" in k) >= 132


def test_launch_floor_option(tmp_path, capsys):
    decode_cost.main(["--models", "smoke", "--context", "64", "--launch-floor-us", "1.3", "--json",
                      str(tmp_path / "cost.json")])
    out = capsys.readouterr().out
    assert "Time model:" in out and "| time model |" in out
    (r,) = json.loads((tmp_path / "cost.json").read_text())["results"]
    t = r["time"]
    assert t["launch_floor_s"] == pytest.approx(1.3e-6)
    assert t["floor_s"] == pytest.approx(1.3e-6 * t["floor_launches"])
    assert decode_cost.compact(r)["time_step_s"] == t["step_s"]


def test_launch_bytes_follow_the_op_rules():
    """An op-table call's bytes go to the launches that take each tensor: the sparse FFN's gate weight to its dense
    GEMV, its up rows (5 %) to the up kernel, its down rows to the down kernel."""
    from torch import nn

    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn
    from gemma3n_fast.reference import ops

    meta, bf16 = torch.device("meta"), torch.bfloat16
    H, I = 2048, 8192
    holder = nn.Module()
    holder.device = meta
    for name in ("gate", "up", "down_t"):
        holder.register_parameter(name, nn.Parameter(torch.empty(I, H, device=meta, dtype=bf16), False))
    lr = launch_recorder
    rec = lr.Recorder(meta, lr.WeightMap(holder), set(), tokens=1)
    rec.active = True
    op = lr.wrap_op(rec, "sparse_ffn", sparse_ffn, ops.sparse_ffn, byte_model.op_rules("sparse_ffn"))
    with byte_model.compiled_launch_configs(), lr.record_triton(rec), lr.CountAten(rec):
        op(torch.empty(1, 1, H, device=meta, dtype=bf16), holder.gate, holder.up, holder.down_t, 1.6448)
    kernel = {i: l.name.split(":")[1] for i, l in enumerate(rec.launches)}
    by_launch = {}
    for t in rec.traffic:
        if t.weight is not None:
            by_launch[t.weight] = (kernel[t.launch], by_launch.get(t.weight, (None, 0))[1] + t.read)
    w = I * H * BF16
    assert by_launch["gate"] == ("_gemv_kernel", w)
    assert by_launch["up"][0] == "_sparse_up_kernel" and by_launch["up"][1] == pytest.approx(0.05 * w)
    assert by_launch["down_t"][0] == "_sparse_down_kernel" and by_launch["down_t"][1] == pytest.approx(0.05 * w)
    assert all(t.launch is not None for t in rec.traffic)
