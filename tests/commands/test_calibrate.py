"""``kakeya calibrate`` reuses a bundle only when it was measured with the settings asked for."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kakeyaturbo.calibration import Calibration
from kakeyaturbo.commands.calibrate import why_remeasure
from tests.conftest import SETTINGS


@pytest.mark.model
def test_why_remeasure(tmp_path, tiny_bundle):
    _, cal = tiny_bundle
    assert why_remeasure(tmp_path / "none", SETTINGS) == "no bundle there yet"
    Calibration(cal.manifest, cal.statistics).save(tmp_path / "b")
    assert why_remeasure(tmp_path / "b", SETTINGS) is None
    other = dataclasses.replace(SETTINGS, windows=3, ridge=0.01)
    assert why_remeasure(tmp_path / "b", other) == ("the bundle there was measured with other settings "
                                                    "(ridge, windows)")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": 2}))
    assert "cannot be used" in why_remeasure(tmp_path / "b", SETTINGS)
    assert "kakeya calibrate --force --model tiny" in why_remeasure(tmp_path / "b", SETTINGS)
