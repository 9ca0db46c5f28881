"""GET /metrics over real HTTP: prometheus-client text with the daemon's families and values."""

import httpx
import pytest

from appliance.api.app import ApiParts, ApiServer, create_app
from appliance.status import CaseInFlight, DaemonStatus, LinkView
from tests.appliance.conftest import finished_case
from tests.daemon_standin import DaemonStandIn


def test_metrics_parse_as_prometheus_text_with_the_expected_families_and_values(settings, store):
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.model.engine import LatencyHistogram

    finished_case(store, "A")
    finished_case(store, "B")
    store.case_started("RUN-1", specimen_id="S", tiles_expected=9)
    for i in range(4):
        store.tile_stored("RUN-1", i, i * 200, 0, 200, 200, "0" * 64)
    latency = LatencyHistogram()
    for seconds in (0.004, 0.03, 0.3, 7.0):
        latency.observe(seconds)
    live = DaemonStatus(version="test", storage={"free_bytes": 123456789},
                        case=CaseInFlight("RUN-1", tiles_received=4, tiles_processed=3, score=0.0, early_positive=False),
                        link=LinkView("up", "/dev/scanner", counters={"crc_errors": 2, "reconnects": 1}))
    # two apps in one process, as in this test session: each has its own registry, neither clashes
    servers = [ApiServer(create_app(ApiParts(settings, store, DaemonStandIn(live, latency=latency))), "127.0.0.1", 0),
               ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0)]
    for s in servers:
        s.start()
    try:
        full, bare = (httpx.get(f"http://127.0.0.1:{s.port}/metrics", timeout=10) for s in servers)
    finally:
        for s in servers:
            s.stop()
    for r in (full, bare):
        assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    # the exposed names are the ones scrapers already use (counters end in _total)
    types = {line.split()[2]: line.split()[3] for line in full.text.splitlines() if line.startswith("# TYPE ")}
    assert types == {"appliance_tiles_received_total": "counter", "appliance_current_case_tiles": "gauge",
                     "appliance_cases": "gauge", "appliance_link_crc_errors_total": "counter",
                     "appliance_link_reconnects_total": "counter", "appliance_link_up": "gauge",
                     "appliance_disk_free_bytes": "gauge", "appliance_inference_batch_seconds": "histogram",
                     "appliance_deliveries": "gauge"}
    families = {f.name: f for f in text_string_to_metric_families(full.text)}
    assert {n: f.type for n, f in families.items()} == {
        "appliance_tiles_received": "counter", "appliance_current_case_tiles": "gauge", "appliance_cases": "gauge",
        "appliance_link_crc_errors": "counter", "appliance_link_reconnects": "counter", "appliance_link_up": "gauge",
        "appliance_disk_free_bytes": "gauge", "appliance_inference_batch_seconds": "histogram",
        "appliance_deliveries": "gauge"}

    def values(name):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families[name].samples}

    assert values("appliance_tiles_received") == {("appliance_tiles_received_total", ()): 4}
    assert values("appliance_current_case_tiles") == {("appliance_current_case_tiles", (("stage", "received"),)): 4,
                                                      ("appliance_current_case_tiles", (("stage", "processed"),)): 3}
    assert values("appliance_cases") == {("appliance_cases", (("verdict", "suspicious"),)): 2,
                                         ("appliance_cases", (("verdict", "receiving"),)): 1}
    assert values("appliance_link_crc_errors") == {("appliance_link_crc_errors_total", ()): 2}
    assert values("appliance_link_reconnects") == {("appliance_link_reconnects_total", ()): 1}
    assert values("appliance_link_up") == {("appliance_link_up", ()): 1}
    assert values("appliance_deliveries") == {("appliance_deliveries", (("state", s),)): 0
                                              for s in ("delivered", "failed", "pending")}  # no LIS configured
    assert values("appliance_disk_free_bytes") == {("appliance_disk_free_bytes", ()): 123456789}
    hist = values("appliance_inference_batch_seconds")
    buckets = {dict(labels)["le"]: v for (name, labels), v in hist.items() if name.endswith("_bucket")}
    assert buckets == {"0.005": 1, "0.01": 1, "0.025": 1, "0.05": 2, "0.1": 2, "0.25": 2, "0.5": 3, "1.0": 3,
                       "2.5": 3, "+Inf": 4}
    assert hist[("appliance_inference_batch_seconds_count", ())] == 4
    assert hist[("appliance_inference_batch_seconds_sum", ())] == pytest.approx(7.334)
    # without a live case, a link, a disk reading or an engine: zeros, and no disk or latency family at all
    bare_families = {f.name: f for f in text_string_to_metric_families(bare.text)}
    assert set(families) - set(bare_families) == {"appliance_disk_free_bytes", "appliance_inference_batch_seconds"}
    assert [s.value for s in bare_families["appliance_link_up"].samples] == [0]
    assert [s.value for s in bare_families["appliance_current_case_tiles"].samples] == [0, 0]
    assert [s.value for s in bare_families["appliance_tiles_received"].samples] == [4]
    # the appliance's families are not in prometheus_client's process-wide registry
    assert not any(m.name.startswith("appliance_") for m in REGISTRY.collect())


def test_the_status_value_and_the_api_s_status_schema_name_the_same_fields():
    """appliance.status is what the daemon fills in, appliance.api.schemas what /status promises: a field added to
    one and not the other would be dropped from the answer without a word (pydantic ignores extra keys)."""
    from dataclasses import fields

    from appliance.api.schemas import CaseStatus, LinkStatus, StatusPublic

    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    assert names(LinkView) == set(LinkStatus.model_fields)
    assert names(CaseInFlight) == set(CaseStatus.model_fields)
    # the API adds what is its own (the deliveries, the notice) and the free space, read from storage
    assert names(DaemonStatus) | {"disk_free_bytes", "deliveries", "notice"} == set(StatusPublic.model_fields)
    live = DaemonStatus(version="t", storage={"free_bytes": 1, "min_free_bytes": 0, "accepting_cases": True},
                        case=CaseInFlight("C", 1, 1, 0.5, False, warnings=({"code": "x", "message": "y"},)),
                        link=LinkView("up", "/dev/scanner"))

    def set_values(d):
        return {k: set_values(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    assert StatusPublic.model_validate(live.to_dict()).model_dump(exclude={"notice", "deliveries"},
                                                                  exclude_none=True) == set_values(live.to_dict())
