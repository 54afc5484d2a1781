"""Token selection on the device: what the fast model's captured decode step runs after the logits.

``Sampler`` processes the fp32 logits in the order of HF's logits processors, each exact to HF's:
    repetition penalty -> min_new_tokens / min_length (eos ids at -inf) -> [sampling only] temperature ->
    top-k -> top-p.
Greedy takes the argmax of the processed scores; sampling draws from their softmax by the exponential race:
with E_i ~ Exp(1) independent, ``argmax_i p_i / E_i`` is distributed as ``p`` exactly. The noise is one [B, V]
draw per step from a seeded generator (``TokenState.seed`` / ``draw``), so one seed gives the same tokens in
the fast and the reference model.

``TokenState`` holds every per-step buffer in static shapes with no host synchronisation: the repetition
penalty reads a [B, V] "seen" buffer, min_new_tokens compares a device step counter, scores and logits go into
static [B, N, V] buffers; so the fast model's CUDA graph captures them with the decode step.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


# ---- checks of single values -----------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_at_least(name, v, lo: int, where: str) -> int:
    if not _is_int(v) or v < lo:
        raise ValueError(f"{name}{where}: expected an int >= {lo}, got {v!r}")
    return int(v)


def _flag(name, v, where: str) -> bool:
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValueError(f"{name}{where}: expected True or False, got {v!r}")
    return v


# ---- the sampler -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """Token selection from logits [B, V]: processing in HF's order, then argmax (greedy) or the exponential race.

    Hashable and static: the fast model keys its captured decode step on it."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # eos ids stay at -inf while fewer new tokens than this exist

    @classmethod
    def from_args(cls, do_sample=False, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                  min_new_tokens=0) -> "Sampler":
        """Validate HF-meaning values (temperature 0 with do_sample is greedy; top_k 0 / None and top_p 1 / None
        are off); when greedy the sampling values are dropped, so equal behaviour gives equal samplers."""
        if temperature is not None and not (_is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and not (_is_int(top_k) and top_k >= 0):
            raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
        if top_p is not None and not (_is_real(top_p) and 0 <= top_p <= 1):
            raise ValueError(f"top_p: expected a number in [0, 1], got {top_p!r}")
        rp = 1.0 if repetition_penalty is None else repetition_penalty
        if not (_is_real(rp) and math.isfinite(rp) and rp > 0):
            raise ValueError(f"repetition_penalty: expected a finite number > 0 (1 = off), got {repetition_penalty!r}")
        min_new = _int_at_least("min_new_tokens", 0 if min_new_tokens is None else min_new_tokens, 0, "")
        do_sample = _flag("do_sample", do_sample, "")
        if do_sample and temperature == 0:
            do_sample = False  # a common convention (HF raises here); the CLI maps --temperature 0 to greedy
        if not do_sample:
            return cls(greedy=True, repetition_penalty=float(rp), min_new_tokens=min_new)
        return cls(greedy=False, temperature=1.0 if temperature is None else float(temperature),
                   top_k=int(top_k) if top_k else None, top_p=None if top_p is None or top_p >= 1 else float(top_p),
                   repetition_penalty=float(rp), min_new_tokens=min_new)

    @property
    def processes(self) -> bool:
        """Whether the scores differ from the fp32 logits."""
        return not self.greedy or self.repetition_penalty != 1.0 or self.min_new_tokens > 0

    def scores(self, logits, seen=None, step=None, eos_mask=None) -> torch.Tensor:
        """logits [B, V] -> processed fp32 scores. seen [B, V] bool: ids in the prompt or generated (repetition
        penalty); step [1] (device): new tokens so far; eos_mask [V] bool: the eos ids (min_new_tokens)."""
        s = logits.float()
        if self.repetition_penalty != 1.0:
            p = self.repetition_penalty
            s = torch.where(seen, torch.where(s < 0, s * p, s / p), s)
        if self.min_new_tokens > 0:
            s = s.masked_fill(eos_mask & (step < self.min_new_tokens), float("-inf"))
        if self.greedy:
            return s
        if self.temperature != 1.0:
            s = s / self.temperature
        if self.top_k is not None and self.top_k < s.shape[-1]:
            kth = torch.topk(s, self.top_k, dim=-1).values[:, -1:]
            s = s.masked_fill(s < kth, float("-inf"))
        if self.top_p is not None:
            ascending, order = torch.sort(s, dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= (1 - self.top_p)
            drop[:, -1] = False  # the most likely token always stays
            s = s.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return s

    def pick(self, scores, noise) -> torch.Tensor:
        """Processed scores [B, V] -> ids [B] (int64). noise: [B, V] Exp(1) draws, used only when sampling."""
        if self.greedy:
            return scores.argmax(-1)
        return (scores.softmax(-1) / noise).argmax(-1)

    def __call__(self, logits, noise=None, seen=None, step=None, eos_mask=None) -> torch.Tensor:
        if not self.processes:
            return logits.argmax(-1)
        return self.pick(self.scores(logits, seen, step, eos_mask), noise)



class NonFiniteLogitsError(RuntimeError):
    """A live row's logits held NaN or inf during generate(): the tokens would be meaningless (the argmax of NaN
    logits is token 0, every step)."""


# ---- per-step state on the device ------------------------------------------------------------------------
class TokenState:
    """What token selection reads and writes each step, in static buffers on the device (no host sync):
    ``done`` [B] rows that emitted an eos id (they emit pad from then on), ``step`` [1] new tokens so far,
    ``seen`` [B, V] ids in the prompt or generated (repetition penalty), ``noise`` [B, V] Exp(1) draws
    (sampling), ``scores`` / ``logits`` [B, R, V] what HF returns with output_scores / output_logits.

    Non-finite logits are recorded on the device too, in 5 launches per step: ``logit_sum`` [B] accumulates each
    row's fp32 logit sums while the row is live (not done), so it is NaN or inf from the first step where that row's
    logits held a NaN or inf on (NaN and inf stay in a sum; finite logits overflow it only above ~1e28 each, over
    262k ids and 100k steps, and Gemma 3n's softcap bounds them by 30); ``last_clean`` [B] is the last step at
    which it was still finite (-1: none). ``finished()``, the host's look at the device, raises when a row has a step after its last clean
    one."""

    def __init__(self, sampler: Sampler, batch: int, vocab: int, eos: list[int], pad: int, device,
                 record: int = 0, scores: bool = False, logits: bool = False):
        self.sampler = sampler
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.pad = torch.tensor(pad, dtype=torch.long, device=device)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        in_vocab = [e for e in eos if 0 <= e < vocab]  # eos ids beyond the vocabulary are never generated
        if in_vocab:
            self.eos_mask[torch.tensor(in_vocab, device=device)] = True
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) \
            if sampler.repetition_penalty != 1.0 else None
        self.noise = torch.ones(batch, vocab, device=device) if not sampler.greedy else None
        self.scores = torch.full((batch, record, vocab), float("nan"), device=device) if scores else None
        self.logits = torch.full((batch, record, vocab), float("nan"), device=device) if logits else None
        self.logit_sum = torch.zeros(batch, device=device)
        self.last_clean = torch.full((batch,), -1.0, device=device)
        self._zero = torch.zeros(1, device=device)
        self.generator = None  # sampling: the noise's seeded generator (``seed``), host state outside any graph

    def reset(self, input_ids, attention_mask=None) -> None:
        """Before a call: no row done, step 0, ``seen`` = the prompt's ids (left padding excluded, as HF)."""
        self.step.zero_(), self.done.zero_(), self.logit_sum.zero_(), self.last_clean.fill_(-1.0)
        if self.seen is not None:
            self.seen.zero_()
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else \
                torch.cumsum(attention_mask, 1) > 0  # from each row's first real token on
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
            self.seen[rows[real], input_ids[real]] = True

    def seed(self, seed: int | None) -> None:
        """Before a call that samples: a generator on the noise's device seeded with ``seed`` (a random seed when
        None). Greedy calls draw no noise."""
        if self.noise is None:
            return
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()).item())
        self.generator = torch.Generator(self.noise.device)
        self.generator.manual_seed(int(seed))

    def draw(self) -> None:
        """Before each ``pick`` (outside a captured graph): the next [B, V] Exp(1) draw into ``noise``."""
        if self.generator is not None:
            self.noise.exponential_(generator=self.generator)

    def pick(self, logits) -> torch.Tensor:
        """logits [B, V] -> the next ids [B] (pad for finished rows); records scores/logits at ``step``."""
        s = self.sampler
        if s.processes or self.scores is not None:
            scores = s.scores(logits, self.seen, self.step, self.eos_mask)
            nxt = s.pick(scores, self.noise)
            if self.scores is not None:
                self.scores.index_copy_(1, self.step, scores[:, None])
        else:
            nxt = logits.argmax(-1)
        if self.logits is not None:
            self.logits.index_copy_(1, self.step, logits.float()[:, None])
        self.logit_sum.add_(logits.sum(-1, dtype=torch.float32).masked_fill_(self.done, 0.0))
        # step + 0 * logit_sum: the step while the row's sum is finite, NaN after; fmax ignores the NaN
        torch.fmax(self.last_clean, torch.addcmul(self.step, self.logit_sum, self._zero), out=self.last_clean)
        return torch.where(self.done, self.pad, nxt)

    def finished(self) -> bool:
        """The host's look at the device (one transfer): whether every row is done. Raises
        ``NonFiniteLogitsError`` naming the step when a live row's logits held NaN or inf at a step so far."""
        done, last_clean, steps = torch.stack([self.done.all().float(), self.last_clean.min(),
                                               self.step[0].float()]).tolist()
        clean = int(last_clean) + 1  # the first step whose logits were not finite in some live row, if < steps
        if clean < steps:
            at = "the prompt's logits (the prefill, new token 1)" if clean == 0 else \
                f"the logits of decode step {clean} (new token {clean + 1})"
            raise NonFiniteLogitsError(
                f"generation stopped: {at} hold NaN or infinite values; the tokens would be meaningless (the argmax "
                "of NaN logits is token 0). Likely cause: non-finite weights in the checkpoint (load() warns "
                "naming those tensors with a CheckpointWarning)")
        return bool(done)

    def advance(self, nxt) -> None:
        """After ``pick``: mark finished rows and seen ids, count the step."""
        self.done |= torch.isin(nxt, self.eos)
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        self.step += 1
