"""The case pyramid as a DICOM whole-slide image series (appliance.dicom.wsi): OpenSlide opens it with the levels,
sizes and um/px of case.ome.tif; a 40x scan's subsampled JPEG tiles are its frames byte for byte; dicom3tools'
dciodvfy finds no error; the same case gives the same UIDs."""

from __future__ import annotations

import io
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.encaps import generate_frames

from appliance.config import load_settings
from appliance.errors import ConfigError
from appliance.dicom.wsi import DicomIdentity, jpeg_subsampled, passes_through, write_wsi
from appliance.offline.scans import upsampled
from appliance.pipeline.scanpyramid import ScanTile, scan_grid, write_scan_pyramid
from tests.cli import appliance
from tests.conftest import DEMO_CASE, MODEL_DIR

ROOT_UID = load_settings(None, data_dir=Path("var")).dicom_uid_root  # the setting's default: pydicom's root
WHEN = datetime(2026, 12, 8, 9, 30, 15)
IDENTITY = DicomIdentity("WSI-1", "ab" * 32, ROOT_UID, specimen_id="S-2026-7", accession="ACC-42", when=WHEN)


@pytest.fixture(scope="module")
def demo_pyramid(tmp_path_factory):
    """case.ome.tif of the demo case, as `appliance triage --out` writes it (4:4:4 JPEG at the model's 4 um/px)."""
    out = tmp_path_factory.mktemp("demo") / "case"
    ran = appliance("triage", DEMO_CASE, "--out", out, model=MODEL_DIR)
    assert ran.returncode == 0, ran.stderr
    return out / "case.ome.tif"


@pytest.fixture(scope="module")
def scan_pyramid(tmp_path_factory, demo_image):
    """case.ome.tif of a 2 x 2 tile 40x scan, its level 0 the scanner's 4:2:0 JPEG tiles."""
    root = tmp_path_factory.mktemp("scan")
    tiles = []
    for ty in range(2):
        for tx in range(2):
            px = upsampled(demo_image[400 + ty * 64:464 + ty * 64, 600 + tx * 64:664 + tx * 64], 16, seed=tx + 2 * ty)
            path = root / f"{tx}_{ty}.jpg"
            Image.fromarray(px).save(path, quality=80, subsampling=2)  # 4:2:0, as scanners send
            tiles.append(ScanTile(tx * 1024, ty * 1024, path))
    grid = scan_grid(tiles, 2048, 2048, 1024, 1024, 0, 0.25, lambda p: p.read_bytes())
    write_scan_pyramid(root / "case.ome.tif", grid, "SCAN-1")
    return root / "case.ome.tif"


def levels(path) -> tuple:
    s = openslide.OpenSlide(str(path))
    try:
        return s.level_count, s.level_dimensions, round(float(s.properties["openslide.mpp-x"]), 4)
    finally:
        s.close()


@pytest.mark.parametrize("which", ["demo_pyramid", "scan_pyramid"])
def test_openslide_opens_the_series_with_the_pyramid_s_levels_sizes_and_um_per_px(which, request, tmp_path):
    pyramid = request.getfixturevalue(which)
    files = write_wsi(pyramid, tmp_path / "dicom", IDENTITY)
    assert len(files) == len(tifffile.TiffFile(pyramid).pages)
    assert levels(files[0]) == levels(pyramid)
    for f in files:
        d = pydicom.dcmread(f, stop_before_pixels=True)
        assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6" and d.DimensionOrganizationType == "TILED_FULL"
        assert d.PhotometricInterpretation == "YBR_FULL_422" and d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert d.ContainerIdentifier == "S-2026-7" and d.AccessionNumber == "ACC-42"
        assert (d.StudyDate, d.StudyTime) == ("20261208", "093015")


def test_a_40x_scan_s_tiles_are_the_frames_byte_for_byte_and_4_4_4_levels_are_encoded_as_4_2_0(scan_pyramid, tmp_path):
    tiff = tifffile.TiffFile(scan_pyramid)
    through = [passes_through(p) for p in tiff.pages]
    assert through[0] and not all(through)  # the scanner's level passes; the pyramid's own 4:4:4 levels do not
    by_width = {pydicom.dcmread(f, stop_before_pixels=True).TotalPixelMatrixColumns: f
                for f in write_wsi(scan_pyramid, tmp_path, IDENTITY)}
    for page, passed in zip(tiff.pages, through):
        d = pydicom.dcmread(by_width[page.imagewidth])
        frames = list(generate_frames(d.PixelData, number_of_frames=d.NumberOfFrames))
        assert all(jpeg_subsampled(frame) for frame in frames)
        if passed:
            assert len(frames) == len(page.dataoffsets)
            for i, frame in enumerate(frames):
                tiff.filehandle.seek(page.dataoffsets[i])
                tile = tiff.filehandle.read(page.databytecounts[i])
                assert frame[: len(tile)] == tile and len(frame) - len(tile) in (0, 1)  # DICOM pads to even length
        else:  # encoded again (4:2:0, in the series' tile size): the same pixels within JPEG's loss
            got = np.asarray(Image.open(io.BytesIO(frames[0])).convert("RGB"), np.float32)
            h, w = min(d.Rows, page.imagelength), min(d.Columns, page.imagewidth)
            want = page.asarray()[:h, :w].astype(np.float32)
            assert np.abs(got[:h, :w] - want).mean() < 4


def test_the_same_case_gives_the_same_uids_and_another_model_other_ones(demo_pyramid, tmp_path):
    def uids(identity, folder):
        return [(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID, d.FrameOfReferenceUID)
                for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in write_wsi(demo_pyramid, folder, identity))]

    first, again = uids(IDENTITY, tmp_path / "a"), uids(IDENTITY, tmp_path / "b")
    other = uids(DicomIdentity("WSI-1", "cd" * 32, ROOT_UID), tmp_path / "c")
    assert first == again and all(u.startswith(ROOT_UID) for row in first for u in row)
    assert not {u for row in first for u in row} & {u for row in other for u in row}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools' dciodvfy (apt-get install dicom3tools)")
@pytest.mark.parametrize("which", ["demo_pyramid", "scan_pyramid"])
def test_dciodvfy_finds_no_error_in_any_instance(which, request, tmp_path):
    for f in write_wsi(request.getfixturevalue(which), tmp_path, IDENTITY):
        said = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        lines = (said.stdout + said.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], lines
        # what it warns of: the patient identity only a DICOMDIR needs, which the appliance is never sent
        assert {line.split(" - ")[-1] for line in lines if line.startswith("Warning")} <= {"Patient ID"}, lines


@pytest.mark.parametrize("root", ["1.2.3", "1.02.3.", "a.b.", "1.2.826.0.1.3680043.8.498.1234567."])
def test_a_uid_root_that_is_not_one_is_refused_in_one_sentence(root):
    with pytest.raises(ConfigError, match="is not a UID root: digits and dots, no leading zeros"):
        load_settings(None, data_dir=Path("var"), dicom_uid_root=root)
