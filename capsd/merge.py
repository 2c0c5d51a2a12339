"""Merging the tokens of overlapping segments into one task result, by timestamps.

CapsWriter drops new tokens equal to the last one or two merged tokens, which deletes real
repeats at a boundary ("...1 1..."; docs/design.md#boundary-de-duplication-deletes-repeats). capsd instead cuts each overlap in the
middle: tokens of the earlier segment before the cut, tokens of the later one from the cut on,
both away from the segment edges where recognition is weakest. A token near the cut may be
seen by both segments with slightly different timestamps; two equal tokens closer than
`SAME_TOKEN_S` are one token, equal tokens further apart are two.

A task may run for hours, so merging a segment costs what the segment holds, not what the task
holds (docs/design.md#long-tasks): the merged prefix is only ever cut at its end and extended.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

SAME_TOKEN_S = 0.12  # a few 40-60 ms frames: one token seen by two segments, not two tokens
WORD_MARK = "\u2581"  # sentencepiece: only this starts a word


@dataclass
class PartialResult:
    tokens: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)  # never decreasing, so bisect finds the cut
    duration: float = 0.0
    # What each token adds to join_tokens' text, and the text's last two characters after it:
    # a cut at the end and an append cost O(1) each, and `text` is one join.
    _pieces: list[str] = field(default_factory=list, repr=False)
    _tails: list[str] = field(default_factory=list, repr=False)
    _marked: int = 0  # tokens starting with WORD_MARK: any of them changes how Latin words are spaced
    _bpe: bool = False  # what _pieces were made with

    def add(self, offset: float, overlap: float, tokens: list[str], timestamps: list[float], end: float) -> None:
        """Merge one segment's tokens; `timestamps` are relative to the segment, `offset` to the task."""
        absolute = [offset + t for t in timestamps]
        self.duration = max(self.duration, end)
        if not overlap or not self.tokens:
            self._extend(tokens, absolute, after=self.timestamps[-1] if self.timestamps else -1.0)
            return
        cut = offset + overlap / 2
        self._truncate(bisect.bisect_left(self.timestamps, cut))
        # A new token kept below is >= cut - SAME_TOKEN_S, so its old copy may be up to SAME_TOKEN_S earlier.
        first_near = bisect.bisect_left(self.timestamps, cut - 2 * SAME_TOKEN_S)
        near = list(zip(self.tokens[first_near:], self.timestamps[first_near:]))
        new = [
            (tok, t)
            for tok, t in zip(tokens, absolute)
            if t >= cut - SAME_TOKEN_S and not any(tok == p and abs(t - q) < SAME_TOKEN_S for p, q in near)
        ]
        self._extend([tok for tok, _ in new], [t for _, t in new], after=self.timestamps[-1] if self.timestamps else -1)

    def _truncate(self, keep: int) -> None:
        self._marked -= sum(tok.startswith(WORD_MARK) for tok in self.tokens[keep:])
        del self.tokens[keep:], self.timestamps[keep:], self._pieces[keep:], self._tails[keep:]
        self._respace()

    def _extend(self, tokens: list[str], timestamps: list[float], after: float) -> None:
        # Timestamps must increase for clients that build subtitles from them.
        for tok, t in zip(tokens, timestamps):
            self.tokens.append(tok)
            self.timestamps.append(max(t, after))
            after = self.timestamps[-1]
            self._marked += tok.startswith(WORD_MARK)
            self._append_piece(tok)
        self._respace()

    def _append_piece(self, tok: str) -> None:
        piece, tail = _piece(self._tails[-1] if self._tails else "", tok, self._bpe)
        self._pieces.append(piece)
        self._tails.append(tail)

    def _respace(self) -> None:
        """The first word-marked token turns Latin spacing off for the whole text, the last one
        gone turns it back on (join_tokens): the pieces are made anew, once per such change."""
        if self._bpe != (self._marked > 0):
            self._bpe = self._marked > 0
            self._pieces.clear(), self._tails.clear()
            for tok in self.tokens:
                self._append_piece(tok)

    @property
    def text(self) -> str:
        """join_tokens(self.tokens), from the pieces kept as tokens came."""
        return "".join(self._pieces).replace("@@", "").strip()


def _piece(tail: str, tok: str, bpe: bool) -> tuple[str, str]:
    """What `tok` adds to join_tokens' text after a text ending in `tail`, and the new tail.
    A BPE continuation mark "@@" stays in the text (glued, no space) and is removed at the end."""
    piece = tok.lstrip(WORD_MARK)
    if not piece:
        return "", tail
    if (
        not tail.endswith("@@")
        and tail
        and (tok.startswith(WORD_MARK) or (not bpe and _latin(tail[-1]) and _latin(piece[0])))
    ):
        piece = " " + piece
    return piece, (tail + piece)[-2:]


def join_tokens(tokens: list[str]) -> str:
    """Tokens to text as sherpa-onnx does: CJK glued, Latin words spaced, BPE pieces joined."""
    out = ""
    bpe = any(tok.startswith(WORD_MARK) for tok in tokens)
    for tok in tokens:
        word_start = tok.startswith(WORD_MARK)
        piece = tok.lstrip(WORD_MARK)
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
# How far apart a formatting change may put the recognised text and the formatted one before
# they agree again (一百二十三万四千五百六十七 -> 1234567 is 13 against 7).
RESYNC_WINDOW = 32


def realign(tokens: list[str], timestamps: list[float], text: str) -> tuple[list[str], list[float]]:
    """The tokens and timestamps of `text`, a formatted version of these tokens' text
    (numerals, spacing, punctuation), so that a subtitle built from them matches it.

    Characters are matched in one pass (docs/design.md#text_accu-on-the-final-frame): a kept
    character keeps its time, a replaced run (一二三 -> 123) takes the times of what it replaces,
    spread evenly, and an inserted one (punctuation) the time of the character before it.
    """
    pieces = [tok.replace(WORD_MARK, "").replace("@@", "") for tok in tokens]
    raw = "".join(pieces)
    raw_times = [t for piece, t in zip(pieces, timestamps) for _ in piece]
    units = _UNIT.findall(text)
    if not raw_times:
        return units, [0.0] * len(units)
    target = _SPACE.sub("", text)  # the units, one after the other
    times = [0.0] * len(target)
    for op, i1, i2, j1, j2 in _opcodes(raw, target):
        if op == "equal":
            times[j1:j2] = raw_times[i1:i2]
        elif op == "replace":
            times[j1:j2] = [raw_times[i1 + k * (i2 - i1) // (j2 - j1)] for k in range(j2 - j1)]
        elif op == "insert":
            times[j1:j2] = [raw_times[max(i1 - 1, 0)]] * (j2 - j1)
    starts = itertools.accumulate(map(len, units), initial=0)  # each unit's first character in target
    # A unit takes the time of its first character; times never go back.
    return units, list(itertools.accumulate((times[k] for k, _ in zip(starts, units)), max, initial=0.0))[1:]


_SPACE = re.compile(r"\s+")


def _opcodes(a: str, b: str) -> Iterator[tuple[str, int, int, int, int]]:
    """The edits that turn `a` into `b`, named as difflib's get_opcodes names them, found in one
    pass: `b` is `a` formatted, so they agree but for short local changes. At each disagreement
    the nearest point where they agree again is looked for within RESYNC_WINDOW characters, and
    the short stretch between is matched with difflib."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            n = _agreeing(a, b, i, j)
            yield "equal", i, i + n, j, j + n
            i, j = i + n, j + n
            continue
        di, dj = _resync(a, b, i, j)
        yield from _stretch(a, b, i, i + di, j, j + dj)
        i, j = i + di, j + dj
    if i < len(a):
        yield "delete", i, len(a), j, j
    elif j < len(b):
        yield "insert", i, i, j, len(b)


def _agreeing(a: str, b: str, i: int, j: int) -> int:
    """How many characters agree from a[i] and b[j] on: slices compared, doubling then halving."""
    n, step = 0, 1
    while step:
        if a[i + n : i + n + step] == b[j + n : j + n + step] and i + n + step <= len(a) and j + n + step <= len(b):
            n += step
            step *= 2
        else:
            step //= 2
    return n


# The nearest points first: one character inserted, replaced or dropped, then two.
_NEAR = sorted(((di, dj) for di in range(3) for dj in range(3) if di or dj), key=lambda d: (max(d), abs(d[0] - d[1])))


def _resync(a: str, b: str, i: int, j: int) -> tuple[int, int]:
    """The nearest (di, dj) from which `a[i + di:]` and `b[j + dj:]` agree on two characters (or on
    one where a text ends); nearest by the longer of the two stretches skipped, then by the more
    even (a numeral run and its digits); none within the window: the window."""

    def agree(di: int, dj: int) -> bool:
        x, y = i + di, j + dj
        return (
            x < len(a) and y < len(b) and a[x] == b[y] and (x + 1 == len(a) or y + 1 == len(b) or a[x + 1] == b[y + 1])
        )

    near = next((d for d in _NEAR if agree(*d)), None)  # most disagreements are a comma inserted
    if near is not None:
        return near
    where: dict[str, list[int]] = {}
    for di in range(min(RESYNC_WINDOW, len(a) - i)):
        where.setdefault(a[i + di], []).append(di)
    best = (RESYNC_WINDOW, 0, min(RESYNC_WINDOW, len(a) - i), min(RESYNC_WINDOW, len(b) - j))
    for dj in range(min(RESYNC_WINDOW, len(b) - j)):
        if dj > best[0]:
            break
        for di in where.get(b[j + dj], ()):
            if (max(di, dj), abs(di - dj)) < best[:2] and agree(di, dj):
                best = (max(di, dj), abs(di - dj), di, dj)
    return best[2], best[3]


def _stretch(a: str, b: str, i1: int, i2: int, j1: int, j2: int) -> Iterator[tuple[str, int, int, int, int]]:
    """Where `a[i1:i2]` and `b[j1:j2]` disagree: one replacement, insertion or deletion, unless
    they share a character (一四 between inserted commas): then difflib, on a few characters."""
    if i1 < i2 and j1 < j2 and set(a[i1:i2]) & set(b[j1:j2]):
        for op, x1, x2, y1, y2 in difflib.SequenceMatcher(None, a[i1:i2], b[j1:j2], autojunk=False).get_opcodes():
            yield op, i1 + x1, i1 + x2, j1 + y1, j1 + y2
    else:
        yield ("replace" if i1 < i2 and j1 < j2 else "insert" if j1 < j2 else "delete"), i1, i2, j1, j2
