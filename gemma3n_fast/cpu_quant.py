"""Quantized decode GEMVs on a CPU through torch's own packed int8 / int4 matmuls.

``prepack(QuantizedWeight)`` lays a weight out once for torch's CPU ops; ``project(x, w)`` and the GEMV-family
ops below (same signatures as ``reference.ops``) run on the packed form where that is exact and fast, and on the
definition (dequantize to fp32, ``F.linear`` in fp32, round to x.dtype once) everywhere else.

What torch offers on a CPU (checked on torch 2.14, x86 AVX-512; private ops, so every use is guarded):

  ``torch._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]``: scales must have x's dtype.
      bf16 x: fast (vectorized, fp32 accumulation, the output rounded once) but only for K % 16 == 0 (other K
      gives wrong values or a segfault: we pad K, see ``_K_ALIGN_INT8``); fp32 x: a slow loop whose time grows
      with M (about 4x an fp32 F.linear at one row, 20x at 20 rows).
  ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, inner_k_tiles)`` ->
  uint8 [N, K / 2], then ``torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], packed, G, sz [K / G, N, 2])``:
      W[n, k] = (q - 8) * sz[k // G, n, 0] + sz[k // G, n, 1]; needs N % 16 == 0, K even, K % G == 0,
      G in {32, 64, 128, 256}, sz in x's dtype. bf16 x: fast and fp32-exact (the dequantized weight and the
      products are exact in fp32, summed in fp32, rounded once); fp32 x: a slow scalar loop.
  ``_dyn_quant_pack_4bit_weight`` / ``_dyn_quant_matmul_4bit``: KleidiAI (Arm) only; elsewhere a reference
      path that also quantizes x to int8, which changes the result: not used.

So the packed route serves bf16 activations: int4 always (our format is torch's formula with zero = 0: the
stored nibble is q + 8, the bf16 scale is exact in bf16), int8 only when every fp32 scale is exactly a bf16
value (the bf16 op reads bf16 scales; rounding an fp32 scale would change the weight). fp32 activations take
the int8 fp32 op at one row (measured faster than dequantizing; so do bf16 rows when the int8 scales are not
bf16 values: x goes to fp32, exactly) and the definition otherwise. Padding instead
of falling back: K grows to the op's multiple with weight-0 columns (int8 0, int4 nibble 8) and x with zeros,
N to a multiple of 16 with zero-scale rows cut from the output, so MatFormer widths, partial last groups and odd
K all stay on the packed route. Whether an op is usable is decided in one place (``_op_ok``, run once per
kind / group size / dtype on a small weight, checked bit for bit); a missing or failing op logs one warning
and the weight uses the definition.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from gemma3n_fast.reference import ops as ref_ops
from gemma3n_fast.reference.quant import QuantizedWeight, unpack_int4

__all__ = ["CpuPackedWeight", "prepack", "project", "linear", "linear_gelu_mul", "linear_gelu_aux",
           "linear_softcap", "dual_linear", "qkv_projection_norm_rope_cache", "o_proj_post_attention",
           "sparse_ffn", "down_altup_correct", "sparse_ffn_altup_correct", "per_layer_projection_predict",
           "per_layer_projection_inject", "sliding_window_attention_decode"]

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu accepts
_K_ALIGN_INT8 = 64  # the bf16 int8 op is right only for K % 16 == 0: pad K to a multiple of 64 (a safe margin)
_N_ALIGN_INT4 = 16  # the int4 packer requires N % 16 == 0
_INT4_INNER_K_TILES = 2  # accepted 1/2/4/8 on CPU; 2 needs only K % 32 == 0, which K % G == 0 implies
FP32_INT8_MAX_ROWS = 1  # fp32 x: the int8 op's loop beats dequantize-then-F.linear only at one row
FP32_ATTENTION_MAX_SLOTS = 1024  # decode attention upcasts bf16 K/V up to here (1.7x faster at 1,024; slower at 4,096)

# route names: which computation a (weight, activation dtype, rows) gets
PACKED_BF16 = "packed_bf16"  # the bf16 packed op
PACKED_FP32 = "packed_fp32"  # the fp32 packed op
DEQUANTIZE = "dequantize"  # the definition: dequantize to fp32, F.linear in fp32, round to x.dtype

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("cpu_quant: %s; those weights use dequantize-then-F.linear (correct, slower)", reason)


@dataclass(frozen=True)
class CpuPackedWeight:
    """A QuantizedWeight plus torch's packed form of it. ``weight`` is the truth (the definition stays available
    and is what every route is checked against). ``packed`` / ``scales_bf16`` / ``scales_fp32`` are None where
    that route is unavailable; ``k_padded`` is the K the packed op reads (x is zero-padded to it), ``n_padded``
    the N it writes (the output is cut back to N). ``why_not`` says why there is no bf16 packed route."""
    weight: QuantizedWeight
    packed: torch.Tensor | None
    scales_bf16: torch.Tensor | None  # int8: [N]; int4: [K_pad / G, N_pad, 2] (scale, zero = 0)
    scales_fp32: torch.Tensor | None  # int8 only: [N], the exact fp32 scales (the fp32 op)
    k_padded: int
    n_padded: int
    why_not: str = ""

    @property
    def kind(self) -> str:
        return self.weight.kind

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        """Bytes one packed GEMV reads (the packed values and the scales it uses); the stored size if unpacked."""
        if self.packed is None:
            return self.weight.nbytes
        side = self.scales_bf16 if self.scales_bf16 is not None else self.scales_fp32
        return self.packed.numel() * self.packed.element_size() + side.numel() * side.element_size()

    def route(self, dtype: torch.dtype, rows: int) -> str:
        """The one place that decides which computation x of ``dtype`` with ``rows`` rows gets."""
        if dtype == torch.bfloat16 and self.scales_bf16 is not None:
            return PACKED_BF16
        if dtype in (torch.float32, torch.bfloat16) and self.scales_fp32 is not None and rows <= FP32_INT8_MAX_ROWS:
            return PACKED_FP32  # bf16 x without bf16 scales: x in fp32 (exact), the fp32 sum rounded once

        return DEQUANTIZE

    def __repr__(self) -> str:
        how = "bf16 packed" if self.scales_bf16 is not None else f"definition only ({self.why_not})"
        return f"CpuPackedWeight({self.weight!r}, {how})"


# ---- packing -----------------------------------------------------------------------------------------------

def _pack_int8(w: QuantizedWeight):
    N, K = w.shape
    k_pad = -(-K // _K_ALIGN_INT8) * _K_ALIGN_INT8
    data = F.pad(w.data, (0, k_pad - K)).contiguous()  # int8 zeros: weight-0 columns
    scales = w.scales.float().contiguous()
    bf16_scales = scales.to(torch.bfloat16)
    # the bf16 op multiplies by a bf16 scale: usable only if that equals the stored fp32 scale bit for bit
    exact = bool(torch.equal(bf16_scales.float(), scales))
    return data, (bf16_scales if exact else None), scales, k_pad, N, "" if exact else "int8 scales not bf16 values"


def _pack_int4(w: QuantizedWeight):
    N, K = w.shape
    G = w.group_size
    k_pad = -(-K // G) * G  # whole groups; G even, so the odd-K pad nibble (weight 0) lies inside
    n_pad = -(-N // _N_ALIGN_INT4) * _N_ALIGN_INT4
    q = unpack_int4(w.data).to(torch.int32) + 8  # back to the stored nibble 0..15: torch's q
    q = F.pad(q, (0, k_pad - q.shape[1], 0, n_pad - N), value=8)  # nibble 8 = weight 0 (pad columns and rows)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INT4_INNER_K_TILES)
    scales = F.pad(w.scales.to(torch.bfloat16), (0, 0, 0, n_pad - N))  # pad rows: scale 0
    # torch's layout [K / G, N, 2] = (scale, zero); zero = 0 makes (q - 8) * scale + zero our symmetric format
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).contiguous()
    return packed, sz, None, k_pad, n_pad, ""


def _packed_matmul(x2: torch.Tensor, p: CpuPackedWeight, route: str) -> torch.Tensor:
    """x2 [M, K] (bf16 for PACKED_BF16, fp32 for PACKED_FP32) through the packed op -> [M, N] in x2.dtype."""
    K = p.shape[1]
    if p.k_padded != K:
        x2 = F.pad(x2, (0, p.k_padded - K))  # zeros meet weight-0 columns: the sums are unchanged
    x2 = x2.contiguous()
    if p.kind == "int8":
        scales = p.scales_bf16 if route == PACKED_BF16 else p.scales_fp32
        return torch._weight_int8pack_mm(x2, p.packed, scales)
    out = (_INT4_MM or torch.ops.aten._weight_int4pack_mm_for_cpu)(x2, p.packed, p.weight.group_size, p.scales_bf16)
    return out if p.n_padded == p.shape[0] else out[:, :p.shape[0]]


def _overload(name: str):
    """``torch.ops.aten.<name>.default`` resolved once (calling the op's packet resolves it per call: ~6 us, a fifth
    of a small GEMV at one row), or None where this torch lacks the op (``_op_ok`` then finds it missing)."""
    packet = getattr(torch.ops.aten, name, None)
    return getattr(packet, "default", None)


_INT4_MM = _overload("_weight_int4pack_mm_for_cpu")


def _unpacked(w: QuantizedWeight, why: str) -> CpuPackedWeight:
    return CpuPackedWeight(w, None, None, None, w.shape[1], w.shape[0], why)


_op_cache: dict[tuple, str] = {}  # (kind, G) -> "" if the packed op passed its check, else why not


def _op_ok(kind: str, group_size: int) -> str:
    """Pack a small weight (odd K, a partial last group, N not a multiple of 16) and check the packed op bit for
    bit: x = the identity gives back the dequantized weight (one product per sum: exact in fp32, one rounding in
    bf16). Run once per (kind, G); returns "" if usable, else why not (any missing op or error included)."""
    key = (kind, group_size)
    if key not in _op_cache:
        _op_cache[key] = _check_op(kind, group_size)
    return _op_cache[key]


def _check_op(kind: str, group_size: int) -> str:
    from gemma3n_fast.reference.quant import quantize
    G = group_size or 32
    N, K = 21, G + G // 2 + 1  # N % 16 != 0, odd K, a partial last group
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen)
    qw = quantize(w, kind, group_size if kind == "int4" else 64)
    if kind == "int8":  # bf16-exact scales so the bf16 op is checked too
        qw = QuantizedWeight("int8", qw.data, qw.scales.to(torch.bfloat16).float(), qw.shape)
    truth = qw.dequantize().t()  # [K, N]: what the identity rows must give
    try:
        p = _pack(qw)
        if p.scales_bf16 is None:
            return f"{kind} packing failed its own check"
        eye = torch.eye(K)
        got_bf16 = _packed_matmul(eye.to(torch.bfloat16), p, PACKED_BF16)
        if not torch.equal(got_bf16, truth.to(torch.bfloat16)):
            return f"torch's {kind} bf16 packed matmul gives other values than the format ({torch.__version__})"
        if kind == "int8":
            got_fp32 = _packed_matmul(eye, p, PACKED_FP32)
            if not torch.equal(got_fp32, truth):
                return f"torch's int8 fp32 packed matmul gives other values than the format ({torch.__version__})"
    except (AttributeError, RuntimeError, NotImplementedError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"torch {torch.__version__} has no usable {kind} packed CPU matmul ({first[:160]})"
    return ""


def _pack(w: QuantizedWeight) -> CpuPackedWeight:
    packed, sb, sf, k_pad, n_pad, why = (_pack_int8 if w.kind == "int8" else _pack_int4)(w)
    return CpuPackedWeight(w, packed, sb, sf, k_pad, n_pad, why)


def prepack(w: QuantizedWeight) -> CpuPackedWeight:
    """Lay a CPU QuantizedWeight out for torch's packed ops (once, at load). A weight no packed op can take
    exactly (an int4 group size torch lacks, a missing or failing op) keeps only the definition; a missing or
    failing op is logged once."""
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"cpu_quant.prepack: expected a QuantizedWeight, got {type(w).__name__}")
    if w.device.type != "cpu":
        raise ValueError(f"cpu_quant.prepack: the packed ops are CPU ops; the weight is on {w.device}")
    if w.kind == "int4" and w.group_size not in INT4_GROUP_SIZES:
        return _unpacked(w, f"int4 group size {w.group_size} not in torch's {INT4_GROUP_SIZES}")
    why = _op_ok(w.kind, w.group_size)
    if why:
        _warn_once(why)
        return _unpacked(w, why)
    try:
        return _pack(w)
    except (RuntimeError, NotImplementedError) as e:
        why = f"packing a {w.kind} {list(w.shape)} weight failed ({str(e).splitlines()[0][:160]})"
        _warn_once(why)
        return _unpacked(w, why)


# ---- the ops -----------------------------------------------------------------------------------------------

def project(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight | CpuPackedWeight) -> torch.Tensor:
    """``x @ weight^T`` in x.dtype. A float weight: F.linear. A QuantizedWeight: the definition (dequantize to
    fp32, F.linear in fp32, round once; pack it with ``prepack`` for speed). A CpuPackedWeight: the route
    ``weight.route`` picks, each computing the definition's value (fp32 products and sums, one rounding)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    if not isinstance(weight, (QuantizedWeight, CpuPackedWeight)):
        raise TypeError(f"cpu_quant.project: expected a float tensor, QuantizedWeight or CpuPackedWeight weight, "
                        f"got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"cpu_quant.project: x must be a float tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    N, K = weight.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"cpu_quant.project: x's last dim {tuple(x.shape)[-1:]} does not match the weight's "
                         f"K = {K} (weight [N, K] = {[N, K]})")
    if isinstance(weight, QuantizedWeight):
        return ref_ops.project(x, weight)
    if x.device.type != "cpu":
        raise ValueError(f"cpu_quant.project: a CpuPackedWeight needs x on the CPU, got {x.device}")
    x2 = x.reshape(-1, K)
    route = weight.route(x.dtype, x2.shape[0])
    if route == DEQUANTIZE or x2.shape[0] == 0:
        return ref_ops.project(x, weight.weight)
    if route == PACKED_FP32:
        return _packed_matmul(x2.float(), weight, route).to(x.dtype).reshape(*x.shape[:-1], N)
    return _packed_matmul(x2, weight, route).reshape(*x.shape[:-1], N)


def linear(x: torch.Tensor, weight, *, workspace=None) -> torch.Tensor:
    """``x @ weight^T``. x [..., K], weight [N, K] -> [..., N]."""
    return project(x, weight)


def linear_gelu_mul(x: torch.Tensor, gate_up_weight, *, workspace=None) -> torch.Tensor:
    """``gelu_tanh(x Wg^T) * (x Wu^T)`` with ``gate_up_weight = [Wg; Wu]`` [2I, K] -> [..., I]."""
    gate, up = project(x, gate_up_weight).chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def linear_gelu_aux(x: torch.Tensor, weight, aux: torch.Tensor, *, workspace=None) -> torch.Tensor:
    """``gelu_tanh(x @ weight^T) * aux``. aux [..., N]."""
    return F.gelu(project(x, weight), approximate="tanh") * aux


def linear_softcap(x: torch.Tensor, weight, cap: float | None, *, workspace=None) -> torch.Tensor:
    """``cap * tanh((x @ weight^T) / cap)`` in x.dtype (logits rounded first), or plain if cap is None."""
    logits = project(x, weight)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def sliding_window_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                                    k_pos: torch.Tensor, *, window: int | None = None, scaling: float = 1.0,
                                    softcap: float | None = None, last_slot: torch.Tensor | None = None,
                                    workspace=None) -> torch.Tensor:
    """``reference.ops.sliding_window_attention_decode`` on the CPU with fewer bytes moved, the same terms:
      * only slots up to ``last_slot`` are read (the slots above are empty, k_pos = -1: masked, weight exactly 0);
      * GQA by a view: the Hq / Hkv query heads of a KV head are rows of one matmul with that head's keys, instead
        of K and V repeated per query head;
      * up to ``FP32_ATTENTION_MAX_SLOTS`` live slots, the two matmuls take fp32 copies of their bf16 operands
        (exact) and round their fp32 sums to the activation dtype where the bf16 matmul rounds: torch's bf16 bmm
        at these sizes is ~2x slower than converting and multiplying in fp32; longer, the copies cost more.
    The same products, fp32 softmax and roundings; the sums over keys may run in another order."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q.device.type != "cpu" or Hq % Hkv:
        return ref_ops.sliding_window_attention_decode(q, k, v, q_pos, k_pos, window=window, scaling=scaling,
                                                       softcap=softcap)
    n = S if last_slot is None else min(int(last_slot.max()) + 1, S)  # a host read: fine on the CPU
    k, v = k[:, :, :n], v[:, :, :n]
    g, dt = Hq // Hkv, q.dtype
    upcast = dt != torch.float32 and n <= FP32_ATTENTION_MAX_SLOTS
    qg = q.reshape(B, Hkv, g * T, D)  # rows (head in group, t)
    if upcast:
        scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)).to(dt)
    else:
        scores = torch.matmul(qg, k.transpose(-1, -2))
    if scaling != 1.0:
        scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    # + 0 / + -inf is the masked_fill of the reference; one mask per step and layer type (_memo)
    bias = _memo(("attention mask", window), (q_pos, k_pos), n, lambda: _attention_bias(q_pos, k_pos[:, :n], window))
    scores = scores.float().view(B, Hkv, g, T, n) + bias
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(dt).view(B, Hkv, g * T, n)  # all-masked rows -> 0
    out = torch.matmul(probs.float(), v.float()).to(dt) if upcast else torch.matmul(probs, v)
    return out.view(B, Hq, T, D)


def _attention_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, 1, T, n] fp32: 0 where the reference's mask lets query t see key s, -inf elsewhere."""
    qp, kp = q_pos[:, :, None].long(), k_pos[:, None, :].long()
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= (qp - kp) < window
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(visible, zero, zero - float("inf"))[:, None, None]


_memo_store: dict = {}


def _memo(key: tuple, tensors: tuple, extra, make):
    """``make()``, reused while ``tensors`` are the same objects (a reference is held, so none is freed and its
    address reused) at the same in-place version (``_version``: every in-place write bumps it) and ``extra`` is
    equal. Within a decode step the positions and the cache's position tables are unchanged across the layers:
    their RoPE and attention mask are computed once per step, not once per layer. One entry per ``key`` (a new
    step replaces the last step's), so the store stays a few small tensors however long the generation.
    Tensors without a version counter (inference mode): no reuse."""
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:
        return make()
    hit = _memo_store.get(key)
    if hit is not None and hit[1] == versions and hit[2] == extra and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[3]
    value = make()
    _memo_store[key] = (tuple(tensors), versions, extra, value)
    return value


def dual_linear(x1: torch.Tensor, w1, x2: torch.Tensor, w2, *, workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x1 @ w1^T, x2 @ w2^T)``."""
    return project(x1, w1), project(x2, w2)


def qkv_projection_norm_rope_cache(x: torch.Tensor, weight, qkv_width: int, q_norm_weight: torch.Tensor,
                                   k_norm_weight: torch.Tensor | None, inv_freq: torch.Tensor,
                                   positions: torch.Tensor, k_cache: torch.Tensor | None = None,
                                   v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                                   eps: float = 1e-6, *, workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.ops.qkv_projection_norm_rope_cache`` with the projection through ``project``."""
    projected = project(x, weight)
    q = qkv_norm_rope_cache(projected[..., :qkv_width], q_norm_weight, k_norm_weight, inv_freq, positions,
                            k_cache, v_cache, slots, eps)
    return q, projected[..., qkv_width:]


def o_proj_post_attention(x1: torch.Tensor, w1, x2: torch.Tensor, w2, a: torch.Tensor, an: torch.Tensor,
                          post_attention_norm_weight: torch.Tensor, post_laurel_norm_weight: torch.Tensor,
                          pre_ffn_norm_weight: torch.Tensor, eps: float = 1e-6, *,
                          workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.ops.o_proj_post_attention`` with its two projections through ``project`` (``dual_linear``) and
    the norms as ``_rms_norm``."""
    o, laurel_branch = dual_linear(x1, w1, x2, w2)
    att = _rms_norm(o, post_attention_norm_weight, eps, residual=a)  # reference.ops.post_attention_chain's steps
    lau = _rms_norm(laurel_branch, post_laurel_norm_weight, eps, residual=an)
    h = (att + lau) / 2 ** 0.5
    return h, _rms_norm(h, pre_ffn_norm_weight, eps)


def per_layer_projection_predict(gated: torch.Tensor, projection_weight, streams: torch.Tensor,
                                 per_layer_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                                 router_weight: torch.Tensor, prediction_coefs: torch.Tensor,
                                 input_norm_weight: torch.Tensor, eps: float = 1e-6, active: int = 0, *,
                                 workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.ops.per_layer_projection_predict`` with the projection through ``project``."""
    return altup_predict_fused(streams, project(gated, projection_weight), per_layer_norm_weight, router_norm_weight,
                               router_weight, prediction_coefs, input_norm_weight, eps, active)


def per_layer_projection_inject(gated: torch.Tensor, projection_weight, streams: torch.Tensor,
                                per_layer_norm_weight: torch.Tensor, eps: float = 1e-6, active: int = 0, *,
                                workspace=None) -> torch.Tensor:
    """``reference.ops.per_layer_projection_inject`` with the projection through ``project``."""
    return altup_inject(streams, project(gated, projection_weight), per_layer_norm_weight, eps, active)


def sparse_ffn(x: torch.Tensor, gate_weight, up_weight, down_weight_t, std_multiplier: float, *,
               workspace=None) -> torch.Tensor:
    """``reference.ops.sparse_ffn`` with gate and up through ``project``. The down weight is stored transposed
    (rows = channels, quantized along H), so no packed op computes ``act @ down_weight_t`` with its values; but
    only the channels some row keeps active (about 5 % at one row) contribute, so a quantized down weight is read
    and dequantized for those rows only (``times_rows``): the definition's products, the zero terms left out of
    the fp32 sums (exact zeros), rounded once."""
    act = ref_ops.gaussian_topk_gelu_mul(project(x, gate_weight), project(x, up_weight), std_multiplier)
    down = down_weight_t.weight if isinstance(down_weight_t, CpuPackedWeight) else down_weight_t
    if not isinstance(down, QuantizedWeight):
        return F.linear(act, down.t())
    rows = act.reshape(-1, act.shape[-1])
    active = (rows != 0).any(0).nonzero().squeeze(1)  # a host sync: fine on the CPU
    out = times_rows(rows.index_select(1, active).float(), down, active)
    return out.to(act.dtype).reshape(*act.shape[:-1], down.shape[1])


def times_rows(a: torch.Tensor, w: QuantizedWeight, idx: torch.Tensor) -> torch.Tensor:
    """``a @ take_rows(w, idx)``: a [R, n] fp32 times w's rows ``idx`` dequantized [n, K] -> [R, K] fp32, in two
    halves of the K columns, each column's sum the same. Two reasons: a fresh [n, K] fp32 buffer (3.3 MB at E2B's
    decode) was page-faulted in on every call (~7k minor faults per token over the sparse layers), while glibc
    serves the 1.7 MB halves from memory it keeps (measured: none); and int4 rows are not interleaved back to
    [n, K]: the low nibbles (the even columns) and the high ones (the odd columns) are dequantized and multiplied
    apart, and only the [R, K / 2] products interleaved (writing nibbles into every other column of a [n, K]
    buffer costs ~4x the rest of the product)."""
    N, K = w.shape
    G = w.group_size
    if w.kind == "int8" and w.scales.dim() == 1:
        rows = w.data.index_select(0, idx)
        scales = w.scales.index_select(0, idx).float()[:, None]
        halves = [a @ half.float().mul_(scales) for half in rows.tensor_split(2, dim=1)]
        return torch.cat(halves, dim=1)
    if w.kind != "int4" or K % G or G % 2 or w.data.shape[1] * 2 != K or w.scales.shape[1] != K // G:
        return a @ take_rows(w, idx)
    n = idx.numel()
    packed = w.data.index_select(0, idx)  # [n, K / 2] uint8: column 2j in the low nibble of byte j, 2j + 1 high
    scales = w.scales.index_select(0, idx).float()[:, :, None]  # [n, K / G, 1]: group g holds bytes g G/2 ...
    halves = []
    for nibbles in (torch.bitwise_and(packed, 15), torch.bitwise_right_shift(packed, 4)):
        q = nibbles.float().view(n, K // G, G // 2).sub_(8).mul_(scales)  # (nibble - 8) * scale, exact
        halves.append(a @ q.view(n, K // 2))
    return torch.stack(halves, dim=-1).view(a.shape[0], K)


def take_rows(w: QuantizedWeight, idx: torch.Tensor) -> torch.Tensor:
    """``w.take_rows(idx)`` for a 1-D idx (rows dequantized to fp32 [n, K]: q * scale, exact), in fewer passes:
    ``index_select`` gathers (advanced indexing is several times slower on uint8 rows), the nibbles are split
    with in-place ops and each group is scaled through a view. Any other layout takes the definition."""
    N, K = w.shape
    G = w.group_size
    if w.kind == "int8" and w.scales.dim() == 1:
        return w.data.index_select(0, idx).float().mul_(w.scales.index_select(0, idx).float()[:, None])
    if w.kind != "int4" or K % G or G % 2 or w.data.shape[1] * 2 != K or w.scales.shape[1] != K // G:
        return w.take_rows(idx)
    n = idx.numel()
    d = w.data.index_select(0, idx)  # [n, K / 2] uint8: value 2j in the low nibble of byte j, 2j + 1 in the high
    q = torch.empty(n, K // 2, 2, dtype=torch.uint8)
    torch.bitwise_and(d, 15, out=q[:, :, 0])
    torch.bitwise_right_shift(d, 4, out=q[:, :, 1])
    scales = w.scales.index_select(0, idx).float()  # [n, K / G]
    return q.view(n, K // G, G).float().sub_(8).mul_(scales[:, :, None]).view(n, K)


def down_altup_correct(x: torch.Tensor, down_weight, predictions: torch.Tensor, h: torch.Tensor,
                       post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                       router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                       correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6, active: int = 0, *,
                       workspace=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference.ops.down_altup_correct`` with the down projection through ``project``, then the plain post-FFN
    norm and AltUp correct (``reference.ops.altup_correct_fused``)."""
    return altup_correct_fused(predictions, project(x, down_weight), h, post_ffn_norm_weight, router_norm_weight,
                               router_weight, correction_coefs, correct_output_scale, eps, active)


def sparse_ffn_altup_correct(x: torch.Tensor, gate_weight, up_weight, down_weight_t, std_multiplier: float,
                             predictions: torch.Tensor, h: torch.Tensor, post_ffn_norm_weight: torch.Tensor,
                             router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                             correction_coefs: torch.Tensor, correct_output_scale: torch.Tensor | None = None,
                             eps: float = 1e-6, active: int = 0, *,
                             workspace=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference.ops.sparse_ffn_altup_correct`` with the FFN as ``sparse_ffn`` here, then the plain post-FFN norm
    and AltUp correct (``reference.ops.altup_correct_fused``)."""
    mlp_out = sparse_ffn(x, gate_weight, up_weight, down_weight_t, std_multiplier)
    return altup_correct_fused(predictions, mlp_out, h, post_ffn_norm_weight, router_norm_weight, router_weight,
                               correction_coefs, correct_output_scale, eps, active)


# ---- AltUp on the CPU: the reference's steps and roundings in fewer, cheaper ops --------------------------------
# At one row these chains are dispatch-bound (a few us per op): every op saved counts.

def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """``reference.ops.rms_norm`` through torch's own ``F.rms_norm``: one call instead of nine; it takes the same
    fp32 steps (x in fp32, times (mean(x^2) + eps)^-1/2, times the weight in fp32, rounded once)."""
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    return y if residual is None else residual + y


_fp32_store = WeakIdKeyDictionary()  # a weight -> (its in-place version, its fp32 copy)


def _fp32(w: torch.Tensor) -> torch.Tensor:
    """``w.float()``, made once per weight (kept while the weight lives; rebuilt if it is written in place)."""
    if w.dtype == torch.float32:
        return w
    hit = _fp32_store.get(w)
    if hit is None or hit[0] != w._version:
        hit = _fp32_store[w] = (w._version, w.float())
    return hit[1]


def _altup_router(x: torch.Tensor, router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """``reference.ops.altup_router`` with the router's linear in fp32: the bf16 inputs are exact in fp32, the fp32
    sums are rounded once to x.dtype, as the bf16 F.linear computes them (it accumulates in fp32)."""
    inputs = _rms_norm(x, router_norm_weight, eps) * _inverse_width(x.shape[-1], x.dtype)
    routed = F.linear(inputs.float(), _fp32(router_weight)).to(x.dtype)
    return torch.tanh(routed.float()).to(x.dtype)


_inverse_widths: dict = {}


def _inverse_width(H: int, dtype: torch.dtype) -> torch.Tensor:
    """1/H rounded to ``dtype`` (HF's buffer in the model dtype), a CPU scalar tensor made once."""
    key = (H, dtype)
    if key not in _inverse_widths:
        _inverse_widths[key] = torch.tensor(1.0 / H, dtype=dtype)
    return _inverse_widths[key]


def altup_inject(streams: torch.Tensor, proj_raw: torch.Tensor, per_layer_norm_weight: torch.Tensor,
                 eps: float = 1e-6, active: int = 0) -> torch.Tensor:
    """``reference.ops.altup_inject``: one add over all streams, the active one put back."""
    out = streams + _rms_norm(proj_raw, per_layer_norm_weight, eps)
    out[active] = streams[active]
    return out


def altup_predict_fused(streams: torch.Tensor, proj_raw: torch.Tensor | None,
                        per_layer_norm_weight: torch.Tensor | None, router_norm_weight: torch.Tensor,
                        router_weight: torch.Tensor, prediction_coefs: torch.Tensor, input_norm_weight: torch.Tensor,
                        eps: float = 1e-6, active: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.ops.altup_predict_fused``; the 4x4 mix as one fp32 bmm (the einsum's products and sums, rounded
    once) and the router as ``_altup_router``."""
    if proj_raw is not None:
        streams = altup_inject(streams, proj_raw, per_layer_norm_weight, eps, active)
    A, H = streams.shape[0], streams.shape[-1]
    modalities = _altup_router(streams[active], router_norm_weight, router_weight, eps)  # [..., A]
    coefs = F.linear(modalities, prediction_coefs).float().reshape(-1, A, A)  # [R, k, j]
    s = streams.float().reshape(A, -1, H).transpose(0, 1)  # [R, j, H]
    mix = torch.bmm(coefs, s).transpose(0, 1).reshape(streams.shape).to(streams.dtype)
    pred = mix + streams
    return pred, _rms_norm(pred[active], input_norm_weight, eps)


def altup_correct_fused(predictions: torch.Tensor, mlp_out: torch.Tensor, h: torch.Tensor,
                        post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                        router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                        correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6,
                        active: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference.ops.altup_correct_fused`` with the router as ``_altup_router`` (the same ops otherwise)."""
    activated = _rms_norm(mlp_out, post_ffn_norm_weight, eps, residual=h)
    modalities = _altup_router(activated, router_norm_weight, router_weight, eps)  # [..., A]
    return ref_ops.altup_correct_by_modalities(predictions, activated, modalities, correction_coefs,
                                               correct_output_scale, active)


def qkv_norm_rope_cache(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor | None,
                        inv_freq: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor | None = None,
                        v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                        eps: float = 1e-6) -> torch.Tensor:
    """``reference.ops.qkv_norm_rope_cache`` for one column (a decode step): the q, k and v head norms as one norm
    over every head with a per-head fp32 weight (q_norm's, k_norm's, 1 for v's scale-free norm: x * 1.0 is x),
    RoPE on the q and k heads at once, cos / sin once per step (``_memo``: the positions are the same for every
    layer), the K/V write a plain ``index_copy_`` when the slot is a real one (the reference's masked write writes
    exactly that then). The same products and roundings. More columns: the reference."""
    B, T, W = qkv.shape
    if T != 1 or (k_cache is not None and int(slots.min()) < 0):  # a host read: fine on the CPU
        return ref_ops.qkv_norm_rope_cache(qkv, q_norm_weight, k_norm_weight, inv_freq, positions, k_cache, v_cache,
                                           slots, eps)
    D = q_norm_weight.shape[0]
    Hkv = 0 if k_cache is None else k_cache.shape[1]
    heads = W // D
    Hq = heads - 2 * Hkv
    cos, sin = _memo(("rope",), (positions, inv_freq), qkv.dtype,
                     lambda: ref_ops.rope_cos_sin(positions, inv_freq, qkv.dtype))
    y = qkv.unflatten(-1, (heads, D)).float()
    # rms_norm's fp32 steps: y * (mean(y^2) + eps)^-1/2 * w, rounded once
    normed = (y * (y * y).mean(-1, keepdim=True).add_(eps).pow_(-0.5)).mul_(
        _head_norm_weights(q_norm_weight, k_norm_weight, Hq, Hkv)).to(qkv.dtype)
    qk = normed[:, :, :Hq + Hkv]
    x1, x2 = qk.chunk(2, dim=-1)
    roped = qk * cos[:, :, None] + torch.cat([-x2, x1], dim=-1) * sin[:, :, None]  # apply_rope's roundings
    if k_cache is not None:
        k_cache.index_copy_(2, slots, roped[:, :, Hq:].transpose(1, 2))
        v_cache.index_copy_(2, slots, normed[:, :, Hq + Hkv:].transpose(1, 2))
    return roped[:, :, :Hq].transpose(1, 2)


_head_norm_store = WeakIdKeyDictionary()  # q_norm weight -> (k_norm weight, shapes and versions, [heads, D] fp32)


def _head_norm_weights(q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor | None, Hq: int,
                       Hkv: int) -> torch.Tensor:
    """[Hq + 2 Hkv, D] fp32: q_norm's weight per q head, k_norm's per k head, ones per v head; built once per layer
    (kept while the q_norm weight lives, rebuilt if either weight is written in place)."""
    key = (Hq, Hkv, q_norm_weight._version, None if k_norm_weight is None else k_norm_weight._version)
    hit = _head_norm_store.get(q_norm_weight)
    if hit is not None and hit[0] is k_norm_weight and hit[1] == key:
        return hit[2]
    parts = [q_norm_weight.float().expand(Hq, -1)]
    if Hkv:
        parts += [k_norm_weight.float().expand(Hkv, -1), torch.ones(Hkv, q_norm_weight.shape[0])]
    value = torch.cat(parts).contiguous()
    _head_norm_store[q_norm_weight] = (k_norm_weight, key, value)
    return value
