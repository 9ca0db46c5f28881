"""The site report: written with its sha256, read back only when unchanged, and opened in a real chromium."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from appliance import RESEARCH_USE_NOTICE
from appliance.errors import InputError
from appliance.site.report import read_report, render_html, report_digest, write_report
from appliance.site.stats import at_threshold, auc_delong, ci_overlap, recommend_threshold, roc_curve, spread

SCREENSHOT = Path(__file__).resolve().parents[1] / "output" / "site_report.png"
SHIPPED = 0.7061


def synthetic_report() -> dict:
    """60 malignant and 60 benign callable cases (seeded), three that could not be called, one odd file name."""
    rng = np.random.default_rng(21)
    labels = np.repeat([1, 0], 60)
    scores = np.concatenate([rng.beta(5, 2, 60), rng.beta(2, 5, 60)])
    cases = [{"case_id": f"C-{i:03d}", "input": f"slides/C-{i:03d}.tif", "specimen": f"S-{i:03d}", "label": int(y),
              "status": "done", "verdict": "suspicious" if s >= SHIPPED else "benign-appearing", "score": float(s),
              "reasons": [], "callable": True} for i, (y, s) in enumerate(zip(labels, scores))]
    cases[0]["input"] = "slides/odd <b>name</b> & co.tif"
    for i, reasons in enumerate([["out-of-focus"], ["out-of-focus", "over-exposed"], ["stain-out-of-range"]]):
        cases.append({"case_id": f"X-{i}", "input": f"slides/X-{i}.tif", "specimen": f"SX-{i}", "label": i % 2,
                      "status": "cannot-call", "verdict": "cannot-call", "score": None, "reasons": reasons,
                      "callable": False})
    auc, ci = auc_delong(labels, scores)
    shipped = at_threshold(labels, scores, SHIPPED)
    fpr, tpr, _ = roc_curve(labels, scores)
    card = {"auc": 0.93, "auc_ci95": [0.90, 0.95], "threshold": SHIPPED, "sensitivity": 0.91,
            "sensitivity_ci95": [0.86, 0.94], "specificity": 0.85, "specificity_ci95": [0.80, 0.89],
            "source": "models/idc-resnet/manifest.json"}
    lab = {"auc": [round(ci[0], 4), round(ci[1], 4)], "sensitivity": shipped["sensitivity_ci95"],
           "specificity": shipped["specificity_ci95"]}
    return {
        "notice": RESEARCH_USE_NOTICE,
        "model": {"name": "idc-resnet", "version": "0.5.0", "sha256": "ab12" * 16},
        "created_at": "2025-12-04T10:15:00+00:00",
        "cannot_call": {"by_reason": {"out-of-focus": 2, "over-exposed": 1, "stain-out-of-range": 1}},
        "auc": {"value": round(auc, 4), "ci95": lab["auc"], "method": "DeLong"},
        "shipped": shipped,
        "recommended": recommend_threshold(labels, scores, target=0.95),
        "recommendation_note": None,
        "model_card": card,
        "agreement": {name: ci_overlap(ci95, card[f"{name}_ci95"]) for name, ci95 in lab.items()},
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "cases": cases,
        "distributions": {"score": spread(scores), "tissue_fraction": spread(rng.uniform(0.2, 0.9, 123)),
                          "focus_variance": None},
    }


def test_report_round_trips_with_its_sha256(tmp_path):
    report = synthetic_report()
    written = write_report(tmp_path / "site", report)
    assert written["sha256"] == report["report_sha256"] == report_digest(report)
    assert read_report(tmp_path / "site") == report
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["report.html", "report.json"]


def test_a_changed_report_is_refused(tmp_path):
    write_report(tmp_path, synthetic_report())
    path = tmp_path / "report.json"
    data = json.loads(path.read_text())
    data["cases"][5]["score"] = 0.999
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="changed after it was written"):
        read_report(tmp_path)


def test_a_missing_or_broken_report_is_refused(tmp_path):
    with pytest.raises(InputError, match="No site report"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text('{"cases": [')
    with pytest.raises(InputError, match="not valid JSON"):
        read_report(tmp_path)


def test_html_is_self_contained_and_escaped(tmp_path):
    page = write_report(tmp_path, synthetic_report())["html"].read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page)
    assert "odd &lt;b&gt;name&lt;/b&gt; &amp; co.tif" in page and "<b>name</b>" not in page
    assert page.count("data:image/png;base64,") == 2


def test_html_without_a_recommendation_or_roc_says_why():
    report = synthetic_report() | {"recommended": None, "roc": None, "auc": None,
                                   "recommendation_note": "No site threshold is recommended: 3 more benign "
                                                          "callable cases are needed (at least 30 of each)."}
    page = render_html(report)
    assert 'class="note">No site threshold is recommended: 3 more benign' in page
    assert 'id="roc"' not in page and 'id="scores"' in page and "not computable" in page


def test_report_opens_in_chromium(tmp_path, chromium):
    report = synthetic_report()
    written = write_report(tmp_path, report)
    chromium.get(written["html"].resolve().as_uri())
    images = chromium.execute_script(
        "return ['roc', 'scores'].map(id => { const i = document.getElementById(id);"
        " return i && {complete: i.complete, width: i.naturalWidth}; });")
    assert all(image and image["complete"] and image["width"] > 300 for image in images), images
    text = chromium.execute_script("return document.body.innerText;")
    assert RESEARCH_USE_NOTICE in text and report["report_sha256"] in text
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert chromium.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 10_000
