"""The status API over real HTTP on 127.0.0.1, served by uvicorn as the daemon serves it."""

import ipaddress
import socket

import httpx
import pytest

from appliance.api.app import ApiServer, create_app
from appliance.store.database import CaseStore
from appliance.terms import CaseFile
from tests.results import a_result


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
    store.case_finished("C-1", a_result("benign-appearing", 0.12, patches=20, timings_ms={"inference": 1.5}))
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


def _non_loopback_addresses() -> set[str]:
    """This machine's IPv4 addresses other than loopback: the host name's, and the source address the kernel
    would route from (a UDP connect sends nothing)."""
    found = set()
    try:
        found |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    for far in ("192.0.2.1", "198.51.100.1", "10.255.255.254"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((far, 9))
                found.add(probe.getsockname()[0])
            except OSError:
                pass
    return {a for a in found if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_unspecified}


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:  # refused (nothing listens on that address), or unreachable
        return False


def test_api_binds_loopback_only_by_default(tmp_path):
    """The daemon's own start-up with the default api_host (only the port is 0): the listening socket is bound
    to 127.0.0.1, and from this machine's other addresses the port is closed. The model folder is empty, so
    the daemon starts degraded (store and API only, no model, no scanner link): that start serves the API the
    same way, from settings.api_host."""
    from appliance.config import load_settings
    from appliance.service.daemon import Daemon

    (tmp_path / "no-model").mkdir()
    defaults = load_settings(None, data_dir=tmp_path / "var", model_dir=tmp_path / "no-model", api_port=0)
    assert defaults.api_host == "127.0.0.1"
    daemon = Daemon(defaults, port=str(tmp_path / "scanner"), notify=lambda kind, data: None)
    daemon.start()
    try:
        assert daemon.problem and daemon.api is not None  # degraded, and serving
        bound = daemon.api.addresses
        port = daemon.api.port
        assert bound and {host for host, _ in bound} == {"127.0.0.1"}, bound
        assert _accepts("127.0.0.1", port)
        others = _non_loopback_addresses()
        refused = {a: _accepts(a, port) for a in others}
    finally:
        daemon.stop()
    assert not any(refused.values()), refused
    if others:  # the probe can see a listener on those addresses: one bound to all of them is reached
        allowed = load_settings(None, data_dir=tmp_path / "var2", model_dir=tmp_path / "no-model", api_port=0,
                                api_host="0.0.0.0", api_allow_remote=True)
        store = CaseStore(allowed.db_path)
        everywhere = ApiServer(create_app(allowed, store), allowed.api_host, 0)
        everywhere.start()
        try:
            assert all(_accepts(a, everywhere.port) for a in others), others
        finally:
            everywhere.stop()
            store.close()


def _finished_case(store, case_id="C-1"):
    model = {"name": "m", "version": "1", "sha256": "a" * 64, "backend": "openvino"}
    store.case_started(case_id, specimen_id="S-1", tiles_expected=3, model=model)
    store.case_finished(case_id, a_result("suspicious", 0.9, patches=20, early_positive_after_tiles=2, model=model))


def test_token_file_is_made_once_and_private(settings):
    import stat

    from appliance.api.auth import ensure_token
    from appliance.errors import ApplianceError

    token = ensure_token(settings.token_path)
    assert len(token) >= 32 and stat.S_IMODE(settings.token_path.stat().st_mode) == 0o600
    assert ensure_token(settings.token_path) == token
    settings.token_path.chmod(0o644)
    with pytest.raises(ApplianceError, match="readable by others"):
        ensure_token(settings.token_path)


def test_actions_need_the_token_and_land_in_the_audit_table(api, settings):
    store, url = api
    _finished_case(store)
    token = settings.token_path.read_text().strip()
    body = {"initials": "JS", "comment": "agree with the call"}
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.post("/cases/C-1/signoff", json=body).status_code == 401
        assert c.post("/cases/C-1/signoff", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
        assert c.post("/cases/C-1/signoff", json=body, headers={"Authorization": "Basic abc"}).status_code == 401
        assert store.audit_log() == []  # refused actions change nothing
        auth = {"Authorization": f"Bearer {token}"}
        ok = c.post("/cases/C-1/signoff", json=body, headers=auth)
        assert ok.status_code == 200 and ok.json()["signed_off_by"] == "JS"
        assert c.get("/cases/C-1").status_code == 200
        assert c.post("/cases/C-1/comment", json={"initials": "AB", "comment": "seen"}, headers=auth).status_code == 200
        assert c.post("/cases/nope/signoff", json=body, headers=auth).status_code == 404
        assert c.post("/cases/C-1/signoff", json={"initials": ""}, headers=auth).status_code == 422
        store.case_started("RUN-1", specimen_id="S")
        assert c.post("/cases/RUN-1/signoff", json=body, headers=auth).status_code == 409
    audit = store.audit_log("C-1")
    assert [(a["actor"], a["action"], a["via"]) for a in audit] == [("JS", "sign-off", "api"), ("AB", "comment", "api")]
    assert audit[0]["detail"] == {"comment": "agree with the call"}
    assert store.get_case("C-1")["signed_off_by"] == "JS"


def test_link_reconnect_says_why_it_cannot_and_changes_nothing_then(settings):
    """No link in this process: 503; a link that cannot reopen (given an open transport): 409 with the reason.
    Neither lands in the audit table, because nothing happened."""
    import os

    from firmware_bridge.host import HostLink
    from firmware_bridge.transport import FdTransport

    store = CaseStore(settings.db_path)
    master, slave = os.openpty()
    link = HostLink(FdTransport(slave), sink=None)  # an open transport: no path to reopen
    servers = [ApiServer(create_app(settings, store), "127.0.0.1", 0),
               ApiServer(create_app(settings, store, reconnect=link.request_reconnect), "127.0.0.1", 0)]
    for s in servers:
        s.start()
    auth = {"Authorization": f"Bearer {settings.token_path.read_text().strip()}"}
    try:
        none, fixed = (httpx.post(f"http://127.0.0.1:{s.port}/link/reconnect", json={"initials": "AB"},
                                  headers=auth, timeout=10) for s in servers)
    finally:
        for s in servers:
            s.stop()
        store.close()
        os.close(master)
        os.close(slave)
    assert none.status_code == 503 and "no scanner link" in none.json()["detail"]
    assert fixed.status_code == 409 and "cannot reopen" in fixed.json()["detail"]
    assert store.audit_log() == []


def test_hostile_case_ids_and_queries_get_a_4xx_never_a_file_or_a_5xx(api):
    store, url = api
    _finished_case(store)
    with httpx.Client(base_url=url, timeout=10) as c:
        for path in ("/cases/../../etc/passwd", "/cases/..%2F..%2Fetc%2Fpasswd", "/cases/%2e%2e/overlay.png",
                     "/cases/C-1/..%2F..%2Fappliance.db", "/cases/C-1/appliance.db", "/cases/.hidden",
                     "/cases/C-1/overlay.png%00.txt"):
            r = c.get(path)
            assert 400 <= r.status_code < 500, (path, r.status_code)
            assert b"root:" not in r.content and b"SQLite format" not in r.content
        r = c.get("/cases", params={"offset": "1" * 10_000})
        assert 400 <= r.status_code < 500
        r = c.get("/cases/" + "a" * 10_000)
        assert 400 <= r.status_code < 500


def test_case_files_are_served_with_their_media_types(api, settings, ov_engine):
    import json

    from appliance.offline.triage import triage_path
    from tests.conftest import DEMO_CASE

    store, url = api
    _finished_case(store, "DEMO-1")
    triage_path(ov_engine, DEMO_CASE, out_dir=settings.cases_dir / "DEMO-1")
    folder = settings.cases_dir / "DEMO-1"
    with httpx.Client(base_url=url, timeout=30) as c:
        # the record lists exactly the case's files on disk (all of them: the demo case has tissue), each
        # with a URL that serves those bytes with the media type the record gave
        listed = c.get("/cases/DEMO-1").json()["files"]
        assert {f["name"] for f in listed} == {p.name for p in folder.iterdir() if p.is_file()} == set(CaseFile)
        for f in listed:
            got = c.get(f["url"])
            assert got.status_code == 200, f
            assert got.headers["content-type"] == f["media_type"] == CaseFile(f["name"]).media_type
            assert got.content == (folder / f["name"]).read_bytes() and len(got.content) == f["bytes"]
        png = c.get("/cases/DEMO-1/overlay.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        geo = c.get("/cases/DEMO-1/regions.geojson")
        assert geo.headers["content-type"] == "application/geo+json"
        assert json.loads(geo.content)["type"] == "FeatureCollection"
        tif = c.get("/cases/DEMO-1/case.ome.tif")
        assert tif.headers["content-type"] == "image/tiff" and tif.content[:4] in (b"II*\x00", b"II+\x00")
        assert c.get("/cases/C-9/overlay.png").status_code == 404
        assert c.get("/cases/DEMO-1/secret.txt").status_code == 404


def test_ready_is_503_with_reasons_until_ready(settings):
    store = CaseStore(settings.db_path)
    reasons = ["the scanner port /dev/scanner is not open"]
    server = ApiServer(create_app(settings, store, ready=lambda: list(reasons)), "127.0.0.1", 0)
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as c:
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["reasons"] == reasons
            reasons.clear()
            assert c.get("/ready").status_code == 200
    finally:
        server.stop()
        store.close()


def test_a_non_loopback_bind_must_be_allowed_and_then_needs_the_token_everywhere(settings):
    from appliance.config import load_settings
    from appliance.errors import ApplianceError
    from tests.conftest import MODEL_DIR

    store = CaseStore(settings.db_path)
    try:
        remote = load_settings(None, data_dir=settings.data_dir, model_dir=MODEL_DIR, api_host="0.0.0.0", api_port=0)
        with pytest.raises(ApplianceError, match="not loopback"):
            create_app(remote, store)
        allowed = load_settings(None, data_dir=settings.data_dir, model_dir=MODEL_DIR, api_host="0.0.0.0",
                                api_port=0, api_allow_remote=True)
        server = ApiServer(create_app(allowed, store), "127.0.0.1", 0)
        server.start()
        try:
            token = allowed.token_path.read_text().strip()
            with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as c:
                assert c.get("/cases").status_code == 401
                assert c.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 403
                assert c.get("/cases", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        finally:
            server.stop()
    finally:
        store.close()


def test_case_list_filters_by_verdict_date_and_sign_off(api, settings):
    store, url = api
    _finished_case(store, "A")
    _finished_case(store, "B")
    store.case_started("C", specimen_id="S")
    store.case_finished("C", a_result("benign-appearing", 0.1, patches=0))
    store.sign_off("A", by="JS")
    with httpx.Client(base_url=url, timeout=10) as c:
        def ids(**params):
            r = c.get("/cases", params=params)
            assert r.status_code == 200, r.text
            return sorted(x["id"] for x in r.json()["cases"])

        assert ids() == ["A", "B", "C"]
        assert ids(verdict="suspicious") == ["A", "B"]
        assert ids(signed_off="true") == ["A"] and ids(signed_off="false") == ["B", "C"]
        assert ids(since="2000-01-01T00:00:00Z") == ["A", "B", "C"] and ids(until="2000-01-01") == []
        assert ids(limit=1, offset=1) in (["A"], ["B"], ["C"])
        assert c.get("/cases", params={"verdict": "maybe"}).status_code == 422
        assert c.get("/cases", params={"since": "yesterday-ish"}).status_code == 422
        assert c.get("/cases/A").json()["signed_off_by"] == "JS"


def test_a_case_lists_the_files_on_disk_with_urls_that_serve_them(api, settings):
    """Only complete files with a case-file name are listed: not a temporary name being written, not a stray
    file, not a folder; a new file shows on the next read and a removed one goes."""
    store, url = api
    _finished_case(store, "C-1")
    folder = settings.cases_dir / "C-1"
    folder.mkdir(parents=True)
    written = {CaseFile.SUMMARY: b'{"case_id": "C-1"}', CaseFile.OVERLAY: b"\x89PNG\r\n\x1a\n-overlay",
               CaseFile.REGIONS: b'{"type": "FeatureCollection", "features": []}'}
    for name, data in written.items():
        (folder / name).write_bytes(data)
    (folder / f".{CaseFile.HEATMAP}.tmp").write_bytes(b"half a file")  # the writer's temporary name
    (folder / "notes.txt").write_text("not a case file")
    (folder / CaseFile.THUMBNAIL).mkdir()  # a folder with a file's name is not that file
    (folder / ".work").mkdir()
    with httpx.Client(base_url=url, timeout=10) as c:
        record = c.get("/cases/C-1").json()
        order = list(CaseFile)
        expected = sorted(written, key=order.index)  # in CaseFile order, whatever the folder's order
        assert [f["name"] for f in record["files"]] == expected
        assert c.get("/cases").json()["cases"][0]["files"] == record["files"]  # the list carries them too
        for f in record["files"]:
            assert f["url"] == f"/cases/C-1/{f['name']}"
            assert f["media_type"] == CaseFile(f["name"]).media_type and f["bytes"] == len(written[f["name"]])
            got = c.get(f["url"])
            assert got.status_code == 200 and got.content == written[f["name"]]
            assert got.headers["content-type"] == f["media_type"]
        # what is not listed is not there to fetch
        assert c.get(f"/cases/C-1/{CaseFile.HEATMAP}").status_code == 404
        assert c.get(f"/cases/C-1/{CaseFile.THUMBNAIL}").status_code == 404
        (folder / CaseFile.TOP_PATCHES).write_bytes(b"\x89PNG\r\n\x1a\n-top")
        (folder / CaseFile.OVERLAY).unlink()  # as retention does
        after = [f["name"] for f in c.get("/cases/C-1").json()["files"]]
        assert after == [CaseFile.SUMMARY, CaseFile.TOP_PATCHES, CaseFile.REGIONS]


def test_a_case_with_no_files_yet_lists_none(api, settings):
    store, url = api
    store.case_started("RUN-1", specimen_id="S", tiles_expected=3)  # receiving: nothing written yet
    _finished_case(store, "C-1")  # called, its files not written yet (the call is stored before them)
    (settings.cases_dir / "C-1").mkdir(parents=True)  # the folder alone, as when writing has begun
    with httpx.Client(base_url=url, timeout=10) as c:
        for case_id in ("RUN-1", "C-1"):
            record = c.get(f"/cases/{case_id}")
            assert record.status_code == 200 and record.json()["files"] == [], case_id
        assert {x["id"]: x["files"] for x in c.get("/cases").json()["cases"]} == {"RUN-1": [], "C-1": []}


def test_a_file_being_written_is_not_listed_until_it_is_complete(api, settings):
    """The pipeline's writer (temporary name, then rename) seen through the API: while the bytes are going
    in, the record does not list the file and its URL is a 404; once renamed, it is listed whole."""
    from appliance.pipeline.outputs import _replace_into

    store, url = api
    _finished_case(store, "C-1")
    folder = settings.cases_dir / "C-1"
    folder.mkdir(parents=True)
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
    seen_while_writing = {}
    with httpx.Client(base_url=url, timeout=10) as c:
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[:100])
                f.flush()
                seen_while_writing["files"] = c.get("/cases/C-1").json()["files"]
                seen_while_writing["get"] = c.get(f"/cases/C-1/{CaseFile.OVERLAY}").status_code
                f.write(data[100:])

        _replace_into(folder / CaseFile.OVERLAY, write)
        done = c.get("/cases/C-1").json()["files"]
        got = c.get(f"/cases/C-1/{CaseFile.OVERLAY}")
    assert seen_while_writing == {"files": [], "get": 404}
    assert [(f["name"], f["bytes"]) for f in done] == [(CaseFile.OVERLAY, len(data))]
    assert got.status_code == 200 and got.content == data


def test_metrics_parse_as_prometheus_text_with_the_expected_families_and_values(settings):
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.model.engine import LatencyHistogram

    store = CaseStore(settings.db_path)
    _finished_case(store, "A")
    _finished_case(store, "B")
    store.case_started("RUN-1", specimen_id="S", tiles_expected=9)
    for i in range(4):
        store.tile_stored("RUN-1", i, i * 200, 0, 200, 200, "0" * 64)
    latency = LatencyHistogram()
    for seconds in (0.004, 0.03, 0.3, 7.0):
        latency.observe(seconds)
    live = {"case": {"tiles_received": 4, "tiles_processed": 3}, "disk_free_bytes": 123456789,
            "link": {"state": "up", "counters": {"crc_errors": 2, "reconnects": 1}}}
    # two apps in one process, as in this test session: each has its own registry, neither clashes
    servers = [ApiServer(create_app(settings, store, status=lambda: live, latency=latency), "127.0.0.1", 0),
               ApiServer(create_app(settings, store), "127.0.0.1", 0)]
    for s in servers:
        s.start()
    try:
        full, bare = (httpx.get(f"http://127.0.0.1:{s.port}/metrics", timeout=10) for s in servers)
    finally:
        for s in servers:
            s.stop()
        store.close()
    for r in (full, bare):
        assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    # the exposed names are the ones scrapers already use (counters end in _total)
    types = {line.split()[2]: line.split()[3] for line in full.text.splitlines() if line.startswith("# TYPE ")}
    assert types == {"appliance_tiles_received_total": "counter", "appliance_current_case_tiles": "gauge",
                     "appliance_cases": "gauge", "appliance_link_crc_errors_total": "counter",
                     "appliance_link_reconnects_total": "counter", "appliance_link_up": "gauge",
                     "appliance_disk_free_bytes": "gauge", "appliance_inference_batch_seconds": "histogram"}
    families = {f.name: f for f in text_string_to_metric_families(full.text)}
    assert {n: f.type for n, f in families.items()} == {
        "appliance_tiles_received": "counter", "appliance_current_case_tiles": "gauge", "appliance_cases": "gauge",
        "appliance_link_crc_errors": "counter", "appliance_link_reconnects": "counter", "appliance_link_up": "gauge",
        "appliance_disk_free_bytes": "gauge", "appliance_inference_batch_seconds": "histogram"}

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


def test_a_port_in_use_is_one_sentence_from_the_api_and_from_appliance_run(api, settings, tmp_path):
    import subprocess
    import sys

    from appliance.errors import ApiBindError

    store, url = api
    port = int(url.rsplit(":", 1)[1])
    second = ApiServer(create_app(settings, store), "127.0.0.1", port)
    with pytest.raises(ApiBindError, match=rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use; "
                                           r"another program \(another appliance\?\) already listens there"):
        second.start()
    second.stop()  # nothing was started: stopping is harmless
    with httpx.Client(base_url=url, timeout=10) as c:  # the first server is untouched
        assert c.get("/health").status_code == 200

    # the daemon as systemd starts it: one line on stderr, exit status 1, no traceback
    config = tmp_path / "appliance.toml"
    config.write_text(f'data_dir = "{tmp_path / "var"}"\nmodel_dir = "{settings.model_dir}"\n'
                      f'api_port = {port}\nserial_port = "{tmp_path / "no-scanner"}"\n')
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), "run"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert f"Error: the status API cannot listen on 127.0.0.1:{port}: Address already in use" in run.stderr
