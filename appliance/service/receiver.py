"""The link's side of the daemon: each tile spooled and logged before it is ACKed (CaseReceiver), and the
free-space check that refuses new cases on a full disk (StorageGuard)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from firmware_bridge.cases import ENDED_CASES_REMEMBERED
from firmware_bridge.sink import CaseInfo, CaseRefused, TileReceived

from appliance.model.ref import ModelRef
from appliance.service.cases import CaseProgress
from appliance.service.events import CaseEnded, CaseStarted, LinkReported, Notify, Refused, Resumed, TileStored
from appliance.service.worker import PipelineWorker
from appliance.store.database import CaseStore
from appliance.store.spool import TileSpool, tile_record
from appliance.terms import CaseFile, CaseStatus

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    """What ``CaseReceiver.recover`` found after a restart: the cases resumed from the spool; of them, the open
    ones (their info and the tile indexes stored, for the link to resume) and, with the latest called cases,
    the ended ones (case id, tiles: a CASE_END the scanner sends again is ACKed); the called cases whose lost
    files were made again."""

    resumed: list[str] = field(default_factory=list)
    reopened: list[tuple[CaseInfo, list[int]]] = field(default_factory=list)
    ended: list[tuple[str, int]] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)


class CaseReceiver:
    """The link's TileSink: a tile is spooled and logged before this returns, and only then ACKed."""

    def __init__(self, spool: TileSpool, store: CaseStore, pipeline: PipelineWorker, model: ModelRef,
                 notify: Notify, storage: "StorageGuard"):
        self.storage = storage
        self.spool = spool
        self.store = store
        self.pipeline = pipeline
        self.book = pipeline.book  # the case book the pipeline writes its part of each case into
        self.model = model
        self.notify = notify

    def case_began(self, info: CaseInfo) -> None:
        if self.book.in_flight(info.case_id):
            return  # rebuilt after a restart and resumed by the scanner: keep what is stored and replayed
        refusal = self.storage.refusal()
        if refusal:
            self.notify(Refused(info.case_id, refusal))
            raise CaseRefused(refusal)
        expected = info.expected_tiles or None
        self.spool.begin_case(info.case_id, _info_dict(info))
        self.store.case_started(info.case_id, specimen_id=info.specimen_id, accession=info.accession, source="scanner",
                                tiles_expected=expected, model=self.model)
        progress = self.book.opened(CaseProgress.of(info))
        self.pipeline.begin(progress)
        self.notify(CaseStarted(info.case_id, expected))

    def tile_received(self, tile: TileReceived) -> None:
        progress = self.book.arriving(tile.case_id)
        # the link hashed the tile as it checked it; the spool hashes only when it did not
        if tile.jpeg is not None:  # kept as the scanner sent it: the case pyramid's full-resolution tile
            path, sha = self.spool.store_jpeg(tile.case_id, tile.index, tile.x, tile.y, tile.jpeg, tile.sha256)
        else:
            path, sha = self.spool.store_tile(tile.case_id, tile.index, tile.x, tile.y, tile.decoded, tile.sha256)
        self.store.tile_stored(tile.case_id, tile.index, tile.x, tile.y, tile.width, tile.height, sha)
        received = self.book.received(progress)
        self.pipeline.tile(progress, tile.x, tile.y, tile.jpeg if tile.jpeg is not None else tile.decoded, path)
        self.notify(TileStored(tile.case_id, received, progress.tiles_expected))

    def case_ended(self, case_id: str, tile_count: int) -> None:
        # Committed before this returns (and so before the ACK): a crash after the ACK must still find the case
        # ended, or the restarted daemon would wait for a CASE_END the scanner will never resend.
        progress = self.book.ended(case_id, lambda: self.store.case_processing(case_id))
        self.pipeline.end(progress)
        self.notify(CaseEnded(case_id, tile_count))

    def recover(self) -> Recovery:
        """After a crash: rebuild every case the last run left open from the spool (what was ACKed) and replay
        its tiles into the pipeline in index order; a case whose CASE_END was received (its row says
        processing) is finished now, with the same tiles, so the same verdict and score. Others stay open (and
        are abandoned if the scanner does not come back within case_timeout_s).

        The latest called cases are remembered as ended too: a power cut can take the ACK of a CASE_END whose
        commit it kept, and the case can be called after a restart before the scanner sends CASE_END again
        (to be ACKed, not refused as unknown)."""
        out = Recovery(ended=[(r["id"], r["tiles_received"]) for r in self.store.called_cases(ENDED_CASES_REMEMBERED)])
        for row in self.store.open_cases():
            case_id = row["id"]
            try:
                info = CaseInfo(**self.spool.case_info(case_id))
            except (OSError, ValueError, TypeError) as exc:
                self.store.case_failed(case_id, f"could not resume after a restart: {exc}")
                continue
            ended = row["status"] == CaseStatus.PROCESSING
            progress = self.book.opened(CaseProgress.of(info))
            self.pipeline.begin(progress)
            logged = {r["idx"] for r in self.store.tiles(case_id)}
            for idx, x, y, path in self.spool.stored_tiles(case_id):
                if idx not in logged:  # spooled, then killed before its row was committed (and before the ACK)
                    self.store.tile_stored(case_id, idx, x, y, *tile_record(path))
                self.pipeline.tile(progress, x, y, None, path)  # read back when its turn comes
                self.book.received(progress)
            self.notify(Resumed(case_id, progress.tiles_received, ended))
            if ended:
                self.book.ended(case_id, lambda: None)  # its CASE_END is in the store already
                self.pipeline.end(progress)
                out.ended.append((case_id, progress.tiles_received))
            else:
                out.reopened.append((info, [i for i, _x, _y, _p in self.spool.stored_tiles(case_id)]))
            out.resumed.append(case_id)
        out.rebuilt = self.rebuild_lost_files()
        return out

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
            progress = self.book.opened(CaseProgress.of(info, ended=True, rebuild_files=True), current=False)
            self.pipeline.begin(progress)
            for _idx, x, y, path in tiles:
                self.pipeline.tile(progress, x, y, None, path)
                self.book.received(progress)
            self.pipeline.end(progress)
            rebuilt.append(case_id)
        return rebuilt

    def abandon_stale(self, timeout: float) -> list[str]:
        """Abandon the cases with no tile and no CASE_END for ``timeout`` seconds; returns their ids."""
        stale = self.book.abandon_stale(timeout, time.monotonic())
        for progress in stale:
            self.pipeline.abandon(progress)
        return [p.case_id for p in stale]

    def link_event(self, kind: str, detail: str) -> None:
        self.notify(LinkReported(kind, detail))


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
