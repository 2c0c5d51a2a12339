"""Formatting of final recognition results, as CapsWriter-Offline's `[format]` options do.

Three steps, each optional, applied by `format_final` in CapsWriter's order
(`util/server_recognize.py`, `format_text`): punctuation, then numerals, then spacing.
Punctuation comes first because the CT-Transformer model was trained on Chinese text,
not on Arabic digits; spacing comes last because numeral conversion creates new digits
next to CJK characters. (CapsWriter also adjusts spaces once before punctuation, since
its spacing step also joins spelled-out letters such as "t x t"; ours only inserts
spaces, so once at the end is enough.)

Numeral rule (`chinese_to_num`). A *run* is a maximal stretch of numeral characters,
optionally with decimal parts (点 followed by digits) and an optional 百分之 prefix.

- A run of one numeral character is never converted: 一个, 一样, 一起, 第一, 十分好,
  三月 and a lone 五 all stay as written. This keeps words and idioms intact and
  follows the usual Chinese style of writing small counts in characters. The only
  exception is after 百分之 (百分之五 -> 5%).
- A run of two or more digit characters (零〇幺一二三四五六七八九) is read digit by
  digit: 三一四 -> 314, 二零二四年 -> 2024年. The self-test model emits only such digits,
  so any result of two or more of them becomes Arabic digits, and a one-digit result
  stays a Chinese character.
- A run with units (十百千万亿) is read as a value: 一百二十三 -> 123, 两千零五 -> 2005,
  两万五 -> 25000. A malformed run (万一, 千万, 一两) is left alone.
- 点 followed by digits is a decimal point (三点一四 -> 3.14); several of them between
  digit sequences make a dotted number (幺九二点幺六八点幺点幺 -> 192.168.1.1).
- Runs inside a few idioms (乱七八糟, 三十而立, ...) are left alone. Only idioms holding
  a non-numeral character are listed, so a text made only of digits always converts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sherpa_onnx

_DIGITS = {
    "零": 0, "〇": 0, "幺": 1, "一": 1, "二": 2, "两": 2, "三": 3,
    "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9,
}  # fmt: skip
# 两 means "two of something", never a digit read out in a sequence.
_SEQUENCE_DIGITS = "零〇幺一二三四五六七八九"
_SMALL_UNITS = {"十": 10, "百": 100, "千": 1000}
_LARGE_UNITS = {"万": 10**4, "亿": 10**8}
_UNITS = "".join(_SMALL_UNITS) + "".join(_LARGE_UNITS)

# A decimal part followed by a unit (两点五十分: two-fifty) is not a decimal part.
_NUMERAL_RUN = re.compile(
    rf"(?P<percent>百分之)?"
    rf"(?P<number>[{''.join(_DIGITS)}{_UNITS}]+(?:点[{_SEQUENCE_DIGITS}]+(?![{_UNITS}]))*)"
)

_IDIOMS = (
    "乱七八糟", "七零八落", "十之八九", "十有八九", "八九不离十", "略知一二", "一点一滴",
    "三十而立", "三十六计", "三百六十行", "五十步笑百步", "九九归一", "三五成群",
    "三六九等", "正经八百", "二三其德", "五四运动",
)  # fmt: skip


def chinese_to_num(text: str) -> str:
    """Replace Chinese numerals in `text` with Arabic digits (see the module docstring)."""
    protected = [(found.start(), found.end()) for idiom in _IDIOMS for found in re.finditer(idiom, text)]

    def replace(match: re.Match[str]) -> str:
        start, end = match.span("number")
        if any(low <= start and end <= high for low, high in protected):
            return match[0]
        percent = match["percent"] is not None
        converted = _convert(match["number"], lone_allowed=percent)
        if converted is None:
            return match[0]
        return converted + "%" if percent else converted

    return _NUMERAL_RUN.sub(replace, text)


def _convert(number: str, *, lone_allowed: bool) -> str | None:
    """Arabic form of one numeral run, or None when it should stay as written."""
    parts = number.split("点")
    if len(parts) > 2:
        if all(_is_sequence(part) for part in parts):
            return ".".join(_read_digits(part) for part in parts)
        return None
    if len(number) == 1 and not lone_allowed:
        return None
    integer = parts[0]
    whole = _read_digits(integer) if _is_sequence(integer) else _read_value(integer)
    if whole is None:
        return None
    return f"{whole}.{_read_digits(parts[1])}" if len(parts) == 2 else whole


def _is_sequence(chars: str) -> bool:
    return bool(chars) and all(c in _SEQUENCE_DIGITS for c in chars)


def _read_digits(chars: str) -> str:
    return "".join(str(_DIGITS[c]) for c in chars)


def _read_value(chars: str) -> str | None:
    """Decimal string of a numeral with units (一百二十三 -> "123"), or None if malformed."""
    total = 0  # value of the finished 万/亿 groups
    group = 0  # value below the next 万/亿
    group_unit = 0  # last small unit in this group; they must fall (千 > 百 > 十)
    last_unit = 0  # for the spoken shorthand 一百五 = 150
    digit: int | None = None
    after_zero = False  # 一百零五 = 105, not 150
    for c in chars:
        if c in "零〇":
            if digit is not None:
                return None
            after_zero = True
        elif c in _DIGITS:
            if digit is not None:
                return None
            digit = _DIGITS[c]
        elif c in _SMALL_UNITS:
            unit = _SMALL_UNITS[c]
            if (digit is None and c != "十") or (group_unit and unit >= group_unit):
                return None
            group += (1 if digit is None else digit) * unit
            group_unit = last_unit = unit
            digit, after_zero = None, False
        else:
            unit = _LARGE_UNITS[c]
            value = group + (digit or 0) + (total if unit > 10**4 else 0)
            if value == 0:
                return None
            total = value * unit if unit > 10**4 else total + value * unit
            group = group_unit = 0
            last_unit = unit
            digit, after_zero = None, False
    if digit is not None:
        group += digit if after_zero or last_unit <= 10 else digit * last_unit // 10
    return str(total + group)


_CJK = r"\u3400-\u4dbf\u4e00-\u9fff"
_CJK_THEN_LATIN = re.compile(rf"(?<=[{_CJK}])(?=[A-Za-z0-9])")
# A percent sign belongs to the number before it: 50% 的人.
_LATIN_THEN_CJK = re.compile(rf"(?<=[A-Za-z0-9%])(?=[{_CJK}])")


def space_cjk_latin(text: str) -> str:
    """Put one space between CJK characters and Latin letters or Arabic digits."""
    return _LATIN_THEN_CJK.sub(" ", _CJK_THEN_LATIN.sub(" ", text))


def model_files(model_dir: Path) -> list[Path]:
    """Files a CT-Transformer punctuation model directory must hold before loading."""
    return [model_dir / "model.onnx"]


class Punctuator:
    """Adds punctuation with a CT-Transformer model through sherpa-onnx."""

    def __init__(self, model_dir: Path, num_threads: int = 1) -> None:
        missing = [str(path) for path in model_files(model_dir) if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"punctuation model files missing: {', '.join(missing)}")
        # Imported here so that formatting without punctuation never needs sherpa-onnx.
        import sherpa_onnx

        model = sherpa_onnx.OfflinePunctuationModelConfig(
            ct_transformer=str(model_dir / "model.onnx"), num_threads=num_threads
        )
        self._model: sherpa_onnx.OfflinePunctuation = sherpa_onnx.OfflinePunctuation(
            sherpa_onnx.OfflinePunctuationConfig(model=model)
        )

    def __call__(self, text: str) -> str:
        return self._model.add_punctuation(text)


def format_final(text: str, *, num: bool, spell: bool, punctuator: Punctuator | None) -> str:
    """Format a final result: punctuation, then numerals, then spacing (CapsWriter's order)."""
    if punctuator is not None and text:
        text = punctuator(text)
    if num:
        text = chinese_to_num(text)
    if spell:
        text = space_cjk_latin(text)
    return text
