"""Merging the tokens of overlapping segments into one task result, by timestamps.

CapsWriter drops new tokens equal to the last one or two merged tokens, which deletes real
repeats at a boundary ("...1 1..."; docs/design.md#boundary-de-duplication-deletes-repeats). capsd instead cuts each overlap in the
middle: tokens of the earlier segment before the cut, tokens of the later one from the cut on,
both away from the segment edges where recognition is weakest. A token near the cut may be
seen by both segments with slightly different timestamps; two equal tokens closer than
`SAME_TOKEN_S` are one token, equal tokens further apart are two.
"""

from __future__ import annotations

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
    return ch.isascii() and ch.isalnum() or ch == "'"
