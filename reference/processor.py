"""Gemma 3n prompt processing: tokenizer, chat template, image/audio placeholder expansion (no transformers).

    proc = Processor.from_pretrained("path/to/checkpoint")
    batch = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    # batch: input_ids, attention_mask, token_type_ids [B, T]; pixel_values [N_img, 3, 768, 768];
    #        input_features [N_audio, T_a, 128], input_features_mask [N_audio, T_a]

Equal to HF's ``Gemma3nProcessor``: the chat template renders one ``<image_soft_token>`` per image and one
``<audio_soft_token>`` per clip; the processor then replaces each with
``"\\n\\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\\n\\n"`` (audio: 188 soft tokens between
``<start_of_audio>``/``<end_of_audio>``). The tokenizer adds ``<bos>`` unless the text already starts with it
(the chat template writes it). ``token_type_ids`` is 1 on image soft tokens, 3 on audio soft tokens, else 0.
Padding is on the left by default (Gemma's tokenizer default; ``tokenizer_config.json`` may say otherwise).

Long audio (beyond HF, which cuts every clip to 30 s): a clip longer than ``audio_segment_seconds`` (default
30 s) is split into consecutive segments, and its one placeholder becomes one audio block per segment, in
order -- the same ids and features as the pieces given as separate clips. ``truncate_audio=True`` restores
HF's cut. Arrays are read at ``sampling_rate`` (default 16 kHz) and resampled; integer PCM is scaled to [-1, 1].
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

# Default special-token strings; a checkpoint's tokenizer_config.json ("extra_special_tokens") may rename them.
DEFAULT_MM_TOKENS = {
    "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>",
}
TOKEN_TYPE_IMAGE, TOKEN_TYPE_AUDIO = 1, 3  # HF's mm_token_type_ids codes (2 is video)

# The Gemma turn format, used when a checkpoint ships no chat template. Same output as the official
# Gemma 3n template: <bos>, system text folded into the first user turn, roles must alternate,
# assistant -> model, text items trimmed, image/audio items become one placeholder each.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set sys = '' -%}{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set c = messages[0]['content'] -%}"
    "{%- set sys = (c if c is string else c[0]['text']) + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{%- if loop.first %}{{ sys }}{% endif -%}"
    "{%- if m['content'] is string -%}{{ m['content'] | trim }}"
    "{%- elif m['content'] is iterable -%}"
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ image_token }}"
    "{%- elif item['type'] == 'audio' -%}{{ audio_token }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class ProcessorError(ValueError):
    """Bad prompt input: placeholder/media count mismatch, bad message format, missing tokenizer files."""


# ----------------------------------------------------------------------------------------------------------
# Chat template rendering (jinja2, with the helpers HF templates rely on)


def _jinja_env():
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


CHAT_ROLES = ("system", "user", "assistant", "model")  # "model" is Gemma's own name for "assistant"
_MEDIA_KEYS = {"image": ("image", "url", "path"), "audio": ("audio", "url", "path")}


def validate_messages(messages, require_media: bool = False) -> None:
    """Raise ``ProcessorError`` (a ValueError) naming the problem unless ``messages`` is one Gemma conversation.

    A conversation is a non-empty list of ``{"role": ..., "content": ...}`` dicts: an optional first "system"
    message, then "user" and "assistant" (or "model") turns alternating, starting with "user". Content is a
    string or a list of items ``{"type": "text", "text": str}``, ``{"type": "image", "image"|"url"|"path": ...}``,
    ``{"type": "audio", "audio"|"url"|"path": ...}``; an image/audio item without its source is fine for
    rendering the prompt text (the media are then given to the processor call), an error with
    ``require_media`` (tokenizing). These are the rules Gemma's chat template enforces or silently relies on
    (a system message later in the list, or alone, would be dropped or rendered as a turn).
    Pure: no tokenizer needed, so the text-only chat path can call it too.
    """
    if not isinstance(messages, (list, tuple)):
        raise ProcessorError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                             f"{type(messages).__name__}")
    if not messages:
        raise ProcessorError("messages is empty: give at least one {'role': 'user', 'content': ...} message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ProcessorError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        missing = [k for k in ("role", "content") if m.get(k) is None]
        if missing:
            raise ProcessorError(f"message {i} has no {' and no '.join(repr(k) for k in missing)} "
                                 f"(keys: {sorted(map(str, m))})")
        role = m["role"]
        if role not in CHAT_ROLES:
            raise ProcessorError(f"message {i}: unknown role {role!r}; Gemma's chat format knows {list(CHAT_ROLES)}")
        content = m["content"]
        if isinstance(content, (list, tuple)):
            for j, item in enumerate(content):
                where = f"message {i}, content item {j}"
                if not isinstance(item, dict) or item.get("type") not in ("text", "image", "audio"):
                    raise ProcessorError(f"{where}: content items must be dicts with type text|image|audio, "
                                         f"got {item!r:.80}")
                kind = item["type"]
                if kind == "text" and not isinstance(item.get("text"), str):
                    raise ProcessorError(f"{where}: a text item needs a 'text' string")
                if require_media and kind in _MEDIA_KEYS and all(item.get(k) is None for k in _MEDIA_KEYS[kind]):
                    raise ProcessorError(f"{where}: an {kind} item needs one of the keys "
                                         f"{list(_MEDIA_KEYS[kind])} to be tokenized")
        elif not isinstance(content, str):
            raise ProcessorError(f"message {i}: content must be a string or a list of items, got "
                                 f"{type(content).__name__}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise ProcessorError("messages hold only a system message: add a {'role': 'user', ...} message after it")
    for k, m in enumerate(turns):
        i = k + len(messages) - len(turns)
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] == "system":
            raise ProcessorError(f"message {i}: a system message may only come first")
        if (m["role"] == "user") != (expected == "user"):
            raise ProcessorError(f"message {i}: roles must alternate user/assistant/user/... (after an optional "
                                 f"system message); expected {expected!r}, got {m['role']!r}")


def _media_in(messages) -> tuple[list, list]:
    """Images and audio clips named in the messages, in order (keys as HF: image/url/path, audio/url/path)."""
    images, audio = [], []
    for m in messages:
        if isinstance(m["content"], str):
            continue
        for item in m["content"]:
            if item["type"] in _MEDIA_KEYS:  # the first source key given, as HF reads it
                source = next(item[k] for k in _MEDIA_KEYS[item["type"]] if item.get(k) is not None)
                (images if item["type"] == "image" else audio).append(source)
    return images, audio


# ----------------------------------------------------------------------------------------------------------


class Processor:
    """Tokenizer + chat template + image processor + audio feature extractor, as HF's Gemma3nProcessor."""

    def __init__(self, tokenizer, chat_template: str | None = None, image_processor=None, feature_extractor=None,
                 image_seq_length: int = 256, audio_seq_length: int = 188, add_bos_token: bool = True,
                 add_eos_token: bool = False, padding_side: str = "left", special_tokens: dict | None = None,
                 audio_segment_seconds: float | None = None, truncate_audio: bool | None = None):
        """``audio_segment_seconds`` / ``truncate_audio``: defaults for every call; None takes the feature
        extractor's settings (30 s segments, no truncation)."""
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.chat_template = chat_template or BUILTIN_CHAT_TEMPLATE
        self.has_own_chat_template = chat_template is not None
        self._image_processor, self._feature_extractor = image_processor, feature_extractor
        self.image_seq_length, self.audio_seq_length = int(image_seq_length), int(audio_seq_length)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side

        tok = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               **DEFAULT_MM_TOKENS, **(special_tokens or {})}
        self.special_tokens = tok
        for name, text in tok.items():
            setattr(self, name, text)
            setattr(self, name + "_id", tokenizer.token_to_id(text))
        for name in ("bos_token", "pad_token", *DEFAULT_MM_TOKENS):
            if getattr(self, name + "_id") is None:
                raise ProcessorError(f"the tokenizer has no {name} {tok[name]!r}")
        self.full_image_sequence = f"\n\n{self.boi_token}{self.image_token * self.image_seq_length}{self.eoi_token}\n\n"
        self.full_audio_sequence = f"\n\n{self.boa_token}{self.audio_token * self.audio_seq_length}{self.eoa_token}\n\n"
        self._template = None
        if audio_segment_seconds is not None and (isinstance(audio_segment_seconds, bool) or not (
                isinstance(audio_segment_seconds, numbers.Real) and 0 < audio_segment_seconds < math.inf)):
            raise ProcessorError(f"audio_segment_seconds must be a positive number of seconds, "
                                 f"got {audio_segment_seconds!r}")  # its upper bound is the extractor's window
        if truncate_audio not in (None, True, False):
            raise ProcessorError(f"truncate_audio must be True, False or None, got {truncate_audio!r}")
        self.audio_segment_seconds, self.truncate_audio = audio_segment_seconds, truncate_audio

    # -- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, tokenizer=None, **overrides) -> "Processor":
        """From a checkpoint folder: tokenizer.json, tokenizer_config.json, chat template, processor configs.
        ``tokenizer``: the folder's tokenizer.json already parsed (``tokenizers.Tokenizer``), else it is read here.
        A file that cannot be parsed raises ``ProcessorError`` naming it."""
        from gemma3n_fast.reference.loader import CheckpointError, read_tokenizer

        path = Path(path)
        if tokenizer is None:
            if not (path / "tokenizer.json").is_file():
                raise ProcessorError(f"no tokenizer.json in {path}")
            try:
                tokenizer = read_tokenizer(path / "tokenizer.json")
            except CheckpointError as e:
                raise ProcessorError(str(e)) from None

        def read(name):
            f = path / name
            if not f.is_file():
                return {}
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ProcessorError(f"{f}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ProcessorError(f"{f}: expected a JSON object ({{...}}), got {type(d).__name__}")
            return d

        tok_cfg, proc_cfg, pre_cfg = read("tokenizer_config.json"), read("processor_config.json"), \
            read("preprocessor_config.json")
        # Chat template: chat_template.jinja, then chat_template.json, then tokenizer_config.json.
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = read("chat_template.json").get("chat_template")
        if template is None:
            template = proc_cfg.get("chat_template") or tok_cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: take "default"
            template = {t["name"]: t["template"] for t in template}.get("default")

        special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if isinstance(tok_cfg.get(k), str)}
        # The multimodal token strings: flat keys (HF 5), "model_specific_special_tokens" or a dict-valued
        # "extra_special_tokens" (HF 4.5x checkpoints).
        for source in (tok_cfg.get("extra_special_tokens"), tok_cfg.get("model_specific_special_tokens"), tok_cfg):
            if isinstance(source, dict):
                special.update({k: v for k, v in source.items() if k in DEFAULT_MM_TOKENS and isinstance(v, str)})

        # Image/audio settings: processor_config.json (HF 5) nests them; older checkpoints keep them
        # flat in preprocessor_config.json (image and audio keys side by side).
        image_cfg = proc_cfg.get("image_processor") or pre_cfg
        audio_cfg = proc_cfg.get("feature_extractor") or pre_cfg
        seq = {**pre_cfg, **proc_cfg}
        kwargs = dict(
            chat_template=template,
            image_processor=_lazy("image", image_cfg), feature_extractor=_lazy("audio", audio_cfg),
            image_seq_length=seq.get("image_seq_length", 256), audio_seq_length=seq.get("audio_seq_length", 188),
            add_bos_token=tok_cfg.get("add_bos_token", True), add_eos_token=tok_cfg.get("add_eos_token", False),
            padding_side=tok_cfg.get("padding_side", "left"), special_tokens=special,
        )
        kwargs.update(overrides)
        return cls(tokenizer, **kwargs)

    @property
    def image_processor(self):
        if isinstance(self._image_processor, _lazy):
            self._image_processor = self._image_processor.build()
        if self._image_processor is None:
            from gemma3n_fast.reference.vision import ImageProcessor

            self._image_processor = ImageProcessor()
        return self._image_processor

    @property
    def feature_extractor(self):
        if isinstance(self._feature_extractor, _lazy):
            self._feature_extractor = self._feature_extractor.build()
        if self._feature_extractor is None:
            self._feature_extractor = _lazy("audio", {}).build()
        return self._feature_extractor

    # -- tokenizer -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; special-token strings in the text become their ids; <bos> prepended if configured."""
        if not isinstance(text, str):
            raise ProcessorError(f"text must be a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos_token else []) + ids
            ids = ids + ([self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else [])
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            raise ProcessorError("decode takes one sequence; use batch_decode for a batch")
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def stream_decoder(self, skip_special_tokens: bool = True):
        """Incremental decoding for streaming: ``d = proc.stream_decoder(); d.step(proc.tokenizer, id)`` returns
        ``None`` until a complete UTF-8 chunk exists (Gemma's byte-fallback pieces)."""
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=skip_special_tokens)

    # -- chat template -------------------------------------------------------------------------------------

    def render_chat(self, messages, add_generation_prompt: bool = False, **template_kwargs) -> str:
        """Render one conversation with the checkpoint's chat template (or the built-in Gemma turn format)."""
        import jinja2

        validate_messages(messages)
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        # Keys whose value is None are dropped, as HF does (templates handle a missing key better).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **template_kwargs})
        except jinja2.exceptions.TemplateError as e:
            raise ProcessorError(f"chat template: {e}") from None

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "pt", padding: bool = True,
                            padding_side: str | None = None, sampling_rate: int | None = None,
                            audio_segment_seconds: float | None = None, truncate_audio: bool | None = None,
                            **template_kwargs):
        """One conversation or a batch of them -> prompt text, or (tokenize=True) ids / the full batch dict.

        Images and audio are taken from the content items (``{"type": "image", "image"|"url"|"path": ...}``,
        ``{"type": "audio", "audio"|"path": ...}``) in order. ``sampling_rate``, ``audio_segment_seconds`` and
        ``truncate_audio`` are the audio options of ``__call__``.
        """
        batched = isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        prompts = [self.render_chat(c, add_generation_prompt, **template_kwargs) for c in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        for c in conversations:
            validate_messages(c, require_media=True)
        per_conv = [_media_in(c) for c in conversations]
        images = [im for ims, _ in per_conv for im in ims]
        audio = [a for _, auds in per_conv for a in auds]
        out = self(text=prompts, images=images or None, audio=audio or None, return_tensors=return_tensors,
                   padding=padding, padding_side=padding_side,
                   add_special_tokens=not prompts[0].startswith(self.bos_token), sampling_rate=sampling_rate,
                   audio_segment_seconds=audio_segment_seconds, truncate_audio=truncate_audio)
        return out if return_dict else out["input_ids"]

    # -- the processor call --------------------------------------------------------------------------------

    def __call__(self, text=None, images=None, audio=None, return_tensors: str | None = "pt", padding=True,
                 padding_side: str | None = None, add_special_tokens: bool = True, sampling_rate: int | None = None,
                 audio_segment_seconds: float | None = None, truncate_audio: bool | None = None):
        """Text with one ``<image_soft_token>`` per image and one ``<audio_soft_token>`` per clip -> model inputs.

        ``images``: a list (or one list per prompt) of paths / PIL images / arrays / tensors; ``audio``: a list
        of clips: WAV paths, or 1-D (2-D: channels averaged) arrays / tensors at ``sampling_rate`` (default
        16 kHz; other rates are resampled), float in [-1, 1] or integer PCM (scaled). Without text, each prompt
        is just its placeholders.

        A clip longer than ``audio_segment_seconds`` (default: the feature extractor's, 30 s) becomes
        ceil(length / segment) consecutive segments: its placeholder expands to that many audio blocks and
        ``input_features`` gets one row per segment, in order. ``truncate_audio=True``: HF's behaviour, one
        block per clip and the clip cut to 30 s.
        """
        if text is None and images is None and audio is None:
            raise ProcessorError("give at least one of text, images, audio")
        if return_tensors not in ("pt", None):
            raise ProcessorError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        image_groups = _group_images(images) if images is not None else None
        audio = _list_of_audio(audio) if audio is not None else None
        if isinstance(text, str):
            text = [text]
        if not text:
            if image_groups is not None:
                text = [" ".join([self.image_token] * len(g)) for g in image_groups]
            elif audio is not None:
                text = [self.audio_token] * len(audio)
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise ProcessorError("text must be a string or a list of strings")
        text = list(text)

        n_images = sum(len(g) for g in image_groups) if image_groups is not None else 0
        n_image_slots = sum(t.count(self.image_token) for t in text)
        if n_image_slots != n_images:
            raise ProcessorError(f"the prompts have {n_image_slots} {self.image_token} placeholders but "
                                 f"{n_images} images were given")
        n_audio = len(audio) if audio is not None else 0
        n_audio_slots = sum(t.count(self.audio_token) for t in text)
        if n_audio_slots != n_audio:
            raise ProcessorError(f"the prompts have {n_audio_slots} {self.audio_token} placeholders but "
                                 f"{n_audio} audio clips were given")

        data = {}
        if n_images:
            data["pixel_values"] = self.image_processor([im for g in image_groups for im in g])
            text = [t.replace(self.image_token, self.full_image_sequence) for t in text]
        if n_audio:
            features, segments_per_clip = self._audio_features(audio, sampling_rate, audio_segment_seconds,
                                                               truncate_audio)
            data.update(features)
            text = self._expand_audio_placeholders(text, segments_per_clip)

        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in text]
        data.update(self._pad(ids, padding, padding_side or self.padding_side, return_tensors))
        return data

    def _pad(self, ids: list[list[int]], padding, side: str, return_tensors) -> dict:
        if side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {side!r}")
        lengths = [len(x) for x in ids]
        width = max(lengths)
        if not padding and return_tensors == "pt" and len(set(lengths)) > 1:
            raise ProcessorError(f"prompts have different lengths {lengths}; pass padding=True")
        rows, masks, types = [], [], []
        for x in ids:
            n_pad = width - len(x) if padding else 0
            pad, pad0 = [self.pad_token_id] * n_pad, [0] * n_pad
            tt = [TOKEN_TYPE_IMAGE if i == self.image_token_id else TOKEN_TYPE_AUDIO if i == self.audio_token_id
                  else 0 for i in x]
            if side == "left":
                rows.append(pad + x), masks.append(pad0 + [1] * len(x)), types.append(pad0 + tt)
            else:
                rows.append(x + pad), masks.append([1] * len(x) + pad0), types.append(tt + pad0)
        out = {"input_ids": rows, "attention_mask": masks, "token_type_ids": types}
        if return_tensors == "pt":
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        return out

    def _audio_features(self, audio: list, sampling_rate: int | None, audio_segment_seconds: float | None,
                        truncate_audio: bool | None) -> tuple[dict, list[int]]:
        """Clips -> ({input_features [N, T, F], input_features_mask [N, T]}, segments per clip), N = all segments.

        Every clip is first brought to the extractor's rate (files at their header's rate, arrays at
        ``sampling_rate``), so segment lengths are counted in the samples the extractor sees."""
        from gemma3n_fast.reference.audio_features import AudioWarning, load_audio

        fe = self.feature_extractor
        rate = getattr(fe, "sampling_rate", 16_000)
        arrays = sum(not isinstance(a, (str, os.PathLike)) for a in audio)
        if sampling_rate is None and arrays:  # as HF's extractor warns; a file's header gives its rate
            warnings.warn(f"audio: {arrays} array clip(s) without sampling_rate are read as {rate} Hz; pass "
                          "sampling_rate=... (the processor call, apply_chat_template or model.chat_inputs / chat) "
                          "for audio at another rate, which is then resampled", AudioWarning, stacklevel=4)
        clips = [load_audio(a, sampling_rate=rate if sampling_rate is None else sampling_rate, target_rate=rate)
                 for a in audio]
        seconds = self.audio_segment_seconds if audio_segment_seconds is None else audio_segment_seconds
        truncate = self.truncate_audio if truncate_audio is None else truncate_audio
        options = {k: v for k, v in (("audio_segment_seconds", seconds), ("truncate_audio", truncate))
                   if v is not None}
        feats = fe(clips, sampling_rate=rate, **options)  # the clips are at the extractor's rate now
        out = {}
        for key in ("input_features", "input_features_mask", "segments_per_clip"):
            if key not in feats:
                raise ProcessorError(f"the audio feature extractor returned no {key!r} (the processor needs "
                                     "gemma3n_fast.reference.audio_features.AudioFeatureExtractor)")
            v = feats[key]
            out[key] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        segments = [int(n) for n in out.pop("segments_per_clip").reshape(-1)]
        if len(segments) != len(clips) or sum(segments) != out["input_features"].shape[0]:
            raise ProcessorError(f"the audio feature extractor gave {out['input_features'].shape[0]} rows and "
                                 f"segments_per_clip={segments} for {len(clips)} clips")
        return out, segments

    def _expand_audio_placeholders(self, text: list[str], segments_per_clip: list[int]) -> list[str]:
        """The k-th audio placeholder over all prompts -> one audio block per segment of the k-th clip.

        Consecutive blocks are exactly what the pieces given as separate, adjacent clips would produce."""
        blocks = iter(segments_per_clip)
        out = []
        for t in text:
            head, *rest = t.split(self.audio_token)
            out.append(head + "".join(self.full_audio_sequence * next(blocks) + after for after in rest))
        return out


class _lazy:
    """An image processor / feature extractor built from its config only when first used."""

    def __init__(self, kind: str, cfg: dict):
        self.kind, self.cfg = kind, dict(cfg or {})

    def build(self):
        if self.kind == "image":
            from gemma3n_fast.reference.vision import ImageProcessor

            return ImageProcessor.from_dict(self.cfg)
        from gemma3n_fast.reference.audio_features import AudioFeatureExtractor

        return AudioFeatureExtractor.from_dict(self.cfg) if hasattr(AudioFeatureExtractor, "from_dict") \
            else AudioFeatureExtractor()


def _group_images(images) -> list[list]:
    """One image, a flat list (HF then splits it over the prompts by their placeholders), or one list per prompt."""
    if not isinstance(images, (list, tuple)):
        return [[images]]
    if images and all(isinstance(g, (list, tuple)) for g in images):
        return [list(g) for g in images]
    return [list(images)]


def _list_of_audio(audio) -> list:
    if isinstance(audio, (str, Path)):
        return [audio]
    if isinstance(audio, np.ndarray) and audio.ndim == 1:
        return [audio]
    if isinstance(audio, torch.Tensor) and audio.ndim == 1:
        return [audio]
    if isinstance(audio, (list, tuple)) and audio and all(isinstance(a, (int, float)) for a in audio):
        return [np.asarray(audio, dtype=np.float32)]  # one clip as a list of samples
    if not isinstance(audio, (list, tuple)):
        raise ProcessorError(f"audio must be a 1-D array, a path or a list of them, got {type(audio).__name__}")
    return list(audio)
