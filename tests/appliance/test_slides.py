"""Slide files in (appliance/offline/slides.py): real third-party fixtures in SVS, DICOM WSI and generic tiled
TIFF, and an Aperio-style pyramid written here from the bundled real case, read back through OpenSlide."""

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import tifffile
from PIL import Image

from appliance.offline.slides import Slide, is_slide, pick_level
from appliance.offline.triage import triage_path
from appliance.pipeline.heatmap import ring_area
from tests.conftest import DEMO_CASE, MODEL_DIR, FIXTURES as ALL_FIXTURES
from tests.ptys import open_pty
from tests.cli import appliance

FIXTURES = ALL_FIXTURES / "wsi"  # third-party files in real slide formats (tests/fixtures/README.md)
CLI = [sys.executable, "-m", "appliance.cli"]


def run_cli(*args):
    return appliance(*args)


@pytest.mark.parametrize("name, vendor", [("small.svs", "aperio"), ("boxes_0.dcm", "dicom")])
def test_tiny_real_slides_open_with_their_resolution_and_give_a_cannot_call(name, vendor, tmp_path):
    out = tmp_path / "r.json"
    run = run_cli("triage", FIXTURES / name, "--json", out)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    result = json.loads(out.read_text())
    assert result["slide"] == {"reader": "openslide", "vendor": vendor, "width": 16, "height": 16,
                               "microns_per_pixel": 0.499, "mpp_source": "slide", "level": 0, "downsample": 1.0,
                               "level_microns_per_pixel": 0.499}
    assert result["verdict"] == "cannot-call" and [r["code"] for r in result["reasons"]] == ["no-tissue"]


def test_a_generic_tiff_without_a_real_resolution_needs_mpp_and_its_level_0_is_the_png(tmp_path):
    boxes = FIXTURES / "boxes.tiff"
    assert is_slide(boxes)  # four levels: a pyramid
    run = run_cli("triage", boxes, "--json", tmp_path / "r.json", "--out", tmp_path / "out")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"Error: {boxes}: the slide states 352.778 µm/px, which is no microscope resolution (a TIFF's default "
        f"72 dpi reads as 352.8); give the real one with --mpp"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()  # nothing written

    with Slide(boxes, target_mpp=0.5, mpp=0.5) as slide:
        assert (slide.level, slide.width, slide.height) == (0, 300, 250)
        png = np.asarray(Image.open(FIXTURES / "boxes.png").convert("RGB"))
        assert np.array_equal(slide.read(0, 0, 300, 250), png)
    with Slide(boxes, target_mpp=4.0, mpp=0.5) as slide:  # levels at 0.5, 1, 2 and ~4 um/px (37 x 31 px)
        assert (slide.level, slide.level_width, slide.level_height) == (3, 37, 31)
        assert slide.info.level_microns_per_pixel == pytest.approx(4.04, abs=0.01)


def test_a_damaged_slide_is_one_sentence_and_nothing_is_written(tmp_path):
    data = (FIXTURES / "small.svs").read_bytes()  # 2,651 bytes; its one JPEG tile starts before byte 1,200
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[:1000])  # the copy stopped part way
    flipped = tmp_path / "flipped.svs"
    flipped.write_bytes(data[:1200] + bytes(b ^ 0xFF for b in data[1200:1350]) + data[1350:])  # bad tile bytes
    junk = tmp_path / "notes.ndpi"
    junk.write_text("not a slide at all")
    for bad, says in ((cut, "not a slide OpenSlide can read, an unknown format or a damaged file"),
                      (junk, "not a slide OpenSlide can read, an unknown format or a damaged file"),
                      (flipped, "cannot read the region at level 0 (0, 0, 16 x 16): Corrupt JPEG data")):
        out = tmp_path / f"out-{bad.stem}"
        run = run_cli("triage", bad, "--out", out, "--json", tmp_path / f"{bad.stem}.json")
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        (line,) = [x for x in run.stderr.strip().splitlines() if x.startswith("Error:")]
        assert line.startswith(f"Error: {bad}: {says}"), line
        assert not out.exists() and not (tmp_path / f"{bad.stem}.json").exists()  # nothing written


def test_the_level_nearest_the_model_is_read_and_positions_come_back_in_level_0(ov_engine, tmp_path):
    """The bundled case at 2 um/px (level 0, each pixel doubled) over itself at 4 um/px (level 1), as an
    Aperio SVS: the appliance reads level 1, the model's resolution, tissue tiles only, and reports every
    patch in level-0 pixels, twice the positions the same pixels get as a plain image."""
    image = tifffile.imread(DEMO_CASE)
    svs = tmp_path / "case.svs"
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    with tifffile.TiffWriter(svs) as tw:
        tw.write(big, tile=(256, 256), compression="jpeg", compressionargs={"level": 95}, photometric="rgb",
                 metadata=None, description=f"Aperio Image Library v12.0.0\n{big.shape[1]}x{big.shape[0]} "
                                            f"(256x256) JPEG Q=95|AppMag = 5|MPP = 2.0")
        tw.write(image, tile=(256, 256), compression="zlib", photometric="rgb", metadata=None,
                 description="Aperio Image Library v12.0.0\nlevel 1")
    plain = triage_path(ov_engine, DEMO_CASE, tile_size=200, out_dir=tmp_path / "plain")
    got = triage_path(ov_engine, svs, tile_size=200, out_dir=tmp_path / "out", geojson_tiles=True)
    assert got["slide"]["vendor"] == "aperio" and got["slide"]["microns_per_pixel"] == 2.0
    assert (got["slide"]["level"], got["slide"]["downsample"], got["slide"]["level_microns_per_pixel"]) == (1, 2.0, 4.0)
    assert got["tiles"] < plain["tiles"] == 130  # background tiles are never read
    assert got["verdict"] == plain["verdict"] == "suspicious"
    assert got["score"] == pytest.approx(plain["score"], abs=0.01)
    doubled = {(p["x"] * 2, p["y"] * 2, p["w"] * 2): p["probability"] for p in plain["patches"]}
    same = [p for p in got["patches"] if doubled.get((p["x"], p["y"], p["w"])) == p["probability"]]
    assert len(same) >= 0.95 * len(plain["patches"])  # the same patches, now in the slide's level-0 pixels
    assert [(p["x"], p["y"]) for p in got["top_patches"]] == [(p["x"] * 2, p["y"] * 2) for p in plain["top_patches"]]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["slide"] == got["slide"] and summary["patches"] == got["patches"]
    # the regions are drawn over the slide itself: its level-0 pixels, twice the plain image's
    slide_geo = json.loads((tmp_path / "out" / "regions.geojson").read_text())
    plain_geo = json.loads((tmp_path / "plain" / "regions.geojson").read_text())
    assert slide_geo["properties"]["units"] == "level-0 pixels of case.svs"
    assert plain_geo["properties"]["units"] == "pixels of case.ome.tif"

    def box(geo):
        pts = np.array([xy for f in geo["features"] if f["properties"]["objectType"] == "annotation"
                        for ring in f["geometry"]["coordinates"] for xy in ring])
        return pts.min(axis=0), pts.max(axis=0)

    # --geojson-tiles: every scored patch as a QuPath tile, over the same level-0 box as in the summary
    tiles = [f for f in slide_geo["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == len(got["patches"])
    assert not [f for f in plain_geo["features"] if f["properties"]["objectType"] == "tile"]
    by_box = {(p["x"], p["y"], p["x"] + p["w"], p["y"] + p["h"]): p for p in got["patches"]}
    for f in tiles:
        assert_qupath_tile(f)
        (xs, ys) = zip(*f["geometry"]["coordinates"][0])
        p = by_box[(min(xs), min(ys), max(xs), max(ys))]
        m = f["properties"]["measurements"]
        assert m["probability"] == pytest.approx(p["probability"], abs=1e-4)  # 4 decimals in the file
        assert m.get("first_stage") == (None if p.get("first_stage") is None else pytest.approx(p["first_stage"], abs=1e-4))

    assert slide_geo["features"] and plain_geo["features"]
    (slo, shi), (plo, phi) = box(slide_geo), box(plain_geo)
    assert np.all(np.abs(slo - 2 * plo) <= 100) and np.all(np.abs(shi - 2 * phi) <= 100)  # within one cell
    assert shi[0] <= 5000 and shi[1] <= 4000


def assert_qupath_tile(f: dict) -> None:
    """A tile object as WSInfer writes them for QuPath: locked, a closed box, numbers under measurements."""
    assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
    assert str(uuid.UUID(f["id"])) == f["id"]
    assert set(f["properties"]) == {"objectType", "isLocked", "measurements"}
    assert f["properties"]["objectType"] == "tile" and f["properties"]["isLocked"] is True
    (ring,) = f["geometry"]["coordinates"]
    assert len(ring) == 5 and ring[0] == ring[-1]
    assert ring_area(ring) > 0  # counter-clockwise as numbers, like the region exteriors
    assert all(isinstance(v, float) for v in f["properties"]["measurements"].values())


def test_pick_level_never_upsamples():
    assert pick_level([0.25, 1.0, 4.0, 16.0], 4.0) == 2
    assert pick_level([0.25, 1.0, 4.3, 16.0], 4.0) == 2  # within 10 %: fine enough
    assert pick_level([0.25, 1.0, 4.5, 16.0], 4.0) == 1  # coarser than the model: read the finer level
    assert pick_level([8.0, 16.0], 4.0) == 0  # nothing fine enough: the finest there is


@contextmanager
def _null_modem() -> Iterator[tuple[str, str]]:
    """Two ptys joined master to master (a null-modem cable): two device paths a host and a scanner
    process can each open. Yields (host path, scanner path)."""
    import select
    import threading

    with open_pty(raw=True) as a, open_pty(raw=True) as b:
        stop = threading.Event()

        def relay() -> None:
            while not stop.is_set():
                ready, _, _ = select.select([a.master, b.master], [], [], 0.1)
                for fd in ready:
                    try:
                        data = os.read(fd, 65536)
                        os.write(b.master if fd == a.master else a.master, data)
                    except OSError:
                        return

        relaying = threading.Thread(target=relay, name="null-modem", daemon=True)
        relaying.start()
        try:
            yield a.path, b.path
        finally:
            stop.set()  # before the ptys close, so the relay never selects on a closed (or reused) descriptor
            relaying.join(5)


def test_emulate_streams_a_slide_file_at_the_models_level(settings, tmp_path):
    """`appliance emulate --port PORT case.svs` as a separate process, into the real daemon over ptys: the
    scanner sends level 1 (4 um/px), tissue tiles only, announced at that resolution; the daemon calls it."""
    from appliance.service.daemon import Daemon
    from appliance.api.app import daemon_api

    image = tifffile.imread(DEMO_CASE)
    svs = tmp_path / "case.svs"
    with tifffile.TiffWriter(svs) as tw:
        tw.write(np.repeat(np.repeat(image, 2, axis=0), 2, axis=1), tile=(256, 256), compression="jpeg",
                 photometric="rgb", metadata=None, description="Aperio Image Library v12.0.0\n|MPP = 2.0")
        tw.write(image, tile=(256, 256), compression="zlib", photometric="rgb", metadata=None,
                 description="Aperio Image Library v12.0.0\nlevel 1")
    with _null_modem() as (host, scanner):
        daemon = Daemon(settings, port=host, api=daemon_api)
        try:
            daemon.start()
            run = subprocess.run([*CLI, "emulate", "--port", scanner, str(svs), "--case-id", "EMU-SVS"],
                                 capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            assert run.returncode == 0, run.stderr
            progress = daemon.wait_case("EMU-SVS", 120)
            assert progress is not None and progress.result is not None
            assert progress.info.microns_per_pixel == 4.0 and progress.info.image_width == 2500
            assert progress.result.verdict == "suspicious" and progress.result.tiles == progress.tiles_received < 130
            assert daemon.store.get_case("EMU-SVS")["status"] == "done"
        finally:
            daemon.stop()


def test_a_40000_px_slide_of_real_tissue_is_triaged_in_bounded_memory(demo_image, tmp_path):
    """Done-means of issue 17: a >= 40,000 x 30,000 px SVS of real tissue (the bundled case, each pixel repeated
    16 x 16, at 0.25 um/px with levels at 1 and 4 um/px), triaged by `appliance triage` in its own process:
    peak RSS under 1 GiB, the call of the case, positions in the slide's level-0 pixels."""
    from appliance.offline.slides import write_svs

    svs = tmp_path / "big.svs"
    assert write_svs(svs, demo_image, upsample=16, mpp=0.25) == (40000, 32000)
    out = tmp_path / "r.json"
    # the child's peak is its own VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of
    # the pytest process (itself near 1 GB late in the suite) reported the parent's memory as its own
    child = ("import sys\nfrom appliance.commands.main import main\n"
             f"sys.argv = ['appliance', 'triage', {str(svs)!r}, '--json', {str(out)!r}]\n"
             "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
             "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
             "print('MAXRSS_KB', hwm, 'EXIT', code)\n")
    # its own environment and data folder, so nothing earlier tests set changes what is measured
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "OMP_NUM_THREADS",
                                                         "OPENBLAS_NUM_THREADS")}
    env.update(APPLIANCE_DATA_DIR=str(tmp_path / "var"), APPLIANCE_MODEL_DIR=str(MODEL_DIR))
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL, env=env)
    last = run.stdout.strip().splitlines()[-1].split()
    assert last[0] == "MAXRSS_KB" and last[3] == "0", run.stdout + run.stderr
    assert int(last[1]) < 1024 * 1024, f"peak RSS {int(last[1]) // 1024} MB"
    result = json.loads(out.read_text())
    assert result["slide"]["width"] == 40000 and result["slide"]["level"] == 2 and result["verdict"] == "suspicious"
    xs = [p["x"] + p["w"] for p in result["patches"]]
    assert max(xs) <= 40000 and max(xs) > 2500 * 8  # level-0 pixels, not the level read
