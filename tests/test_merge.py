"""capsd/merge.py: one task result from overlapping segments, by timestamps (docs/design.md#boundary-de-duplication-deletes-repeats)."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from capsd import textformat
from capsd.merge import SAME_TOKEN_S, PartialResult, join_tokens, realign

pytestmark = pytest.mark.unit

# Two segments as seg_duration=15, seg_overlap=2 cuts them: [0, 17) and [15, 32).
STRIDE, OVERLAP = 15.0, 2.0
CUT = STRIDE + OVERLAP / 2  # the middle of the overlap, in task time


def merged(first: list[tuple[str, float]], second: list[tuple[str, float]]) -> PartialResult:
    """Merge two segments given as (token, task time) pairs; the second starts at STRIDE."""
    p = PartialResult()
    p.add(0.0, 0.0, [tok for tok, _ in first], [t for _, t in first], STRIDE + OVERLAP)
    p.add(STRIDE, OVERLAP, [tok for tok, _ in second], [t - STRIDE for _, t in second], 2 * STRIDE + OVERLAP)
    return p


def assert_increasing(timestamps: list[float]) -> None:
    assert all(a <= b for a, b in itertools.pairwise(timestamps)), timestamps


def test_first_segment_is_taken_as_is() -> None:
    p = PartialResult()
    p.add(0.0, 0.0, ["你", "好"], [0.2, 0.5], 17.0)
    assert p.tokens == ["你", "好"]
    assert p.timestamps == [0.2, 0.5]
    assert p.duration == 17.0
    assert p.text == "你好"


def test_tokens_in_the_overlap_appear_once() -> None:
    first = [("今", 14.0), ("天", 15.3), ("天", 15.6), ("气", 16.2), ("很", 16.7)]
    second = [("天", 15.32), ("天", 15.58), ("气", 16.25), ("很", 16.66), ("好", 17.5)]
    p = merged(first, second)
    assert p.tokens == ["今", "天", "天", "气", "很", "好"]
    assert p.text == "今天天气很好"
    assert_increasing(p.timestamps)
    assert p.duration == 32.0


def test_earlier_segment_owns_before_the_cut_later_one_after() -> None:
    # The two segments disagree about a token on each side of the cut: each side's owner wins.
    first = [("a", 14.0), ("b", CUT - 0.5), ("c", CUT + 0.5)]
    second = [("B", CUT - 0.5), ("C", CUT + 0.5), ("d", 20.0)]
    p = merged(first, second)
    assert p.tokens == ["a", "b", "C", "d"]
    assert p.timestamps == pytest.approx([14.0, CUT - 0.5, CUT + 0.5, 20.0])


@pytest.mark.parametrize(
    ("first_at", "second_at"), [(-0.25, 0.25), (-0.45, 0.05), (-0.05, 0.45), (-0.1, 0.4), (-0.4, 0.1)]
)
@pytest.mark.parametrize("jitter", [0.0, -0.06, 0.06])
def test_repeated_digit_at_the_boundary_is_kept_twice(first_at: float, second_at: float, jitter: float) -> None:
    """'...1 1...' with the two 1s 0.5 s apart around the cut: two tokens, not one (docs/design.md#boundary-de-duplication-deletes-repeats)."""
    first = [("3", CUT - 1.0), ("1", CUT + first_at), ("1", CUT + second_at)]
    second = [("1", CUT + first_at + jitter), ("1", CUT + second_at + jitter), ("2", CUT + 1.0)]
    p = merged(first, second)
    assert p.tokens == ["3", "1", "1", "2"]
    assert_increasing(p.timestamps)


def test_a_token_spoken_three_times_across_a_cut_stays_three() -> None:
    first = [("1", CUT - 0.6), ("1", CUT - 0.2), ("1", CUT + 0.2)]
    second = [("1", CUT - 0.57), ("1", CUT - 0.22), ("1", CUT + 0.23), ("9", CUT + 0.6)]
    assert merged(first, second).tokens == ["1", "1", "1", "9"]


# (time in the first segment, time in the second), relative to the cut: one token seen twice,
# the copies less than SAME_TOKEN_S apart, on either side of the cut or on the same side.
SAME_TOKEN = [
    (-0.05, 0.05),
    (0.05, -0.05),
    (-0.01, 0.1),
    (0.1, -0.01),
    (0.001, -0.11),
    (-0.11, 0.001),
    (-0.2, -0.1),
    (-0.1, -0.2),
    (-0.23, -0.12),
    (-0.05, -0.15),
    (-0.15, -0.05),
    (0.1, 0.2),
    (0.2, 0.1),
    (0.0, 0.0),
]


@pytest.mark.parametrize(("old", "new"), SAME_TOKEN)
def test_one_token_seen_by_both_segments_is_kept_once(old: float, new: float) -> None:
    assert abs(old - new) < SAME_TOKEN_S
    first = [("前", CUT - 1.0), ("字", CUT + old), ("后", CUT + 0.9)]
    second = [("前", CUT - 1.02), ("字", CUT + new), ("后", CUT + 1.0)]
    p = merged(first, second)
    assert p.tokens == ["前", "字", "后"]
    assert_increasing(p.timestamps)


@pytest.mark.parametrize(("a", "b"), [(-0.1, 0.1), (-0.05, 0.15), (-0.3, -0.1), (0.1, 0.3), (-0.15, 0.15)])
@pytest.mark.parametrize("jitter", [0.0, -0.03, 0.03])
def test_equal_tokens_further_apart_are_two(a: float, b: float, jitter: float) -> None:
    """A quick repeat, closer than 0.5 s but further apart than SAME_TOKEN_S, seen by both segments."""
    assert b - a > SAME_TOKEN_S
    first = [("1", CUT + a), ("1", CUT + b)]
    second = [("1", CUT + a + jitter), ("1", CUT + b + jitter)]
    p = merged(first, second)
    assert p.tokens == ["1", "1"]
    assert_increasing(p.timestamps)


def test_merged_timestamps_stay_increasing_across_a_cut() -> None:
    # The later segment has a token just before the cut that the earlier one did not see.
    first = [("a", CUT - 0.5), ("b", CUT - 0.02)]
    second = [("x", CUT - 0.1), ("c", CUT + 0.3), ("d", CUT + 0.2)]
    p = merged(first, second)
    assert p.tokens == ["a", "b", "x", "c", "d"]
    assert_increasing(p.timestamps)
    assert p.timestamps[0] == CUT - 0.5


def test_timestamps_are_in_task_time_not_segment_time() -> None:
    p = PartialResult()
    p.add(0.0, 0.0, ["a"], [1.0], 17.0)
    p.add(15.0, 2.0, ["b"], [3.0], 32.0)
    p.add(30.0, 2.0, ["c"], [2.5], 40.0)
    assert p.tokens == ["a", "b", "c"]
    assert p.timestamps == pytest.approx([1.0, 18.0, 32.5])
    assert p.duration == 40.0


def test_a_silent_segment_between_others_adds_only_its_duration() -> None:
    p = PartialResult()
    p.add(0.0, 0.0, ["a", "b"], [1.0, 10.0], 17.0)
    p.add(15.0, 2.0, [], [], 32.0)  # silence
    assert p.tokens == ["a", "b"]
    assert p.duration == 32.0
    p.add(30.0, 2.0, ["c"], [1.5], 40.0)
    assert p.tokens == ["a", "b", "c"]
    assert p.timestamps == pytest.approx([1.0, 10.0, 31.5])


def test_after_silent_first_segments_the_next_overlap_is_taken_whole() -> None:
    p = PartialResult()
    p.add(0.0, 0.0, [], [], 17.0)
    assert (p.tokens, p.timestamps, p.duration, p.text) == ([], [], 17.0, "")
    # Nothing merged yet, so the overlap's tokens of the next segment are all taken.
    p.add(15.0, 2.0, ["a", "b"], [0.2, 1.8], 32.0)
    assert p.tokens == ["a", "b"]
    assert p.timestamps == pytest.approx([15.2, 16.8])


def test_segments_without_overlap_are_concatenated() -> None:
    p = PartialResult()
    p.add(0.0, 0.0, ["a", "b"], [0.5, 1.9], 2.0)
    p.add(2.0, 0.0, ["b", "c"], [0.05, 1.0], 4.0)
    assert p.tokens == ["a", "b", "b", "c"]
    assert p.timestamps == pytest.approx([0.5, 1.9, 2.05, 3.0])
    assert p.duration == 4.0


def test_empty_last_segment_keeps_the_duration() -> None:
    p = PartialResult()
    p.add(0.0, 0.0, ["a"], [1.0], 17.0)
    p.add(15.0, 2.0, [], [], 15.0)
    assert p.duration == 17.0


@pytest.mark.parametrize(
    ("tokens", "text"),
    [
        ([], ""),
        (["你", "好", "世", "界"], "你好世界"),
        (["hello", "world"], "hello world"),
        (["HELLO", "WORLD", "2024"], "HELLO WORLD 2024"),
        (["1", "1"], "1 1"),
        (["我", "用", "python", "写", "代", "码"], "我用python写代码"),
        (["don't", "go"], "don't go"),
        (["\u2581HE", "LLO", "\u2581WOR", "LD"], "HELLO WORLD"),
        (["\u2581the", "\u2581cat", "s"], "the cats"),
        (["\u2581", "hi"], "hi"),
        (["你", "好", "\u2581and", "\u2581you"], "你好 and you"),
        (["hel@@", "lo", "world"], "hello world"),
        (["un@@", "believ@@", "able", "news"], "unbelievable news"),
        (["我", "说", "hel@@", "lo", "你", "好"], "我说hello你好"),
        (["end@@"], "end"),
        (["。"], "。"),
        (["你", "好", "，", "hello", "。"], "你好，hello。"),
    ],
)
def test_tokens_join_into_the_text_with_spaces_only_between_words(tokens: list[str], text: str) -> None:
    assert join_tokens(tokens) == text


def test_the_text_follows_the_merged_tokens() -> None:
    p = PartialResult()
    p.add(0.0, 0.0, ["\u2581good", "\u2581mor", "ning"], [0.1, 0.5, 0.8], 17.0)
    assert p.text == "good morning"


def test_realign_keeps_each_kept_character_at_its_time() -> None:
    tokens, times = realign(list("你好世界"), [0.0, 0.2, 0.4, 0.6], "你好世界")
    assert (tokens, times) == (list("你好世界"), [0.0, 0.2, 0.4, 0.6])


def test_realign_gives_punctuation_the_time_of_the_character_before_it() -> None:
    tokens, times = realign(list("你好世界"), [0.0, 0.2, 0.4, 0.6], "你好，世界。")
    assert tokens == list("你好，世界。") and times == [0.0, 0.2, 0.2, 0.4, 0.6, 0.6]


def test_realign_spreads_a_replaced_run_over_the_times_it_replaces() -> None:
    tokens, times = realign(list("今天是二零二四年"), [0.1 * i for i in range(8)], "今天是 2024 年")
    assert tokens == list("今天是2024年")
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])  # digit for numeral
    tokens, times = realign(list("一百二十三"), [0.0, 0.2, 0.4, 0.6, 0.8], "123")
    assert tokens == ["1", "2", "3"] and times == [0.0, 0.2, 0.6]


def test_realign_keeps_latin_words_whole_and_times_increasing() -> None:
    tokens, times = realign(["\u2581HELLO", "\u2581WOR", "LD", "好"], [0.0, 0.5, 0.7, 1.0], "HELLO WORLD 好")
    assert tokens == ["HELLO", "WORLD", "好"] and times == [0.0, 0.5, 1.0]
    tokens, times = realign(list("三二一"), [0.4, 0.2, 0.3], "321")
    assert times == sorted(times)


def test_a_two_hour_result_is_realigned_once_and_stays_in_order() -> None:
    """Tens of thousands of characters with punctuation inserted, realigned once, on the final frame."""
    import random

    rng = random.Random(1)
    text = "".join(rng.choices([chr(0x4E00 + i) for i in range(3000)], k=36000))
    punctuated = "".join(ch + ("，" if rng.random() < 0.06 else "") for ch in text)
    tokens, times = realign(list(text), [0.2 * i for i in range(len(text))], punctuated)
    assert "".join(tokens) == punctuated and times == sorted(times)


# -- a long task: what a segment costs does not grow with the task (docs/design.md#long-tasks) ----


def digits_segment(index: int) -> tuple[float, float, list[str], list[float], float]:
    """Segment `index` of a task cut with seg_duration 1, seg_overlap 0.5: dense digits, 2 a second."""
    offset = float(index)
    tokens, times = (["1", "2", "3"], [0.1, 0.6, 1.1]) if index else (["1", "2"], [0.1, 0.6])
    return offset, 0.5 if index else 0.0, tokens, times, offset + 1.5


def seconds_per_add(p: PartialResult, first: int, count: int) -> float:
    """The best of five runs of `count` merges: noise on a busy machine only ever adds time."""
    best = float("inf")
    for run in range(5):
        start = time.perf_counter()
        for index in range(first + run * count, first + (run + 1) * count):
            p.add(*digits_segment(index))
        best = min(best, time.perf_counter() - start)
    return best / count


def test_merging_a_segment_costs_the_same_at_segment_20000_as_at_segment_10() -> None:
    """Merging used to scan the whole task for the cut: 20,000 segments in, a merge cost ~1000
    times what it did at the start."""
    p = PartialResult()
    p.add(*digits_segment(0))
    early = seconds_per_add(p, 1, 200)
    for index in range(1001, 20_000):
        p.add(*digits_segment(index))
    late = seconds_per_add(p, 20_000, 200)
    assert len(p.tokens) == 2 * 21_000  # two new digits a segment, none lost or doubled
    assert late < 5 * early, (early, late)


def test_text_is_join_tokens_whatever_the_segments_cut_and_add() -> None:
    """The text is kept as pieces, cut and extended with the tokens: always what join_tokens gives."""
    rng = random.Random(3)
    alphabet = ["你", "好", "hello", "world", "\u2581the", "\u2581cat", "s", "hel@@", "lo", "@@", "\u2581", "1", "x"]
    for _ in range(2000):
        p = PartialResult()
        for index in range(rng.randint(1, 6)):
            tokens = rng.choices(alphabet, k=rng.randint(0, 6))
            times = sorted(rng.uniform(0, 3) for _ in tokens)
            p.add(2.0 * index, 1.0 if index else 0.0, tokens, times, 2.0 * index + 3)
            assert p.text == join_tokens(p.tokens), p.tokens


def test_realign_of_a_30k_token_result_is_linear() -> None:
    """The final frame's realignment was difflib over the whole text: 1.1 s for ~30k tokens,
    blocking the event loop. One pass takes a few tens of milliseconds."""
    rng = random.Random(2)
    text = "".join(rng.choices([chr(0x4E00 + i) for i in range(3000)] + list("一二三四五六七八九十"), k=30_000))
    formatted = textformat.format_final("".join(ch + ("，" if rng.random() < 0.06 else "") for ch in text),
                                        num=True, spell=True, punctuator=None)  # fmt: skip
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        tokens, times = realign(list(text), [0.2 * i for i in range(len(text))], formatted)
        best = min(best, time.perf_counter() - start)
    assert "".join(tokens) == formatted.replace(" ", "") and times == sorted(times)
    assert best < 0.2, best


def test_realign_of_a_digit_run_longer_than_the_resync_window_keeps_each_digits_time() -> None:
    spoken = "一二三四五六七八九零" * 10  # 100 digits, nothing in common with "1234567890" * 10
    tokens, times = realign(list(spoken), [0.5 * i for i in range(100)], textformat.chinese_to_num(spoken))
    assert tokens == list("1234567890" * 10) and times == [0.5 * i for i in range(100)]
