"""MatFormer slicing at load time: a smaller Gemma 3n read straight out of an E4B checkpoint (E2B, or any mix).

Gemma 3n E4B is a MatFormer: E2B and every size between them are nested inside it. Google publishes slices (the
``google/gemma3n-slicing-configs`` dataset that its MatFormer Lab reads) as two fields:
  * ``ffn_hidden_dims``: one FFN width per KEPT layer, in order;
  * ``layers_skipped``: indices of the full model's layers to drop (may be empty or None).
``load(path, matformer=...)`` takes such a dict, a ``MatformerSpec`` or a preset name (``PRESETS``: the dataset's
slices of E4B, e.g. ``"E2B"`` = layers 20-24 skipped, every width 8192).

What a slice does to the weights, applied to each tensor AS IT IS READ (``MatformerSlice.part`` reads only the kept
part from the safetensors file), so the full model never reaches the device:
  * layer i's ``mlp.gate_proj``/``mlp.up_proj`` [I_i, H] keep their first w rows and ``mlp.down_proj`` [H, I_i] its
    first w columns: MatFormer's sub-models use a prefix of the FFN channels;
  * a skipped layer's tensors are never read; the kept layers are renumbered 0..L'-1 in order;
  * ``embed_tokens_per_layer`` [V, L*P] keeps the kept layers' P-wide column blocks and
    ``per_layer_model_projection`` [L*P, H] their row blocks (layer i owns block i of both).
And to the config, as the MatFormer Lab derives it: ``num_hidden_layers`` = L - len(skipped), ``intermediate_size``
= the widths, ``layer_types`` and ``activation_sparsity_pattern`` = the kept layers' entries (the Lab writes 0.95 for
the kept layers among the first 10, which is the same list for E4B), ``num_kv_shared_layers`` reduced by the number
of skipped KV-shared layers (layers >= L - num_kv_shared_layers). Every other layer keeps its role: a kept layer
that computed its own K/V still does, a kept KV-shared layer still reads the cache of its type's producer.

KV producers. A KV-shared layer reads the K/V of the LAST earlier non-shared layer of its own type (the producer:
layers 18, sliding, and 19, full, in E4B). Skipping a producer would make its kept consumers read another layer's
K/V than they do in the full model (or none at all), a different network than the one trained: such a slice is
refused with an error naming the layer. The MatFormer Lab refuses the same slices (it reserves layers
``first_shared - 2`` and ``first_shared - 1``, which are E4B's producers); a producer whose consumers are all skipped
too may go, since no kept layer's K/V source changes. E2B (skipping 20-24, all KV-shared) is legal: E4B's
consumers are 20-34, so ``num_kv_shared_layers`` goes 15 -> 10 and the producers stay 18 and 19.

Widths: any whole number from 1 to the checkpoint's width of that layer; the Triton kernels mask every tile, so no
multiple is required (the published slices use multiples of 2048, which also keep the weight rows 16-byte aligned).
Every check runs before any weight is read; a bad slice raises ``MatformerError`` (a ``ValueError``) naming the
field.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from gemma3n_fast.reference.config import ConfigError, Gemma3nConfig, TextConfig


class MatformerError(ValueError):
    """A MatFormer slice that is malformed or does not fit the checkpoint; the message names the field."""


@dataclass(frozen=True)
class MatformerSpec:
    """A MatFormer slice: one FFN width per kept layer, and the full model's layers to skip (sorted)."""

    ffn_hidden_dims: tuple[int, ...]
    layers_skipped: tuple[int, ...] = ()
    name: str | None = None  # the preset it came from, if any

    @property
    def num_source_layers(self) -> int:
        return len(self.ffn_hidden_dims) + len(self.layers_skipped)

    def to_dict(self) -> dict:
        """The dataset's two fields (what ``load(..., matformer=...)`` takes back)."""
        return {"ffn_hidden_dims": list(self.ffn_hidden_dims), "layers_skipped": list(self.layers_skipped)}

    def describe(self) -> str:
        """One line for logs and the CLI, e.g. ``MatFormer E2B: 30 of 35 layers (skipped 20-24), FFN 8192 x30``."""
        widths: dict[int, int] = {}
        for w in self.ffn_hidden_dims:
            widths[w] = widths.get(w, 0) + 1
        ffn = " + ".join(f"{w} x{n}" for w, n in sorted(widths.items()))
        skipped = f"skipped {_ranges(self.layers_skipped)}" if self.layers_skipped else "none skipped"
        name = f" {self.name}" if self.name else ""
        return (f"MatFormer{name}: {len(self.ffn_hidden_dims)} of {self.num_source_layers} layers ({skipped}), "
                f"FFN {ffn}")


def _ranges(values) -> str:
    """[20, 21, 22, 24] -> '20-22, 24'."""
    out, run = [], []
    for v in values:
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [v]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


# ---- presets: Google's slicing table for Gemma 3n E4B ---------------------------------------------------
# From the google/gemma3n-slicing-configs dataset (the MatFormer Lab's table): per preset, the FFN width of each
# kept layer in units of 2048 (4 -> 8192, 8 -> 16384, E4B's own width) and the layers skipped; the dataset's own row
# name is accepted as an alias. "-block" marks the dataset's block-level rows, the others are its layer-level rows.
_E4B_LAYERS = 35
_WIDTH_UNIT = 2048
_E4B_SLICES = {
    "E4B": ("Main model", "8" * 35, ()),
    "E2B": ("Config for official E2B Model", "4" * 30, (20, 21, 22, 23, 24)),
    "E1.96B": ("Config for E1.96B (layer-level)", "444484444444444444444444444444", (20, 21, 22, 23, 24)),
    "E2.54B": ("Config for E2.54B (layer-level)", "44448444444444444444888884444444444", ()),
    "E2.69B": ("Config for E2.69B (layer-level)", "44448444484444844448888884444444444", ()),
    "E2.98B": ("Config for E2.98B (layer-level)", "44444444444444488888888884444488888", ()),
    "E3.18B": ("Config for E3.18B (layer-level)", "44448444488888888888888884444844448", ()),
    "E3.39B": ("Config for E3.39B (layer-level)", "44448444488888888888888888888844448", ()),
    "E3.59B": ("Config for E3.59B (layer-level)", "44448888888888888888888888888844448", ()),
    "E3.79B": ("Config for E3.79B (layer-level)", "44448888888888888888888888888888888", ()),
    "E2.49B-block": ("Config for E2.49B (block-level)", "44444444444444444444888884444444444", ()),
    "E2.73B-block": ("Config for E2.73B (block-level)", "44444444444444488888888884444444444", ()),
    "E2.98B-block": ("Config for E2.98B (block-level)", "44444444448888888888888884444444444", ()),
    "E3.24B-block": ("Config for E3.24B (block-level)", "44444444448888888888888888888844444", ()),
    "E3.49B-block": ("Config for E3.49B (block-level)", "44444888888888888888888888888844444", ()),
    "E3.79B-block": ("Config for E3.79B (block-level)", "44444888888888888888888888888888888", ()),
}
PRESETS: dict[str, MatformerSpec] = {
    name: MatformerSpec(tuple(int(u) * _WIDTH_UNIT for u in units), skipped, name)
    for name, (_, units, skipped) in _E4B_SLICES.items()
}
_PRESET_ALIASES = {key.lower(): key for key in PRESETS} | {row.lower(): key for key, (row, _, _) in _E4B_SLICES.items()}


# ---- parsing ------------------------------------------------------------------------------------------
_FIELDS = {"ffn_hidden_dims": "ffn_hidden_dims", "ffn hidden dims": "ffn_hidden_dims",
           "layers_skipped": "layers_skipped", "layers skipped": "layers_skipped"}


def _int_list(value, field: str, allow_none: bool) -> tuple[int, ...]:
    """A list of whole numbers: a JSON list, or the dataset's text form ``"[2_048 * 4, 2_048 * 8]"``."""
    if value is None and allow_none:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if not (text.startswith("[") and text.endswith("]")) and not (allow_none and text == ""):
            raise MatformerError(f"matformer.{field}: expected a list like [8192, 16384], got {value!r}")
        items = [s for s in text.strip("[]").split(",") if s.strip()]
        out = []
        for k, item in enumerate(items):
            product = 1
            for factor in item.split("*"):
                digits = factor.strip().replace("_", "")
                if not digits.isdigit():
                    raise MatformerError(f"matformer.{field}[{k}]: {item.strip()!r} is not a whole number "
                                         "(or a product like 2_048 * 4)")
                product *= int(digits)
            out.append(product)
        return tuple(out)
    if not isinstance(value, (list, tuple)):
        raise MatformerError(f"matformer.{field}: expected a list of whole numbers, got "
                             f"{type(value).__name__} {value!r}")
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise MatformerError(f"matformer.{field}[{k}]: expected a whole number, got {v!r} "
                                 f"({type(v).__name__})")
    return tuple(int(v) for v in value)


def parse_spec(matformer) -> MatformerSpec | None:
    """``None`` | preset name | ``{"ffn_hidden_dims": [...], "layers_skipped": [...]}`` (or the dataset's column
    names "FFN Hidden Dims" / "Layers Skipped", text values included) | ``MatformerSpec`` -> ``MatformerSpec``.

    Checks what needs no checkpoint: the types, widths >= 1, skipped indices >= 0 and distinct."""
    if matformer is None or isinstance(matformer, MatformerSpec):
        return matformer
    if isinstance(matformer, MatformerSlice):
        return matformer.spec
    if isinstance(matformer, str):
        key = _PRESET_ALIASES.get(matformer.strip().lower())
        if key is None:
            raise MatformerError(f"matformer: unknown preset {matformer!r}; presets (slices of Gemma 3n E4B): "
                                 f"{', '.join(PRESETS)}; or pass {{'ffn_hidden_dims': [...], 'layers_skipped': [...]}}")
        return PRESETS[key]
    if not isinstance(matformer, Mapping):
        raise MatformerError("matformer: expected a preset name or a dict {'ffn_hidden_dims': [...], "
                             f"'layers_skipped': [...]}}, got {type(matformer).__name__}")
    fields, unknown = {}, []
    for k, v in matformer.items():
        canonical = _FIELDS.get(str(k).strip().lower())
        if canonical is None:
            unknown.append(k)
        elif canonical in fields:
            raise MatformerError(f"matformer: {canonical} given twice ({k!r})")
        else:
            fields[canonical] = v
    if unknown:
        raise MatformerError(f"matformer: unknown key(s) {unknown}; expected 'ffn_hidden_dims' and (optional) "
                             "'layers_skipped'")
    if "ffn_hidden_dims" not in fields:
        raise MatformerError("matformer: 'ffn_hidden_dims' is required (one FFN width per kept layer)")
    widths = _int_list(fields["ffn_hidden_dims"], "ffn_hidden_dims", allow_none=False)
    skipped = _int_list(fields.get("layers_skipped"), "layers_skipped", allow_none=True)
    if not widths:
        raise MatformerError("matformer.ffn_hidden_dims: empty; it needs one FFN width per kept layer")
    for k, w in enumerate(widths):
        if w < 1:
            raise MatformerError(f"matformer.ffn_hidden_dims[{k}]: an FFN width must be >= 1, got {w}")
    for k, i in enumerate(skipped):
        if i < 0:
            raise MatformerError(f"matformer.layers_skipped[{k}]: layer indices start at 0, got {i}")
    dupes = sorted({i for i in skipped if skipped.count(i) > 1})
    if dupes:
        raise MatformerError(f"matformer.layers_skipped: layer(s) {dupes} listed more than once")
    return MatformerSpec(widths, tuple(sorted(skipped)))


# ---- fitting a spec to a checkpoint -------------------------------------------------------------------
def kv_producers(text: TextConfig) -> dict[int, list[int]]:
    """producer layer -> the KV-shared layers that read its K/V (empty when the model shares no K/V)."""
    out: dict[int, list[int]] = {}
    for i in range(text.first_kv_shared_layer, text.num_hidden_layers):
        out.setdefault(text.kv_source(i), []).append(i)
    return out


def _check_fit(spec: MatformerSpec, text: TextConfig) -> tuple[int, ...]:
    """Raise unless ``spec`` slices a model of this config; -> the kept layers (the checkpoint's indices)."""
    L = text.num_hidden_layers
    if spec.name is not None and spec.name in PRESETS and L != _E4B_LAYERS:
        hint = " (it looks like E2B already: load it without matformer)" if L == 30 else ""
        raise MatformerError(f"matformer preset {spec.name!r} is a slice of Gemma 3n E4B ({_E4B_LAYERS} layers); "
                             f"this checkpoint has {L} layers{hint}")
    out_of_range = [i for i in spec.layers_skipped if i >= L]
    if out_of_range:
        raise MatformerError(f"matformer.layers_skipped: layer(s) {out_of_range} out of range; this checkpoint has "
                             f"{L} layers (0..{L - 1})")
    if len(spec.layers_skipped) == L:
        raise MatformerError(f"matformer.layers_skipped: skips all {L} layers; at least one must stay")
    kept = tuple(i for i in range(L) if i not in spec.layers_skipped)
    if len(spec.ffn_hidden_dims) != len(kept):
        raise MatformerError(
            f"matformer.ffn_hidden_dims: {len(spec.ffn_hidden_dims)} widths given; it needs one per KEPT layer: "
            f"{L} layers - {len(spec.layers_skipped)} skipped = {len(kept)}")
    for k, (i, w) in enumerate(zip(kept, spec.ffn_hidden_dims)):
        if w > text.intermediate_size[i]:
            raise MatformerError(
                f"matformer.ffn_hidden_dims[{k}] = {w} (the checkpoint's layer {i}) exceeds that layer's FFN width "
                f"{text.intermediate_size[i]}: a slice can only keep a prefix of the channels"
                + (f" (preset {spec.name!r})" if spec.name else ""))
    for producer, consumers in kv_producers(text).items():
        kept_consumers = [c for c in consumers if c in kept]
        if producer in spec.layers_skipped and kept_consumers:
            raise MatformerError(
                f"matformer.layers_skipped: layer {producer} is a KV producer ({text.layer_types[producer]}): the "
                f"KV-shared layer(s) {kept_consumers} read its K/V; without it they would read another layer's "
                "K/V than in the full model. Keep it, or skip those layers too")
    return kept


def slice_text_config(text: TextConfig, spec: MatformerSpec, kept: tuple[int, ...]) -> TextConfig:
    """The sliced model's text config: the MatFormer Lab's rules (module docstring), validated again."""
    first_shared = text.first_kv_shared_layer
    skipped_shared = sum(1 for i in spec.layers_skipped if i >= first_shared)
    try:
        return dataclasses.replace(
            text, num_hidden_layers=len(kept), intermediate_size=list(spec.ffn_hidden_dims),
            layer_types=[text.layer_types[i] for i in kept],
            activation_sparsity_pattern=[text.activation_sparsity_pattern[i] for i in kept],
            num_kv_shared_layers=text.num_kv_shared_layers - skipped_shared)
    except ConfigError as e:
        raise MatformerError(f"matformer: the sliced model's config is not valid ({spec.describe()}): {e}") from None


_LAYER_KEY = r"layers\.(\d+)\."
_MLP_KEY = re.compile(_LAYER_KEY + r"mlp\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class MatformerSlice:
    """A spec fitted to one checkpoint: the derived config, and the key/tensor rules the loader applies.

    ``source``: the checkpoint's config; ``config``: the sliced model's (``config.matformer`` = ``spec``);
    ``kept``: the checkpoint's indices of the kept layers, in order (new layer k = old layer ``kept[k]``)."""

    spec: MatformerSpec
    source: Gemma3nConfig
    config: Gemma3nConfig
    kept: tuple[int, ...]

    @property
    def new_index(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}

    def _layer(self, name: str) -> int | None:
        prefix = self.source.weight_prefix
        if not name.startswith(prefix):
            return None
        m = re.match(_LAYER_KEY, name[len(prefix):])
        return int(m.group(1)) if m else None

    def keeps(self, name: str) -> bool:
        """False for the tensors of a skipped layer (never read)."""
        i = self._layer(name)
        return i is None or i not in self.spec.layers_skipped

    def renumber(self, name: str) -> str:
        """A kept layer's checkpoint key with its new layer index; other keys unchanged."""
        i = self._layer(name)
        if i is None:
            return name
        prefix = self.source.weight_prefix
        return f"{prefix}layers.{self.new_index[i]}." + name[len(prefix) + len(f"layers.{i}."):]

    def part(self, name: str, x) -> torch.Tensor | None:
        """The kept part of checkpoint tensor ``name``, or None when it is kept whole.

        ``x``: the tensor, or safetensors' lazy slice (``get_slice``: indexing it reads only that part of the
        file). A tensor already at the sliced shape is returned as is, so slicing twice is harmless; one of
        neither shape is left alone for the loader's shape check to name."""
        prefix, src = self.source.weight_prefix, self.source.text
        if not name.startswith(prefix):
            return None
        local = name[len(prefix):]
        shape = tuple(x.get_shape()) if hasattr(x, "get_shape") else tuple(x.shape)
        m = _MLP_KEY.match(local)
        if m is not None:
            i, proj = int(m.group(1)), m.group(2)
            if i not in self.new_index:
                return None
            full, w = src.intermediate_size[i], self.spec.ffn_hidden_dims[self.new_index[i]]
            dim = 1 if proj == "down_proj" else 0
            if w == full or len(shape) != 2 or shape[dim] != full:
                return None
            return _contiguous(x[:w] if dim == 0 else x[:, :w])
        P, L = src.hidden_size_per_layer_input, src.num_hidden_layers
        if local in ("embed_tokens_per_layer.weight", "per_layer_model_projection.weight"):
            dim = 1 if local.startswith("embed") else 0
            if len(self.kept) == L or len(shape) != 2 or shape[dim] != L * P:
                return None
            blocks = []
            for a, b in _runs(self.kept):  # contiguous runs of kept layers: one read each
                blocks.append(x[:, a * P:b * P] if dim == 1 else x[a * P:b * P])
            return _contiguous(torch.cat(blocks, dim) if len(blocks) > 1 else blocks[0])
        return None


def _runs(kept) -> list[tuple[int, int]]:
    """Sorted layer indices -> [start, stop) runs of consecutive ones."""
    out: list[list[int]] = []
    for i in kept:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def resolve(matformer, config: Gemma3nConfig) -> MatformerSlice | None:
    """Fit a slice (preset name, dict, ``MatformerSpec``; None -> None) to a checkpoint's config. Every check runs
    here, before any weight is read; raises ``MatformerError`` naming the problem."""
    if isinstance(matformer, MatformerSlice):
        if matformer.source is not config and matformer.source != config:
            raise MatformerError("matformer: this MatformerSlice was fitted to another checkpoint's config; pass "
                                 "its spec instead")
        return matformer
    spec = parse_spec(matformer)
    if spec is None:
        return None
    if config.matformer is not None:
        raise MatformerError(f"matformer: this config is already a slice ({config.matformer.describe()}); "
                             "slice the checkpoint's own config")
    kept = _check_fit(spec, config.text)
    text = slice_text_config(config.text, spec, kept)
    return MatformerSlice(spec, config, dataclasses.replace(config, text=text, matformer=spec), kept)


def slice_config(config: Gemma3nConfig, matformer) -> Gemma3nConfig:
    """The config of ``config``'s model sliced by ``matformer`` (no weights involved)."""
    sliced = resolve(matformer, config)
    return config if sliced is None else sliced.config

