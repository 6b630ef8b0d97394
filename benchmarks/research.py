"""What the research benchmarks (``allocation.py``, ``cross_layer.py``, ``entropy_coding.py``) share: their
text options and writing their rows as JSON and a Markdown table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parser(doc: str, out: str, cal_windows: int | None = None) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of ``doc``, with ``--tokens`` per window, the
    output folder ``--out`` (default ``out``) and, given a default, ``--cal-windows``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if cal_windows is not None:
        p.add_argument("--cal-windows", type=int, default=cal_windows,
                       help="calibration windows (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per window (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path(out), help="output folder (default: %(default)s)")
    return p


def write(out: Path, name: str, rows: list[dict[str, Any]], table: str) -> int:
    """``out/name.json`` (the rows) and ``out/name.md`` (the table), the table printed; returns 0."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(table)
    print(table)
    return 0
