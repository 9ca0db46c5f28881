"""OpenAPI-driven fuzzing (schemathesis) of the status API over real HTTP: no input makes a 5xx."""

import pytest

from appliance.api.app import ApiParts, ApiServer, create_app
from firmware_bridge.host import HostLink
from tests.openapi_fuzz import fuzz_api, schema_operation_count
from tests.results import MODEL, a_result
from tests.daemon_standin import DaemonStandIn


@pytest.fixture
def api_url(settings, store, pty_pair):
    store.case_started("C-1", specimen_id="S-1", model=MODEL)
    store.case_finished("C-1", a_result("suspicious", 0.9, patches=0))
    # a real link on a pty path, so POST /link/reconnect really reopens it
    link = HostLink(pty_pair.path, sink=None, backoff_initial=0.01).start()

    def reconnect(why: str) -> str:
        link.request_reconnect(why)
        return link.state

    server = ApiServer(create_app(ApiParts(settings, store, DaemonStandIn(reconnect=reconnect))), "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", settings.token_path.read_text().strip()
    finally:
        server.stop()
        link.stop()


def test_no_request_makes_a_server_error(api_url):
    operations, calls = fuzz_api(*api_url, examples=25)
    assert len(operations) >= 8
    assert len(operations) == schema_operation_count(api_url[0])  # every operation of the schema was fuzzed
    assert len(calls) >= 100  # the fuzzer really ran (how many examples hypothesis draws per operation varies)
