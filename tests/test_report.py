"""``report.html`` of ``brainseg evaluate``: self-contained, complete, and rendered without
errors by a real headless Chromium (skipped where none is installed)."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from browser import Browser, find_chromium

from brainseg_dist.evaluate import evaluate_run


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "eval"
    return evaluate_run(trained_run, split="all", out=out, show_progress=False)


def test_report_is_self_contained_and_complete(evaluated):
    path = evaluated.out / "report.html"
    assert path in evaluated.figures
    html = path.read_text()
    sources = re.findall(r'<img src="([^"]*)"', html)
    patients = len(evaluated.per_patient)
    # Dice, curves, best/median/worst overlays, and one strip per patient.
    assert len(sources) == 5 + patients
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from the network
    for heading in ("Protocol", "Summary", "Per patient", "Dice per patient",
                    "Training curves", "Best patient", "Median patient", "Worst patient",
                    "Slices of every patient"):
        assert f">{heading}</h2>" in html, heading
    for patient in evaluated.per_patient["patient"]:
        assert patient in html
    assert html.count('<div class="strip">') == patients
    assert "per patient: 2|P∩G|/(|P|+|G|)" in html  # the Dice convention, escaped intact


needs_browser = pytest.mark.skipif(find_chromium() is None,
                                   reason="no chromium on PATH (apt-get install chromium)")


@needs_browser
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    pytest.importorskip("websocket", reason="websocket-client (dev extra) not installed")
    path = evaluated.out / "report.html"
    with Browser() as b:
        b.open(path.as_uri())
        assert b.evaluate("document.body.dataset.ready") == "1"  # the inline script ran
        images = b.evaluate("Array.from(document.images).map(i => [i.complete, "
                            "i.naturalWidth, i.naturalHeight])")
        assert len(images) == 5 + len(evaluated.per_patient)
        assert all(done and w > 0 and h > 0 for done, w, h in images), images
        # sort the per-patient table by Dice, descending after two clicks
        col = b.evaluate("Array.from(document.querySelectorAll('#patient-table th'))"
                         ".findIndex(th => th.textContent === 'dice')")
        assert col >= 0
        b.evaluate(f"document.querySelectorAll('#patient-table th')[{col}].click()")
        b.evaluate(f"document.querySelectorAll('#patient-table th')[{col}].click()")
        shown = b.evaluate("Array.from(document.querySelectorAll('#patient-table tbody tr'))"
                           f".map(r => parseFloat(r.cells[{col}].dataset.value))")
        assert shown == sorted(evaluated.per_patient["dice"], reverse=True)
        shot = b.screenshot(tmp_path / "report.png")
        assert b.errors == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000
    if os.environ.get("BRAINSEG_REPORT_SCREENSHOT"):  # keep it to look at
        shutil.copyfile(shot, os.environ["BRAINSEG_REPORT_SCREENSHOT"])


@needs_browser
def test_browser_check_sees_broken_images_and_errors(tmp_path):
    """The check can fail: a broken image and a script error are both reported."""
    pytest.importorskip("websocket", reason="websocket-client (dev extra) not installed")
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="data:image/png;base64,AAAA">'
                    "<script>undefinedFunction();</script></body></html>")
    with Browser() as b:
        b.open(page.as_uri())
        loaded = b.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        b.evaluate("1")  # flush pending events
    assert loaded == [0]
    assert any("undefinedFunction" in e for e in b.errors), b.errors
