"""Launches and bytes of a stretch of PyTorch + Triton code, recorded on the meta device (no GPU, no weights).

Generic machinery, nothing model-specific (bench/byte_model.py applies it to one Gemma 3n decode step):

* ``CountAten``: a ``TorchDispatchMode`` that records every aten op that would launch a GPU kernel (views, metadata
  ops, allocations and ops on host tensors are not launches; one aten op = one launch) with the bytes it moves: its
  tensor inputs read and outputs written at their real sizes (views: their elements only), except gathers (read the
  rows they return), indexed writes (write the source's bytes) and in-place fills (do not read);
* ``record_triton``: Triton's launch (``JITFunction.run``, the interpreter's and the autotuner's ``run``) replaced
  by a record of the kernel and its grid size, so a launcher runs its real host code on meta tensors;
* ``wrap_op``: an op-table entry whose launches are counted as the launcher makes them and whose bytes follow
  per-argument rules (``ArgRule``), with a fallback to the op's plain version when the launcher cannot run on meta;
* ``WeightMap``: a weight recognised by its storage, the bytes of a read split over the parameters (or tensor
  attributes of the modules) whose byte ranges it covers, so fused matrices are attributed to their parts;
* ``wrap_layers``: a per-layer method wrapped on the instance, so each launch belongs to the layer it happens in.

Every byte moved belongs to one launch (``Traffic.launch``): an aten op's to its launch; an op-table call's to the
call's Triton launches whose tensor arguments overlap the tensor's bytes (split evenly when several take it; when none
does, e.g. the launcher passed a copy, evenly over the call's Triton launches), so each launch carries the bytes its
op's rules give it (a sparse FFN's up rows, one cache slot), not its arguments' whole sizes.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gemma3n_fast.reference.quant import QuantizedWeight

KINDS = ("GEMM", "elementwise", "copy/cat", "indexing", "reduction", "Triton")

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



def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of the storage a tensor (view) spans."""
    e = t.element_size()
    if t.numel() == 0:
        return t.storage_offset() * e, t.storage_offset() * e
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.storage_offset() * e, (t.storage_offset() + extent) * e


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class WeightMap:
    """Every weight of the model by storage: the byte ranges of its named tensors, cut into segments each owned by
    the smallest named tensor covering it (a parameter over a tensor attribute of the same range).
    ``group_of(name)``: the group a weight's bytes are reported under."""

    def __init__(self, model: torch.nn.Module, group_of: Callable[[str], str] = lambda name: "weights"):
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
                elif isinstance(v, QuantizedWeight) and not aname.startswith("_"):  # packed values + scales
                    own = aname == "weight"  # a quantized module's own weight ranks as a parameter (owns its bytes)
                    named.setdefault(f"{prefix}{aname}.data", (v.data, own))
                    named.setdefault(f"{prefix}{aname}.scales", (v.scales, own))
        self.tensors = named
        self.is_parameter = {n: p for n, (_, p) in named.items()}
        self.size = {n: t.numel() * t.element_size() for n, (t, _) in named.items()}
        self.group = {n: group_of(n) for n in named}
        by_storage = defaultdict(list)
        for n, (t, param) in named.items():
            lo, hi = _byte_range(t)
            if hi > lo:
                by_storage[storage_key(t)].append((lo, hi, n, param))
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
        segs = self.segments.get(storage_key(t))
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
    spans: tuple = ()  # a Triton launch's tensor arguments as (storage, first byte, end byte): its op's bytes go here

    def takes(self, t: torch.Tensor) -> bool:
        """Does one of this launch's tensor arguments overlap ``t``'s bytes?"""
        key, (lo, hi) = storage_key(t), _byte_range(t)
        return any(k == key and a < hi and lo < b for k, a, b in self.spans)


@dataclass
class Traffic:
    layer: int | None
    layers_begun: int
    group: str  # a weight group, "KV" or "activations"
    weight: str | None  # the weight's name
    op: str  # the aten op or op-table op that moves it
    read: float
    written: float
    launch: int | None = None  # index in Recorder.launches of the launch that moves it


@dataclass
class OpCall:
    name: str
    layer: int | None
    layers_begun: int
    launches: int = 0
    plain_fallback: str | None = None


@dataclass
class Recorder:
    """Collects launches and traffic on ``device`` (while ``active``: a warm-up runs with it off); bytes of a tensor
    in ``kv_storages`` are reported as "KV", of a weight under its ``weights`` group, of anything else as
    "activations"; ``tokens``: the new tokens per step, for the byte rules."""
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

    def launch(self, kind, name, programs=None, spans=()) -> int | None:
        """Record a launch; -> its index in ``launches`` (None when not recording)."""
        if self.active and not self.suppress:
            self.launches.append(Launch(kind, name, self.layer, self.layers_begun, programs, spans))
            return len(self.launches) - 1
        return None

    def move(self, op: str, t: torch.Tensor, read: float, written: float, launch: int | None = None):
        """``read`` / ``written`` bytes of ``t`` moved by ``op``, in launch number ``launch``."""
        if not self.active or self.suppress or not (read or written):
            return
        total = read + written
        parts = self.weights.split(t, total)
        if parts is not None:
            for name, b in parts:
                self.traffic.append(Traffic(self.layer, self.layers_begun, self.weights.group[name], name, op,
                                            read * b / total, written * b / total, launch))
            return
        group = "KV" if storage_key(t) in self.kv_storages else "activations"
        self.traffic.append(Traffic(self.layer, self.layers_begun, group, None, op, read, written, launch))


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensors_in(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, QuantizedWeight):  # what a kernel reads of it: the packed values and the scales
        yield v.data
        yield v.scales
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from tensors_in(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from tensors_in(x)



class CountAten(TorchDispatchMode):
    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        base = func.overloadpacket.__name__
        inplace = base.endswith("_") and not base.startswith("_")
        base = base.rstrip("_") if inplace else base
        flat = list(tensors_in(args)) + list(tensors_in(kwargs))
        if base in _HOST_READS and any(rec.on_device(t) for t in flat):
            if rec.active:
                rec.host_reads.append(f"{func} in {'layer %d' % rec.layer if rec.layer is not None else 'step'}")
            if base == "_local_scalar_dense":
                return False if flat[0].dtype == torch.bool else 0  # meta has no value; keep going
            try:
                return func(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - e.g. nonzero: its output shape depends on device values
                raise RuntimeError(f"launch_recorder: the recorded code reads device values on the host ({func}, "
                                   f"{rec.host_reads[-1] if rec.host_reads else 'warm-up'}): it cannot be counted "
                                   "on meta, nor captured in a CUDA graph") from e
        out = func(*args, **kwargs)
        if base in _NO_LAUNCH or func.is_view or base in _HOST_READS:
            return out
        outs = [t for t in tensors_in(out) if rec.on_device(t)]
        if not any(rec.on_device(t) for t in flat) and not outs:
            return out  # host-side op (a CPU scalar), no kernel
        if not any(t.numel() for t in flat + outs):
            return out  # empty: nothing launches
        name = base + ("_" if inplace else "")
        index = rec.launch(aten_kind(base), name)
        self._traffic(func, base, name, args, kwargs, outs, index)
        return out

    def _traffic(self, func, base, name, args, kwargs, outs, index):
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
        out_bytes = sum(tensor_bytes(t) for t in outs)
        source = next((values[k] for k in ("source", "src", "values", "value")
                       if isinstance(values.get(k), torch.Tensor)), None)
        for a in schema:
            if a.name not in values:
                continue
            for t in tensors_in(values[a.name]):
                if not rec.on_device(t):
                    continue
                if a.name in mutated:
                    written = tensor_bytes(source) if base in _WRITE_SOURCE and source is not None else tensor_bytes(t)
                    read = 0 if (base in _WRITE_ONLY or a.name.startswith("out")) else tensor_bytes(t)
                    rec.move(name, t, read, written, index)
                elif base in _GATHERS and a.name in ("weight", "self"):
                    rec.move(name, t, out_bytes, 0, index)
                else:
                    rec.move(name, t, tensor_bytes(t), 0, index)
        if not mutated:
            for t in outs:
                rec.move(name, t, 0, tensor_bytes(t), index)


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
def record_triton(rec: Recorder):
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
        spans = tuple((storage_key(t), *_byte_range(t)) for t in (*tensors_in(args), *tensors_in(kwargs))
                      if rec.on_device(t))
        if rec.op_stack:
            call = rec.op_stack[-1]
            call.launches += 1
            rec.launch("Triton", f"{call.name}:{name}", programs, spans)
        else:  # a kernel called outside the op table: counted, its tensor arguments read whole
            index = rec.launch("Triton", f"(outside the op table):{name}", programs, spans)
            if rec.active:
                rec.outside_table[name] += 1
            for t in tensors_in(args):
                if rec.on_device(t):
                    rec.move(name, t, tensor_bytes(t), 0, index)
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


# The bytes an op-table argument moves where "read it whole" is wrong: (tensor, bound arguments, new tokens) ->
# (bytes read, bytes written).
ArgRule = Callable[[torch.Tensor, dict, int], "tuple[float, float]"]


def wrap_op(rec: Recorder, name: str, launcher, plain, rules: dict[str, ArgRule] | None = None,
            plain_launches: int = 1):
    """The op-table entry ``name``: run the launcher on meta (its Triton launches recorded); its bytes are each
    tensor argument read whole, except those ``rules`` names, and arguments named ``out*`` (outputs, counted as
    written through the result) or ``workspace*`` (scratch that stays in L2), which are not read. A launcher that
    fails on meta runs ``plain`` instead, counted as ``plain_launches`` launches."""
    try:
        signature = inspect.signature(launcher)
    except (TypeError, ValueError):
        signature = None
    rules = rules or {}

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
            call.launches = plain_launches
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
            _op_traffic(rec, name, signature, rules, args, kwargs, result, range(n_launches, len(rec.launches)))
        return result

    op.__wrapped__ = launcher
    return op


def _op_traffic(rec: Recorder, name: str, signature, rules, args, kwargs, result, launches: range):
    """The op call's bytes by argument rule, each tensor's given to the call's ``launches`` that take it."""
    triton = [i for i in launches if rec.launches[i].kind == "Triton"]
    own = triton or list(launches)  # a call that launched no Triton kernel: its aten launches move its bytes

    def move(t, read, written):
        takers = [i for i in triton if rec.launches[i].takes(t)] or own or [None]
        for i in takers:  # several launches take it (e.g. the input of each of a chain's kernels): split evenly
            rec.move(name, t, read / len(takers), written / len(takers), i)

    try:
        bound = signature.bind(*args, **kwargs).arguments if signature is not None else None
    except TypeError:
        bound = None
    if bound is None:
        bound = {f"arg{i}": a for i, a in enumerate(args)} | dict(kwargs)
    for arg, value in bound.items():
        if arg.startswith(("out", "workspace")):
            continue
        for t in tensors_in(value):
            if rec.on_device(t):
                move(t, *(rules[arg](t, bound, rec.tokens) if arg in rules else (tensor_bytes(t), 0)))
    for t in tensors_in(result):  # a tensor updated in place and returned is read above and written here
        if rec.on_device(t):
            move(t, 0, tensor_bytes(t))


def wrap_layers(rec: Recorder, model, methods: tuple[str, ...]) -> list[str]:
    """Wrap the model's per-layer ``methods`` (first argument the layer index) on the instance; -> those found."""
    wrapped = []
    for mname in methods:
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
    raise RuntimeError("launch_recorder: cannot find the layer index among the arguments of the per-layer method")

