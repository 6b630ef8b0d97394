"""Corpus split and token windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.text import load_corpus, reflow, split_text, token_windows


class CharTokenizer:
    """One token per character (ids = code points + 10); BOS id 1, or none."""

    def __init__(self, bos: bool = True) -> None:
        self.bos_token_id = 1 if bos else None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) + 10 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)


@given(count=st.integers(1, 6), length=st.integers(2, 9), extra=st.integers(0, 30), bos=st.booleans())
def test_windows_disjoint_and_spread(count: int, length: int, extra: int, bos: bool) -> None:
    tok = CharTokenizer(bos)
    body = length - bos
    text = "".join(chr(0x100 + i) for i in range(count * body + extra))  # all characters distinct
    w = token_windows(tok, text, count, length)
    assert w.shape == (count, length) and w.dtype == torch.long
    if bos:
        assert (w[:, 0] == 1).all()
    starts = [text.index(tok.decode(row.tolist())) for row in w]  # characters are all distinct
    assert starts[0] == 0 and (count == 1 or starts[-1] == len(text) - body)
    assert all(b - a >= body for a, b in zip(starts, starts[1:]))


def test_too_short_text_says_how_many_fit() -> None:
    with pytest.raises(ConfigError, match="2 windows of 6 tokens fit, 3 requested"):
        token_windows(CharTokenizer(), "x" * 12, 3, 6)
    with pytest.raises(ConfigError, match="no room"):
        token_windows(CharTokenizer(), "x" * 12, 1, 1)
    with pytest.raises(ConfigError, match="count"):
        token_windows(CharTokenizer(), "x" * 12, 0, 4)


@given(paragraphs=st.lists(st.text(alphabet="abc .", min_size=1, max_size=30).filter(str.strip),
                           min_size=2, max_size=12))
def test_split_at_a_paragraph_break(paragraphs: list[str]) -> None:
    text = "\n\n".join(p.strip() for p in paragraphs)
    head, tail = split_text(text)
    assert text.startswith(head) and text.endswith(tail)
    assert text[len(head):len(text) - len(tail)] == "\n\n"


def test_split_without_breaks_raises() -> None:
    with pytest.raises(ConfigError, match="no paragraph"):
        split_text("one long line")


def test_file_corpus(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Paragraph {i} " + "word " * 20 for i in range(50)), encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.name == "book.txt" and "20%" in corpus.split_note
    assert corpus.calibration.endswith("word") and corpus.evaluation.startswith("Paragraph ")
    assert 0.18 < len(corpus.calibration) / len(path.read_text()) < 0.25
    with pytest.raises(ConfigError, match="neither"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_corpus(str(tmp_path / "bad.txt"))


def test_reflow() -> None:
    assert reflow(["A b", "c.", "", "", "D", None, "E"]) == "A b c.\n\nD\n\nE"


@pytest.mark.model
def test_austen_split_is_disjoint(default_model: tuple[Any, Any]) -> None:
    _, tokenizer = default_model
    try:
        corpus = load_corpus("austen")
    except ConfigError as err:
        pytest.skip(f"cannot fetch r-cran-janeaustenr from Debian: {err}")
    assert corpus.calibration.startswith("PRIDE AND PREJUDICE")
    assert "Elizabeth Bennet" in corpus.calibration and "Elizabeth Bennet" not in corpus.evaluation
    assert "Pride and Prejudice" in corpus.split_note
    evaluation = corpus.evaluation[:400_000]  # keeps tokenization fast; windows span all of it
    windows = token_windows(tokenizer, evaluation, 6, 48)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    for row in windows:
        piece = tokenizer.decode(row[1:].tolist())
        assert piece in evaluation and piece not in corpus.calibration
