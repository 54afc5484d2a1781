"""generate(), stream() and chat() for the fast model (a mixin: the model calls no code here, so no import cycle).

Decode loop (gpt-fast style):
  * ``prefill`` runs once (chunked for long prompts); the KV-shared layers see only the last prompt token;
  * every ``decode_step`` reads and writes static buffers only (token, position, column, done flags, output buffer,
    KV cache), samples on the device and has no host synchronisation;
  * on CUDA the step is captured once into a CUDA graph (after a warm-up that compiles the kernels) and replayed;
    the graph and its buffers are kept for the next call with the same batch size, cache length and sampler;
  * the eos check (a host sync) runs every ``EOS_CHECK_EVERY`` steps; finished rows emit pad_token_id and the
    output is cut where the last row finished, so the result equals HF's.
Sampling: the reference's ``Sampler`` (shared); its Exp(1) noise is drawn from the seeded generator into a static
buffer before each step, so a seed reproduces the same tokens (and the reference model's, for equal logits).
"""
from __future__ import annotations

import logging
import time

import torch

from gemma3n_fast.cache import StaticKVCache
from gemma3n_fast.reference.generation import CacheLengthError, Sampler, check_prompt, eos_and_pad, trim_after_eos

log = logging.getLogger("gemma3n_fast")

EOS_CHECK_EVERY = 8
PREFILL_CHUNK = 1024  # columns per prefill chunk (bounds activation memory for long prompts)
CACHE_ROUND = 256  # cache lengths are rounded up so that a captured graph serves calls of similar length


class DecodeState:
    """The static buffers of one decode configuration: what a captured step reads and writes."""

    def __init__(self, model, batch: int, max_length: int, eos: list[int], pad: int, sampler: Sampler):
        dev, V = model.device, model.text_config.vocab_size
        self.sampler = sampler
        self.cache = StaticKVCache(model.text_config, batch, max_length, dev, model.dtype)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, 1, dtype=torch.int32, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.out = torch.full((batch, max_length), pad, dtype=torch.long, device=dev)  # any N that fits the cache
        self.eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self.pad = torch.tensor(pad, dtype=torch.long, device=dev)
        self.noise = torch.ones(batch, V, device=dev)
        self.graph = None

    def reset(self) -> None:
        for p in self.cache.pos.values():
            p.fill_(-1)
        self.done.zero_(), self.step.zero_(), self.out.fill_(self.pad)

    def record(self, logits: torch.Tensor) -> None:
        """Pick the next tokens [B] (pad for finished rows), store them, advance the step inputs."""
        nxt = torch.where(self.done, self.pad, self.sampler(logits, self.noise))
        self.out.index_copy_(1, self.step, nxt[:, None])
        self.done |= torch.isin(nxt, self.eos)
        self.tokens.copy_(nxt[:, None])
        self.step += 1


def _step(model, st: DecodeState) -> None:
    """One token for every row: static shapes, no host sync (this is what is captured)."""
    st.record(model.decode_step(st.tokens, st.positions, st.col, st.cache))
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


class GenerationMixin:
    """generate / stream / chat over ``prefill`` and ``decode_step`` (provided by the model)."""

    @torch.no_grad()
    def _generate_steps(self, input_ids, attention_mask=None, pixel_values=None, input_features=None,
                        input_features_mask=None, max_new_tokens=None, do_sample=False, temperature=1.0, top_k=None,
                        top_p=None, eos_token_id=None, pad_token_id=None, seed=None, token_type_ids=None,
                        stepwise=False):
        """Generator: yields the first new tokens [B] (CPU), then each step's when ``stepwise``; returns [B, T + N].
        ``token_type_ids`` (from processors) is accepted and unused: Gemma 3n's image tokens attend causally."""
        c = self.text_config
        if max_new_tokens is None:
            max_new_tokens = self.generation_config.get("max_new_tokens", 32)
        input_ids, attention_mask = check_prompt(input_ids, attention_mask, max_new_tokens,
                                                 c.max_position_embeddings)
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        sampler = Sampler.from_args(do_sample, temperature, top_k, top_p)
        eos, pad = eos_and_pad(self.generation_config, c, eos_token_id, pad_token_id)
        B, T = input_ids.shape
        N = max_new_tokens
        max_length = min(-(-(T + N) // CACHE_ROUND) * CACHE_ROUND, c.max_position_embeddings)

        # N == 1 needs no decode step (no capture; a captured graph of a longer run is kept for the next call)
        use_graph = self.backend.mode == "triton" and self.use_cuda_graph and N > 1  # reference ops may sync
        key = (B, max_length, tuple(eos), pad, sampler)
        st = self._graphs.get(key)
        if st is None:
            st = DecodeState(self, B, max_length, eos, pad, sampler)
            if use_graph:
                _capture(self, st)  # a failure is an error: eager decode would hide a kernel that syncs
                self._graphs = {key: st}  # one configuration at a time (the cache can be large)
        st.reset()
        generator = None
        if not sampler.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))
            st.noise.exponential_(generator=generator)
        media = dict(pixel_values=pixel_values, input_features=input_features, input_features_mask=input_features_mask)
        st.record(self.prefill(input_ids, attention_mask, st.cache, media, PREFILL_CHUNK))
        st.positions.copy_(self.last_positions(input_ids, attention_mask) + 1)
        st.col.fill_(T)
        yield st.out[:, 0].cpu()  # always: the first token marks the time to first token

        for i in range(1, N):
            if generator is not None:
                st.noise.exponential_(generator=generator)
            if use_graph and st.graph is not None:
                st.graph.replay()
            else:
                _step(self, st)
            if stepwise:
                yield st.out[:, i].cpu()
                if bool(st.done.all()):
                    break
            elif i % EOS_CHECK_EVERY == 0 and bool(st.done.all()):
                break
        return torch.cat([input_ids, trim_after_eos(st.out[:, :N], eos)], dim=1)

    @staticmethod
    def last_positions(input_ids, attention_mask):
        """Position of each row's last prompt token [B, 1] (int32)."""
        if attention_mask is None:
            return torch.full((input_ids.shape[0], 1), input_ids.shape[1] - 1, dtype=torch.int32,
                              device=input_ids.device)
        return (attention_mask.long().sum(-1, keepdim=True) - 1).to(torch.int32)

    def generate(self, input_ids, attention_mask=None, streamer=None, **kwargs) -> torch.Tensor:
        """HF-style generate: prompt + new tokens [B, T + N]; each row stops at any eos id and is padded after it.

        Arguments (HF's names): pixel_values, input_features, input_features_mask, max_new_tokens, do_sample,
        temperature, top_k, top_p, eos_token_id (int or list), pad_token_id, seed, token_type_ids (ignored), and
        ``streamer`` (HF protocol: ``put(prompt)``, ``put(step tokens [B])``..., ``end()``).
        ``self.last_stats``: prompt tokens, new tokens, time to first token, decode tok/s of this call.
        """
        t0 = time.perf_counter()
        steps = self._generate_steps(input_ids, attention_mask, stepwise=streamer is not None, **kwargs)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        ttft = None
        try:
            while True:
                toks = next(steps)
                ttft = ttft or time.perf_counter() - t0
                if streamer is not None:
                    streamer.put(toks)
        except StopIteration as stop:
            result = stop.value
        if streamer is not None:
            streamer.end()
        self._set_stats(input_ids.shape[1], result.shape[1] - input_ids.shape[1], t0, ttft)
        return result

    def _set_stats(self, prompt_tokens, new_tokens, t0, ttft):
        total = time.perf_counter() - t0
        self.last_stats = {"prompt_tokens": int(prompt_tokens), "new_tokens": int(new_tokens), "ttft_s": ttft,
                           "decode_tok_s": (new_tokens - 1) / (total - ttft) if new_tokens > 1 and total > ttft
                           else None}

    def stream(self, input_ids, attention_mask=None, **kwargs):
        """Iterate over the generated text (batch 1) as it is decoded; same arguments as ``generate``."""
        if "streamer" in kwargs:
            raise ValueError("stream(): do not pass a streamer")
        from tokenizers import decoders

        tokenizer = self._text_tokenizer()
        t0, ttft, n = time.perf_counter(), None, 0
        steps = self._generate_steps(input_ids, attention_mask, stepwise=True, **kwargs)
        decoder = decoders.DecodeStream(skip_special_tokens=True)
        for tok in steps:
            ttft, n = ttft or time.perf_counter() - t0, n + 1
            if tok.numel() != 1:
                raise ValueError("stream(): batch size must be 1")
            text = decoder.step(tokenizer, int(tok[0]))
            if text:
                yield text
        self._set_stats(input_ids.shape[1], n, t0, ttft)

    def _text_tokenizer(self):
        """The ``tokenizers.Tokenizer`` of the checkpoint."""
        tok = self.tokenizer or getattr(self.processor, "tokenizer", None)
        if tok is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json in the checkpoint folder)")
        return tok

    def chat_inputs(self, messages) -> dict:
        """Messages -> generate() inputs (input_ids [1, T], any pixel_values / input_features) via the chat template."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise ValueError("chat(): messages must be a list of {'role': ..., 'content': ...} dicts")
        if self.processor is not None:
            return dict(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True, return_tensors="pt"))
        ids = self._text_tokenizer().encode(gemma_prompt(messages), add_special_tokens=False).ids
        return {"input_ids": torch.tensor([ids])}

    def chat(self, messages, max_new_tokens=None, **sampling) -> str:
        """Reply to a chat (``[{"role": "user", "content": ...}]``) with the chat template; returns the text."""
        inputs = self.chat_inputs(messages)
        out = self.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
        return self._text_tokenizer().decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


def gemma_prompt(messages) -> str:
    """Gemma's chat format for text-only messages (checkpoints without a processor)."""
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
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n{system}{content.strip()}<end_of_turn>\n")
        system = ""
    out.append("<start_of_turn>model\n")
    return "".join(out)


__all__ = ["GenerationMixin", "DecodeState", "CacheLengthError", "gemma_prompt"]
