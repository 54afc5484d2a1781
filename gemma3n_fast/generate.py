"""generate(), stream() and chat() for the fast model (bound onto ``Gemma3nFast``).

Decode loop (gpt-fast style):
  * prefill runs once (chunked for long prompts); the KV-shared layers see only the last prompt token;
  * every decode step reads and writes static buffers only (token, position, column, done flags, output
    buffer, KV cache), samples on the device and has no host synchronisation;
  * on CUDA the step is captured once into a CUDA graph (after warm-up) and replayed; the graph and its
    buffers are kept for the next call with the same batch size / cache length / sampling settings;
  * the eos check (a host sync) happens every ``EOS_CHECK_EVERY`` steps; finished rows emit pad_token_id,
    and the output is trimmed to where the last row finished, so the result equals HF's.
Sampling noise (exponential race = exact categorical sampling) is drawn from the seeded generator into a
static buffer before each replay, so a seed reproduces the same tokens.
"""
from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.nn.functional as F

from gemma3n_fast.cache import CacheLengthError, StaticKVCache

log = logging.getLogger("gemma3n_fast")

EOS_CHECK_EVERY = 8
PREFILL_CHUNK = 1024  # columns per prefill chunk (bounds activation memory for very long prompts)
CACHE_ROUND = 256  # cache lengths are rounded up so that a captured graph is reused across calls


class _Sampler:
    """Static-shape sampling on the device. greedy -> argmax; else temperature, top-k, top-p (HF order)."""

    def __init__(self, greedy: bool, temperature: float, top_k: int | None, top_p: float | None):
        self.greedy, self.temperature, self.top_k, self.top_p = greedy, temperature, top_k, top_p

    def key(self):
        return (self.greedy, self.temperature, self.top_k, self.top_p)

    def __call__(self, logits: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """logits [B, V] -> token ids [B] (int64). noise: [B, V] Exp(1) samples (sampling only)."""
        if self.greedy:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            remove = cum <= (1 - self.top_p)
            remove[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        probs = scores.softmax(-1)
        return (probs / noise).argmax(-1)  # exponential race: P(argmax = i) = probs[i]


class _DecodeState:
    """Static buffers of one decode configuration (what a CUDA graph reads and writes)."""

    def __init__(self, model, batch: int, max_length: int, new_tokens: int, eos: list[int], pad: int):
        dev = model.device
        self.cache = StaticKVCache(model.text_config, batch, max_length, dev, model.dtype)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.int32, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.out = torch.full((batch, new_tokens), pad, dtype=torch.long, device=dev)
        self.eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self.pad = torch.tensor(pad, dtype=torch.long, device=dev)
        self.noise = torch.ones(batch, model.text_config.vocab_size, device=dev)
        self.graph = None

    def record(self, nxt: torch.Tensor) -> None:
        """Store token ids [B] at the current step (pad for finished rows), update done and the step inputs."""
        nxt = torch.where(self.done, self.pad, nxt)
        self.out.index_copy_(1, self.step, nxt[:, None])
        self.done |= torch.isin(nxt, self.eos)
        self.tokens.copy_(nxt[:, None])
        self.step += 1


def _decode_step(model, st: _DecodeState, sampler: _Sampler) -> None:
    """One token for every row; static shapes, no host sync (capturable)."""
    from gemma3n_fast.model import _KV

    x, per_layer = model._embed(st.tokens, decode=True)
    kv = _KV(st.pos, st.cache, col=st.col)
    streams = model._decoder(x, per_layer, st.pos, kv, decode=True)
    logits = model._logits(model._collapse(streams))[:, -1]
    st.record(sampler(logits, st.noise))
    st.pos += 1
    st.col += 1


def _capture(model, st: _DecodeState, sampler: _Sampler) -> None:
    """Warm up the step (compiles the kernels) on a side stream, then capture it once into a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _decode_step(model, st, sampler)
    torch.cuda.current_stream().wait_stream(side)
    st.step.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _decode_step(model, st, sampler)
    st.graph = graph


def _eos_and_pad(model, eos_token_id, pad_token_id):
    gc, c = model.generation_config, model.text_config
    eos = eos_token_id if eos_token_id is not None else gc.get("eos_token_id", c.eos_token_id)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = pad_token_id if pad_token_id is not None else gc.get("pad_token_id", c.pad_token_id)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


@torch.no_grad()
def _generate_steps(model, input_ids, attention_mask=None, pixel_values=None, input_features=None,
                    input_features_mask=None, max_new_tokens=None, do_sample=False, temperature=1.0, top_k=None,
                    top_p=None, eos_token_id=None, pad_token_id=None, seed=None, stepwise=False):
    """Generator: yields the first new tokens [B] (CPU), then each step's when ``stepwise``; returns [B, T + N]."""
    from gemma3n_fast.model import _KV, positions_from_mask

    c = model.text_config
    input_ids = model._check_ids(input_ids)
    B, T = input_ids.shape
    if max_new_tokens is None:
        max_new_tokens = model.generation_config.get("max_new_tokens", 32)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if T + max_new_tokens > c.max_position_embeddings:
        raise CacheLengthError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} "
                               f"exceeds the model's max_position_embeddings={c.max_position_embeddings}")
    if attention_mask is not None:
        attention_mask = attention_mask.to(input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: padding must be on the left for generation (the last column of every "
                             "row must be a real token)")
    greedy = (not do_sample) or temperature == 0
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
    sampler = _Sampler(greedy, float(temperature), top_k, top_p)
    eos, pad = _eos_and_pad(model, eos_token_id, pad_token_id)
    N = max_new_tokens
    max_length = min(-(-(T + N) // CACHE_ROUND) * CACHE_ROUND, c.max_position_embeddings)

    # decode state: reuse the captured graph for the same configuration
    # (N == 1 needs no decode step: no capture, and the captured graph of a longer run is kept for the next call)
    use_graph = model.device.type == "cuda" and model.use_cuda_graph and N > 1
    key = (B, max_length, tuple(eos), pad, sampler.key())
    st = model._graphs.get(key) if use_graph else None
    if st is None:
        st = _DecodeState(model, B, max_length, max_length, eos, pad)  # output buffer sized for any N that fits
        if use_graph:
            try:
                _capture(model, st, sampler)
                model._graphs = {key: st}  # keep one configuration (the cache can be large)
            except Exception as e:  # e.g. an op that syncs; eager decode is still correct
                warnings.warn(f"gemma3n_fast: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                st.graph = None
    cache = st.cache
    for p in cache.pos.values():
        p.fill_(-1)
    st.done.zero_(), st.step.zero_(), st.out.fill_(pad)
    generator = None
    if not greedy:
        generator = torch.Generator(model.device)
        generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))

    # prefill: owner layers on every chunk; KV-shared layers only on the last column of the last chunk
    positions = positions_from_mask(input_ids, attention_mask)
    if bool((positions.max(dim=1).values < 0).any()):
        raise ValueError("attention_mask: a row has no real token")
    x, per_layer = model._embed(input_ids, pixel_values, input_features, input_features_mask)
    for col0 in range(0, T, PREFILL_CHUNK):
        col1 = min(col0 + PREFILL_CHUNK, T)
        kv = _KV(positions[:, col0:col1], cache, col0=col0)
        last = col1 == T
        streams = model._decoder(x[:, col0:col1], per_layer[:, col0:col1], positions[:, col0:col1], kv,
                                 last_only=last, owners_only=not last)
    logits = model._logits(model._collapse(streams))[:, -1]
    if generator is not None:
        st.noise.exponential_(generator=generator)
    st.record(sampler(logits, st.noise))
    st.pos.copy_(positions[:, -1:] + 1)
    st.col.fill_(T)
    yield st.out[:, 0].cpu()  # always: the first token marks the time to first token

    for i in range(1, N):
        if generator is not None:
            st.noise.exponential_(generator=generator)
        if st.graph is not None:
            st.graph.replay()
        else:
            _decode_step(model, st, sampler)
        if stepwise:
            yield st.out[:, i].cpu()
            if bool(st.done.all()):
                break
        elif i % EOS_CHECK_EVERY == 0 and bool(st.done.all()):
            break

    # trim to where the last row finished (HF stops when every row is done)
    out = st.out[:, :N].clone()
    is_eos = torch.isin(out, st.eos)
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], N, dtype=torch.long))
    n = int(first_eos.max())
    return torch.cat([input_ids, out[:, :n]], dim=1)


def generate(self, input_ids, attention_mask=None, pixel_values=None, input_features=None, input_features_mask=None,
             max_new_tokens=None, do_sample=False, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
             pad_token_id=None, streamer=None, seed=None, token_type_ids=None) -> torch.Tensor:
    """HF-style generate: returns prompt + new tokens [B, T + N]; stops per row at any eos id and pads.

    Greedy unless ``do_sample`` (and temperature > 0). ``streamer``: an object with ``put(tokens)`` / ``end()``
    (HF convention: first the prompt, then each step's tokens [B]). ``seed`` makes sampling reproducible.
    Timing of the last call: ``self.last_stats`` (prompt tokens, time to first token, decode tok/s).
    ``token_type_ids`` (returned by processors) is accepted and unused: Gemma 3n's image tokens are causal.
    """
    t0 = time.perf_counter()
    steps = _generate_steps(self, input_ids, attention_mask, pixel_values, input_features, input_features_mask,
                            max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, seed,
                            stepwise=streamer is not None)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    ttft = None
    try:
        while True:
            toks = next(steps)
            if ttft is None:
                ttft = time.perf_counter() - t0
            if streamer is not None:
                streamer.put(toks)
    except StopIteration as stop:
        result = stop.value
    if streamer is not None:
        streamer.end()
    total = time.perf_counter() - t0
    new = result.shape[1] - input_ids.shape[1]
    self.last_stats = {"prompt_tokens": int(input_ids.shape[1]), "new_tokens": int(new),
                       "ttft_s": ttft, "decode_tok_s": (new - 1) / (total - ttft) if new > 1 and total > ttft else None}
    return result


def _stream_text(self, steps, tokenizer):
    from tokenizers import decoders

    ds = decoders.DecodeStream(skip_special_tokens=True)
    try:
        while True:
            tok = next(steps)
            if tok.numel() != 1:
                raise ValueError("stream(): batch size must be 1")
            text = ds.step(tokenizer, int(tok[0]))
            if text:
                yield text
    except StopIteration:
        return


def _tokenizer(self):
    tok = self.tokenizer
    if tok is None and self.processor is not None:
        tok = getattr(self.processor, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer (no tokenizer.json in the checkpoint folder)")
    return getattr(tok, "_tokenizer", tok)  # a tokenizers.Tokenizer


def stream(self, input_ids, attention_mask=None, **kwargs):
    """Iterate over the generated text (batch 1) as it is decoded. Same arguments as ``generate``."""
    if "streamer" in kwargs:
        raise ValueError("stream(): do not pass a streamer")
    tokenizer = _tokenizer(self)
    steps = _generate_steps(self, input_ids, attention_mask, stepwise=True, **kwargs)
    yield from _stream_text(self, steps, tokenizer)


def _gemma_prompt(messages) -> str:
    """Gemma's chat format for text-only messages (used when no processor is loaded)."""
    out, system = ["<bos>"], ""
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            parts = []
            for p in content:
                if p.get("type") != "text":
                    raise ValueError(f"chat(): {p.get('type')!r} content needs the processor "
                                     "(gemma3n_fast.reference.processor), which is not loaded")
                parts.append(p["text"])
            content = "".join(parts)
        if m["role"] == "system":
            system = content + "\n\n"
            continue
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n{system}{content.strip()}<end_of_turn>\n")
        system = ""
    out.append("<start_of_turn>model\n")
    return "".join(out)


def chat_inputs(self, messages) -> dict:
    """Messages -> generate() inputs (input_ids [1, T] and any pixel_values / input_features) via the chat template."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError("chat(): messages must be a list of {'role': ..., 'content': ...} dicts")
    if self.processor is not None and hasattr(self.processor, "apply_chat_template"):
        return dict(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt"))
    tok = _tokenizer(self)
    return {"input_ids": torch.tensor([tok.encode(_gemma_prompt(messages), add_special_tokens=False).ids])}


def chat(self, messages, max_new_tokens=None, **sampling) -> str:
    """Reply to a chat (``[{"role": "user", "content": ...}]``) with the chat template; returns the text."""
    inputs = chat_inputs(self, messages)
    out = self.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    return _tokenizer(self).decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
