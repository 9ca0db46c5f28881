"""OpenAPI-driven fuzzing (schemathesis) of the status API over real HTTP: no input makes a 5xx."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from appliance.api.app import ApiServer, create_app
from appliance.store import CaseStore
from firmware_bridge.host import HostLink


@pytest.fixture
def api_schema(settings_for_fuzz):
    s = settings_for_fuzz
    store = CaseStore(s.db_path)
    model = {"name": "m", "version": "1", "sha256": "a" * 64, "backend": "openvino"}
    store.case_started("C-1", specimen_id="S-1", model=model)
    store.case_finished("C-1", {"verdict": "suspicious", "score": 0.9, "threshold": 0.5, "reasons": [],
                                "patches": [], "early_positive": False, "early_positive_after_tiles": None,
                                "timings_ms": {}, "model": model})
    master, slave = os.openpty()  # a real link on a pty path, so POST /link/reconnect really reopens it
    link = HostLink(os.ttyname(slave), sink=None, backoff_initial=0.01).start()

    def reconnect(why: str) -> str:
        link.request_reconnect(why)
        return link.state

    server = ApiServer(create_app(s, store, reconnect=reconnect), "127.0.0.1", 0)
    server.start()
    pytest.fuzz_token = s.token_path.read_text().strip()
    try:
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{server.port}/openapi.json").exclude(path="/events")
    finally:
        server.stop()
        link.stop()
        store.close()
        os.close(master)
        os.close(slave)


@pytest.fixture
def settings_for_fuzz(tmp_path):
    from appliance.config import load_settings
    from tests.conftest import MODEL_DIR

    return load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0)


def test_no_request_makes_a_server_error(api_schema):
    from hypothesis import given

    token = {"Authorization": f"Bearer {pytest.fuzz_token}"}
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 8
    calls = []
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            for headers in (None, token):
                response = case.call(headers=headers, timeout=10)
                calls.append(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                    response.text[:300])

        fuzz()
    assert len(calls) >= 100  # the fuzzer really ran
