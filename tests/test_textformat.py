from pathlib import Path

import pytest

from capsd.textformat import (
    Punctuator,
    chinese_to_num,
    format_final,
    model_files,
    space_cjk_latin,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("spoken", "written"),
    [
        # digit by digit
        ("三一四", "314"),
        ("一二三四五六七八九零", "1234567890"),
        ("幺幺零", "110"),
        ("二零二四年", "2024年"),
        ("幺九二点幺六八点幺点幺", "192.168.1.1"),
        # values with units
        ("一百二十三", "123"),
        ("两千零五", "2005"),
        ("一万两千", "12000"),
        ("一千零五十", "1050"),
        ("两万五", "25000"),
        ("三亿两千万", "320000000"),
        ("十五", "15"),
        ("二十个", "20个"),
        # decimals and percentages
        ("三点一四", "3.14"),
        ("零点五", "0.5"),
        ("百分之五十", "50%"),
        ("百分之三点五", "3.5%"),
        ("百分之五", "5%"),
        # in a sentence
        ("我有一百二十三本书", "我有123本书"),
        ("电话是幺三八零零", "电话是13800"),
    ],
)
def test_chinese_numerals_are_converted_to_digits(spoken: str, written: str) -> None:
    assert chinese_to_num(spoken) == written


@pytest.mark.parametrize(
    "text",
    [
        # a lone numeral is never converted
        "一个",
        "一样",
        "一起",
        "第一",
        "十分好",
        "五",
        "一点点",
        # malformed runs
        "万一",
        "千万",
        "一两个",
        "百分之百",
        # idioms
        "乱七八糟",
        "三十而立",
        "一点一滴",
        # no numerals at all
        "",
        "今天天气很好",
    ],
)
def test_words_and_idioms_with_numerals_stay_as_they_are(text: str) -> None:
    assert chinese_to_num(text) == text


def test_decimal_part_followed_by_unit_is_not_a_decimal() -> None:
    assert chinese_to_num("两点五十分") == "两点50分"


@pytest.mark.parametrize(
    ("text", "spaced"),
    [
        ("我用Python写代码", "我用 Python 写代码"),
        ("共3个", "共 3 个"),
        ("Python是语言", "Python 是语言"),
        ("用python", "用 python"),
        ("我用 Python写代码", "我用 Python 写代码"),
        ("50%的人", "50% 的人"),
        ("好，Python。", "好，Python。"),
        ("纯中文", "纯中文"),
        ("plain English 3.14", "plain English 3.14"),
    ],
)
def test_a_space_goes_between_cjk_and_latin(text: str, spaced: str) -> None:
    assert space_cjk_latin(text) == spaced


@pytest.mark.parametrize("text", ["我用Python写代码", "共3个", "a我b你c", "50%的人"])
def test_spacing_is_idempotent(text: str) -> None:
    once = space_cjk_latin(text)
    assert space_cjk_latin(once) == once


@pytest.mark.parametrize(
    ("num", "spell", "formatted"),
    [
        (False, False, "共一百二十三个Python文件"),
        (True, False, "共123个Python文件"),
        (False, True, "共一百二十三个 Python 文件"),
        (True, True, "共 123 个 Python 文件"),
    ],
)
def test_the_final_text_is_formatted_as_num_and_spell_say(num: bool, spell: bool, formatted: str) -> None:
    text = "共一百二十三个Python文件"
    assert format_final(text, num=num, spell=spell, punctuator=None) == formatted


def test_a_punctuation_model_directory_must_hold_model_onnx(tmp_path: Path) -> None:
    assert model_files(tmp_path) == [tmp_path / "model.onnx"]


def test_punctuator_without_model_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.onnx"):
        Punctuator(tmp_path, num_threads=1)
