"""Launches and bytes of ONE batch-1 decode step of gemma3n_fast, counted on the meta device (no GPU, no weights).

    python -m bench.decode_cost [--models e2b,e4b] [--context 1024] [--bandwidth-tbs 3.0] [--dtype bfloat16]
                                [--json PATH] [--dry-run]

How it counts. The fast model is built at the real E2B / E4B text structure (``bench/configs.py``, i.e.
``reference/config.py``'s ``E2B_TEXT`` / ``E4B_TEXT``) on the meta device, with the op table in its "triton" mode
(the real kernel launchers), and one decode step runs the way ``gemma3n_fast/generate.py``'s ``_step`` runs it,
through a ``DecodeState`` (one step first as a warm-up, as the graph capture does; the second is counted):

* every aten op that would launch a GPU kernel is recorded by a ``TorchDispatchMode`` (views, metadata ops,
  allocations and ops on host tensors are not launches); one aten op = one launch (a few aten ops launch more
  on CUDA, e.g. ``isin``: not modelled);
* every op of the model's op table (``model.backend.<name>`` for each name in ``backend.sources``: whatever the
  table holds) runs its REAL kernel launcher on meta tensors, with Triton's launch (``JITFunction.run``, the
  interpreter's and the autotuner's ``run``) replaced by a recorder: the launch count, kernel names and grids are
  the launcher's own decisions at these shapes (split + reduce of decode attention, the 3 launches of the sparse
  FFN, ...), and aten ops a launcher issues itself (a ``.contiguous()`` copy) are counted too. A launcher that
  cannot run on meta falls back to its plain op (counted as ``PLAIN_OP_LAUNCHES``, default 1; the output says so);
* bytes: each launch reads its tensor inputs and writes its outputs at their real sizes (views: their elements
  only), with the exceptions in ``_CountAten._traffic`` (gathers read the rows they return, indexed writes write the
  source's bytes, in-place fills do not read) and ``ARG_TRAFFIC`` (op-table arguments: KV caches are written one
  slot per new token, the sparse FFN reads its active up rows / down columns only). A weight is recognised by its
  storage: the bytes of a read are split over the parameters (or tensor attributes of the modules) whose byte
  ranges it covers, so fused matrices (q|k|v, gate|up) are attributed to their parts;
* layers: ``FastGemma3n._layer(i, ...)`` is wrapped on the instance, so a launch belongs to the layer whose call
  it happens in; the rest is the prologue (before the first layer), "between layers" or the epilogue.

Bytes per token = weights (each weight byte counted once per step: a re-read of a small weight, e.g. the AltUp
router in predict and correct, stays in L2) + K/V (every attention read, every cache write) + activations (every
launch's reads and writes of everything else, as launched today). Floor = bytes / bandwidth (default 3.0 TB/s,
the H100's measured copy bandwidth). The step decodes at the last column of a ``--context``-slot cache, so the
full-attention layers read every slot whether or not they bound their scan by the position.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("GEMM", "elementwise", "copy/cat", "indexing", "reduction", "Triton")
H100_COPY_BANDWIDTH = 3.0e12  # bytes/s, read + write, measured by bench/common.py::device_bandwidth on an H100
H100_SMS = 132  # a Triton grid smaller than this leaves SMs idle (batch-1 row-wise kernels: 1 program)

# ---- aten ops: which launch, and what kind --------------------------------------------------------------------
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "matmul", "linear", "_scaled_mm",
         "_int_mm", "convolution", "_convolution"}
_COPY = {"copy", "_to_copy", "clone", "cat", "stack", "_copy_from", "_copy_from_and_resize", "slice_scatter",
         "select_scatter", "as_strided_scatter", "diagonal_scatter", "repeat", "constant_pad_nd", "flip", "roll",
         "expand_copy", "permute_copy", "view_copy", "t_copy", "transpose_copy", "unsqueeze_copy", "squeeze_copy",
         "alias_copy", "slice_copy", "select_copy"}
_INDEXING = {"index_copy", "index", "_unsafe_index", "index_select", "index_put", "_index_put_impl",
             "_unsafe_index_put", "embedding", "gather", "scatter", "scatter_add", "scatter_reduce", "take",
             "index_add", "index_fill", "index_reduce", "masked_scatter", "masked_select", "put"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "aminmax", "var", "std", "var_mean",
              "std_mean", "prod", "norm", "linalg_vector_norm", "logsumexp", "_softmax", "_log_softmax", "softmax",
              "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "topk", "sort", "argsort",
              "any", "all", "count_nonzero", "median", "nanmedian", "kthvalue", "mode", "nansum", "unique",
              "_unique2", "unique_consecutive"}
# Not launches: allocations, metadata, views whose schema does not say so (``func.is_view`` covers the rest).
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "empty_permuted",
              "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "lift_fresh", "detach",
              "_unsafe_view", "_reshape_alias", "resize_", "resize_as_", "set_", "record_stream", "as_strided_",
              "_assert_async", "_assert_tensor_metadata", "_functional_assert_async"}
# Host reads of a device value: a sync (and a graph-capture failure). On meta they return 0 and are reported.
_HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero"}
_GATHERS = {"embedding", "index", "_unsafe_index", "index_select", "gather", "take", "masked_select"}
_WRITE_ONLY = {"copy", "fill", "zero", "normal", "uniform", "exponential", "random", "bernoulli", "geometric",
               "cauchy", "log_normal", "index_copy", "index_put", "_index_put_impl", "_unsafe_index_put",
               "masked_fill", "index_fill", "scatter"}  # in place: the target is written, not read
_WRITE_SOURCE = {"index_copy", "index_put", "_index_put_impl", "_unsafe_index_put", "index_add", "scatter",
                 "scatter_add", "masked_scatter", "put"}  # in place: only the source's elements are written


def aten_kind(base: str) -> str:
    if base in _GEMM:
        return "GEMM"
    if base in _COPY:
        return "copy/cat"
    if base in _INDEXING:
        return "indexing"
    if base in _REDUCTION:
        return "reduction"
    return "elementwise"


# ---- op-table ops ---------------------------------------------------------------------------------------------
# Launches of an op-table op whose launcher cannot run on meta tensors (then its plain op runs and this many
# Triton launches are assumed; the output lists such ops under "plain_op_fallbacks"). Normally unused: the
# launchers run on meta and their launches are counted as they happen.
PLAIN_OP_LAUNCHES = {"sparse_ffn": 3, "sliding_window_attention_decode": 2}

SPARSE_ACTIVE_FRACTION = 0.05  # channels active after the Gaussian top-k at sparsity 0.95 (sparse_ffn_bytes' default)


def _sparse_fraction() -> float:
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
    return rows * _sparse_fraction() * t.numel() * t.element_size(), 0


def _gathered_rows(t: torch.Tensor, bound: dict, tokens: int):
    """An embedding table [V, n] argument of ``token_embeddings``: one row per token id is read."""
    ids = bound.get("input_ids")
    n = ids.numel() if isinstance(ids, torch.Tensor) else 1
    return n * t.shape[-1] * t.element_size(), 0


def _not_read(t: torch.Tensor, bound: dict, tokens: int):
    """``token_embeddings``' multimodal hard table: a token reads one row of it OR of the text table (counted there)."""
    return 0, 0


# Op-table arguments for which "read whole" is wrong: op name ("*": any op) -> argument name -> rule
# (tensor, bound arguments, new tokens) -> (bytes read, bytes written). Arguments named ``out*`` are outputs
# (counted as written through the result) and ``workspace*`` scratch that stays in L2: neither is read.
ARG_TRAFFIC = {
    "*": {"k_cache": _one_slot_per_token, "v_cache": _one_slot_per_token},
    "sparse_ffn": {"up_weight": _active_rows, "down_weight_t": _active_rows},
    "token_embeddings": {"embed_weight": _gathered_rows, "per_layer_weight": _gathered_rows,
                         "hard_embeddings": _not_read},
}

# ---- weight groups --------------------------------------------------------------------------------------------
# (group, pattern on the weight's name without the "model.language_model." prefix); the first match wins.
WEIGHT_GROUPS = (
    ("gate|up", r"mlp\.(gate|up)_proj\.|gate_up"),
    ("down", r"mlp\.down_proj\.|down_"),
    ("LM head", r"^embed_tokens\.weight$"),  # tied: the LM head reads the whole table, the token gather one row
    ("q|k|v", r"self_attn\.[qkv]_proj\.|qkv"),
    ("o", r"self_attn\.o_proj\."),
    ("per-layer inputs", r"per_layer"),
    ("AltUp", r"altup"),
    ("LAuReL", r"laurel"),
    ("norms", r"norm"),
    ("other weights", r""),
)
BYTE_GROUPS = tuple(g for g, _ in WEIGHT_GROUPS) + ("KV", "activations")


def weight_group(name: str) -> str:
    short = name.removeprefix("model.").removeprefix("language_model.")
    for group, pattern in WEIGHT_GROUPS:
        if re.search(pattern, short):
            return group
    return "other weights"


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of the storage a tensor (view) spans."""
    e = t.element_size()
    if t.numel() == 0:
        return t.storage_offset() * e, t.storage_offset() * e
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.storage_offset() * e, (t.storage_offset() + extent) * e


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class WeightMap:
    """Every weight of the model by storage: the byte ranges of its named tensors, cut into segments each owned by
    the smallest named tensor covering it (a parameter over a tensor attribute of the same range)."""

    def __init__(self, model: torch.nn.Module):
        named: dict[str, tuple[torch.Tensor, bool]] = {}
        for mname, mod in model.named_modules():
            prefix = f"{mname}." if mname else ""
            for pname, p in mod.named_parameters(recurse=False):
                named.setdefault(prefix + pname, (p, True))
            for bname, b in mod.named_buffers(recurse=False):
                if b is not None:
                    named.setdefault(prefix + bname, (b, False))
            for aname, v in vars(mod).items():
                if isinstance(v, torch.Tensor) and not aname.startswith("_") and v.device == model.device:
                    named.setdefault(prefix + aname, (v, False))
        self.tensors = named
        self.is_parameter = {n: p for n, (_, p) in named.items()}
        self.size = {n: t.numel() * t.element_size() for n, (t, _) in named.items()}
        self.group = {n: weight_group(n) for n in named}
        by_storage = defaultdict(list)
        for n, (t, param) in named.items():
            lo, hi = _byte_range(t)
            if hi > lo:
                by_storage[_storage_key(t)].append((lo, hi, n, param))
        self.segments: dict[int, list[tuple[int, int, str]]] = {}
        for key, items in by_storage.items():
            cuts = sorted({x for lo, hi, _, _ in items for x in (lo, hi)})
            segs = []
            for a, b in zip(cuts, cuts[1:]):
                owners = [(hi - lo, not param, n) for lo, hi, n, param in items if lo <= a and b <= hi]
                if owners:
                    segs.append((a, b, min(owners)[2]))
            self.segments[key] = segs
        # what a segment's owner is called when it is read: only names that own a segment are leaves
        self.leaves = sorted({n for segs in self.segments.values() for _, _, n in segs})

    def split(self, t: torch.Tensor, nbytes: float) -> list[tuple[str, float]] | None:
        """(weight name, bytes) for ``nbytes`` read from / written to ``t``; None when ``t`` is not a weight."""
        segs = self.segments.get(_storage_key(t))
        if segs is None:
            return None
        lo, hi = _byte_range(t)
        overlaps = [(n, min(hi, b) - max(lo, a)) for a, b, n in segs if min(hi, b) > max(lo, a)]
        span = sum(o for _, o in overlaps)
        if not span:
            return None
        share = defaultdict(float)
        for n, o in overlaps:
            share[n] += nbytes * o / span
        return list(share.items())


# ---- the records ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kind: str  # one of KINDS
    name: str  # aten op ("mm"), or "op_name:kernel_name" for a Triton launch
    layer: int | None
    layers_begun: int  # layer calls begun before it (places a launch outside the layers)
    programs: int | None = None  # Triton grid size


@dataclass
class Traffic:
    layer: int | None
    layers_begun: int
    group: str  # a weight group, "KV" or "activations"
    weight: str | None  # the weight's name
    op: str  # the aten op or op-table op that moves it
    read: float
    written: float


@dataclass
class OpCall:
    name: str
    layer: int | None
    layers_begun: int
    launches: int = 0
    plain_fallback: str | None = None


@dataclass
class Recorder:
    """Collects launches and traffic of one decode step on ``device``."""
    device: torch.device
    weights: WeightMap
    kv_storages: set
    tokens: int
    launches: list = field(default_factory=list)
    traffic: list = field(default_factory=list)
    op_calls: list = field(default_factory=list)
    host_reads: list = field(default_factory=list)
    outside_table: Counter = field(default_factory=Counter)  # Triton launches outside any op-table call
    layer_stack: list = field(default_factory=list)
    layers_begun: int = 0
    op_stack: list = field(default_factory=list)
    suppress: int = 0  # > 0 while a plain op runs in place of a launcher that failed on meta
    active: bool = False  # False during the warm-up step

    @property
    def layer(self):
        return self.layer_stack[-1] if self.layer_stack else None

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device == self.device

    def launch(self, kind, name, programs=None):
        if self.active and not self.suppress:
            self.launches.append(Launch(kind, name, self.layer, self.layers_begun, programs))

    def move(self, op: str, t: torch.Tensor, read: float, written: float):
        if not self.active or self.suppress or not (read or written):
            return
        total = read + written
        parts = self.weights.split(t, total)
        if parts is not None:
            for name, b in parts:
                self.traffic.append(Traffic(self.layer, self.layers_begun, self.weights.group[name], name, op,
                                            read * b / total, written * b / total))
            return
        group = "KV" if _storage_key(t) in self.kv_storages else "activations"
        self.traffic.append(Traffic(self.layer, self.layers_begun, group, None, op, read, written))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x)


class _CountAten(TorchDispatchMode):
    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        base = func.overloadpacket.__name__
        inplace = base.endswith("_") and not base.startswith("_")
        base = base.rstrip("_") if inplace else base
        flat = list(_tensors(args)) + list(_tensors(kwargs))
        if base in _HOST_READS and any(rec.on_device(t) for t in flat):
            if rec.active:
                rec.host_reads.append(f"{func} in {'layer %d' % rec.layer if rec.layer is not None else 'step'}")
            if base == "_local_scalar_dense":
                return False if flat[0].dtype == torch.bool else 0  # meta has no value; keep going
            try:
                return func(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - e.g. nonzero: its output shape depends on device values
                raise RuntimeError(f"decode_cost: the decode step reads device values on the host ({func}, "
                                   f"{rec.host_reads[-1] if rec.host_reads else 'warm-up'}): it cannot be counted "
                                   "on meta, nor captured in a CUDA graph") from e
        out = func(*args, **kwargs)
        if base in _NO_LAUNCH or func.is_view or base in _HOST_READS:
            return out
        outs = [t for t in _tensors(out) if rec.on_device(t)]
        if not any(rec.on_device(t) for t in flat) and not outs:
            return out  # host-side op (a CPU scalar), no kernel
        if not any(t.numel() for t in flat + outs):
            return out  # empty: nothing launches
        name = base + ("_" if inplace else "")
        rec.launch(aten_kind(base), name)
        self._traffic(func, base, name, args, kwargs, outs)
        return out

    def _traffic(self, func, base, name, args, kwargs, outs):
        rec = self.rec
        schema = func._schema.arguments
        values = {}
        for i, a in enumerate(schema):
            if a.kwarg_only or i >= len(args):
                if a.name in kwargs:
                    values[a.name] = kwargs[a.name]
            else:
                values[a.name] = args[i]
        mutated = [a.name for a in schema if a.alias_info is not None and a.alias_info.is_write
                   and a.name in values]
        out_bytes = sum(_nbytes(t) for t in outs)
        source = next((values[k] for k in ("source", "src", "values", "value")
                       if isinstance(values.get(k), torch.Tensor)), None)
        for a in schema:
            if a.name not in values:
                continue
            for t in _tensors(values[a.name]):
                if not rec.on_device(t):
                    continue
                if a.name in mutated:
                    written = _nbytes(source) if base in _WRITE_SOURCE and source is not None else _nbytes(t)
                    read = 0 if (base in _WRITE_ONLY or a.name.startswith("out")) else _nbytes(t)
                    rec.move(name, t, read, written)
                elif base in _GATHERS and a.name in ("weight", "self"):
                    rec.move(name, t, out_bytes, 0)
                else:
                    rec.move(name, t, _nbytes(t), 0)
        if not mutated:
            for t in outs:
                rec.move(name, t, 0, _nbytes(t))


def _kernel_name(kernel) -> str:
    for obj in (kernel, getattr(kernel, "base_fn", None), getattr(kernel, "fn", None)):
        name = getattr(obj, "__name__", None)
        if isinstance(name, str):
            return name
    return type(kernel).__name__


def _launch_classes() -> list:
    """Triton's launch entry points: compiled and interpreted kernels, and the autotuner (recorded as one launch
    of its kernel: on meta there is nothing to tune, and its benchmarking would launch every config)."""
    from triton.runtime import jit

    classes = [jit.JITFunction]
    for module, name in (("triton.runtime.interpreter", "InterpretedFunction"),
                         ("triton.runtime.autotuner", "Autotuner")):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return classes


@contextlib.contextmanager
def _record_triton(rec: Recorder):
    """Replace Triton's kernel launch by a record of it (kernel, grid size), for the duration."""

    def run(self, *args, grid=None, warmup=False, **kwargs):
        if warmup:
            return None
        name = _kernel_name(self)
        try:
            g = grid(kwargs) if callable(grid) else grid
            programs = math.prod(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
        except Exception:  # noqa: BLE001 - a grid function that needs the compiled metadata
            programs = None
        if rec.op_stack:
            call = rec.op_stack[-1]
            call.launches += 1
            rec.launch("Triton", f"{call.name}:{name}", programs)
        else:  # a kernel called outside the op table: counted, its tensor arguments read whole
            rec.launch("Triton", f"(outside the op table):{name}", programs)
            if rec.active:
                rec.outside_table[name] += 1
            for t in _tensors(args):
                if rec.on_device(t):
                    rec.move(name, t, _nbytes(t), 0)
        return None

    classes = _launch_classes()
    saved = [(c, c.__dict__.get("run")) for c in classes]
    try:
        for c in classes:
            c.run = run
        yield
    finally:
        for c, old in saved:
            if old is None:
                del c.run
            else:
                c.run = old


def _wrap_op(rec: Recorder, name: str, launcher, plain):
    """The op-table entry ``name``: run the launcher on meta (its Triton launches recorded), byte model on top."""
    try:
        signature = inspect.signature(launcher)
    except (TypeError, ValueError):
        signature = None
    rules = {**ARG_TRAFFIC.get("*", {}), **ARG_TRAFFIC.get(name, {})}

    def op(*args, **kwargs):
        call = OpCall(name, rec.layer, rec.layers_begun)
        n_launches, n_traffic = len(rec.launches), len(rec.traffic)
        rec.op_stack.append(call)
        try:
            result = launcher(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - fall back to the plain op, said in the output
            if plain is None:
                raise
            del rec.launches[n_launches:], rec.traffic[n_traffic:]
            call.launches = PLAIN_OP_LAUNCHES.get(name, 1)
            call.plain_fallback = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
            rec.suppress += 1
            try:
                result = plain(*args, **kwargs)
            finally:
                rec.suppress -= 1
            for _ in range(call.launches):
                rec.launch("Triton", f"{name}:(plain op, assumed)")
        finally:
            rec.op_stack.pop()
        if rec.active and not rec.suppress:
            rec.op_calls.append(call)
            _op_traffic(rec, name, signature, rules, args, kwargs, result)
        return result

    op.__wrapped__ = launcher
    return op


def _op_traffic(rec: Recorder, name: str, signature, rules, args, kwargs, result):
    try:
        bound = signature.bind(*args, **kwargs).arguments if signature is not None else None
    except TypeError:
        bound = None
    if bound is None:
        bound = {f"arg{i}": a for i, a in enumerate(args)} | dict(kwargs)
    for arg, value in bound.items():
        if arg.startswith(("out", "workspace")):
            continue
        for t in _tensors(value):
            if rec.on_device(t):
                rec.move(name, t, *(rules[arg](t, bound, rec.tokens) if arg in rules else (_nbytes(t), 0)))
    for t in _tensors(result):  # a tensor updated in place and returned is read above and written here
        if rec.on_device(t):
            rec.move(name, t, 0, _nbytes(t))


# Methods of the fast model that run one decoder layer, first argument the layer index.
LAYER_METHODS = ("_layer",)


def _wrap_layers(rec: Recorder, model) -> list[str]:
    wrapped = []
    for mname in LAYER_METHODS:
        method = getattr(model, mname, None)
        if method is None:
            continue
        signature = inspect.signature(method)

        def run_layer(*args, _method=method, _signature=signature, **kwargs):
            i = _layer_index(_signature, args, kwargs)
            rec.layer_stack.append(i)
            if rec.active:
                rec.layers_begun += 1
            try:
                return _method(*args, **kwargs)
            finally:
                rec.layer_stack.pop()

        setattr(model, mname, run_layer)
        wrapped.append(mname)
    return wrapped


def _layer_index(signature, args, kwargs) -> int:
    bound = signature.bind(*args, **kwargs).arguments
    for key in ("i", "index", "layer", "layer_idx", "layer_index"):
        if isinstance(bound.get(key), int):
            return bound[key]
    for v in bound.values():
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise RuntimeError("decode_cost: cannot find the layer index among the arguments of the per-layer method")


# ---- building the model on meta -------------------------------------------------------------------------------
def text_config(model: str):
    from bench import configs
    from gemma3n_fast.reference.config import TextConfig

    return TextConfig.from_dict(dict(configs.model_dict(model)["text_config"]))


def build_meta_model(model: str, dtype: torch.dtype):
    """-> (fast model on meta with the op table in its "triton" mode, how it was built)."""
    from gemma3n_fast import backend as backend_module
    from gemma3n_fast.model import from_reference
    from gemma3n_fast.reference.config import Gemma3nConfig
    from gemma3n_fast.reference.model import Gemma3nReference

    cfg = Gemma3nConfig(text=text_config(model), audio=None, vision=None, text_only=True)
    with torch.device("meta"):
        ref = Gemma3nReference(cfg)
    ref = ref.to(dtype).eval().requires_grad_(False)
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
    ref = ref.to(dtype).eval().requires_grad_(False)
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


# ---- the accounting -------------------------------------------------------------------------------------------
def account(model: str = "e2b", *, context: int = 1024, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
            bandwidth: float = H100_COPY_BANDWIDTH) -> dict:
    """Launches and bytes of one decode step of ``model`` ("e2b", "e4b", "smoke"); see the module docstring."""
    from gemma3n_fast import reference
    from gemma3n_fast.generate import DecodeState, _step
    from gemma3n_fast.reference.generation import GenerationPlan, Sampler

    t0 = time.perf_counter()
    fast, how = build_meta_model(model, dtype)
    cfg = fast.text_config
    context = min(context, cfg.max_position_embeddings)
    plan = GenerationPlan(sampler=Sampler.from_args(False), max_new_tokens=context, eos=[1], pad=0)  # greedy
    st = DecodeState(fast, batch, context, plan)
    kv = {_storage_key(t) for t in [*st.cache.k, *st.cache.v, *st.cache.pos.values()]}
    rec = Recorder(fast.device, WeightMap(fast), kv, tokens=1)
    for name in list(fast.backend.sources):
        setattr(fast.backend, name, _wrap_op(rec, name, getattr(fast.backend, name),
                                             getattr(reference.ops, name, None)))
    wrapped = _wrap_layers(rec, fast)
    with torch.no_grad(), _record_triton(rec), _CountAten(rec):
        _step(fast, st)  # warm-up: cached workspaces are allocated here, as before a graph capture
        rec.active = True
        _step(fast, st)
    if not wrapped or not rec.layers_begun:
        raise RuntimeError(f"decode_cost: no decoder layer call was seen (wrapped {wrapped or 'nothing'}); add the "
                           "fast model's per-layer method to bench.decode_cost.LAYER_METHODS")
    return summarize(rec, cfg, model=model, how=how, context=context, batch=batch, dtype=dtype,
                     bandwidth=bandwidth, seconds=time.perf_counter() - t0)


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


# ---- output ---------------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """Text for a markdown table cell (group names hold "|")."""
    return text.replace("|", "\\|")


def _mb(b: float) -> str:
    return f"{b / 1e6:,.0f}" if b >= 1e6 else f"{b / 1e6:,.2f}"


def table(results: list[dict]) -> str:
    """Markdown: launches by kind per layer type and per step, then bytes per token by group and the floor."""
    out = []
    for r in results:
        la, by = r["launches"], r["bytes"]
        name = r["model"].upper()
        out += [f"### {name}: {la['total']:,} launches per decode step, {by['total'] / 1e9:.2f} GB per token, "
                f"floor {r['floor_s'] * 1e3:.2f} ms ({r['floor_tok_s']:.0f} tok/s at "
                f"{r['bandwidth_Bps'] / 1e12:.1f} TB/s)", "",
                f"batch {r['batch']}, {r['dtype']}, cache of {r['context']} slots (the step at its last column), "
                f"{r['layers']} layers ({r['first_kv_shared_layer']} own K/V); built: {r['built']}", "",
                "| launches | layers | " + " | ".join(KINDS) + " | total |",
                "|---|---|" + "---:|" * (len(KINDS) + 1)]
        for t in la["layer_types"]:
            cells = " | ".join(str(t["per_layer"][k]) for k in KINDS)
            tot = str(t["per_layer"]["total"]) if t["uniform"] else f"{t['min_total']}-{t['max_total']}"
            out.append(f"| {t['type']} (per layer) | {_ranges(t['layers'])} | {cells} | {tot} |")
        for p, d in la["by_part"].items():
            if p != "layers" and d["total"]:
                out.append(f"| {p} | | " + " | ".join(str(d[k]) for k in KINDS) + f" | {d['total']} |")
        out.append(f"| **{name} step** | all | " + " | ".join(f"**{la['by_kind'][k]}**" for k in KINDS)
                   + f" | **{la['total']}** |")
        top = Counter({**la["aten_ops"], **la["triton_kernels"]}).most_common(12)
        out += ["", "Largest groups: " + ", ".join(f"{n} {c}" for n, c in top) + "."]
        small = [f"{k} {v['max']}" for k, v in la["triton_programs"].items() if v["max"] < H100_SMS]
        if small:
            out.append(f"Triton kernels whose largest grid is under {H100_SMS} programs (an H100's SMs): "
                       + ", ".join(small) + ".")
        out += ["", "| bytes per token | MB | share |", "|---|---:|---:|"]
        for g, b in by["by_group"].items():
            if b:
                out.append(f"| {_cell(g)} | {_mb(b)} | {b / by['total']:.1%} |")
        out.append(f"| **total** | **{_mb(by['total'])}** | |")
        unread = Counter()
        for n in by["weights_partly_read"]:
            w = by["per_weight"][n]
            unread[w["group"]] += w["size"] - w["read"]
        why = {"per-layer inputs": " (the token table: one row gathered)", "gate|up": " (sparse FFN: up rows)",
               "down": " (sparse FFN: down rows)"}
        if unread:
            out += ["", "Weights read in part, MB not read: "
                    + ", ".join(f"{g} {_mb(b)}{why.get(g, '')}" for g, b in unread.items()) + "."]
        notes = []
        if r["host_reads"]:
            notes.append(f"HOST READS of device values ({len(r['host_reads'])}): {r['host_reads'][:3]}")
        if r["plain_op_fallbacks"]:
            notes.append(f"op-table ops counted from their plain op (their launcher failed on meta): "
                         f"{r['plain_op_fallbacks']}")
        if r["triton_outside_op_table"]:
            notes.append(f"Triton launches outside the op table: {r['triton_outside_op_table']}")
        if by["weights_not_read"]:
            more = " ..." if len(by["weights_not_read"]) > 5 else ""
            notes.append(f"weights never read: {by['weights_not_read'][:5]}{more}")
        out += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(out).rstrip() + "\n"


def _ranges(idx: list[int]) -> str:
    spans, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans)


def compact(r: dict) -> dict:
    """The headline numbers of one accounting (what the e2e report keeps)."""
    return dict(model=r["model"], launches_per_step=r["launches"]["total"], launches_by_kind=r["launches"]["by_kind"],
                bytes_per_token=r["bytes"]["total"], weight_bytes=r["bytes"]["weights"], kv_bytes=r["bytes"]["kv"],
                activation_bytes=r["bytes"]["activations"], bandwidth_Bps=r["bandwidth_Bps"], floor_s=r["floor_s"],
                floor_tok_s=r["floor_tok_s"], context=r["context"], dtype=r["dtype"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="e2b,e4b", help="comma list from e2b,e4b,smoke")
    p.add_argument("--context", type=int, default=1024, help="KV-cache slots; the step decodes at the last one")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--bandwidth-tbs", type=float, default=H100_COPY_BANDWIDTH / 1e12,
                   help="memory bandwidth for the floor, TB/s (default: the H100's measured copy bandwidth)")
    p.add_argument("--json", default=None, help="write the full accounting here")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print what would be counted, exit")
    args = p.parse_args(argv)
    from bench import configs

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in configs.MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {','.join(configs.MODELS)}")
    if args.context < 1 or args.batch < 1 or args.bandwidth_tbs <= 0:
        p.error("--context and --batch must be >= 1, --bandwidth-tbs > 0")
    if args.dry_run:
        print(f"dry run: {','.join(models)} at batch {args.batch}, {args.context}-slot cache, {args.dtype}"
              + (f", json {args.json}" if args.json else ""))
        return
    results = [account(m, context=args.context, batch=args.batch, dtype=getattr(torch, args.dtype),
                       bandwidth=args.bandwidth_tbs * 1e12) for m in models]
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(command=" ".join(["python -m bench.decode_cost", *sys.argv[1:]]),
                                                   results=results), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
