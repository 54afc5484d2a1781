"""generate(), stream() and chat() for the fast model (a mixin: the model calls no code here, so no import cycle).

Arguments, defaults and checks are HF's and shared with the reference model (``reference.generation``:
``prepare_generation`` resolves them, ``TokenState`` selects tokens, ``finish`` builds the result).

Decode loop (gpt-fast style; ``Decoding`` holds one call, ``GenerationMixin._decode`` is the loop, an iterator
over the new tokens that generate() drives with its streamer and stream() turns into text):
  * ``prefill`` runs once (chunked for long prompts); the KV-shared layers see only the last prompt token;
  * every ``decode_step`` reads and writes static buffers only (token, position, column, done flags, step
    counter, seen-ids buffer of the repetition penalty, score buffers, output buffer, KV cache, the kernels'
    workspaces), selects the token on the device and has no host synchronisation;
  * those buffers belong to one ``DecodeState`` per configuration (batch size, cache length, settings), kept for
    the next call with the same configuration on every device. Each is allocated once, at the state's creation,
    sized for every launch of the configuration (prefill chunks included: prefill uses the same workspaces) and
    never reallocated, so a prompt of any length leaves them where they are;
  * on CUDA the step is captured once into a CUDA graph (after a warm-up that compiles the kernels) and replayed;
    the graph lives in its state, so whatever it points at lives at least as long;
  * the host looks at the device every ``EOS_CHECK_EVERY`` steps (every step when streaming): whether every row
    has finished (eos), and, with ``stop_strings``, whether a new token completed one (host-side: a row found
    stopped gets its done flag set then, and its tokens after the stop become pad, so the result equals HF's).
    Finished rows emit pad_token_id and the output is cut where the last row finished, as HF stops.
    The same looks (and the last one, after the loop) raise ``NonFiniteLogitsError`` naming the step when a live
    row's logits held NaN or inf (recorded on the device by ``TokenState.pick``, no extra sync).
Sampling: its Exp(1) noise is drawn from the seeded generator into a static buffer before each step, so a seed
reproduces the same tokens (and the reference model's, for equal logits).
"""
from __future__ import annotations

import logging
import time

import torch

from gemma3n_fast.cache import StaticKVCache
from gemma3n_fast.reference.generation import GenerateOutput, StopScan, finish, prepare_generation
from gemma3n_fast.reference.generation_args import CacheLengthError, GenerationPlan
from gemma3n_fast.reference.sampling import TokenState

log = logging.getLogger("gemma3n_fast")

EOS_CHECK_EVERY = 8
PREFILL_CHUNK = 1024  # columns per prefill chunk (bounds activation memory for long prompts)
CACHE_ROUND = 256  # cache lengths are rounded up so that a captured graph serves calls of similar length
RECORD_ROUND = 32  # score/logit buffers hold a multiple of this many steps (same reason)
PROCESSOR_OPTIONS = ("audio_segment_seconds", "truncate_audio", "sampling_rate")


class DecodeState:
    """The static buffers of one decode configuration: what a captured step reads and writes (``buffers()``), and
    the graph. Nothing here is reallocated after ``__init__``: a captured graph keeps pointing at live memory."""

    def __init__(self, model, batch: int, max_length: int, plan: GenerationPlan, record: int = 0):
        dev, V = model.device, model.text_config.vocab_size
        self.sampler = plan.sampler
        self.tok = TokenState(plan.sampler, batch, V, plan.eos, plan.pad, dev, record,
                              scores=plan.return_dict and plan.output_scores,
                              logits=plan.return_dict and plan.output_logits)
        self.cache = StaticKVCache(model.text_config, batch, max_length, dev, model.dtype)
        self.workspaces = model.make_workspaces(batch, self.cache)  # the kernels' scratch, prefill's too
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, 1, dtype=torch.int32, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.full((batch, max_length), plan.pad, dtype=torch.long, device=dev)  # any N that fits
        self.graph = None

    @property
    def done(self):
        return self.tok.done

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every persistent buffer a prefill or decode step of this state uses, by name: the KV cache and its
        position tables, the step's inputs and outputs, token selection's buffers, the kernels' workspaces."""
        out = {f"cache.k[{i}]": k for i, k in enumerate(self.cache.k)}
        out |= {f"cache.v[{i}]": v for i, v in enumerate(self.cache.v)}
        out |= {f"cache.pos[{t}]": p for t, p in self.cache.pos.items()}
        out |= {"tokens": self.tokens, "positions": self.positions, "col": self.col, "out": self.out}
        out |= {f"tok.{name}": t for name, t in vars(self.tok).items() if isinstance(t, torch.Tensor)}
        out |= {f"workspaces.{name}": t for name, t in self.workspaces.tensors().items()}
        return out

    def reset(self, input_ids, attention_mask) -> None:
        """Start a call as a fresh state would. K/V are zeroed as well as marked empty: attention multiplies a
        masked slot's value by a zero weight, and 0 * NaN is NaN, so a non-finite K/V left by an earlier call (one
        that ended in NonFiniteLogitsError) would poison this one. One memset of the cache (~1e-4 s on a GPU)."""
        for p in self.cache.pos.values():
            p.fill_(-1)
        for t in (*self.cache.k, *self.cache.v):
            t.zero_()
        self.tok.reset(input_ids, attention_mask)
        self.out.fill_(self.tok.pad)

    def record(self, logits: torch.Tensor) -> None:
        """Select the next tokens [B] (pad for finished rows), store them, advance the step inputs."""
        nxt = self.tok.pick(logits)
        self.out.index_copy_(1, self.tok.step, nxt[:, None])
        self.tokens.copy_(nxt[:, None])
        self.tok.advance(nxt)


def _step(model, st: DecodeState) -> None:
    """One token for every row: static shapes, no host sync (this is what is captured)."""
    st.record(model.decode_step(st.tokens, st.positions, st.col, st.cache, st.workspaces))
    st.positions += 1
    st.col += 1


def _capture(model, st: DecodeState) -> None:
    """Warm up on a side stream (compiles the kernels), then capture one step into a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(model, st)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(model, st)
    st.graph = graph


class Decoding:
    """One call's decode on its ``DecodeState``: ``start`` (state, seed, prefill, first token), then ``step`` by
    step; ``finished`` is the host's look at the device, ``result`` the output once the loop stops."""

    def __init__(self, model, plan: GenerationPlan, input_ids, attention_mask, t0: float):
        self.model, self.plan, self.input_ids, self.attention_mask = model, plan, input_ids, attention_mask
        self.t0 = t0  # when the call began (perf_counter)
        self.ttft: float | None = None  # seconds from ``t0`` to the first new token on the host
        self.new_tokens = 0  # the steps run so far (the first token included)
        self.st: DecodeState | None = None
        self.stops: StopScan | None = None
        self.use_graph = False

    def start(self) -> torch.Tensor:
        """Get (or make, and on CUDA capture) the state, seed the noise, prefill: the first new tokens [B] (CPU)."""
        model, plan, input_ids, attention_mask = self.model, self.plan, self.input_ids, self.attention_mask
        B, T = input_ids.shape
        N = plan.max_new_tokens
        max_length = min(-(-(T + N) // CACHE_ROUND) * CACHE_ROUND, model.text_config.max_position_embeddings)
        recording = plan.return_dict and (plan.output_scores or plan.output_logits)
        record = -(-N // RECORD_ROUND) * RECORD_ROUND if recording else 0
        # N == 1 needs no decode step (no capture; a captured graph of a longer run is kept for the next call)
        self.use_graph = model.backend.mode == "triton" and model.use_cuda_graph and N > 1  # reference ops may sync
        key = (B, max_length, tuple(plan.eos), plan.pad, plan.sampler, record, plan.return_dict and
               plan.output_scores, plan.return_dict and plan.output_logits)
        st = model._decode_states.get(key)
        if st is None:
            model._decode_states.clear()  # one configuration at a time (the cache can be large): free it first
            st = model._decode_states[key] = DecodeState(model, B, max_length, plan, record)
        if self.use_graph and st.graph is None:
            _capture(model, st)  # a failure is an error: eager decode would hide a kernel that syncs
        self.st = st
        st.reset(input_ids, attention_mask)
        st.tok.seed(plan.seed)
        st.tok.draw()
        model._media_stats = None
        st.record(model.prefill(input_ids, attention_mask, st.cache, plan.media, PREFILL_CHUNK, st.workspaces))
        st.positions.copy_(model.last_positions(input_ids, attention_mask) + 1)
        st.col.fill_(T)
        self.stops = StopScan(plan.stop_strings, input_ids, plan.eos)
        self.new_tokens = 1
        first = st.out[:, 0].cpu()
        self.ttft = time.perf_counter() - self.t0
        return first

    def step(self) -> None:
        """One decode step for every row: a graph replay on CUDA."""
        self.st.tok.draw()
        if self.use_graph and self.st.graph is not None:
            self.st.graph.replay()
        else:
            _step(self.model, self.st)
        self.new_tokens += 1

    def last_tokens(self) -> torch.Tensor:
        """The newest step's tokens [B] (CPU)."""
        return self.st.out[:, self.new_tokens - 1].cpu()

    def finished(self) -> bool:
        """The host's look: stop strings in the new tokens (marking those rows done), then whether every row is
        done; raises NonFiniteLogitsError on NaN / inf logits of a live row."""
        self.stops.update(self.st.out[:, :self.new_tokens], self.st.tok.done)
        return self.st.tok.finished()

    def result(self):
        """The output (tensor or GenerateOutput), after a last look at the steps not yet checked."""
        self.finished()
        st = self.st
        return finish(self.plan, self.input_ids, st.out[:, :self.new_tokens], self.stops.stopped, st.tok.scores,
                      st.tok.logits)


class GenerationMixin:
    """generate / stream / chat over ``prefill`` and ``decode_step`` (provided by the model).

    ``last_stats``: None before the first call; then a dict describing the last generate() / stream() / chat():
    prompt_tokens, new_tokens (per row, up to where the last row finished), batch, ttft_s (time to the first
    new token, prefill and media encoding included), decode_tok_s (tokens per second per row after the first;
    None with one new token), media_encode_s (the vision/audio towers; None without media), images and
    audio_segments (encoded this call)."""

    last_stats: dict | None = None
    _media_stats: dict | None = None

    def _prepare(self, input_ids, attention_mask, kwargs, what, t0) -> Decoding:
        plan, input_ids, attention_mask = prepare_generation(self, input_ids, attention_mask, kwargs, what)
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return Decoding(self, plan, input_ids, attention_mask, t0)

    @torch.no_grad()
    def _decode(self, run: Decoding, stepwise: bool = False):
        """The decode loop, as an iterator: the first new tokens [B] (CPU), then each step's when ``stepwise``
        (which also looks at the device every step; else every EOS_CHECK_EVERY steps). ``run.result()`` after."""
        first = run.start()
        finished = run.finished() if stepwise else False
        yield first  # always: the first token marks the time to first token
        while not finished and run.new_tokens < run.plan.max_new_tokens:
            run.step()
            if stepwise:
                finished = run.finished()
                yield run.last_tokens()
            elif (run.new_tokens - 1) % EOS_CHECK_EVERY == 0:
                finished = run.finished()

    @staticmethod
    def last_positions(input_ids, attention_mask):
        """Position of each row's last prompt token [B, 1] (int32)."""
        if attention_mask is None:
            return torch.full((input_ids.shape[0], 1), input_ids.shape[1] - 1, dtype=torch.int32,
                              device=input_ids.device)
        return (attention_mask.long().sum(-1, keepdim=True) - 1).to(torch.int32)

    def generate(self, input_ids, attention_mask=None, streamer=None, **kwargs):
        """HF-style generate: prompt + new tokens [B * num_return_sequences, T + N]; each row stops at any eos id
        (or stop string) and is padded after it. With ``return_dict_in_generate=True``: a ``GenerateOutput``
        (``sequences``, and ``scores`` / ``logits`` tuples when ``output_scores`` / ``output_logits``).

        Arguments (HF's names and meaning; README's table): pixel_values, input_features, input_features_mask,
        token_type_ids (ignored), generation_config, max_new_tokens, max_length, min_new_tokens, min_length,
        do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id, stop_strings
        (tokenizer= optional: the model's is used), num_return_sequences, return_dict_in_generate, output_scores,
        output_logits, use_cache; ``streamer`` (HF protocol: ``put(prompt)``, ``put(step tokens [B])``...,
        ``end()``); ``seed`` (ours: the sampling noise's seed). Defaults: the model's ``generation_config``,
        then HF's. Sets ``self.last_stats``.
        """
        t0 = time.perf_counter()
        run = self._prepare(input_ids, attention_mask, dict(kwargs, streamer=streamer), "generate()", t0)
        if streamer is not None:
            streamer.put(run.input_ids.cpu())
        for tokens in self._decode(run, stepwise=streamer is not None):
            if streamer is not None:
                streamer.put(tokens)
        result = run.result()
        if streamer is not None:
            streamer.end()
        sequences = result.sequences if isinstance(result, GenerateOutput) else result
        self._set_stats(run, sequences.shape[1] - run.input_ids.shape[1])
        return result

    def _set_stats(self, run: Decoding, new_tokens):
        total, ttft = time.perf_counter() - run.t0, run.ttft
        media = self._media_stats or {}
        self.last_stats = {
            "prompt_tokens": int(run.input_ids.shape[1]), "new_tokens": int(new_tokens),
            "batch": int(run.input_ids.shape[0]), "ttft_s": ttft,
            "decode_tok_s": (new_tokens - 1) / (total - ttft) if ttft is not None and new_tokens > 1 and
            total > ttft else None,
            "media_encode_s": media.get("media_encode_s"), "images": media.get("images", 0),
            "audio_segments": media.get("audio_segments", 0)}

    def stream(self, input_ids, attention_mask=None, **kwargs):
        """Iterate over the generated text (batch 1) as it is decoded; same arguments as ``generate``.
        The arguments are checked when this is called; ``last_stats`` is set when the iteration ends (also when
        the caller stops early: then it counts the tokens streamed)."""
        if "streamer" in kwargs:
            raise ValueError("stream(): do not pass a streamer (stream() is one)")
        t0 = time.perf_counter()
        run = self._prepare(input_ids, attention_mask, kwargs, "stream()", t0)
        if run.input_ids.shape[0] != 1:
            raise ValueError(f"stream(): batch size must be 1 (got {run.input_ids.shape[0]} rows, "
                             "num_return_sequences included); use generate() for batches")
        tokenizer = self._text_tokenizer()
        return self._stream(run, tokenizer)

    def _stream(self, run: Decoding, tokenizer):
        from tokenizers import decoders

        n = 0
        decoder = decoders.DecodeStream(skip_special_tokens=True)
        try:
            for tok in self._decode(run, stepwise=True):
                n += 1
                text = decoder.step(tokenizer, int(tok[0]))
                if text:
                    yield text
        finally:
            self._set_stats(run, n)

    def _text_tokenizer(self):
        """The ``tokenizers.Tokenizer`` of the checkpoint."""
        tok = self.tokenizer or getattr(self.processor, "tokenizer", None)
        if tok is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json in the checkpoint folder)")
        return tok

    def chat_inputs(self, messages, **processor_kwargs) -> dict:
        """Messages -> generate() inputs (input_ids [1, T], any pixel_values / input_features) via the chat template.
        processor_kwargs: ``audio_segment_seconds``, ``truncate_audio``, ``sampling_rate`` (the processor's
        long-audio options; without a processor, i.e. a text-only checkpoint, they have nothing to act on)."""
        from gemma3n_fast.reference.processor import validate_messages

        unknown = sorted(set(processor_kwargs) - set(PROCESSOR_OPTIONS))
        if unknown:
            raise TypeError(f"chat_inputs() got unknown argument(s) {unknown}; it accepts {list(PROCESSOR_OPTIONS)}")
        validate_messages(messages)
        if self.processor is not None:
            return dict(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True, return_tensors="pt",
                                                           **processor_kwargs))
        ids = self._text_tokenizer().encode(gemma_prompt(messages), add_special_tokens=False).ids
        return {"input_ids": torch.tensor([ids])}

    def chat(self, messages, max_new_tokens=None, **kwargs):
        """Reply to a chat (``[{"role": "user", "content": ...}]``) with the chat template; returns the text (a list
        of texts with num_return_sequences > 1). kwargs: generate()'s, and chat_inputs()'s audio options."""
        options = {k: kwargs.pop(k) for k in PROCESSOR_OPTIONS if k in kwargs}
        inputs = self.chat_inputs(messages, **options)
        if max_new_tokens is not None:  # else the model's generation_config decides, as in generate()
            kwargs["max_new_tokens"] = max_new_tokens
        out = self.generate(**inputs, **kwargs)
        out = out.sequences if isinstance(out, GenerateOutput) else out
        tok, T = self._text_tokenizer(), inputs["input_ids"].shape[1]
        texts = [tok.decode(row[T:].tolist(), skip_special_tokens=True) for row in out]
        return texts[0] if len(texts) == 1 else texts


def gemma_prompt(messages) -> str:
    """Gemma's chat format for text-only messages (checkpoints without a processor); messages already validated."""
    out, system = ["<bos>"], ""
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            parts = []
            for p in content:
                if p.get("type") != "text":
                    raise ValueError(f"chat(): {p.get('type')!r} content needs a multimodal checkpoint (processor)")
                parts.append(p["text"])
            content = "".join(parts)
        if m["role"] == "system":
            system = content + "\n\n"
            continue
        role = "model" if m["role"] in ("assistant", "model") else m["role"]
        out.append(f"<start_of_turn>{role}\n{system}{content.strip()}<end_of_turn>\n")
        system = ""
    out.append("<start_of_turn>model\n")
    return "".join(out)


__all__ = ["GenerationMixin", "DecodeState", "CacheLengthError", "gemma_prompt"]
