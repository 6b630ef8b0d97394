"""Evaluation text, offline, with a fixed calibration/evaluation split, and token windows over it.

``"austen"``: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (fetched
with ``apt-get download`` once, unpacked with ``dpkg -x`` into :func:`cache_dir` and read with the
R lazy-load reader of :mod:`kakeyaturbo.models.rdata`). *Pride and Prejudice* calibrates; the
other five novels, in publication order, are evaluated. Hard-wrapped lines are re-flowed into
paragraphs separated by a blank line.

Any other spec is the path of a UTF-8 text file: the first 20 % (cut at the first paragraph
break at or after that point) calibrates, the rest is evaluated.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.loading import atomic_dir, cache_dir
from kakeyaturbo.models.rdata import LazyLoadDB

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
CALIBRATION_BOOK = "prideprejudice"
EVALUATION_BOOKS = ("sensesensibility", "mansfieldpark", "emma", "northangerabbey", "persuasion")
CALIBRATION_FRACTION = 0.2


@dataclass(frozen=True)
class Corpus:
    """A text split once and for all into a calibration part and a disjoint evaluation part."""

    name: str
    calibration: str
    evaluation: str
    split_note: str


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)


def _unpack_austen(out: Path) -> None:
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"the 'austen' text needs {' and '.join(missing)} (Debian/Ubuntu) to fetch "
                          f"{AUSTEN_PACKAGE}; pass --text PATH to a UTF-8 text file instead")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = _run(["apt-get", "download", AUSTEN_PACKAGE], Path(tmp))
        if fetched.returncode != 0:
            _run(["apt-get", "update"], Path(tmp))
            fetched = _run(["apt-get", "download", AUSTEN_PACKAGE], Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if fetched.returncode != 0 or not debs:
            raise ConfigError(f"apt-get download {AUSTEN_PACKAGE} failed: {fetched.stderr.strip()[-500:]}; "
                              "check the Debian mirror or pass --text PATH to a UTF-8 text file")
        unpacked = _run(["dpkg", "-x", str(debs[0]), str(out)], Path(tmp))
        if unpacked.returncode != 0:
            raise ConfigError(f"dpkg -x {debs[0].name} failed: {unpacked.stderr.strip()[-500:]}")


def austen_db() -> LazyLoadDB:
    """The janeaustenr data database, fetched and unpacked into ``cache_dir()/janeaustenr`` on first use."""
    root = cache_dir() / "janeaustenr"
    if not (root / (AUSTEN_DATA + ".rdx")).is_file():
        atomic_dir(root, _unpack_austen)
    return LazyLoadDB(root / AUSTEN_DATA)


def reflow(lines: list[str | None]) -> str:
    """Join hard-wrapped lines into paragraphs (blank lines separate them), one blank line between."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        text = (line or "").strip()
        if text:
            current.append(text)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _austen() -> Corpus:
    db = austen_db()
    books = {name: reflow(db.load(name)) for name in (CALIBRATION_BOOK, *EVALUATION_BOOKS)}
    return Corpus(
        name="austen",
        calibration=books[CALIBRATION_BOOK],
        evaluation="\n\n".join(books[name] for name in EVALUATION_BOOKS),
        split_note=(f"Jane Austen ({AUSTEN_PACKAGE}): calibration = Pride and Prejudice; evaluation = "
                    "Sense and Sensibility, Mansfield Park, Emma, Northanger Abbey, Persuasion"),
    )


def split_text(text: str, fraction: float = CALIBRATION_FRACTION) -> tuple[str, str]:
    """Cut ``text`` at the first paragraph break (blank line) at or after ``fraction`` of its length,
    falling back to the last one before it, then to a line break. Both parts are non-empty."""
    at = int(len(text) * fraction)
    for sep in ("\n\n", "\n"):
        cut = text.find(sep, at)
        if cut <= 0:
            cut = text.rfind(sep, 0, at)
        if cut > 0:
            head, tail = text[:cut].strip(), text[cut:].strip()
            if head and tail:
                return head, tail
    raise ConfigError("text has no paragraph or line break to split calibration from evaluation at")


def _file(path: Path) -> Corpus:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"text file {path} is not UTF-8: {err}") from err
    calibration, evaluation = split_text(text)
    return Corpus(
        name=path.name,
        calibration=calibration,
        evaluation=evaluation,
        split_note=(f"{path.name}: calibration = first {len(calibration)} characters (~"
                    f"{CALIBRATION_FRACTION:.0%}, cut at a paragraph break); evaluation = the remaining "
                    f"{len(evaluation)} characters"),
    )


def load_corpus(spec: str = "austen") -> Corpus:
    """``"austen"`` or the path of a UTF-8 text file (see the module docstring for the split)."""
    if spec == "austen":
        return _austen()
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"text {spec!r} is neither 'austen' nor an existing text file")
    return _file(path)


def token_windows(tokenizer: Any, text: str, count: int, length: int, *, bos: bool = True) -> torch.Tensor:
    """``count`` disjoint windows of ``length`` tokens spread evenly over ``text``.

    Each window starts with the tokenizer's BOS token when it has one and ``bos`` is true (the
    BOS counts in ``length``); the rest are consecutive tokens of the text. Returns a
    LongTensor ``[count, length]``. Raises ConfigError when the text is too short.
    """
    if count < 1:
        raise ConfigError(f"window count must be >= 1, got {count}")
    bos_id = tokenizer.bos_token_id if bos else None
    body = length - (bos_id is not None)
    if body < 1:
        raise ConfigError(f"window length {length} leaves no room for text tokens")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    if n < count * body:
        raise ConfigError(
            f"text has {n} tokens: {n // body} windows of {length} tokens fit, {count} requested"
        )
    tokens = torch.tensor(ids, dtype=torch.long)
    starts = torch.arange(count) * (n - body) // max(count - 1, 1)
    windows = tokens[starts[:, None] + torch.arange(body)]
    if bos_id is not None:
        windows = torch.cat((torch.full((count, 1), bos_id, dtype=torch.long), windows), dim=1)
    return windows
