"""The daemon: link -> spool -> pipeline -> store, with the status API alongside.

Threads: the link's reader thread spools each tile durably (then the link ACKs it) and hands it to
the pipeline thread through a queue, so inference never holds up the serial link. The store's writer
thread is the only one that writes SQLite; uvicorn serves the API from its own thread. The parts:
receiver.py (the link's sink: spool, log, ACK; free space), worker.py (the pipeline thread), and here the
Daemon that owns them all and serve(), the systemd loop of `appliance run`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from firmware_bridge.errors import LinkError
from firmware_bridge.host import HostLink
from firmware_bridge.status import LinkEvent, LinkState

from appliance import __version__
from appliance.config import Settings
from appliance.errors import ManifestError, ModelIntegrityError
from appliance.model.engine import Engine, load_engine
from appliance.service import retention
from appliance.lis.outbox import OutboxSender, outbox_of
from appliance.service.cases import CaseBook, CaseProgress, eta_seconds
from appliance.service.events import (ApiStarted, CaseFinished, DriftChanged, Event, EventHub, LinkReported,
                                      Notify, NotReady, Ready)
from appliance.service.receiver import CaseReceiver, StorageGuard
from appliance.status import CaseInFlight, DaemonStatus, LinkView, ThresholdView
from appliance.service.worker import PipelineWorker
from appliance.service.drift import DriftWatch, reference_in_force
from appliance.store.points import thresholds_in_force
from appliance.store.database import CaseStore
from appliance.store.spool import TileSpool
from appliance.terms import RECORDED_EVENTS

log = logging.getLogger(__name__)


class ApiServing(Protocol):
    """The API the daemon serves (appliance.api.app.ApiServer): started once the daemon can answer, stopped last."""

    port: int

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Daemon:
    """Owns the engine, store, spool, pipeline, serial link and API for one process."""

    def __init__(self, settings: Settings, *, port: str | None = None, notify: Notify | None = None,
                 api: Callable[["Daemon"], ApiServing] | None = None, engine: Engine | None = None):
        """``api``: builds the API around this daemon once it has started (appliance.api.app.daemon_api; the
        layer above passes it, so the service never imports the API); None serves none. ``engine``: one already
        loaded (tests that slow inference down); by default the daemon loads ``settings.model_dir`` with
        ``settings.engine`` when it starts."""
        self.settings = settings
        self.port = port or settings.serial_port
        self._user_notify = notify or (lambda event: log.info("%s %s", event.kind, event.data()))
        self.events = EventHub()  # live events for GET /events
        self.storage = StorageGuard(settings.data_dir, settings.min_free_mb, settings.spool_dir)
        self.api_factory = api
        self.engine: Engine | None = engine
        self.store: CaseStore | None = None
        self.link: HostLink | None = None
        self.api: ApiServing | None = None
        self.outbox: OutboxSender | None = None
        self.cases = CaseBook()  # what the daemon knows about the cases in flight
        self.receiver: CaseReceiver | None = None
        self.pipeline: PipelineWorker | None = None
        # Why the daemon cannot take cases at all (the model failed its checks), or None. Set at start: the
        # daemon then runs degraded, serving its status and this reason but never opening the scanner link.
        self.problem: str | None = None
        self.drift = DriftWatch()

    def thresholds(self):
        """The thresholds in force for the next case: the accepted site point's for this model, else the model's."""
        return thresholds_in_force(self.store.site_point(), self.engine.manifest)

    def check_drift(self) -> None:
        """Re-judge the last cases against the reference in force; a change in what drifted is an event."""
        if self.store is None or self.engine is None:
            return
        try:
            reference, name = reference_in_force(self.engine.manifest, self.store.site_point())
            changed = self.drift.check(self.store.recent_cases(self.drift.window), reference, name)
        except Exception:  # noqa: BLE001 - the watch must never stop the daemon
            log.exception("the drift watch failed")
            return
        if changed:
            st = self.drift.status()
            self.notify(DriftChanged(st["drifted"], st["reference"],
                                     st["warning"] or "no drift: recent cases are like the reference"))

    def notify(self, event: Event) -> None:
        """Record lifecycle events in SQLite, then pass every event on (the live stream, demo progress, logs)."""
        self.events.publish(event)
        if event.kind in RECORDED_EVENTS and self.store is not None:
            data = event.data()
            try:
                self.store.event(event.kind, case_id=data.get("case_id"), detail=data)
            except Exception:  # noqa: BLE001 - the history must never stop the daemon
                log.exception("could not record event %s", event.kind)
        self._user_notify(event)
        if isinstance(event, CaseFinished):
            self.check_drift()

    def start(self) -> None:
        """Load the model, open the store, serve the API and open the link; on any failure undo it all.

        A model that fails its checks (manifest, missing file, sha256 mismatch) is not a failure to start: a
        restart would not repair the file. The daemon starts degraded instead (``problem`` says why): the
        store and the API run, so GET /ready and /status name the file and what is wrong with it, but the
        scanner link stays closed and no case can come in."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        try:
            if self.engine is None:
                self.engine = load_engine(s.model_dir, s.engine)
        except (ManifestError, ModelIntegrityError) as exc:
            self.problem = " ".join(f"the model failed its checks: {exc}".split())  # one line, for STATUS=
            log.error("NOT READY, the scanner link stays closed: %s", self.problem)
        outbox = outbox_of(s)
        self.store = CaseStore(s.db_path, outbox)
        if outbox:  # delivers the calls to the lab's systems, model or not
            self.outbox = OutboxSender(self.store, outbox.destinations, s.lis_fhir_token_file)
            self.outbox.start()
        if self.problem:
            self._start_degraded()
            return
        self.store.model_seen(self.engine.model_ref)
        spool = TileSpool(s.spool_dir)
        self.pipeline = PipelineWorker(self.engine, self.store, s.batch_size, self.notify, s.cases_dir,
                                       self.thresholds, self.cases)
        self.check_drift()
        self.pipeline.start()
        self.receiver = CaseReceiver(spool, self.store, self.pipeline, self.engine.model_ref, self.notify,
                                     self.storage)
        self._serve_api()
        recovery = self.receiver.recover()
        self._housekeeping_stop = threading.Event()
        self._housekeeping = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
        self._housekeeping.start()
        # wait_for_port: a daemon started before the scanner is plugged in waits for it instead of failing.
        self.link = HostLink(self.port, self.receiver, wait_for_port=True)
        if recovery.reopened:  # the host holds one open case: the latest the scanner was sending
            self.link.restore_case(*recovery.reopened[-1])
        for case_id, tiles in recovery.ended:  # their CASE_END may come again: re-ACK it
            self.link.restore_ended(case_id, tiles)
        self.link.start()
        self.notify(Ready(self.port, self.engine.model_ref.to_dict()))

    def _start_degraded(self) -> None:
        """Store and API only: the status and the reason are served; no pipeline, no link, no new case."""
        not_ready = NotReady(self.problem)
        self.store.event(not_ready.kind, detail=not_ready.data())
        self.events.publish(not_ready)
        self._serve_api()

    def _serve_api(self) -> None:
        """The API, when this daemon serves one: built by the layer above (full, or degraded: status only)."""
        if self.api_factory is None:
            return
        s = self.settings
        self.api = self.api_factory(self)
        self.api.start()
        self.notify(ApiStarted(f"{s.api_scheme}://{s.api_host}:{self.api.port}"))

    def reconnect_link(self, why: str) -> str:
        """An operator's reconnect (POST /link/reconnect): reopen the scanner port now; returns the link state."""
        if self.link is None:
            raise LinkError(f"the scanner link is not open: {self.problem}" if self.problem
                            else "the scanner link is not started yet")
        log.warning("reconnecting the scanner link: %s", why)
        self.link.request_reconnect(why)
        self.notify(LinkReported(LinkEvent.RECONNECT_REQUESTED, why))
        return self.link.state

    def status(self) -> DaemonStatus:
        """The live status (appliance.status): link, case in flight, model, threshold, drift, disk."""
        model = threshold = drift = None
        if self.engine is not None:
            model = self.engine.model_ref.to_dict()
            if self.store is not None and not self.problem:
                t = self.thresholds()
                threshold = ThresholdView(value=t.threshold, source=t.source, site_accepted_at=t.site_accepted_at,
                                          site_report_sha256=t.site_report_sha256, words=t.words())
                drift = self.drift.status()
        return DaemonStatus(version=__version__, problem=self.problem, link=self._link_view(),
                            case=self._case_view(), model=model, threshold=threshold, drift=drift,
                            storage=self.storage.status())

    def _link_view(self) -> LinkView | None:
        if self.link is None:
            return None
        snap = self.link.snapshot()
        return LinkView(state=snap.get("state", "unknown"), port=self.port, last_error=snap.get("last_error"),
                        counters={k: v for k, v in snap.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def _case_view(self) -> CaseInFlight | None:
        current = self.cases.current
        if current is None:
            return None
        return CaseInFlight(
            case_id=current.case_id, specimen_id=current.specimen_id, tiles_expected=current.tiles_expected,
            tiles_received=current.tiles_received, tiles_processed=current.tiles_processed,
            score=current.score, early_positive=current.early_positive,
            verdict=current.result.verdict if current.result else None, failed=current.failed,
            eta_s=eta_seconds(current, time.monotonic()), warnings=tuple(current.warnings))

    @property
    def latency(self):
        """The engine's inference latency histogram; None while degraded (no working engine)."""
        return self.engine.latency if self.engine is not None and self.problem is None else None

    def site_changed(self) -> None:
        """A site point was accepted or reset (through the API): drift is judged against the new reference."""
        if self.problem is None:
            self.check_drift()

    def _housekeep(self) -> None:
        """Once a second: abandon cases the scanner left open. Every retention_interval_s: retention."""
        tick = min(1.0, self.settings.case_timeout_s / 4)
        next_retention = time.monotonic()
        while not self._housekeeping_stop.wait(tick):
            try:
                self.receiver.abandon_stale(self.settings.case_timeout_s)
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self.settings.retention_interval_s
                    for p in retention.apply(self.store, self.settings):
                        log.info("retention removed the files of case %s (%s, %d bytes)", p.case_id, p.reason,
                                 p.bytes)
            except Exception:  # noqa: BLE001 - housekeeping must never take the daemon down
                log.exception("housekeeping failed")

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready for a scanner yet (empty when it is): for GET /ready."""
        if self.problem:
            return [self.problem]
        reasons = []
        if self.engine is None:
            reasons.append("the model is not loaded")
        if self.link is None or self.link.state in (LinkState.RECONNECTING, LinkState.STOPPED):
            reasons.append(f"the scanner port {self.port} is not open")
        ok, why = self.health() if self.link is not None and self.pipeline is not None else (True, "")
        if not ok:
            reasons.append(why)
        return reasons

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): the link reader and the pipeline are alive and making progress. A daemon started
        degraded (``problem``) is healthy as long as it runs: it does what it can, serve its status."""
        if self.problem:
            return True, ""
        if self.link is None or not self.link.running:
            return False, "scanner link reader is not running"
        if self.pipeline is None:
            return False, "no pipeline"
        return self.pipeline.alive(self.settings.pipeline_stall_s)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: link state and the case in flight, or NOT READY and why (written every
        tick: only the link and the case, no store read)."""
        return DaemonStatus(version=__version__, problem=self.problem, link=self._link_view(),
                            case=self._case_view()).line()

    def wait_case(self, case_id: str, timeout: float) -> CaseProgress | None:
        """Wait until the pipeline has finished ``case_id`` (or the timeout passes)."""
        return self.cases.wait(case_id, timeout)

    def stop(self) -> None:
        if getattr(self, "_housekeeping", None) is not None:
            self._housekeeping_stop.set()
            self._housekeeping.join(timeout=5)
        if self.link:
            self.link.stop()
        if self.pipeline:
            self.pipeline.stop()
        if self.api:
            self.api.stop()
        if self.outbox is not None:
            self.outbox.stop()
        if self.store:
            self.store.close()


def serve(daemon: Daemon, notifier, stop: threading.Event, tick: float = 0.5) -> None:
    """The service loop of `appliance run`: READY=1 once started, then WATCHDOG=1 every half WATCHDOG_USEC
    only while ``daemon.health()`` holds, and STATUS= when it changes, until ``stop`` is set.

    A daemon started degraded (``daemon.problem``) is READY=1 at once with STATUS=NOT READY: <why>: the
    process is up and serving its status, and a restart by systemd would not repair a tampered model."""
    # READY=1 once the port is open
    while daemon.problem is None and daemon.link.state in (LinkState.RECONNECTING, LinkState.STOPPED):
        notifier.status(f"model loaded; waiting for the scanner port {daemon.port}")
        if stop.wait(tick):
            notifier.stopping()
            return
    notifier.ready(daemon.status_line())
    interval = notifier.watchdog_interval
    next_beat = time.monotonic()
    healthy = True
    while not stop.wait(min(tick, interval) if interval else tick):
        notifier.status(daemon.status_line())
        if interval is None or time.monotonic() < next_beat:
            continue
        ok, why = daemon.health()
        if ok:
            notifier.watchdog()
            next_beat = time.monotonic() + interval
        elif healthy:
            log.error("not healthy, withholding the systemd watchdog: %s", why)
        healthy = ok
    notifier.stopping()
