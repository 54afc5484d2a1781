"""Weight-only int8 / int4 quantization: the stored format the kernels read and its dequantization (the truth
every quantized kernel is checked against: dequantize to fp32, then the plain op).

A weight W [N, K] (an nn.Linear weight, output channel n, input channel k; or an embedding table, row n):

  int8  per output channel, symmetric (gpt-fast's int8): scale[n] = max_k |W[n, k]| / 127 rounded to a bf16
        value (stored fp32: torch's packed bf16 CPU matmul reads bf16 scales, and this way it computes exactly
        this weight), q[n, k] = round(W[n, k] / scale[n]) clamped to [-127, 127], stored int8 [N, K].
        W ~ q * scale[n].
  int4  per group of G consecutive input channels, symmetric with all 16 levels (llama.cpp's Q4_0 rule): in each
        group, m = the element of largest magnitude (with its sign) and scale = m / -8, rounded to bf16 (bf16: the
        range of fp32, so tiny or huge groups keep their scale; 16 bits per G weights like Marlin's fp16 scales);
        q = clamp(round(W / scale), -8, 7), built on the ROUNDED scale, so m itself is exact (q = -8).
        Stored offset by 8 as a nibble, two per byte along K: byte [n, j] holds k = 2j in its low nibble and
        k = 2j + 1 in its high one, uint8 [N, ceil(K / 2)]; scales bf16 [N, ceil(K / G)]. Any K works: the last
        group may be partial (its own scale), an odd K pads one zero nibble (the value 8, weight 0).
        W ~ (nibble - 8) * scale[n, k // G].  G must be even (a byte never straddles two groups).

Why these choices: symmetric because the kernels then dequantize with one multiply (no zero point to load and
subtract) and the side data is one scale per row or group; per-channel int8 loses ~0.3 % (relative Frobenius) on
Gaussian rows, so groups buy nothing there. Packing along K keeps a row's bytes contiguous: a GEMV program reading
BLOCK_K weights of a row reads BLOCK_K / 2 consecutive bytes (16-byte vectors, coalesced like the 16-bit weights),
and a gather of one embedding row reads one contiguous run. Quantizing row-wise also commutes with stacking rows:
q|k|v or gate|up quantized one by one and concatenated equal the fused matrix quantized (``QuantizedWeight.cat``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

KINDS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64  # int4: see README "Quantized weights" for the error / bytes trade-off behind it
_ROWS_PER_CHUNK = 4096  # quantize big tables (the 262k-row LM head) in row chunks: bounded fp32 temporaries


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [N, K] weight: ``data`` (int8 [N, K] or packed uint8 [N, ceil(K/2)]), ``scales`` (fp32 [N] or
    bf16 [N, ceil(K/G)]), the float shape and, for int4, the group size. Not a tensor: the ops that take one
    (``reference.ops`` dequantizes, the kernels read it packed) say so in their signatures."""
    kind: str
    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int = 0  # int4 only

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight: packed values + scales (what a full read moves)."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self) -> torch.Tensor:
        """The weight the kernels use, in fp32 [N, K] (exact: q * scale)."""
        N, K = self.shape
        if self.kind == "int8":
            return self.data.float() * self.scales.float()[:, None]
        q = unpack_int4(self.data)[:, :K].float()
        return q * self.scales.float().repeat_interleave(self.group_size, dim=1)[:, :K]

    def take_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (any shape of ids in [0, N)) dequantized to fp32 [..., K]: an embedding gather."""
        flat = idx.reshape(-1)
        part = replace(self, data=self.data[flat], scales=self.scales[flat], shape=(flat.numel(), self.shape[1]))
        return part.dequantize().view(*idx.shape, self.shape[1])

    def __getitem__(self, rows: slice) -> QuantizedWeight:
        """``w[a:b]``: a range of output rows, as views (like a float weight's ``w[a:b]``)."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"QuantizedWeight: only a contiguous range of rows can be taken (w[a:b]), got {rows!r}")
        start, stop, _ = rows.indices(self.shape[0])
        return self.rows(start, max(stop - start, 0))

    def rows(self, start: int, length: int) -> QuantizedWeight:
        """Output rows [start, start + length) as views (a fused matrix's parts)."""
        return replace(self, data=self.data.narrow(0, start, length), scales=self.scales.narrow(0, start, length),
                       shape=(length, self.shape[1]))

    def to(self, device) -> QuantizedWeight:
        return replace(self, data=self.data.to(device), scales=self.scales.to(device))

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack the output rows of weights of one kind, K and G (quantization is per row: this equals quantizing
        the stacked float weight)."""
        first = parts[0]
        for p in parts[1:]:
            if (p.kind, p.shape[1], p.group_size) != (first.kind, first.shape[1], first.group_size):
                raise ValueError(f"QuantizedWeight.cat: parts differ in kind, K or group size: "
                                 f"{[(q.kind, q.shape[1], q.group_size) for q in parts]}")
        return replace(first, data=torch.cat([p.data for p in parts]), scales=torch.cat([p.scales for p in parts]),
                       shape=(sum(p.shape[0] for p in parts), first.shape[1]))

    def __repr__(self) -> str:
        g = f", G={self.group_size}" if self.kind == "int4" else ""
        return f"QuantizedWeight({self.kind}, {list(self.shape)}{g}, {self.nbytes / 1e6:.2f} MB, {self.device})"


def quantized_nbytes(N: int, K: int, kind: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of an [N, K] weight stored as ``kind`` (values + scales), without building it."""
    if kind == "int8":
        return N * K + 4 * N
    return N * ((K + 1) // 2) + 2 * N * (-(-K // group_size))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, J] -> int8 [N, 2J] signed values: column 2j from the low nibble of byte j, 2j + 1 from the high."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def check_kind(kind: str | None, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Raise a clear error for an unknown quantization or an unusable int4 group size."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"quantize: expected one of {KINDS} or None, got {kind!r}")
    if kind == "int4" and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
        raise ValueError(f"quantize: the int4 group size must be an even integer >= 2 (a byte holds two values of "
                         f"one group), got {group_size!r}")


def quantize(weight: torch.Tensor, kind: str, group_size: int = DEFAULT_GROUP_SIZE, *,
             device: torch.device | str | None = None) -> QuantizedWeight:
    """Quantize a float [N, K] weight to ``kind``, in row chunks (bounded fp32 temporaries), each chunk moved to
    ``device`` first (default: the weight's): a checkpoint tensor read on the CPU is quantized on the GPU and
    only its quantized form stays there."""
    check_kind(kind, group_size)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize: expected a float [N, K] weight, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    device = weight.device if device is None else torch.device(device)
    parts = [_quantize_rows(weight[i:i + _ROWS_PER_CHUNK].to(device).float(), kind, group_size)
             for i in range(0, N, _ROWS_PER_CHUNK)]
    data = torch.cat([p[0] for p in parts])
    scales = torch.cat([p[1] for p in parts])
    return QuantizedWeight(kind, data, scales, (N, K), group_size if kind == "int4" else 0)


def _quantize_rows(w: torch.Tensor, kind: str, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = w.shape
    if kind == "int8":
        scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()  # a bf16 value (see the module docstring)
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # an all-zero row: q = 0
        q = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale
    groups = -(-K // G)
    padded = torch.nn.functional.pad(w, (0, groups * G - K)).view(N, groups, G)  # pad: zeros never win the max
    idx = padded.abs().argmax(dim=2, keepdim=True)
    scale = (padded.gather(2, idx) / -8).squeeze(2).to(torch.bfloat16)  # m / -8, rounded: the grid is built on it
    s = scale.float()[:, :, None]
    q = torch.where(s != 0, torch.round(padded / torch.where(s != 0, s, 1.0)), 0.0).clamp_(-8, 7)
    q = q.view(N, groups * G)[:, :K]
    if K % 2:
        q = torch.nn.functional.pad(q, (0, 1))  # the pad nibble holds 8: weight 0
    nib = (q + 8).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4), scale


# ---- modules of a quantized reference model ------------------------------------------------------------
class QuantizedLinear(torch.nn.Module):
    """A bias-free nn.Linear whose weight is a ``QuantizedWeight`` (``.weight``, as the fast model reads it).
    ``transposed``: the weight is stored as W^T [in, out] (a sparse layer's down projection: its kernel gathers
    the rows of the active channels, so it is quantized in that layout). Forward = ``reference.ops.project``:
    dequantize to fp32, multiply in fp32, round to x.dtype once."""

    def __init__(self, weight: QuantizedWeight, transposed: bool = False):
        super().__init__()
        self.weight, self.transposed = weight, transposed

    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight in nn.Linear's [out, in] layout."""
        w = self.weight.dequantize()
        return w.t() if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return torch.nn.functional.linear(x.float(), self.dequantized()).to(x.dtype)
        from gemma3n_fast.reference.ops import project

        return project(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight!r}, transposed={self.transposed}"


class QuantizedEmbedding(torch.nn.Module):
    """An embedding table stored quantized (``.weight``); the reference model gathers rows through
    ``reference.ops.token_embeddings`` (rows dequantized, rounded to the activation dtype)."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight = weight

    def extra_repr(self) -> str:
        return repr(self.weight)
