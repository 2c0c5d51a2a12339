"""Merging the tokens of overlapping segments into one task result, by timestamps.

CapsWriter drops new tokens equal to the last one or two merged tokens, which deletes real
repeats at a boundary ("...1 1..."; docs/design.md#boundary-de-duplication-deletes-repeats). capsd instead cuts each overlap in the
middle: tokens of the earlier segment before the cut, tokens of the later one from the cut on,
both away from the segment edges where recognition is weakest. A token near the cut may be
seen by both segments with slightly different timestamps; two equal tokens closer than
`SAME_TOKEN_S` are one token, equal tokens further apart are two.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

SAME_TOKEN_S = 0.12  # a few 40-60 ms frames: one token seen by two segments, not two tokens


@dataclass
class PartialResult:
    tokens: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    duration: float = 0.0

    def add(self, offset: float, overlap: float, tokens: list[str], timestamps: list[float], end: float) -> None:
        """Merge one segment's tokens; `timestamps` are relative to the segment, `offset` to the task."""
        absolute = [offset + t for t in timestamps]
        self.duration = max(self.duration, end)
        if not overlap or not self.tokens:
            self._extend(tokens, absolute, after=-1.0)
            return
        cut = offset + overlap / 2
        keep = next((i for i, t in enumerate(self.timestamps) if t >= cut), len(self.timestamps))
        del self.tokens[keep:], self.timestamps[keep:]
        # A new token kept below is >= cut - SAME_TOKEN_S, so its old copy may be up to SAME_TOKEN_S earlier.
        near = [(tok, t) for tok, t in zip(self.tokens, self.timestamps) if t >= cut - 2 * SAME_TOKEN_S]
        new = [
            (tok, t)
            for tok, t in zip(tokens, absolute)
            if t >= cut - SAME_TOKEN_S and not any(tok == p and abs(t - q) < SAME_TOKEN_S for p, q in near)
        ]
        self._extend([tok for tok, _ in new], [t for _, t in new], after=self.timestamps[-1] if self.timestamps else -1)

    def _extend(self, tokens: list[str], timestamps: list[float], after: float) -> None:
        # Timestamps must increase for clients that build subtitles from them.
        for tok, t in zip(tokens, timestamps):
            self.tokens.append(tok)
            self.timestamps.append(max(t, after))
            after = self.timestamps[-1]

    @property
    def text(self) -> str:
        return join_tokens(self.tokens)


def join_tokens(tokens: list[str]) -> str:
    """Tokens to text as sherpa-onnx does: CJK glued, Latin words spaced, BPE pieces joined."""
    out = ""
    bpe = any(tok.startswith("\u2581") for tok in tokens)  # sentencepiece: only "\u2581" starts a word
    for tok in tokens:
        word_start = tok.startswith("\u2581")  # sentencepiece word marker
        piece = tok.lstrip("\u2581")
        if not piece:
            continue
        glue = out.endswith("@@")
        if glue:
            out = out[:-2]
        elif out and (word_start or (not bpe and _latin(out[-1]) and _latin(piece[0]))):
            out += " "
        out += piece
    return out.replace("@@", "").strip()


def _latin(ch: str) -> bool:
    return (ch.isascii() and ch.isalnum()) or ch == "'"


# A Latin word (or one with an apostrophe) is one token; every other character is a token of its
# own, digits included, so each digit keeps the time it was spoken at.
_UNIT = re.compile(r"[A-Za-z']+|\S")


def realign(tokens: list[str], timestamps: list[float], text: str) -> tuple[list[str], list[float]]:
    """The tokens and timestamps of `text`, a formatted version of these tokens' text
    (numerals, spacing, punctuation), so that a subtitle built from them matches it.

    Characters are matched with difflib (docs/design.md#text_accu-on-the-final-frame): a kept
    character keeps its time, a replaced run (一二三 -> 123) takes the times of what it replaces,
    spread evenly, and an inserted one (punctuation) the time of the character before it.
    """
    raw, raw_times = [], []
    for tok, t in zip(tokens, timestamps):
        for ch in tok.replace("\u2581", "").replace("@@", ""):
            raw.append(ch)
            raw_times.append(t)
    units = list(_UNIT.finditer(text))
    if not raw_times:
        return [u[0] for u in units], [0.0] * len(units)
    chars = [i for i, ch in enumerate(text) if not ch.isspace()]  # position in text of each aligned character
    target = "".join(text[i] for i in chars)
    times = [0.0] * len(target)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, "".join(raw), target).get_opcodes():
        if op == "equal":
            times[j1:j2] = raw_times[i1:i2]
        elif op == "replace":
            times[j1:j2] = [raw_times[i1 + k * (i2 - i1) // (j2 - j1)] for k in range(j2 - j1)]
        elif op == "insert":
            times[j1:j2] = [raw_times[max(i1 - 1, 0)]] * (j2 - j1)
    at = {position: time for position, time in zip(chars, times)}
    out_times: list[float] = []
    for unit in units:
        out_times.append(max(at[unit.start()], out_times[-1] if out_times else 0.0))  # times never go back
    return [u[0] for u in units], out_times
