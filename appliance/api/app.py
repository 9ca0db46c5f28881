"""The API factory: collaborators come in, an app goes out; uvicorn serves it inside the daemon."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from appliance import RESEARCH_USE_NOTICE, __version__
from appliance.config import Settings
from appliance.errors import ApiBindError, ApplianceError, ConfigError
from appliance.api.auth import ensure_token, is_loopback, reads_need_token
from appliance.store.database import CaseStore
from appliance.service.events import EventHub
from appliance.service.controls import DaemonControls
from appliance.status import DaemonStatus
from appliance.api.deepzoom import DeepZoom
from appliance.api.logins import LoginLimiter, Sessions
from appliance.api.routes import cases, deliveries, events, health, link, metrics, site, viewer
from appliance.api.routes import status as status_route

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiParts:
    """What the API is built around: the settings, the case store, and the daemon it fronts (its status,
    readiness, live events, link and latency: appliance.service.controls.DaemonControls). Without a daemon the
    API serves the store alone: status is the version, always ready, no link to reconnect, no live events."""

    settings: Settings
    store: CaseStore
    daemon: DaemonControls | None = None


def create_app(parts: ApiParts) -> FastAPI:
    """Build the API around ``parts``."""
    settings, store, daemon = parts.settings, parts.store, parts.daemon
    remote = not is_loopback(settings.api_host)
    if remote and not settings.api_tls_files:
        raise ApplianceError(f"the API would listen on {settings.api_host}, which is not loopback, over plain HTTP; "
                             f"set api_tls_cert and api_tls_key (`appliance tls self-signed --host NAME` makes them)")
    if remote and not settings.api_allow_remote:
        raise ApplianceError(f"the API would listen on {settings.api_host}, which is not loopback; set "
                             f"api_allow_remote = true to allow it (every endpoint then needs the token)")
    app = FastAPI(
        title="Bench triage appliance",
        version=__version__,
        description=f"Local status API of the bench triage appliance. {RESEARCH_USE_NOTICE}",
        dependencies=[Depends(reads_need_token)],
    )
    app.state.settings = settings
    app.state.store = store
    app.state.status = daemon.status if daemon else (lambda: DaemonStatus(version=__version__))
    app.state.ready = daemon.not_ready if daemon else (lambda: [])
    app.state.token = ensure_token(settings.token_path)
    app.state.remote = remote
    app.state.latency = daemon.latency if daemon else None
    app.state.events = daemon.events if daemon else EventHub()
    app.state.reconnect = daemon.reconnect_link if daemon else None
    app.state.site_changed = daemon.site_changed if daemon else None
    app.state.metrics = metrics.registry_for(app.state)  # read by GET /metrics; the app's own registry
    app.include_router(health.router)
    app.include_router(cases.router)
    app.include_router(status_route.router)
    app.include_router(metrics.router)
    app.include_router(events.router)
    app.include_router(link.router)
    app.include_router(deliveries.router)
    app.include_router(site.router)
    app.state.sessions = Sessions()
    app.state.logins = LoginLimiter()
    app.state.deepzoom = DeepZoom()
    app.include_router(viewer.router)
    app.mount("/viewer/static", StaticFiles(directory=viewer.STATIC_DIR), name="viewer-static")
    if viewer.OSD_DIR.is_dir():
        app.mount("/viewer/osd", StaticFiles(directory=viewer.OSD_DIR), name="viewer-osd")
    else:
        log.warning("the browser viewer has no OpenSeadragon: %s is missing (make installs it with npm ci)",
                    viewer.OSD_DIR)
    return app


class ApiServer:
    """uvicorn in a background thread, so the daemon's link and pipeline threads stay in charge.

    The socket is bound here, before uvicorn starts, so a port in use is an ApiBindError that says so in one
    sentence (uvicorn alone would log a traceback-like error and exit its thread)."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) PEM files; the API then serves HTTPS only."""
        self.host, self.requested_port = host, port
        if tls is not None:
            check_tls_files(*tls)
        cert, key = tls or (None, None)
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False, lifespan="on", ssl_certfile=cert,
                                                     ssl_keyfile=key))
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10) -> None:
        sock = bind_socket(self.host, self.requested_port)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="api", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.05)
        if not self._server.started:
            sock.close()
            raise ApiBindError(f"the status API on {self.host}:{self.requested_port} did not start within "
                               f"{timeout:g} s; see the log above")

    @property
    def port(self) -> int:
        """The bound port (useful when the settings asked for port 0)."""
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every socket the server listens on, as the kernel has them bound."""
        return [sock.getsockname()[:2] for server in self._server.servers for sock in server.sockets]

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def check_tls_files(cert: Path, key: Path) -> None:
    """Refuse, in one sentence, a certificate and key that uvicorn could not serve (before its thread runs)."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError(f"the API's TLS file {exc.filename} does not exist; check api_tls_cert and api_tls_key")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"the API cannot serve HTTPS with certificate {cert} and key {key}: "
                          f"{getattr(exc, 'reason', None) or exc}; make them again with `appliance tls self-signed`")
    if Path(key).stat().st_mode & 0o077:
        raise ConfigError(f"the API's TLS key {key} is readable by others; chmod 600 it")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (SO_REUSEADDR, as uvicorn binds); ApiBindError if it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ApiBindError(f"the status API cannot listen on {host!r}: {exc.strerror}; check api_host") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = ("another program (another appliance?) already listens there; stop it or set api_port"
                if exc.errno == errno.EADDRINUSE else "check api_host and api_port")
        raise ApiBindError(f"the status API cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def daemon_api(daemon) -> ApiServer:
    """The API around a started appliance.service.daemon.Daemon (its ``api`` argument): its status, readiness,
    live events and link; a degraded daemon (a model that failed its checks) serves its status only, without
    the latency histogram and the drift re-check."""
    s = daemon.settings
    return ApiServer(create_app(ApiParts(s, daemon.store, daemon)), s.api_host, s.api_port, tls=s.api_tls_files)
