"""Shared pieces of the API tests: a real uvicorn on 127.0.0.1 over a real SQLite store, and a called case."""

import pytest

from appliance.api.app import ApiParts, ApiServer, create_app
from tests.results import MODEL, a_result


@pytest.fixture
def api(settings, store):
    server = ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0)
    server.start()
    try:
        yield store, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def finished_case(store, case_id="C-1"):
    store.case_started(case_id, specimen_id="S-1", tiles_expected=3, model=MODEL)
    store.case_finished(case_id, a_result("suspicious", 0.9, patches=20, early_positive_after_tiles=2))
