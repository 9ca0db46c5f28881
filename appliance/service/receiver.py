"""The link's side of the daemon: each tile spooled and logged before it is ACKed (CaseReceiver), and the
free-space check that refuses new cases on a full disk (StorageGuard)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from firmware_bridge.cases import ENDED_CASES_REMEMBERED
from firmware_bridge.sink import CaseInfo, CaseRefused, TileReceived

from appliance.service.worker import CaseProgress, Notify, PipelineWorker
from appliance.store.database import CaseStore
from appliance.store.spool import TileSpool, pixel_digest
from appliance.terms import CaseFile, CaseStatus, EventKind

log = logging.getLogger(__name__)

# Finished cases the receiver keeps in memory (wait_case, the latest call in /status); older ones are in the
# store only. Without a bound every case's result (its ~1,000 patch scores) stayed in memory for good.
FINISHED_CASES_KEPT = 16


class CaseReceiver:
    """The link's TileSink: a tile is spooled and logged before this returns, and only then ACKed."""

    def __init__(self, spool: TileSpool, store: CaseStore, pipeline: PipelineWorker, model: dict, notify: Notify,
                 storage: "StorageGuard"):
        self.storage = storage
        self.spool = spool
        self.store = store
        self.pipeline = pipeline
        self.model = model
        self.notify = notify
        self.cases: dict[str, CaseProgress] = {}
        self.current: CaseProgress | None = None
        self.reopened: list[tuple[CaseInfo, list[int]]] = []  # open cases rebuilt after a restart
        self.ended_recovered: list[tuple[str, int]] = []  # ended cases finished after a restart

    def case_began(self, info: CaseInfo) -> None:
        known = self.cases.get(info.case_id)
        if known is not None and not known.done.is_set() and not known.abandoned:
            return  # rebuilt after a restart and resumed by the scanner: keep what is stored and replayed
        refusal = self.storage.refusal()
        if refusal:
            self.notify(EventKind.REFUSED, {"case_id": info.case_id, "reason": refusal})
            raise CaseRefused(refusal)
        expected = info.expected_tiles or None
        self.spool.begin_case(info.case_id, _info_dict(info))
        self.store.case_started(info.case_id, specimen_id=info.specimen_id, source="scanner",
                                tiles_expected=expected, model=self.model)
        progress = CaseProgress(info.case_id, info.specimen_id, expected, info)
        self.cases.pop(info.case_id, None)  # the same case scanned again is a new case: it goes last
        self.cases[info.case_id] = progress
        self.current = progress
        self._forget_finished()
        self.pipeline.begin(progress)
        self.notify(EventKind.CASE_STARTED, {"case_id": info.case_id, "tiles_expected": expected})

    def _forget_finished(self) -> None:
        """Drop all but the latest FINISHED_CASES_KEPT finished cases from memory (oldest first)."""
        finished = [case_id for case_id, p in self.cases.items()
                    if p.done.is_set() and (p.outputs_done.is_set() or p.result is None) and p is not self.current]
        for case_id in finished[:max(0, len(finished) - FINISHED_CASES_KEPT)]:
            del self.cases[case_id]

    def tile_received(self, tile: TileReceived) -> None:
        progress = self.cases[tile.case_id]
        with progress.lock:  # refused, or alive from now on: never abandoned in between
            if progress.abandoned:
                raise CaseRefused(f"case {tile.case_id} was abandoned: {progress.abandoned}")
            progress.last_activity = time.monotonic()
        h, w = tile.pixels.shape[:2]
        # the link hashed the pixels as it decoded them; the spool hashes only when it did not
        path, sha = self.spool.store_tile(tile.case_id, tile.index, tile.x, tile.y, tile.pixels, sha256=tile.sha256)
        self.store.tile_stored(tile.case_id, tile.index, tile.x, tile.y, w, h, sha)
        progress.tiles_received += 1
        self.pipeline.tile(progress, tile.x, tile.y, tile.pixels, path)
        self.notify(EventKind.TILE, {"case_id": tile.case_id, "received": progress.tiles_received,
                             "expected": progress.tiles_expected})

    def case_ended(self, case_id: str, tile_count: int) -> None:
        progress = self.cases[case_id]
        with progress.lock:  # ended or abandoned, one or the other: a timeout waits for this CASE_END's commit
            if progress.abandoned:
                raise CaseRefused(f"case {case_id} was abandoned: {progress.abandoned}")
            # Committed before this returns (and so before the ACK): a crash after the ACK must still find the
            # case ended, or the restarted daemon would wait for a CASE_END the scanner will never resend.
            self.store.case_processing(case_id)
            progress.ended = True
            self.pipeline.end(progress)
        self.notify(EventKind.CASE_ENDED, {"case_id": case_id, "tile_count": tile_count})

    def recover(self) -> list[str]:
        """After a crash: rebuild every case the last run left open from the spool (what was ACKed) and replay
        its tiles into the pipeline in index order; a case whose CASE_END was received is finished now, with
        the same tiles, so the same verdict and score. Others stay open (and are abandoned if the scanner
        does not come back within case_timeout_s).

        The latest called cases are remembered as ended too: a power cut can take the ACK of a CASE_END whose
        commit it kept, and the case can be called after a restart before the scanner sends CASE_END again
        (to be ACKed, not refused as unknown)."""
        resumed = []
        self.ended_recovered = [(r["id"], r["tiles_received"])
                                for r in self.store.called_cases(ENDED_CASES_REMEMBERED)]
        for row in self.store.open_cases():
            case_id = row["id"]
            try:
                info = CaseInfo(**self.spool.case_info(case_id))
            except (OSError, ValueError, TypeError) as exc:
                self.store.case_failed(case_id, f"could not resume after a restart: {exc}")
                continue
            ended = row["status"] == CaseStatus.PROCESSING or any(
                e["kind"] == EventKind.CASE_ENDED for e in self.store.events(case_id))
            progress = CaseProgress(case_id, info.specimen_id, info.expected_tiles or None, info)
            self.cases[case_id] = progress
            self.current = progress
            self.pipeline.begin(progress)
            logged = {r["idx"] for r in self.store.tiles(case_id)}
            for idx, x, y, path in self.spool.stored_tiles(case_id):
                if idx not in logged:  # spooled, then killed before its row was committed (and before the ACK)
                    pixels = np.load(path, allow_pickle=False)
                    self.store.tile_stored(case_id, idx, x, y, pixels.shape[1], pixels.shape[0], pixel_digest(pixels))
                self.pipeline.tile(progress, x, y, None, path)  # read back when its turn comes
                progress.tiles_received += 1
            self.notify(EventKind.RESUMED, {"case_id": case_id, "tiles": progress.tiles_received, "ended": ended})
            if ended:
                progress.ended = True
                self.pipeline.end(progress)
                self.ended_recovered.append((case_id, progress.tiles_received))
            else:
                self.reopened.append((info, [i for i, _x, _y, _p in self.spool.stored_tiles(case_id)]))
            resumed.append(case_id)
        self.rebuild_lost_files()
        return resumed

    def rebuild_lost_files(self) -> list[str]:
        """After a power cut while a called case's files were written: it has no summary.json (written last,
        once the others are durable), but its tiles are in the spool, so the pipeline makes its files again
        from them. The call stays as stored; the files come only if the tiles give that call again."""
        rebuilt = []
        for case_id in (r["id"] for r in self.store.called_cases()):
            if (self.pipeline.cases_dir / case_id / CaseFile.SUMMARY).exists():
                continue
            tiles = self.spool.stored_tiles(case_id)
            if not tiles:  # retention removed its spool (and its files): nothing to make them from
                continue
            try:
                info = CaseInfo(**self.spool.case_info(case_id))
            except (OSError, ValueError, TypeError) as exc:
                log.error("case %s lost its files and they cannot be made again: %s", case_id, exc)
                continue
            log.warning("case %s: its files were lost (a power cut while they were written); making them again "
                        "from its %d spooled tiles", case_id, len(tiles))
            progress = CaseProgress(case_id, info.specimen_id, info.expected_tiles or None, info, ended=True,
                                    rebuild_files=True)
            self.pipeline.begin(progress)
            for _idx, x, y, path in tiles:
                self.pipeline.tile(progress, x, y, None, path)
                progress.tiles_received += 1
            self.pipeline.end(progress)
            rebuilt.append(case_id)
        return rebuilt

    def abandon_stale(self, timeout: float) -> list[str]:
        """Mark cases with no tile and no CASE_END for ``timeout`` seconds abandoned; returns their ids."""
        now, out = time.monotonic(), []
        for progress in list(self.cases.values()):
            with progress.lock:
                if progress.ended or progress.abandoned or progress.done.is_set():
                    continue
                idle = now - progress.last_activity
                if idle > timeout:
                    progress.abandoned = (f"no tile and no CASE_END for {idle:.0f} s (limit {timeout:.0f} s) "
                                          f"after {progress.tiles_received} tiles")
                    self.pipeline.abandon(progress)
                    out.append(progress.case_id)
        return out

    def link_event(self, kind: str, detail: str) -> None:
        self.notify(EventKind.LINK, {"kind": kind, "detail": detail})


class StorageGuard:
    """Free space on the data disk: below ``min_free_mb`` new cases are refused (cases already in are kept).

    ``also``: folders that may sit on a disk of their own (the spool, mounted apart); the fullest one counts."""

    def __init__(self, path: Path, min_free_mb: int, *also: Path):
        self.path = Path(path)
        self.also = [Path(p) for p in also]
        self.min_free = min_free_mb * 1_000_000

    def _fullest(self) -> tuple[Path, int] | None:
        """(folder, free bytes) of the folder with the least free space, or None if the data folder is unreadable."""
        try:
            out = (self.path, shutil.disk_usage(self.path).free)
        except OSError:
            return None
        for p in self.also:
            try:
                free = shutil.disk_usage(p).free
            except OSError:
                continue  # not made yet: it is on the data disk
            if free < out[1]:
                out = (p, free)
        return out

    def free_bytes(self) -> int | None:
        fullest = self._fullest()
        return None if fullest is None else fullest[1]

    def refusal(self) -> str | None:
        """Why a new case cannot be taken now, or None."""
        fullest = self._fullest()
        if fullest is None:
            return f"the data folder {self.path} is not readable"
        where, free = fullest
        if free < self.min_free:
            return (f"not enough free disk space for a new case: {free / 1e6:.0f} MB free in {where}, at least "
                    f"{self.min_free / 1e6:.0f} MB needed; existing cases are kept. Free space or move old cases.")
        return None

    def status(self) -> dict:
        refusal = self.refusal()
        return {"free_bytes": self.free_bytes(), "min_free_bytes": self.min_free,
                "accepting_cases": refusal is None, "reason": refusal}


def _info_dict(info: CaseInfo) -> dict:
    return {k: getattr(info, k) for k in info.__dataclass_fields__}
