"""The pipeline worker's queue when inference falls behind: tiles beyond MAX_TILES_IN_RAM wait in the spool
(queued by path, read back in turn), the ACK path never blocks, and the call is the same as all in RAM."""

import threading

import numpy as np

from appliance.offline.sources import tiles_from_image
from appliance.service.cases import CaseProgress
from appliance.service.worker import MAX_TILES_IN_RAM, PipelineWorker
from appliance.store.spool import TileSpool
from tests.results import reference_call
from tests.stores import open_store


def test_a_backlog_waits_in_the_spool_not_in_ram_and_gives_the_same_call(ov_engine, demo_image, tmp_path):
    tiles = list(tiles_from_image(demo_image, 200))
    assert len(tiles) > MAX_TILES_IN_RAM + 10  # the case must overflow the queue's RAM budget

    expected = reference_call(ov_engine, tiles, width=demo_image.shape[1], height=demo_image.shape[0])

    store = open_store(tmp_path / "appliance.db")
    spool = TileSpool(tmp_path / "spool")
    events: list[tuple[str, dict]] = []
    worker = PipelineWorker(ov_engine, store, 128, lambda event: events.append((event.kind, event.data())), tmp_path / "cases")
    progress = CaseProgress("Q-1", "S-1", len(tiles))
    try:
        store.case_started("Q-1", specimen_id="S-1")
        spool.begin_case("Q-1", {})
        worker.begin(progress)
        for i, t in enumerate(tiles):  # the worker is not started yet: inference is as far behind as it gets
            path, _sha = spool.store_tile("Q-1", i, t.x, t.y, t.pixels)
            worker.tile(progress, t.x, t.y, np.ascontiguousarray(t.pixels), path)
        assert worker.tiles_in_ram == MAX_TILES_IN_RAM  # the rest are queued by their spool path
        worker.end(progress)
        store.case_processing("Q-1")
        worker.start()
        assert progress.done.wait(300) and progress.outputs_done.wait(300)
        assert worker.tiles_in_ram == 0
    finally:
        worker.stop()
        store.close()
    result = progress.result
    assert result is not None and progress.tiles_processed == len(tiles)
    assert (result.verdict, result.score, result.early_positive_after_tiles) == (
        expected.verdict, expected.score, expected.early_positive_after_tiles)
    assert [(p.x, p.y, p.probability) for p in result.patches] == [
        (p.x, p.y, p.probability) for p in expected.patches]
    assert not [e for e in events if e[0] in ("error", "failed")]


def test_a_spooled_tile_that_cannot_be_read_back_is_reported_and_the_case_goes_on(ov_engine, demo_image, tmp_path):
    tiles = list(tiles_from_image(demo_image, 200))[:MAX_TILES_IN_RAM + 3]
    store = open_store(tmp_path / "appliance.db")
    spool = TileSpool(tmp_path / "spool")
    events: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def notify(event):
        with lock:
            events.append((event.kind, event.data()))

    worker = PipelineWorker(ov_engine, store, 128, notify, tmp_path / "cases")
    progress = CaseProgress("Q-2", "S-2", len(tiles))
    try:
        store.case_started("Q-2", specimen_id="S-2")
        spool.begin_case("Q-2", {})
        worker.begin(progress)
        paths = []
        for i, t in enumerate(tiles):
            path, _sha = spool.store_tile("Q-2", i, t.x, t.y, t.pixels)
            paths.append(path)
            worker.tile(progress, t.x, t.y, np.ascontiguousarray(t.pixels), path)
        paths[-1].write_bytes(b"\x93NUMPY truncated")  # the disk gave back garbage for a queued-by-path tile
        worker.end(progress)
        worker.start()
        assert progress.done.wait(300)
    finally:
        worker.stop()
        store.close()
    errors = [d["message"] for k, d in events if k == "error"]
    assert len(errors) == 1 and str(paths[-1]) in errors[0] and "could not be read back" in errors[0]
    assert progress.result is not None and progress.tiles_processed == len(tiles) - 1
