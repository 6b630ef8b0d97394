"""``kakeya calibrate`` reuses a bundle only when it was made with the settings asked for."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kakeyaturbo.commands.calibrate import why_recalibrate
from tests.conftest import SETTINGS


@pytest.mark.model
def test_why_recalibrate(tmp_path, tiny_bundle):
    _, cal = tiny_bundle
    assert why_recalibrate(tmp_path / "none", SETTINGS) == "no bundle there yet"
    cal.save(tmp_path / "b")
    assert why_recalibrate(tmp_path / "b", SETTINGS) is None
    other = dataclasses.replace(SETTINGS, windows=3, v2_ablation_bits=None)
    assert why_recalibrate(tmp_path / "b", other) == ("the bundle there was made with other settings "
                                                      "(v2_ablation_bits, windows)")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": 1}))
    assert "cannot be used" in why_recalibrate(tmp_path / "b", SETTINGS)
