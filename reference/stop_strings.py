"""HF's ``stop_strings``, checked on the host: which new token completes a stop string.

The fast model's captured decode step cannot decode text, so the host checks the new tokens when it looks at
the eos flags anyway (``StopScan`` in ``reference.generation`` keeps one call's progress)."""
from __future__ import annotations

import re

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class StopStrings:
    """HF's stop_strings rule, checked on the host: a row stops at the first new token that completes a stop
    string, i.e. an occurrence of the string (in the bytes of the tokens' texts) that ends inside that token and
    starts at or before the token's start. Token texts are the tokenizer's decoding of each token after a fixed
    prefix (so a leading space is kept), byte-fallback tokens ``<0xNN>`` their byte, as HF computes them."""

    PREFIX = "abcdef"

    def __init__(self, strings: list[str], tokenizer):
        self.strings = tuple(strings)
        self.targets = [s.encode("utf-8") for s in strings]
        self.window = max(len(t) for t in self.targets)  # tokens to look back: each carries >= 1 byte
        self.tokenizer = tokenizer
        self._base = tokenizer.encode(self.PREFIX, add_special_tokens=False).ids
        self._base_text = tokenizer.decode(self._base, skip_special_tokens=False)
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, i: int) -> bytes:
        b = self._bytes.get(i)
        if b is None:
            tok = self.tokenizer.id_to_token(i) or ""
            m = _BYTE_TOKEN.match(tok)
            if m:
                b = bytes([int(m.group(1), 16)])
            else:
                text = self.tokenizer.decode(self._base + [i], skip_special_tokens=False)
                if self._base_text and text.startswith(self._base_text):
                    text = text[len(self._base_text):]
                else:
                    text = self.tokenizer.decode([i], skip_special_tokens=False)
                b = text.encode("utf-8")
            self._bytes[i] = b
        return b

    def ends_here(self, ids: list[int]) -> bool:
        """Whether a stop string completes at the last id of ``ids`` (the sequence so far)."""
        pieces = [self.token_bytes(i) for i in ids[-self.window:]]
        text, last = b"".join(pieces), len(pieces[-1])
        start = len(text) - last  # where the last token begins
        for t in self.targets:
            for q in range(max(0, start - len(t) + 1), start + 1):
                if q + len(t) <= len(text) and text.startswith(t, q):
                    return True
        return False

    def scan(self, prompt, new, begin: int, end: int, ended: dict, done_before=None) -> None:
        """Rows of ``new`` [B, >= end] (CPU) checked at steps [begin, end); a row that completes a stop string
        at step i gets ``ended[row] = i + 1``. Rows already ended, or finished by eos before i, are skipped."""
        eos_end = done_before if done_before is not None else {}
        for r in range(new.shape[0]):
            if r in ended:
                continue
            row = prompt[r].tolist()
            tokens = new[r].tolist()
            for i in range(begin, min(end, eos_end.get(r, end))):
                if self.ends_here(row[-self.window:] + tokens[max(0, i + 1 - self.window):i + 1]):
                    ended[r] = i + 1
                    break
