"""GET /cases?limit=500 on 500 cases (issue 29), in one run:

  (a) the page over real HTTP (uvicorn on 127.0.0.1, the API's own route): median and p95 of --rounds;
  (b) the store's work for that page as the route does it now: list_cases, then deliveries_of (one query)
      on the pooled read connections;
  (c) the same page read as it was before the pool: one fresh read-only connection for the list and one more
      per case for its deliveries (501 connections), on the same file.
  The ratio (c)/(b) says what the pool and the single query saved; (a) is what a client waits.

    python bench/cases_page.py [--json bench/results/cases_page.json] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CASES = 500


def fill(store, n: int) -> None:
    cases = [{"id": f"B-{i:04d}", "specimen_id": f"S-{i}", "source": "bench", "status": "done",
              "received_at": f"2026-12-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000+00:00",
              "tiles_received": 3, "verdict": "benign-appearing", "score": 0.1, "research_use_only": 1,
              "reasons": "[]", "warnings": "[]"} for i in range(n)]
    deliveries = [{"id": f"B-{i:04d}.r1.{d}", "case_id": f"B-{i:04d}", "revision": 1, "message_id": f"B-{i:04d}.r1",
                   "destination": dest, "kind": kind, "payload": "x" * 2000, "status": "delivered", "attempts": 1,
                   "next_attempt_at": "", "last_error": None, "created_at": "", "delivered_at": ""}
                  for i in range(n) for d, (dest, kind) in enumerate((("mllp:lis:2575", "hl7"),
                                                                       ("fhir:http://lis/fhir", "fhir")))]

    def write(db):
        db["cases"].insert_all(cases)
        db["deliveries"].insert_all(deliveries)

    store.write(write)


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    from appliance.api.app import ApiServer, create_app
    from appliance.config import load_settings
    from appliance.store.database import CaseStore

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, data_dir=Path(tmp) / "var", model_dir=ROOT / "models" / "idc-resnet",
                                 api_port=0)
        store = CaseStore(settings.db_path)
        fill(store, CASES)
        server = ApiServer(create_app(settings, store), "127.0.0.1", 0)
        server.start()
        try:
            url = f"http://127.0.0.1:{server.port}/cases"
            with httpx.Client(timeout=60) as client:
                def page():
                    r = client.get(url, params={"limit": CASES})
                    assert r.status_code == 200 and len(r.json()["cases"]) == CASES

                page()
                http_ms = timed(page, args.rounds)

            def pooled():
                rows = store.list_cases(limit=CASES)
                store.deliveries_of([r["id"] for r in rows])

            def per_case_connections():  # the route before: a connection for the list, one per case after it
                conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
                ids = [r[0] for r in conn.execute("select id from cases order by received_at desc limit ?",
                                                  [CASES])]
                conn.close()
                for case_id in ids:
                    c = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
                    c.execute("select * from deliveries where case_id = ? order by created_at, id", [case_id]).fetchall()
                    c.close()

            pooled()
            store_ms = timed(pooled, args.rounds)
            old_ms = timed(per_case_connections, args.rounds)
        finally:
            server.stop()
            store.close()

    def row(name, xs):
        xs = sorted(xs)
        return {"what": name, "median_ms": round(statistics.median(xs), 2),
                "p95_ms": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 2)}

    rows = [row("GET /cases?limit=500 over HTTP (now)", http_ms),
            row("store: list + deliveries_of, pooled (now)", store_ms),
            row("store: list + a connection per case (before)", old_ms)]
    ratio = rows[2]["median_ms"] / rows[1]["median_ms"]
    print(f"{'what':<48}{'median ms':>11}{'p95 ms':>9}")
    for r in rows:
        print(f"{r['what']:<48}{r['median_ms']:>11.2f}{r['p95_ms']:>9.2f}")
    print(f"before / now (store work for the page): {ratio:.1f}x, {args.rounds} rounds, {CASES} cases")
    write_json(args.json, {"cases": CASES, "rounds": args.rounds, "rows": rows, "before_over_now": round(ratio, 2)})


if __name__ == "__main__":
    main()
