"""Site validation on a site like the model card's: 120 virtual cores of the 26 development slides
(tests/site_cases.dev_site), run as a lab runs it (`appliance site validate`, on the session's Dask cluster).
Its own module, beside test_site.py, so that the two long validations can run side by side."""

from __future__ import annotations

from contextlib import closing

import pytest

from appliance.model.manifest import read_manifest
from appliance.service.drift import watch
from appliance.site.report import read_report
from tests.cli import appliance
from tests.conftest import MODEL_DIR
from tests.site_cases import dev_data, dev_site
from tests.stores import open_store


def test_a_site_like_the_development_cases_agrees_with_the_model_card_and_drift_stays_quiet(tmp_path,
                                                                                             dask_scheduler):
    """120 virtual cores of the 26 development slides (tests/site_cases.dev_site): the card's population."""
    data = dev_data()
    if data is None:
        pytest.skip("the development data (the IDC dataset) is not on this machine; set APPLIANCE_DEV_DATA")
    manifest = dev_site(tmp_path / "dev", data)
    run = appliance("site", "validate", "--manifest", manifest, "--out", tmp_path / "r", "--scheduler", dask_scheduler,
                    data=tmp_path / "var", model=MODEL_DIR)
    assert run.returncode == 0, run.stderr[-2000:]
    report = read_report(tmp_path / "r")
    assert report["agreement"] == {"auc": True, "sensitivity": True, "specificity": True}, (
        report["auc"], report["shipped"], report["model_card"])
    card = report["model_card"]
    assert report["auc"]["ci95"][0] <= card["auc"] + 0.02  # not only overlapping: near the card's own figure
    with closing(open_store(tmp_path / "var" / "appliance.db")) as store:
        by_id = {c["id"]: c for c in store.list_cases(limit=10_000)}
    cases = [by_id[c["case_id"]] for c in report["cases"]]
    drift = read_manifest(MODEL_DIR).drift
    assert len(cases) >= 100
    assert not [n for n in range(1, len(cases) + 1) if any(f.drifted for f in watch(cases[:n][::-1], drift))]
