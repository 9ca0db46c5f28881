"""The case pyramid (case.ome.tif) as a DICOM VL Whole Slide Microscopy Image series (Supplement 145): one
TILED_FULL instance per level, built by wsidicom/wsidicomizer.

A level whose tiles are baseline JPEG with chroma subsampling (a 40x scan's tiles as the scanner sent them, and
the levels made from them) is passed through: each DICOM frame is the TIFF tile's bytes (padded to an even
length, as DICOM requires). A level of 4:4:4 JPEG tiles (the model-resolution mosaic) is encoded again as 4:2:0:
the WSI IOD allows baseline JPEG only as YBR_FULL_422, and OpenSlide reads no other. UIDs are derived from the
case id, the model's sha256 and the role, under the UID root in force, so writing the same case again gives the
same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import tifffile
from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid
from wsidicom import WsiDicom
from wsidicom.codec import Encoder, JpegSettings
from wsidicom.codec.settings import Subsampling
from wsidicom.metadata import Equipment, Series, Slide, Study
from wsidicom.metadata.uid_generator import UidGenerator
from wsidicomizer.metadata import WsiDicomizerMetadata
from wsidicomizer.sources.tiffslide.tiffslide_image_data import TiffSlideLevelImageData
from wsidicomizer.sources.tiffslide.tiffslide_source import TiffSlideSource

from appliance import __version__
from appliance.errors import InputError
from appliance.pipeline.scanpyramid import jpeg_layout

__all__ = ["DicomIdentity", "write_wsi"]

REENCODE_QUALITY = 90  # as the pyramid's own JPEG tiles


@dataclass(frozen=True)
class DicomIdentity:
    """Who and what the objects are about: the case, the model that called it, the UID root (the setting
    dicom_uid_root), the lab's specimen id and accession when known, and when the case was scanned (the study's
    date and time; fixed by the case, so that a resend is the same object)."""

    case_id: str
    model_sha256: str
    uid_root: str
    specimen_id: str = ""
    accession: str = ""
    when: datetime | None = None

    def uid(self, *role: object) -> UID:
        """The UID of ``role`` for this case and model: the same inputs give the same UID."""
        return generate_uid(prefix=self.uid_root, entropy_srcs=[self.case_id, self.model_sha256, *map(str, role)])


def jpeg_subsampled(jpeg: bytes) -> bool:
    """True when a JPEG's chroma is sampled more coarsely than its luma (4:2:2, 4:2:0 and the like)."""
    return jpeg_layout(jpeg)[1] not in (None, (1, 1))


class _PassedThrough(TiffSlideLevelImageData):
    """A level whose subsampled JPEG tiles become the DICOM frames as they are."""

    def __init__(self, tiff: tifffile.TiffFile, level: int, *args):
        super().__init__(*args)
        self._page = tiff.pages[level]
        self._file = tiff.filehandle
        self._across = -(-self._page.imagewidth // self._page.tilewidth)

    @property
    def transfer_syntax(self) -> UID:
        return JPEGBaseline8Bit

    @property
    def photometric_interpretation(self) -> str:
        return "YBR_FULL_422"

    @property
    def transcoder(self) -> Encoder | None:
        return None

    def get_encoded_tile(self, tile, z: float, path: str) -> bytes:
        i = tile.y * self._across + tile.x
        self._file.seek(self._page.dataoffsets[i])
        return self._file.read(self._page.databytecounts[i])


def passes_through(page: tifffile.TiffPage) -> bool:
    """A level can be passed through: tiled baseline JPEG, each tile a whole JPEG (no shared tables), subsampled."""
    if not page.is_tiled or page.compression != tifffile.COMPRESSION.JPEG or page.jpegtables is not None:
        return False
    fh = page.parent.filehandle
    fh.seek(page.dataoffsets[0])
    return jpeg_subsampled(fh.read(page.databytecounts[0]))


class _CasePyramid(TiffSlideSource):
    """The case pyramid through tiffslide, its subsampled JPEG levels passed through."""

    def __init__(self, path: Path, encoder: Encoder, tile_size: int, metadata: WsiDicomizerMetadata,
                 uids: UidGenerator):
        self._tiff = tifffile.TiffFile(path)
        # one tile size for the series (the base level's): a level tiled otherwise is encoded again
        self._through = [passes_through(p) and (p.tilewidth, p.tilelength) == (tile_size, tile_size)
                         for p in self._tiff.pages]
        super().__init__(path, encoder, tile_size=tile_size, metadata=metadata, include_confidential=True,
                         uid_generator=uids)

    def _create_level_image_data(self, level_index: int):
        if not self._through[level_index]:
            return super()._create_level_image_data(level_index)
        return _PassedThrough(self._tiff, level_index, self._tiffslide, self._blank_color, self._base_level_offset,
                              self._base_level_size, self.metadata.pyramid.image, level_index, self._tile_size,
                              self._encoder)

    def close(self) -> None:
        super().close()
        self._tiff.close()


class _Uids(UidGenerator):
    """Every UID from the case identity and its role (an instance's from its level's size)."""

    def __init__(self, identity: DicomIdentity):
        self.identity = identity

    def study_uid(self, study) -> UID:
        return self.identity.uid("study")

    def series_uid(self, series) -> UID:
        return self.identity.uid("series", "wsi")

    def frame_of_reference_uid(self, metadata) -> UID:
        return self.identity.uid("frame-of-reference")

    def dimension_organization_uid(self, metadata) -> UID:
        return self.identity.uid("dimension-organization")

    def sample_uid(self, sample) -> UID:
        return self.identity.uid("specimen")

    def pyramid_uid(self, pyramid) -> UID:
        return self.identity.uid("pyramid")

    def sop_uid(self, dataset: Dataset) -> UID:
        return self.identity.uid("wsi", dataset.TotalPixelMatrixColumns, dataset.TotalPixelMatrixRows,
                                 *dataset.ImageType)

    def annotation_group_uid(self) -> UID:
        return self.identity.uid("annotation-group")


def write_wsi(pyramid: Path, out_dir: Path, identity: DicomIdentity) -> list[Path]:
    """The DICOM WSI series of ``pyramid`` (a case.ome.tif) into ``out_dir``, one file per level; their paths."""
    with tifffile.TiffFile(pyramid) as tiff:
        tile = tiff.pages[0].tilewidth
        if not tile or tiff.pages[0].tilelength != tile:
            raise InputError(f"{pyramid} is not a pyramid of square tiles")
    uids = _Uids(identity)
    when = identity.when
    study = Study(uid=identity.uid("study"), identifier=identity.case_id[:16],
                  date=when.date() if when else None, time=when.time().replace(microsecond=0) if when else None, accession_number=identity.accession[:16] or None,
                  description="Bench triage case (research and triage use, not for diagnosis)")
    metadata = WsiDicomizerMetadata(
        study=study, series=Series(uid=identity.uid("series", "wsi"), number=1, description="Case pyramid"),
        frame_of_reference_uid=identity.uid("frame-of-reference"),
        dimension_organization_uids=[identity.uid("dimension-organization")],
        equipment=Equipment(manufacturer="Bench triage appliance", model_name="bench triage appliance",
                            software_versions=[__version__]),
        slide=Slide(identifier=identity.specimen_id or identity.case_id))
    encoder = Encoder.create_for_settings(JpegSettings(quality=REENCODE_QUALITY, subsampling=Subsampling.R420))
    out_dir.mkdir(parents=True, exist_ok=True)
    source = _CasePyramid(pyramid, encoder, tile, metadata, uids)
    with WsiDicom(source) as wsi:
        files = wsi.save(out_dir, uid_generator=uids, include_labels=False, include_overviews=False,
                         include_thumbnails=False, workers=1)
    return sorted(Path(f) for f in files)
