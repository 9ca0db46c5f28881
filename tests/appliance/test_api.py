"""The status API over real HTTP on 127.0.0.1, served by uvicorn as the daemon serves it."""

import ipaddress
import socket
import ssl
from contextlib import closing

import httpx
import pytest

from appliance.api.app import ApiParts, ApiServer, create_app
from tests.appliance.conftest import finished_case
from tests.results import MODEL, a_result
from tests.stores import open_store
from tests.daemon_standin import DaemonStandIn


def test_health_cases_and_case(api):
    store, url = api
    store.case_started("C-1", specimen_id="S-1", tiles_expected=3,
                       model=MODEL)
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
    from appliance.api.app import daemon_api

    (tmp_path / "no-model").mkdir()
    defaults = load_settings(None, data_dir=tmp_path / "var", model_dir=tmp_path / "no-model", api_port=0)
    assert defaults.api_host == "127.0.0.1"
    daemon = Daemon(defaults, port=str(tmp_path / "scanner"), notify=lambda event: None, api=daemon_api)
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
        from appliance.api.tls import self_signed, write_pair

        cert, key = write_pair(tmp_path / "tls", *self_signed(["localhost"]))
        allowed = load_settings(None, data_dir=tmp_path / "var2", model_dir=tmp_path / "no-model", api_port=0,
                                api_host="0.0.0.0", api_allow_remote=True, api_tls_cert=cert, api_tls_key=key)
        with closing(open_store(allowed.db_path)) as store:
            everywhere = ApiServer(create_app(ApiParts(allowed, store)), allowed.api_host, 0, tls=allowed.api_tls_files)
            everywhere.start()
            try:
                assert all(_accepts(a, everywhere.port) for a in others), others
            finally:
                everywhere.stop()


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
    finished_case(store)
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


def test_link_reconnect_says_why_it_cannot_and_changes_nothing_then(settings, store, pty_pair):
    """No link in this process: 503; a link that cannot reopen (given an open transport): 409 with the reason.
    Neither lands in the audit table, because nothing happened."""
    from firmware_bridge.host import HostLink
    from firmware_bridge.transport import FdTransport

    link = HostLink(FdTransport(pty_pair.slave, close_fd=False), sink=None)  # an open transport: no path to reopen
    servers = [ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0),
               ApiServer(create_app(ApiParts(settings, store, DaemonStandIn(reconnect=link.request_reconnect))), "127.0.0.1", 0)]
    for s in servers:
        s.start()
    auth = {"Authorization": f"Bearer {settings.token_path.read_text().strip()}"}
    try:
        none, fixed = (httpx.post(f"http://127.0.0.1:{s.port}/link/reconnect", json={"initials": "AB"},
                                  headers=auth, timeout=10) for s in servers)
    finally:
        for s in servers:
            s.stop()
    assert none.status_code == 503 and "no scanner link" in none.json()["detail"]
    assert fixed.status_code == 409 and "cannot reopen" in fixed.json()["detail"]
    assert store.audit_log() == []


def test_hostile_case_ids_and_queries_get_a_4xx_never_a_file_or_a_5xx(api):
    store, url = api
    finished_case(store)
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


def test_ready_is_503_with_reasons_until_ready(settings, store):
    reasons = ["the scanner port /dev/scanner is not open"]
    server = ApiServer(create_app(ApiParts(settings, store, DaemonStandIn(reasons=reasons))), "127.0.0.1", 0)
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as c:
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["reasons"] == reasons
            reasons.clear()
            assert c.get("/ready").status_code == 200
    finally:
        server.stop()


def test_a_non_loopback_bind_needs_tls_and_to_be_allowed_and_then_the_token_everywhere(settings, store, tls_files):
    from appliance.config import load_settings
    from appliance.errors import ApplianceError
    from tests.conftest import MODEL_DIR

    cert, key = tls_files
    plain = load_settings(None, data_dir=settings.data_dir, model_dir=MODEL_DIR, api_host="0.0.0.0", api_port=0,
                          api_allow_remote=True)
    with pytest.raises(ApplianceError, match="not loopback, over plain HTTP; set api_tls_cert and api_tls_key"):
        create_app(ApiParts(plain, store))
    not_allowed = load_settings(None, data_dir=settings.data_dir, model_dir=MODEL_DIR, api_host="0.0.0.0",
                                api_port=0, api_tls_cert=cert, api_tls_key=key)
    with pytest.raises(ApplianceError, match="api_allow_remote"):
        create_app(ApiParts(not_allowed, store))
    allowed = load_settings(None, data_dir=settings.data_dir, model_dir=MODEL_DIR, api_host="0.0.0.0",
                            api_port=0, api_allow_remote=True, api_tls_cert=cert, api_tls_key=key)
    server = ApiServer(create_app(ApiParts(allowed, store)), "127.0.0.1", 0, tls=allowed.api_tls_files)
    server.start()
    try:
        token = allowed.token_path.read_text().strip()
        with httpx.Client(base_url=f"https://localhost:{server.port}", timeout=10, verify=ssl.create_default_context(cafile=str(cert))) as c:
            assert c.get("/cases").status_code == 401
            assert c.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 403
            assert c.get("/cases", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        server.stop()


def test_case_list_filters_by_verdict_date_and_sign_off(api, settings):
    store, url = api
    finished_case(store, "A")
    finished_case(store, "B")
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


def test_a_port_in_use_is_one_sentence_from_the_api_and_from_appliance_run(api, settings, tmp_path):
    import subprocess
    import sys

    from appliance.errors import ApiBindError

    store, url = api
    port = int(url.rsplit(":", 1)[1])
    second = ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", port)
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
