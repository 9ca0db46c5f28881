"""Batch re-triage of an archive on Dask distributed: `appliance batch`.

The driver (this process) hashes each input, decides what is left to do, submits one task per input to a
Dask cluster (an embedded LocalCluster of worker processes by default, or a lab's scheduler by address) and
records every answer in the case store itself: the workers only read inputs, score and write the case's
files, so the store keeps its one writer. A case is recorded when its answer comes back, never before, so no
batch case is ever open in the store (a daemon restarting meanwhile has nothing of the batch's to resume).

A case is keyed by (sha256 of the input, sha256 of the model) and its id is made from them, so a rerun finds
what is done and skips it, a run killed halfway resumes where it stopped, the same input is never recorded
twice, and a new model re-triages everything (new ids). A task that raises (an unreadable file) is recorded
as failed with its reason; a worker that dies mid-slide has its task moved to another worker by the
scheduler, and only the answer that comes back is recorded.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.lis.outbox import outbox_of
from appliance.model.ref import ModelRef
from appliance.offline.triage import case_id_for
from appliance.store import CaseStore
from appliance.terms import BatchStatus, CaseStatus

REPORT_COLUMNS = ("input", "specimen", "status", "verdict", "score", "reasons", "model_sha256", "seconds", "case_id")
HASH_CHUNK = 1 << 20


class BatchError(ApplianceError):
    """The batch cannot start: a bad manifest, no inputs, no cluster."""


@dataclass(frozen=True)
class BatchInput:
    path: Path
    specimen: str = ""


@dataclass
class BatchRow:
    """One line of the report."""

    input: str
    specimen: str
    status: str  # done, skipped (already done with this model) or failed
    verdict: str = ""
    score: float | None = None
    reasons: str = ""
    model_sha256: str = ""
    seconds: float | None = None
    case_id: str = ""


# ------------------------------------------------------------------------------------------- inputs
def read_inputs(paths: Iterable[Path], manifest: Path | None = None) -> list[BatchInput]:
    """The inputs given on the command line, then those listed in ``manifest`` (a CSV with a ``path`` or
    ``input`` column and an optional ``specimen`` column; relative paths are relative to the CSV)."""
    items = [BatchInput(Path(p)) for p in paths]
    if manifest is not None:
        try:
            with open(manifest, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise BatchError(f"{manifest}: cannot read the manifest ({exc})") from None
        for n, row in enumerate(rows, start=2):
            raw = (row.get("path") or row.get("input") or "").strip()
            if not raw:
                raise BatchError(f"{manifest}, line {n}: no path (the CSV needs a 'path' or 'input' column)")
            path = Path(raw) if Path(raw).is_absolute() else Path(manifest).parent / raw
            items.append(BatchInput(path, (row.get("specimen") or "").strip()))
    if not items:
        raise BatchError("no inputs: name slide files, images or tile folders, or give --manifest CSV")
    return items


def input_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name order)."""
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def batch_case_id(path: Path, input_sha: str, model_sha: str) -> str:
    """The case id of (input, model): readable, and the same on every run."""
    return f"{case_id_for(path)[:80]}-{input_sha[:10]}-m{model_sha[:8]}"


# ------------------------------------------------------------------------------------------- workers
_ENGINES: dict = {}  # per worker process: the model, loaded once and kept


def triage_on_worker(path: str, out_dir: str, case_id: str, model_dir: str, backend: str, threads: int,
                     batch_size: int):
    """Runs on a Dask worker: triage one input and write its files; returns (TriageResult, seconds)."""
    from appliance.model.engine import load_engine
    from appliance.offline.triage import triage_case

    key = (model_dir, backend, threads)
    if key not in _ENGINES:
        options = {"threads": threads} if backend == "openvino" else {}
        _ENGINES[key] = load_engine(Path(model_dir), backend, **options)
    t0 = time.perf_counter()
    result, _ = triage_case(_ENGINES[key], Path(path), batch_size=batch_size, out_dir=Path(out_dir), case_id=case_id)
    return result, time.perf_counter() - t0


def local_cluster(workers: int):
    """An embedded cluster of ``workers`` single-threaded worker processes (the dashboard on localhost only)."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address="127.0.0.1:0", silence_logs=50)  # task errors are reported, not logged


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None):
    """A Dask client and the OpenVINO threads each worker may use: the lab's ``scheduler`` (its workers keep
    OpenVINO's own default), or an embedded cluster of ``workers`` processes (default: one per 2 cores)
    sharing this machine's cores. Closed (and the embedded cluster stopped) on leaving."""
    from distributed import Client

    if scheduler:
        with Client(scheduler, timeout=30) as client:
            yield client, 0
        return
    workers = workers or default_workers()
    with local_cluster(workers) as cluster, Client(cluster) as client:
        yield client, max(1, (os.cpu_count() or 2) // workers)


class Tally:
    """Done/failed/skipped so far, slides per hour (of the inputs actually worked on) and the time left."""

    def __init__(self, total: int):
        self.total = total
        self.counts = {s: 0 for s in BatchStatus}
        self._started = time.monotonic()

    def add(self, row: BatchRow) -> None:
        self.counts[row.status] += 1

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    def slides_per_hour(self) -> float:
        worked = self.counts[BatchStatus.DONE] + self.counts[BatchStatus.FAILED]
        hours = (time.monotonic() - self._started) / 3600
        return worked / hours if worked and hours > 0 else 0.0

    def summary(self) -> str:
        c = self.counts
        return (f"{c[BatchStatus.DONE]} done, {c[BatchStatus.SKIPPED]} skipped, "
                f"{c[BatchStatus.FAILED]} failed")

    def line(self) -> str:
        rate = self.slides_per_hour()
        eta = f", ETA {(self.total - self.finished) / rate * 60:.1f} min" if rate else ""
        return f"{self.summary()}, {rate:.0f} slides/h{eta}"


# ------------------------------------------------------------------------------------------- driver
def run_batch(inputs: list[BatchInput], settings: Settings, client, *, out_root: Path | None = None,
              threads: int = 1, retry_failed: bool = False, deliver: bool = False,
              on_row: Callable[[BatchRow, int, int], None] | None = None) -> list[BatchRow]:
    """Triage ``inputs`` on ``client``'s cluster and record them; returns one report row per input, in the
    order given. What is already recorded for (input, model) is skipped, failures too unless
    ``retry_failed``. ``on_row(row, finished, total)`` is called as each is known. ``deliver``: each call
    is queued for the LIS destinations of ``settings`` too (the daemon's outbox sends them); off, the calls
    go nowhere but the store."""
    from distributed import as_completed

    from appliance.model.manifest import read_manifest

    manifest = read_manifest(settings.model_dir)
    model_sha = manifest.digest
    model = ModelRef(manifest.name, manifest.version, model_sha, str(settings.engine))
    # absolute: a worker on another machine (or in another folder) gets the same paths
    out_root = (Path(out_root) if out_root is not None else settings.cases_dir).absolute()
    store = CaseStore(settings.db_path, outbox_of(settings) if deliver else None)
    rows: list[BatchRow | None] = [None] * len(inputs)
    finished = 0

    def report(i: int, row: BatchRow) -> None:
        nonlocal finished
        rows[i] = row
        finished += 1
        if on_row:
            on_row(row, finished, len(inputs))

    # Two kinds of task, both on the workers: hashing an input (the archive is read where it is mounted, in
    # parallel), then, unless (input, model) is already recorded, triaging it. The answers are handled here
    # as they come, in whatever order.
    settled = (CaseStatus.DONE, CaseStatus.CANNOT_CALL) + (() if retry_failed else (CaseStatus.FAILED,))
    waiting = as_completed()
    hashing: dict = {}  # digest future -> input index
    triaging: dict[str, list[int]] = {}  # case id -> the input indexes waiting for it (the same input twice)
    bases = [BatchRow(str(item.path), item.specimen, "", model_sha256=model_sha) for item in inputs]
    try:
        for i, item in enumerate(inputs):
            fut = client.submit(input_digest, item.path.absolute(), pure=False)
            hashing[fut] = i
            waiting.add(fut)
        for fut in waiting:
            if fut in hashing:
                i = hashing.pop(fut)
                item, base = inputs[i], bases[i]
                if fut.status == "error":
                    exc = fut.exception()
                    report(i, _failed(base, f"{item.path}: cannot be read ({getattr(exc, 'strerror', None) or exc})"))
                    continue
                case_id = base.case_id = batch_case_id(item.path, fut.result(), model_sha)
                if case_id in triaging:
                    triaging[case_id].append(i)
                    continue
                known = store.get_case(case_id)
                if known is not None and known["status"] in settled:
                    report(i, _from_case(base, known, BatchStatus.SKIPPED))
                    continue
                triaging[case_id] = [i]
                waiting.add(client.submit(
                    triage_on_worker, str(item.path.absolute()), str(out_root / case_id), case_id,
                    str(settings.model_dir.absolute()), str(settings.engine), threads, settings.batch_size,
                    key=f"triage-{case_id}", pure=False))
                continue
            case_id = fut.key.removeprefix("triage-")
            # recorded only once answered, started and finished in one transaction: no batch case is ever left
            # open in the store, so a daemon restarting meanwhile has nothing of the batch's to resume, and a
            # killed batch leaves nothing half-done
            first = inputs[triaging[case_id][0]]
            started = {"specimen_id": first.specimen, "source": str(first.path), "model": model}
            if fut.status == "error":
                message = _reason(fut.exception())
                store.case_recorded(case_id, message, **started)
                for i in triaging.pop(case_id):
                    report(i, _failed(bases[i], message))
                continue
            result, seconds = fut.result()
            store.case_recorded(case_id, result, **started)
            case = store.get_case(case_id)
            for i in triaging.pop(case_id):
                report(i, _from_case(bases[i], case, BatchStatus.DONE, seconds))
            fut.release()
    finally:
        store.close()
    return rows


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return "the workers that took this input died each time (out of memory, or the input crashes the reader)"
    return str(exc) or name


def _failed(row: BatchRow, message: str) -> BatchRow:
    row.status, row.reasons = BatchStatus.FAILED, message
    return row


def _from_case(row: BatchRow, case: dict, status: str, seconds: float | None = None) -> BatchRow:
    row.status = status
    row.verdict = case.get("verdict") or ""
    row.score = case.get("score")
    row.reasons = "; ".join(f"{r['code']}: {r['message']}" for r in case.get("reasons") or [])
    row.seconds = None if seconds is None else round(seconds, 2)
    return row


def write_report(path: Path, rows: list[BatchRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    os.replace(tmp, path)
