"""GET /metrics: the daemon's counters for Prometheus, exposed by prometheus_client from the live status, the
store and the engine's latency histogram, read at scrape time; cheap enough to scrape every few seconds."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.datastructures import State

from firmware_bridge.status import LinkState

router = APIRouter(tags=["metrics"])


class ApplianceCollector(Collector):
    """Builds every family afresh on each scrape from what the daemon already keeps, so nothing here counts
    twice or drifts from the store: the metrics are a view, not a second set of counters."""

    def __init__(self, state: State):
        self._state = state  # the app's state: status(), store and latency are read when scraped

    def collect(self) -> Iterator[Metric]:
        st = self._state
        status = st.status()
        counts = st.store.counts()
        # Counter names are given with _total, as exposed; the family drops it and the text format adds it back.
        yield CounterMetricFamily("appliance_tiles_received_total", "Tiles stored durably and ACKed, all cases.",
                                  value=counts["tiles"])
        case = status.case
        tiles = GaugeMetricFamily("appliance_current_case_tiles", "Tiles of the case in flight.", labels=["stage"])
        tiles.add_metric(["received"], case.tiles_received if case else 0)
        tiles.add_metric(["processed"], case.tiles_processed if case else 0)
        yield tiles
        cases = GaugeMetricFamily("appliance_cases", "Cases in the database by verdict (or status while unfinished).",
                                  labels=["verdict"])
        for verdict, n in sorted(counts["by_verdict"].items()):
            cases.add_metric([verdict], n)
        yield cases
        deliveries = GaugeMetricFamily("appliance_deliveries", "Messages to the lab's systems by state.",
                                       labels=["state"])
        for state, n in sorted(st.store.delivery_counts().items()):
            deliveries.add_metric([state], n)
        yield deliveries
        link = status.link
        counters = link.counters if link else {}
        yield CounterMetricFamily("appliance_link_crc_errors_total", "Frames from the scanner that failed CRC.",
                                  value=counters.get("crc_errors", 0))
        yield CounterMetricFamily("appliance_link_reconnects_total", "Reopens of a vanished scanner port.",
                                  value=counters.get("reconnects", 0))
        yield GaugeMetricFamily("appliance_link_up", "1 while a scanner is connected and heard.",
                                value=1 if link is not None and link.state == LinkState.UP else 0)
        if status.drift is not None:  # 1 per followed measure the drift watch finds outside the reference, else 0
            gauge = GaugeMetricFamily("appliance_drift", "1 while the last cases' measure is outside the drift "
                                      "reference (appliance.service.drift), 0 while inside.", labels=["measure"])
            for f in status.drift["findings"]:
                gauge.add_metric([f["measure"]], 1 if f["drifted"] else 0)
            yield gauge
        if status.threshold is not None:
            yield GaugeMetricFamily("appliance_case_threshold", "The case threshold in force (the site's when "
                                    "one is accepted, else the model's).", value=status.threshold.value)
        free = status.disk_free_bytes
        if free is not None:  # unknown is left out rather than reported as 0 bytes free
            yield GaugeMetricFamily("appliance_disk_free_bytes", "Free space on the data disk.", value=free)
        latency = getattr(st, "latency", None)
        if latency is not None:  # only a daemon with an engine has one (not a degraded daemon, not most tests)
            buckets, total, _ = latency.snapshot()  # cumulative, +Inf last; the +Inf count is the _count
            yield HistogramMetricFamily("appliance_inference_batch_seconds", "Latency of one inference batch.",
                                        buckets=[(floatToGoString(bound), cum) for bound, cum in buckets],
                                        sum_value=total)


def registry_for(state: State) -> CollectorRegistry:
    """A registry of the app's own, not prometheus_client's global one: several apps in one process (tests, a
    restarted API) would otherwise clash, and the global one carries process metrics nobody asked for."""
    registry = CollectorRegistry(auto_describe=False)  # no describe(): registering must not scrape the store
    registry.register(ApplianceCollector(state))
    return registry


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    # generate_latest writes the classic text format, version 0.0.4; CONTENT_TYPE_LATEST names 1.0.0 since
    # prometheus_client 0.23, which a Prometheus 3 scraper would then expect, so the header names what is sent.
    return PlainTextResponse(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_PLAIN_0_0_4)
