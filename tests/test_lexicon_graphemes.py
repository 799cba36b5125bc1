"""Grapheme cluster counting (UAX #29), by hand-checked cases and against ICU.

The reference implementation counts graphemes with ``Intl.Segmenter`` (ICU), so Node, which
the machine has for the reference PDS anyway, is the oracle here. Its ICU follows Unicode 17,
as ``_graphemes``' tables do; if a newer Node moves to a later Unicode and this comparison
fails, the tables need that version's property data (see the module's docstring). Without Node
the comparison cannot run: it carries the ``pds`` marker, so ``pytest -m "not pds"`` leaves it
out; the hand-checked cases, which ICU 78 gives the same counts for, still run.

The ``regex`` package's ``\\X`` fails this comparison (docs/dependencies.md): the virama and
ZWNJ cases below are ones it gets wrong.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atsync.lexicon._graphemes import count_graphemes

CASES = [
    ("", 0),
    ("abc", 3),
    ("a\r\nb", 3),  # CR LF is one cluster
    ("\r\r\n", 2),
    ("\n\r", 2),
    ("e\u0301", 1),  # combining acute
    ("e\u0301\u0302\u0323", 1),
    ("\u0000\u0301", 2),  # a control never takes marks
    ("🇩🇪", 1),
    ("🇩🇪🇫", 2),  # regional indicators pair up
    ("🇩🇪🇫🇷", 2),
    ("👨‍👩‍👧‍👦", 1),  # ZWJ sequence
    ("🏳️‍🌈", 1),
    ("👍🏽", 1),  # skin tone modifier
    ("👩🏽‍💻", 1),
    ("🧑‍🤝‍🧑", 1),
    ("1\ufe0f\u20e3", 1),  # keycap
    ("🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", 1),  # tag sequence
    ("a\u200db", 2),  # ZWJ joins only pictographs
    ("🙂\u200d🙂", 1),
    ("\u1100\u1161\u11a8", 1),  # Hangul jamo L V T
    ("\u1100\u1100\u1161", 1),
    ("한국어", 3),
    ("नमस्ते", 3),  # Devanagari conjunct (GB9c)
    ("क्ष", 1),
    ("\u0915\u094d\u200d\u0937", 1),  # ZWJ inside a conjunct
    ("\u0915\u200c\u094d\u0937", 2),  # ZWNJ breaks it
    ("\u094d\u0915", 2),  # a virama with no consonant before it joins nothing
    ("a\u094d\u0915", 2),
    ("\u1039\u1000", 2),  # the same in Myanmar
    ("\u17d2\u1780", 2),  # and Khmer
    ("ক্ষ", 1),  # Bengali
    ("ಕ್ಷ", 2),  # Kannada has no conjunct rule
    ("กำ", 1),  # Thai SARA AM
    ("\u0600\u0661", 1),  # Arabic number sign prepends
]


@pytest.mark.parametrize(("text", "count"), CASES, ids=[repr(t) for t, _ in CASES])
def test_hand_checked_counts(text: str, count: int) -> None:
    assert count_graphemes(text) == count


@given(st.text())
def test_bounds(text: str) -> None:
    n = count_graphemes(text)
    assert (n == 0) == (text == "")
    assert n <= len(text)


@given(st.text(st.characters(max_codepoint=127)))
def test_ascii_is_characters_minus_crlf(text: str) -> None:
    assert count_graphemes(text) == len(text) - text.count("\r\n")


_SEGMENT_JS = """
const data = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const seg = new Intl.Segmenter(undefined, {granularity: 'grapheme'});
process.stdout.write(JSON.stringify(data.map(s => [...seg.segment(s)].length)));
"""


def _icu_counts(texts: list[str]) -> list[int]:
    node = shutil.which("node")
    assert node is not None, "Node.js (the ICU oracle) is not on PATH: run with -m 'not pds'"
    out = subprocess.run(
        [node, "-e", _SEGMENT_JS],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    counts: list[int] = json.loads(out)
    return counts


def _pools() -> list[list[int]]:
    ranges = [
        (0x20, 0x7F), (0x300, 0x370), (0x900, 0xE80), (0x1000, 0x10A0), (0x1100, 0x1200),
        (0x1780, 0x1800), (0x1B00, 0x1B80), (0x600, 0x620), (0xAC00, 0xAC40), (0x1F1E6, 0x1F200),
        (0x1F300, 0x1F400), (0x1F466, 0x1F46A), (0x1F3FB, 0x1F400), (0xE0020, 0xE0080),
        (0xFE00, 0xFE10), (0x2600, 0x2800),
    ]  # fmt: skip
    extras = [0x0D, 0x0A, 0x00, 0x200C, 0x200D, 0xFE0F, 0x20E3, 0x2028, 0xAD, 0x94D, 0x9CD]
    return [list(range(lo, hi)) for lo, hi in ranges] + [extras]


@pytest.mark.pds  # needs Node.js, as the reference PDS does: `-m "not pds"` leaves it out
def test_counts_agree_with_icu() -> None:
    rng = random.Random(20241101)
    pools = _pools()
    texts = [t for t, _ in CASES]
    for _ in range(5000):
        main, other = rng.choice(pools), rng.choice(pools)
        length = rng.randint(1, 10)
        cps = [rng.choice(main if rng.random() < 0.7 else other) for _ in range(length)]
        # Only characters Python's Unicode knows: for later ones the categories are unknown.
        texts.append("".join(chr(c) for c in cps if unicodedata.category(chr(c)) != "Cn"))
    expected = _icu_counts(texts)
    differ = [(t, count_graphemes(t), e) for t, e in zip(texts, expected, strict=True)]
    differ = [d for d in differ if d[1] != d[2]]
    assert not differ, f"{len(differ)} of {len(texts)} differ from ICU, e.g. {differ[:5]}"
