"""Prometheus text exposition (format 0.0.4) of the daemon's counters, built from the live status, the
store and the engine's latency histogram; cheap enough to scrape every few seconds."""

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

router = APIRouter(tags=["metrics"])


def _line(out: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{labels} {value}")


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    st = request.app.state
    status = st.status()
    counts = st.store.counts()
    out: list[str] = []
    _line(out, "appliance_tiles_received_total", "counter", "Tiles stored durably and ACKed, all cases.",
          [("", counts["tiles"])])
    case = status.get("case") or {}
    _line(out, "appliance_current_case_tiles", "gauge", "Tiles of the case in flight.",
          [('{stage="received"}', case.get("tiles_received", 0)), ('{stage="processed"}', case.get("tiles_processed", 0))])
    _line(out, "appliance_cases", "gauge", "Cases in the database by verdict (or status while unfinished).",
          [(f'{{verdict="{k}"}}', v) for k, v in sorted(counts["by_verdict"].items())])
    link = (status.get("link") or {}).get("counters", {})
    _line(out, "appliance_link_crc_errors_total", "counter", "Frames from the scanner that failed CRC.",
          [("", link.get("crc_errors", 0))])
    _line(out, "appliance_link_reconnects_total", "counter", "Reopens of a vanished scanner port.",
          [("", link.get("reconnects", 0))])
    _line(out, "appliance_link_up", "gauge", "1 while a scanner is connected and heard.",
          [("", 1 if (status.get("link") or {}).get("state") == "up" else 0)])
    free = status.get("disk_free_bytes")
    if free is not None:
        _line(out, "appliance_disk_free_bytes", "gauge", "Free space on the data disk.", [("", free)])
    latency = getattr(st, "latency", None)
    if latency is not None:
        buckets, total, n = latency.snapshot()
        out.append("# HELP appliance_inference_batch_seconds Latency of one inference batch.")
        out.append("# TYPE appliance_inference_batch_seconds histogram")
        for bound, cum in buckets:
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'appliance_inference_batch_seconds_bucket{{le="{le}"}} {cum}')
        out.append(f"appliance_inference_batch_seconds_sum {total}")
        out.append(f"appliance_inference_batch_seconds_count {n}")
    return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")
