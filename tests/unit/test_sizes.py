"""parse_size / format_size: the size syntax of policy files."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from allocpolicy._sizes import MAX_SIZE, GiB, KiB, MiB, Percent, TiB, format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("100 B", 100),
        ("100b", 100),
        ("512k", 512 * KiB),
        ("512 K", 512 * KiB),
        ("512 KiB", 512 * KiB),
        ("512 kib", 512 * KiB),
        ("512KB", 512_000),
        ("512 kb", 512_000),
        ("256 MiB", 256 * MiB),
        ("256M", 256 * MiB),
        ("256MB", 256_000_000),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * GiB // 2),
        ("1.5g", 3 * GiB // 2),
        ("2 TiB", 2 * TiB),
        ("2TB", 2 * 10**12),
        ("5 PiB", 5 * 1024**5),
        (MAX_SIZE, MAX_SIZE),
        (".5 KiB", 512),
        ("  64 MiB  ", 64 * MiB),
        ("1_000_000", 1_000_000),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


def test_fractional_bytes_round_down():
    assert parse_size("1.5 B") == 1
    assert parse_size("0.3 KiB") == 307  # 307.2


def test_percent_only_when_allowed():
    assert parse_size("80%", allow_percent=True) == Percent(80.0)
    assert parse_size(" 12.5 % ", allow_percent=True) == Percent(12.5)
    # Plain sizes still work where percentages are allowed.
    assert parse_size("1 GiB", allow_percent=True) == GiB
    with pytest.raises(ValueError, match="percentage is not allowed here"):
        parse_size("80%")


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "cannot be negative"),
        ("-5 MiB", "cannot be negative"),
        (-0.5, "cannot be negative"),
        ("", "empty string"),
        ("   ", "empty string"),
        (float("nan"), "float"),
        ("nan", "invalid size 'nan'"),
        ("inf", "invalid size"),
        (True, "boolean"),
        (False, "boolean"),
        (1.5, "float"),
        (None, "NoneType"),
        ([1], "list"),
        ("5 xb", "unknown unit 'xb'"),
        ("5 MiBs", "unknown unit"),
        ("1.2.3 MiB", "invalid size"),
        ("MiB", "invalid size"),
        (MAX_SIZE + 1, "too large"),
    ],
)
def test_parse_size_rejects(value, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_size(value)
    # Every message says what would have been accepted (or what was wrong with the number).
    text = str(info.value)
    assert "expected" in text or "negative" in text or "too large" in text


@pytest.mark.parametrize("text", ["0%", "101%", "-5%", "abc%", "%"])
def test_bad_percentages(text):
    with pytest.raises(ValueError):
        parse_size(text, allow_percent=True)


def test_percent_value_checks():
    with pytest.raises(ValueError):
        Percent(0)
    with pytest.raises(ValueError):
        Percent(math.nan)
    with pytest.raises(TypeError):
        Percent("50")  # type: ignore[arg-type]
    assert str(Percent(80)) == "80%"
    assert Percent(50).of(1000) == 500
    assert Percent(0.0001).of(10) == 1  # never 0, which would mean "no limit"


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (KiB, "1 KiB"),
        (1536, "1.5 KiB"),
        (64 * MiB, "64 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (MiB - 1, "1 MiB"),  # rounds up to the next unit, never "1024 KiB"
        (10**6, "976.56 KiB"),
        (2 * TiB, "2 TiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


def test_format_size_rejects():
    with pytest.raises(ValueError):
        format_size(-1)
    with pytest.raises(TypeError):
        format_size(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_size(True)


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_format_then_parse_is_close(n):
    # Two decimals of the largest unit that fits: within half a hundredth of
    # that unit (which is at most n), plus one byte for parsing rounding down.
    back = parse_size(format_size(n))
    assert abs(back - n) <= max(n, 1) * 0.005 + 1


@given(
    st.integers(min_value=0, max_value=1023),
    st.sampled_from([1, KiB, MiB, GiB, TiB]),
    st.sampled_from([0, 25, 50, 75]),
)
def test_format_then_parse_is_exact_for_round_sizes(whole, unit, hundredths):
    n = whole * unit + hundredths * unit // 100
    assert parse_size(format_size(n)) == n


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB"]),
)
def test_parse_whole_numbers_exactly(number, unit):
    factors = {"": 1, "B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "KB": 1000, "MB": 10**6, "GB": 10**9}
    assert parse_size(f"{number} {unit}") == number * factors[unit]
    assert parse_size(f"{number}{unit.lower()}") == number * factors[unit]
