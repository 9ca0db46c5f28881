"""The status API over real HTTP on 127.0.0.1, served by uvicorn as the daemon serves it."""

import httpx
import pytest

from appliance.api.app import ApiServer, create_app
from appliance.store import CaseStore


@pytest.fixture
def api(settings):
    store = CaseStore(settings.db_path)
    server = ApiServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    try:
        yield store, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        store.close()


def test_health_cases_and_case(api):
    store, url = api
    store.case_started("C-1", specimen_id="S-1", tiles_expected=3,
                       model={"name": "m", "version": "1", "sha256": "a" * 64, "backend": "openvino"})
    store.case_finished("C-1", {
        "verdict": "benign-appearing", "score": 0.12, "threshold": 0.5, "reasons": [], "patches": [{}] * 20,
        "early_positive": False, "early_positive_after_tiles": None, "timings_ms": {"inference": 1.5},
        "model": {"name": "m", "version": "1", "sha256": "a" * 64, "backend": "openvino"},
    })
    with httpx.Client(base_url=url, timeout=10) as c:
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert "not for diagnosis" in h.json()["notice"].lower()
        cases = c.get("/cases").json()
        assert [x["id"] for x in cases["cases"]] == ["C-1"]
        case = c.get("/cases/C-1").json()
        assert case["verdict"] == "benign-appearing" and case["patches_scored"] == 20
        assert case["status"] == "done" and case["research_use_only"] is True
        assert case["timings_ms"] == {"inference": 1.5}
        missing = c.get("/cases/nope")
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
        assert c.get("/cases", params={"limit": 0}).status_code == 422
        assert c.get("/openapi.json").status_code == 200


def test_api_binds_loopback_only_by_default(settings):
    assert settings.api_host == "127.0.0.1"
