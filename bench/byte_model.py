"""Gemma 3n's decode-step byte model: what one batch-1 decode step of gemma3n_fast launches and moves, counted on
the meta device (no GPU, no weights) by bench/launch_recorder.py, and the roofline's bytes of any step.

``account(model)`` builds the fast model at the real E2B / E4B text structure (``bench/configs.py``, i.e.
``reference/config.py``'s ``E2B_TEXT`` / ``E4B_TEXT``) on the meta device, with the op table in its "triton" mode
(the real kernel launchers), and runs one decode step the way ``gemma3n_fast/generate.py``'s ``_step`` runs it,
through a ``DecodeState`` (one step first as a warm-up, as the graph capture does; the second is counted). The
launchers pick their grids and workspaces as for compiled kernels on an H100 (``compiled_launch_configs``), also in
a process that runs the Triton interpreter. What is Gemma-specific lives here:

* ``ARG_TRAFFIC``: op-table arguments whose bytes are not "read whole" (KV caches are written one slot per new
  token, the sparse FFN reads its active up rows / down columns only, the embedding gathers read one row per token);
* ``PLAIN_OP_LAUNCHES``: launches assumed for a launcher that cannot run on meta (normally unused);
* ``WEIGHT_GROUPS``: how weight bytes are reported (gate|up, down, LM head, ...);
* the layers: ``FastGemma3n._layer(i, ...)`` is wrapped, so a launch belongs to the layer whose call it happens in;
  the rest is the prologue (before the first layer), "between layers" or the epilogue.

Bytes per token = weights (each weight byte counted once per step: a re-read of a small weight, e.g. the AltUp
router in predict and correct, stays in L2) + K/V (every attention read, every cache write) + activations (every
launch's reads and writes of everything else, as launched today). Floor = bytes / bandwidth (default 3.0 TB/s,
the H100's measured copy bandwidth). The step decodes at the last column of a ``context``-slot cache, so the
full-attention layers read every slot whether or not they bound their scan by the position.

The time model (``time_model``, held out from the kernels: nothing in it is tuned to them): a launch takes
max(``LAUNCH_FLOOR_S``, its bytes / its share of the bandwidth), where a launch of P programs gets min(P, SMs) / SMs
of it (one program runs on one SM, and one SM alone cannot pull the whole bandwidth); it is "at the latency floor"
when the first term wins, "bandwidth-bound" otherwise. The step's estimate is the sum over its launches (a stream
runs them one after another). A launch's bytes are its op's (launch_recorder: ``Traffic.launch``), so partial reads
stay partial; a small weight read again in the step (the AltUp router, the tied LM head's table) counts in each
launch that reads it, so the launches' bytes exceed the step's weights-once total by those re-reads.

``roofline_bytes(text_config, ...)``: the bytes a decode step must move at least, by rule (every text weight
once, one per-layer-embedding row per sequence, K/V reads at a context), for the end-to-end benchmark's roofline
and as the account's check (tests/test_decode_cost.py).
"""
from __future__ import annotations

import contextlib
import inspect
import re
import time
from collections import Counter, defaultdict

import torch

from bench.launch_recorder import (KINDS, CountAten, Recorder, WeightMap, record_triton, storage_key, wrap_layers,
                                   wrap_op)

H100_COPY_BANDWIDTH = 3.0e12  # bytes/s, read + write, measured by bench/common.py::device_bandwidth on an H100
# The time model's cost of a launch that moves (almost) nothing: launch + the kernel's latency, back to back on one
# stream. 2 us is a plain launch's; the best batch-1 decoders measure ~1.3 us per launch inside a CUDA graph
# (python -m bench.decode_cost --launch-floor-us 1.3).
LAUNCH_FLOOR_S = 2e-6

# ---- op-table ops ---------------------------------------------------------------------------------------------
# Launches of an op-table op whose launcher cannot run on meta tensors (then its plain op runs and this many
# Triton launches are assumed; the output lists such ops under "plain_op_fallbacks"). Normally unused: the
# launchers run on meta and their launches are counted as they happen.
PLAIN_OP_LAUNCHES = {"sparse_ffn": 3, "sparse_ffn_altup_correct": 3, "sliding_window_attention_decode": 1}

SPARSE_ACTIVE_FRACTION = 0.05  # channels active after the Gaussian top-k at sparsity 0.95 (sparse_ffn_bytes' default)


def sparse_fraction() -> float:
    try:
        from gemma3n_fast.kernels.sparse_ffn import sparse_ffn_bytes

        return float(inspect.signature(sparse_ffn_bytes).parameters["active_fraction"].default)
    except Exception:  # noqa: BLE001 - the module moved or changed: keep the documented value
        return SPARSE_ACTIVE_FRACTION


def _one_slot_per_token(t: torch.Tensor, bound: dict, tokens: int):
    """A KV cache [B, Hkv, S, D] argument: the new tokens' slots are written, nothing is read."""
    slot = t.numel() // max(t.shape[-2], 1) * t.element_size()
    return 0, slot * tokens


def _active_rows(t: torch.Tensor, bound: dict, tokens: int):
    """A sparse FFN's up weight / transposed down weight [I, H]: only the active channels' rows are read, per row
    of x (each row its own channels)."""
    x = bound.get("x")
    rows = x.numel() // x.shape[-1] if isinstance(x, torch.Tensor) else 1
    return rows * sparse_fraction() * t.numel() * t.element_size(), 0


def _gathered_rows(t: torch.Tensor, bound: dict, tokens: int):
    """An embedding table [V, n] argument of ``token_embeddings``: one row per token id is read."""
    ids = bound.get("input_ids")
    n = ids.numel() if isinstance(ids, torch.Tensor) else 1
    return n * t.shape[-1] * t.element_size(), 0


def _not_read(t: torch.Tensor, bound: dict, tokens: int):
    """``token_embeddings``' multimodal hard table: a token reads one row of it OR of the text table (counted there)."""
    return 0, 0


# Op-table arguments for which "read whole" is wrong: op name ("*": any op) -> argument name -> rule
# (tensor, bound arguments, new tokens) -> (bytes read, bytes written) (launch_recorder.ArgRule).
ARG_TRAFFIC = {
    "*": {"k_cache": _one_slot_per_token, "v_cache": _one_slot_per_token},
    "sparse_ffn": {"up_weight": _active_rows, "down_weight_t": _active_rows},
    "sparse_ffn_altup_correct": {"up_weight": _active_rows, "down_weight_t": _active_rows},
    "token_embeddings": {"embed_weight": _gathered_rows, "per_layer_weight": _gathered_rows,
                         "hard_embeddings": _not_read},
}

# ---- weight groups --------------------------------------------------------------------------------------------
# (group, pattern on the weight's name without the "model.language_model." prefix); the first match wins.
WEIGHT_GROUPS = (
    ("gate|up", r"mlp\.(gate|up)_proj\.|gate_up"),
    ("down", r"mlp\.down_proj\.|down_"),
    ("LM head", r"^embed_tokens\.weight(\.data|\.scales)?$"),  # tied: the LM head reads the whole table, the token gather one row
    ("q|k|v", r"self_attn\.[qkv]_proj\.|qkv"),
    ("o", r"self_attn\.o_proj\."),
    ("per-layer inputs", r"per_layer"),
    ("AltUp", r"altup"),
    ("LAuReL", r"laurel"),
    ("norms", r"norm"),
    ("other weights", r""),
)
BYTE_GROUPS = tuple(g for g, _ in WEIGHT_GROUPS) + ("KV", "activations")


def op_rules(name: str) -> dict:
    """The byte rules of op-table op ``name``'s arguments (``ARG_TRAFFIC``'s "*" entries, then its own)."""
    return {**ARG_TRAFFIC.get("*", {}), **ARG_TRAFFIC.get(name, {})}


def weight_group(name: str) -> str:
    short = name.removeprefix("model.").removeprefix("language_model.")
    for group, pattern in WEIGHT_GROUPS:
        if re.search(pattern, short):
            return group
    return "other weights"


LAYER_METHODS = ("_layer",)  # the fast model's methods that run one decoder layer, first argument the layer index


# ---- building the model on meta -------------------------------------------------------------------------------
def text_config(model: str):
    from bench import configs
    from gemma3n_fast.reference.config import TextConfig

    return TextConfig.from_dict(dict(configs.model_dict(model)["text_config"]))


def build_meta_model(model: str, dtype: torch.dtype, quantize: str | None = None, group_size: int = 64):
    """-> (fast model on meta with the op table in its "triton" mode, how it was built). ``quantize``: its
    matrices quantized as ``load(quantize=...)`` stores them (``reference.model.quantize_model``)."""
    from gemma3n_fast import backend as backend_module
    from gemma3n_fast.model import from_reference
    from gemma3n_fast.reference.config import Gemma3nConfig
    from gemma3n_fast.reference.model import Gemma3nReference, quantize_model

    cfg = Gemma3nConfig(text=text_config(model), audio=None, vision=None, text_only=True)
    with torch.device("meta"):
        ref = Gemma3nReference(cfg)
    ref = quantize_model(ref.to(dtype).eval().requires_grad_(False), quantize, group_size)
    real_pick = backend_module.pick_mode

    def pick_triton(mode, device):  # the kernel mode on meta: the launchers only look at shapes
        return "triton" if torch.device(device).type == "meta" else real_pick(mode, device)

    backend_module.pick_mode = pick_triton
    try:
        return from_reference(ref, kernels="triton"), "triton mode on meta"
    except Exception as e:  # noqa: BLE001 - build in reference mode and put the launchers in
        how = f"reference mode + kernel launchers (the triton mode failed on meta: {type(e).__name__}: {e})"
    finally:
        backend_module.pick_mode = real_pick
    import importlib

    with torch.device("meta"):
        ref = Gemma3nReference(cfg)
    ref = quantize_model(ref.to(dtype).eval().requires_grad_(False), quantize, group_size)
    fast = from_reference(ref, kernels="reference")
    for name in list(fast.backend.sources):
        module = backend_module.KERNEL_MODULES.get(name, name)
        setattr(fast.backend, name, getattr(importlib.import_module(f"gemma3n_fast.kernels.{module}"), name))
        fast.backend.sources[name] = "kernel"
    return fast, how


def layer_type(cfg, i: int) -> str:
    own = "KV-owning" if i < cfg.first_kv_shared_layer else "KV-shared"
    att = "sliding" if cfg.is_sliding(i) else "full"
    ffn = "sparse FFN" if cfg.activation_sparsity_pattern[i] > 0 else "dense FFN"
    return f"{own} {att}, {ffn}"


@contextlib.contextmanager
def compiled_launch_configs():
    """The launchers choose their grids as for compiled kernels (on an H100) for the duration, even in a process
    that runs the Triton interpreter (the tests): the launchers read ``INTERPRETING`` on the host to pick small
    interpreter-friendly grids, and the time model needs the GPU's. Only host-side choices see it: the account
    builds its model on meta and the recorder replaces Triton's launch, so no kernel runs meanwhile."""
    from gemma3n_fast.kernels._common import INTERPRETING

    saved = INTERPRETING.value
    INTERPRETING.value = False
    try:
        yield
    finally:
        INTERPRETING.value = saved


# ---- the accounting -------------------------------------------------------------------------------------------
def account(model: str = "e2b", *, context: int = 1024, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
            bandwidth: float = H100_COPY_BANDWIDTH, quantize: str | None = None, group_size: int = 64,
            launch_floor: float = LAUNCH_FLOOR_S) -> dict:
    """Launches, bytes and the time model's estimate of one decode step of ``model`` ("e2b", "e4b", "smoke"), its
    weights in ``dtype`` or quantized (``quantize`` "int8" | "int4", ``group_size``); see the module docstring.
    The launchers choose their grids (and size their workspaces) as for compiled kernels, in any process."""
    with compiled_launch_configs():  # the model's workspaces are sized then too: build it inside
        return _account(model, context=context, batch=batch, dtype=dtype, bandwidth=bandwidth, quantize=quantize,
                        group_size=group_size, launch_floor=launch_floor)


def _account(model, *, context, batch, dtype, bandwidth, quantize, group_size, launch_floor) -> dict:
    from gemma3n_fast import reference
    from gemma3n_fast.generate import DecodeState, _step
    from gemma3n_fast.reference.generation import GenerationPlan, Sampler

    t0 = time.perf_counter()
    fast, how = build_meta_model(model, dtype, quantize, group_size)
    cfg = fast.text_config
    context = min(context, cfg.max_position_embeddings)
    plan = GenerationPlan(sampler=Sampler.from_args(False), max_new_tokens=context, eos=[1], pad=0)  # greedy
    st = DecodeState(fast, batch, context, plan)
    kv = {storage_key(t) for t in [*st.cache.k, *st.cache.v, *st.cache.pos.values()]}
    rec = Recorder(fast.device, WeightMap(fast, weight_group), kv, tokens=1)
    for name in list(fast.backend.sources):
        setattr(fast.backend, name, wrap_op(rec, name, getattr(fast.backend, name), getattr(reference.ops, name, None),
                                            op_rules(name), PLAIN_OP_LAUNCHES.get(name, 1)))
    wrapped = wrap_layers(rec, fast, LAYER_METHODS)
    with torch.no_grad(), record_triton(rec), CountAten(rec):
        _step(fast, st)  # warm-up: cached workspaces are allocated here, as before a graph capture
        rec.active = True
        _step(fast, st)
    if not wrapped or not rec.layers_begun:
        raise RuntimeError(f"byte_model: no decoder layer call was seen (wrapped {wrapped or 'nothing'}); add the "
                           "fast model's per-layer method to bench.byte_model.LAYER_METHODS")
    out = summarize(rec, cfg, model=model, how=how, context=context, batch=batch, dtype=dtype,
                    bandwidth=bandwidth, seconds=time.perf_counter() - t0)
    out["time"] = time_model(rec, cfg, bandwidth=bandwidth, launch_floor=launch_floor, batch=batch)
    out["quantize"] = None if quantize is None else quantize + (f" G={group_size}" if quantize == "int4" else "")
    return out


def _part(layer, begun, n_layers_begun) -> str:
    if layer is not None:
        return "layers"
    if begun == 0:
        return "prologue"
    return "epilogue" if begun == n_layers_begun else "between layers"


def summarize(rec: Recorder, cfg, *, model, how, context, batch, dtype, bandwidth, seconds) -> dict:
    L = cfg.num_hidden_layers
    kinds = dict.fromkeys(KINDS, 0)
    by_kind = Counter(l.kind for l in rec.launches)
    parts = {p: dict(kinds) for p in ("prologue", "layers", "between layers", "epilogue")}
    per_layer = [dict(kinds) for _ in range(L)]
    for l in rec.launches:
        parts[_part(l.layer, l.layers_begun, rec.layers_begun)][l.kind] += 1
        if l.layer is not None:
            per_layer[l.layer][l.kind] += 1
    for d in [*parts.values(), *per_layer]:
        d["total"] = sum(d[k] for k in KINDS)
    types: dict[str, list[int]] = {}
    for i in range(L):
        types.setdefault(layer_type(cfg, i), []).append(i)
    layer_types = []
    for t, idx in types.items():
        rows = [per_layer[i] for i in idx]
        layer_types.append(dict(type=t, layers=idx, per_layer={k: rows[0][k] for k in (*KINDS, "total")},
                                uniform=all(r == rows[0] for r in rows),
                                min_total=min(r["total"] for r in rows), max_total=max(r["total"] for r in rows)))

    # bytes
    read_by_weight = defaultdict(float)
    group_bytes = dict.fromkeys(BYTE_GROUPS, 0.0)
    kv_bytes = act_bytes = 0.0
    layer_bytes = defaultdict(float)
    op_bytes, act_by_op = Counter(), Counter()
    for tr in rec.traffic:
        op_bytes[tr.op] += tr.read + tr.written
        if tr.group == "activations":
            act_by_op[tr.op] += tr.read + tr.written
        if tr.weight is not None:
            read_by_weight[tr.weight] += tr.read + tr.written
        elif tr.group == "KV":
            kv_bytes += tr.read + tr.written
        else:
            act_bytes += tr.read + tr.written
        if tr.layer is not None:
            layer_bytes[tr.layer] += tr.read + tr.written
    wm = rec.weights
    weights_unique = {n: min(b, wm.size[n]) for n, b in read_by_weight.items()}
    for n, b in weights_unique.items():
        group_bytes[wm.group[n]] += b
    group_bytes["KV"], group_bytes["activations"] = kv_bytes, act_bytes
    weight_total = sum(weights_unique.values())
    total = weight_total + kv_bytes + act_bytes
    floor_s = total / bandwidth
    partial = sorted(n for n, b in weights_unique.items() if b < wm.size[n])
    unread = sorted(n for n in wm.leaves if n not in read_by_weight)

    triton = Counter(l.name for l in rec.launches if l.kind == "Triton")
    programs = defaultdict(list)
    for l in rec.launches:
        if l.kind == "Triton" and l.programs is not None:
            programs[l.name].append(l.programs)
    op_calls = defaultdict(lambda: dict(calls=0, launches=0))
    for c in rec.op_calls:
        op_calls[c.name]["calls"] += 1
        op_calls[c.name]["launches"] += c.launches
    fallbacks = sorted({f"{c.name}: {c.plain_fallback}" for c in rec.op_calls if c.plain_fallback})
    return dict(
        model=model, dtype=str(dtype).removeprefix("torch."), batch=batch, context=context,
        layers=L, first_kv_shared_layer=cfg.first_kv_shared_layer, built=how,
        launches=dict(total=len(rec.launches), by_kind={k: by_kind.get(k, 0) for k in KINDS}, by_part=parts,
                      layer_types=layer_types, per_layer=per_layer,
                      aten_ops=dict(Counter(l.name for l in rec.launches if l.kind != "Triton").most_common()),
                      triton_kernels=dict(triton.most_common()),
                      triton_programs={k: dict(launches=len(v), min=min(v), max=max(v)) for k, v in programs.items()},
                      op_table=dict(op_calls)),
        bytes=dict(total=total, weights=weight_total, kv=kv_bytes, activations=act_bytes, by_group=group_bytes,
                   loaded_weights=sum(b - a for segs in wm.segments.values() for a, b, _ in segs),
                   weights_read_by_launches=sum(read_by_weight.values()),
                   per_weight={n: dict(size=wm.size[n], read=read_by_weight.get(n, 0.0), group=wm.group[n],
                                       parameter=wm.is_parameter[n]) for n in wm.leaves},
                   weights_partly_read=partial, weights_not_read=unread,
                   per_layer=[layer_bytes[i] for i in range(L)], by_op=dict(op_bytes.most_common()),
                   activations_by_op=dict(act_by_op.most_common())),
        bandwidth_Bps=bandwidth, floor_s=floor_s, floor_tok_s=batch / floor_s,
        host_reads=rec.host_reads, triton_outside_op_table=dict(rec.outside_table), plain_op_fallbacks=fallbacks,
        seconds=seconds,
    )


# ---- the time model ------------------------------------------------------------------------------------------
def launch_time(nbytes: float, programs: int | None, *, bandwidth: float, launch_floor: float,
                sms: int) -> tuple[float, str]:
    """-> (seconds, "floor" | "bandwidth") of one launch moving ``nbytes`` with ``programs`` programs (None: an aten
    kernel, whose grid is not seen, counted as filling every SM)."""
    share = min(programs, sms) / sms if programs is not None else 1.0
    streaming = nbytes / (bandwidth * share)
    return (launch_floor, "floor") if launch_floor >= streaming else (streaming, "bandwidth")


def time_model(rec: Recorder, cfg, *, bandwidth: float, launch_floor: float = LAUNCH_FLOOR_S,
               batch: int = 1) -> dict:
    """The time model's estimate of the recorded step (module docstring): per launch, per part, per layer type, per
    kernel and per step, each split into launches at the latency floor and bandwidth-bound ones."""
    from gemma3n_fast.kernels._common import H100_SMS

    nbytes = [0.0] * len(rec.launches)
    unattributed = 0.0
    for tr in rec.traffic:
        if tr.launch is None:
            unattributed += tr.read + tr.written
        else:
            nbytes[tr.launch] += tr.read + tr.written
    per_launch = []
    for l, b in zip(rec.launches, nbytes):
        s, bound = launch_time(b, l.programs, bandwidth=bandwidth, launch_floor=launch_floor, sms=H100_SMS)
        per_launch.append(dict(name=l.name, kind=l.kind, layer=l.layer, part=_part(l.layer, l.layers_begun,
                                                                                    rec.layers_begun),
                               programs=l.programs, bytes=b, s=s, bound=bound))

    def tally(rows) -> dict:
        floor = [r for r in rows if r["bound"] == "floor"]
        bw = [r for r in rows if r["bound"] == "bandwidth"]
        return dict(launches=len(rows), floor_launches=len(floor), bandwidth_launches=len(bw),
                    s=sum(r["s"] for r in rows), floor_s=sum(r["s"] for r in floor),
                    bandwidth_s=sum(r["s"] for r in bw), bytes=sum(r["bytes"] for r in rows))

    step = tally(per_launch)
    L = cfg.num_hidden_layers
    per_layer = [tally([r for r in per_launch if r["layer"] == i]) for i in range(L)]
    types: dict[str, list[int]] = {}
    for i in range(L):
        types.setdefault(layer_type(cfg, i), []).append(i)
    layer_types = []
    for t, idx in types.items():
        rows = [per_layer[i] for i in idx]
        n = len(idx)
        layer_types.append(dict(type=t, layers=idx, launches_per_layer=sum(r["launches"] for r in rows) / n,
                                floor_launches_per_layer=sum(r["floor_launches"] for r in rows) / n,
                                us_per_layer=sum(r["s"] for r in rows) / n * 1e6,
                                min_us=min(r["s"] for r in rows) * 1e6, max_us=max(r["s"] for r in rows) * 1e6,
                                s=sum(r["s"] for r in rows)))
    parts = {p: tally([r for r in per_launch if r["part"] == p])
             for p in ("prologue", "layers", "between layers", "epilogue")}
    kernels = defaultdict(list)
    for r in per_launch:
        kernels[r["name"]].append(r)
    by_kernel = dict(sorted(((k, tally(v)) for k, v in kernels.items()), key=lambda kv: -kv[1]["s"]))
    return dict(launch_floor_s=launch_floor, sms=H100_SMS, bandwidth_Bps=bandwidth,
                step_s=step["s"], per_token_s=step["s"] / batch, tok_s=batch / step["s"] if step["s"] else 0.0,
                launches=step["launches"], floor_launches=step["floor_launches"],
                bandwidth_launches=step["bandwidth_launches"], floor_s=step["floor_s"],
                bandwidth_s=step["bandwidth_s"], launch_bytes=step["bytes"], unattributed_bytes=unattributed,
                grid_unknown=sum(1 for r in per_launch if r["programs"] is None),
                by_part=parts, layer_types=layer_types, per_layer=per_layer, by_kernel=by_kernel,
                per_launch=per_launch)


# ---- the roofline ---------------------------------------------------------------------------------------------
def roofline_bytes(text_config, *, context: int, batch: int = 1, elem: int = 2, quantize: str | None = None,
                   group_size: int = 64) -> dict:
    """The bytes one decode step of ``batch`` sequences must move at least, by rule, in ``elem``-byte weights and K/V:

    * ``weights``: every text-decoder weight once (the tied LM head: the whole table once), except the per-layer token
      table, of which each sequence gathers one row (``ple_row``): ``weights`` includes ``batch`` such rows;
    * ``kv``: the K and V every attention layer reads with ``context`` cached tokens (sliding layers at most their
      window; a KV-shared layer reads its producer's cache again);
    * ``total``: their sum.

    ``quantize`` ("int8" | "int4", ``group_size``): the weights ``load(quantize=...)`` quantizes count their packed
    values and scales (``reference.quant.quantized_nbytes``), the rest ``elem`` bytes per element.
    text_config: a ``TextConfig`` or its dict. The model is built on the meta device: no weights, instant at E4B size.
    ``account`` at batch 1 reads these weights (less the inactive part of the sparse FFNs) and this K/V (plus one
    written slot per KV-owning layer): tests/test_decode_cost.py checks it.
    """
    from gemma3n_fast.reference.config import TextConfig
    from gemma3n_fast.reference.text import Gemma3nTextModel

    cfg = text_config if isinstance(text_config, TextConfig) else TextConfig.from_dict(dict(text_config))
    with torch.device("meta"):
        model = Gemma3nTextModel(cfg)
    from gemma3n_fast.reference.model import quantized_layout
    from gemma3n_fast.reference.quant import quantized_nbytes

    def nbytes(name: str, p: torch.Tensor) -> int:
        layout = quantized_layout(cfg, f"language_model.{name}") if quantize else None
        if layout is None:
            return p.numel() * elem
        N, K = p.shape if layout != "transposed" else p.shape[::-1]
        return quantized_nbytes(N, K, quantize, group_size)

    table = model.embed_tokens_per_layer.weight
    ple_row = nbytes("embed_tokens_per_layer.weight", table[:1])
    weights = sum(nbytes(n, p) for n, p in model.named_parameters()
                  if n != "embed_tokens_per_layer.weight") + batch * ple_row
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * elem  # K and V of one layer
    tokens = sum(min(context, cfg.sliding_window) if cfg.is_sliding(i) else context
                 for i in range(cfg.num_hidden_layers))
    kv = batch * tokens * per_token
    return dict(weights=float(weights), ple_row=float(ple_row), kv=float(kv), total=float(weights + kv))
