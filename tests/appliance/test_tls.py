"""HTTPS for the API: `appliance tls self-signed` makes a certificate the API serves and clients verify
(httpx against that very file, over real sockets); plain HTTP is not answered on it; a non-loopback bind
without TLS stops `appliance run` at start, in one sentence; broken TLS settings are named."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest

from appliance.api.app import ApiParts, ApiServer, create_app
from appliance.config import load_settings
from appliance.errors import ConfigError
from tests.conftest import MODEL_DIR
from tests.stores import open_store
from tests.cli import appliance


def run_cli(*args: str, data, **env):
    return appliance(*args, env=env, data=data, model=MODEL_DIR)


def test_a_self_signed_certificate_is_served_and_verified_and_plain_http_gets_no_answer(tmp_path):
    made = run_cli("tls", "self-signed", "--host", "localhost", "--host", "127.0.0.1", data=tmp_path / "var")
    assert made.returncode == 0, made.stderr
    cert, key = tmp_path / "var" / "tls" / "cert.pem", tmp_path / "var" / "tls" / "key.pem"
    assert "api_tls_cert" in made.stdout and "SHA-256 fingerprint" in made.stdout
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = run_cli("tls", "self-signed", "--host", "localhost", data=tmp_path / "var")
    assert again.returncode == 1 and "--force replaces it" in again.stderr  # never replaced by accident

    settings = load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0,
                             api_tls_cert=cert, api_tls_key=key)
    store = open_store(settings.db_path)
    server = ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0, tls=settings.api_tls_files)
    server.start()
    try:
        for host in ("localhost", "127.0.0.1"):  # both names are in the certificate
            r = httpx.get(f"https://{host}:{server.port}/health", verify=ssl.create_default_context(cafile=str(cert)), timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://localhost:{server.port}/health", timeout=10)  # not in the system's trust store
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)  # plain HTTP: no answer
        ctx = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch|doesn't match"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                ctx.wrap_socket(raw, server_hostname="bench-02.lab")  # a name the certificate does not carry
        status = run_cli("status", "--json", data=tmp_path / "var", APPLIANCE_API_PORT=str(server.port),
                         APPLIANCE_API_TLS_CERT=str(cert), APPLIANCE_API_TLS_KEY=str(key),
                         APPLIANCE_API_HOST="localhost")
        assert status.returncode == 0, status.stderr  # the local tools speak HTTPS and verify the same file
    finally:
        server.stop()
        store.close()


def test_plain_http_on_a_non_loopback_address_is_refused_at_start(tmp_path):
    run = run_cli("run", "--port", str(tmp_path / "no-scanner"), data=tmp_path / "var", APPLIANCE_API_HOST="0.0.0.0",
                  APPLIANCE_API_ALLOW_REMOTE="true", APPLIANCE_API_PORT="0")
    assert run.returncode != 0
    assert ("the API would listen on 0.0.0.0, which is not loopback, over plain HTTP; set api_tls_cert and "
            "api_tls_key") in run.stderr


def test_broken_tls_settings_are_named(tmp_path, tls_files):
    cert, key = tls_files
    with pytest.raises(ConfigError, match="api_tls_cert and api_tls_key go together"):
        load_settings(None, data_dir=tmp_path, api_tls_cert=cert)
    with pytest.raises(ConfigError, match="does not exist"):
        ApiServer(None, "127.0.0.1", 0, tls=(cert, tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="cannot serve HTTPS"):
        ApiServer(None, "127.0.0.1", 0, tls=(key, key))  # a key where the certificate belongs
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        ApiServer(None, "127.0.0.1", 0, tls=(cert, key))
