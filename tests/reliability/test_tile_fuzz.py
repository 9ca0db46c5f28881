"""Tile decoding fuzz through the real daemon over a pty: cases that mix good tiles with tiles whose frame is
valid (CRC, message) but whose pixels are not: corrupt or foreign image bytes (a TIFF sent as PNG or JPEG,
random bytes), truncated payloads, the wrong size for the announced width and height, the wrong dtype or
number of channels. The host must refuse each bad tile with a BAD_TILE NACK that names the tile and says
what is wrong, the daemon must never die, and the case must hold exactly its good tiles, each intact.

Hypothesis draws the cases; a bounded number of examples runs in the normal suite, 2,000 with -m slow."""

import hashlib
import io
import itertools
import re
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from appliance.config import load_settings
from appliance.service.daemon import Daemon
from appliance.api.app import daemon_api
from appliance.offline.demo import case_info_for
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from firmware_bridge.pixels import TileEncoding, encode_pixels
from tests.conftest import DEMO_CASE, MODEL_DIR
from tests.ptys import open_pty

TILE = 50
LOSSLESS = [TileEncoding.RAW, TileEncoding.ZLIB, TileEncoding.PNG]


@dataclass(frozen=True)
class CraftedTile(TileToSend):
    """A tile whose TILE frame carries ``payload`` as is, under ``encoding`` (pixels only give w and h)."""

    payload: bytes = b""
    encoding: TileEncoding = TileEncoding.RAW
    kind: str = ""


class CraftingEmulator(ScannerEmulator):
    """The emulator with one seam for the test: a CraftedTile's payload goes on the wire unencoded, under its
    own encoding; good tiles are encoded by the emulator as usual (each under the encoding it names)."""

    def _encode(self, tile):
        if isinstance(tile, CraftedTile):
            self.encoding = tile.encoding
            return tile.payload
        self.encoding = getattr(tile, "wire_encoding", TileEncoding.RAW)
        return super()._encode(tile)


@dataclass(frozen=True)
class GoodTile(TileToSend):
    wire_encoding: TileEncoding = TileEncoding.RAW


def image_bytes(arr: np.ndarray, fmt: str, convert: str | None = None, **kw) -> bytes:
    """``arr`` saved as ``fmt`` (converted to the PIL mode ``convert`` first, if given)."""
    buf = io.BytesIO()
    if fmt == "TIFF":
        tifffile.imwrite(buf, arr)
    else:
        img = Image.fromarray(arr, **kw)
        (img.convert(convert) if convert else img).save(buf, format=fmt)
    return buf.getvalue()


def bad_payload(draw, pixels: np.ndarray) -> tuple[str, TileEncoding, bytes]:
    """(kind, encoding, payload): pixels that a correct host must refuse for a TILE x TILE RGB tile."""
    h, w = pixels.shape[:2]
    kind = draw(st.sampled_from(["garbage", "foreign", "truncated", "raw-size", "zlib-size", "image-size",
                                 "dtype-channels", "corrupt-header", "corrupt-zlib"]))
    if kind == "garbage":
        enc = draw(st.sampled_from([TileEncoding.PNG, TileEncoding.JPEG, TileEncoding.ZLIB]))
        data = draw(st.binary(max_size=300))
        return kind, enc, data
    if kind == "foreign":  # a whole, valid image of the right size, but not in the announced format
        enc, fmt = draw(st.sampled_from([(TileEncoding.PNG, "TIFF"), (TileEncoding.JPEG, "TIFF"),
                                         (TileEncoding.PNG, "JPEG"), (TileEncoding.JPEG, "PNG"),
                                         (TileEncoding.PNG, "BMP"), (TileEncoding.JPEG, "GIF")]))
        return kind, enc, image_bytes(pixels, fmt)
    if kind == "truncated":
        enc = draw(st.sampled_from([TileEncoding.PNG, TileEncoding.JPEG, TileEncoding.ZLIB, TileEncoding.RAW]))
        full = encode_pixels(pixels, enc)
        # a PNG cut inside the CRC of its IEND trailer (the last 4 bytes) still has every data chunk verified
        keep_max = len(full) - (5 if enc == TileEncoding.PNG else 1)
        return kind, enc, full[:draw(st.integers(0, keep_max))]
    if kind == "raw-size":
        n = w * h * 3
        size = draw(st.integers(0, n + 64).filter(lambda k: k != n))
        return kind, TileEncoding.RAW, bytes(np.resize(pixels.reshape(-1), size))
    if kind == "zlib-size":  # a valid zlib stream, of the wrong number of bytes
        n = w * h * 3
        size = draw(st.integers(0, 2 * n).filter(lambda k: k != n))
        return kind, TileEncoding.ZLIB, zlib.compress(bytes(np.resize(pixels.reshape(-1), size)))
    if kind == "image-size":
        enc = draw(st.sampled_from([TileEncoding.PNG, TileEncoding.JPEG]))
        dw, dh = draw(st.tuples(st.integers(-20, 20), st.integers(-20, 20)).filter(lambda d: d != (0, 0)))
        other = np.resize(pixels, (h + dh, w + dw, 3)).astype(np.uint8)
        return kind, enc, encode_pixels(other, enc)
    if kind == "dtype-channels":
        variant = draw(st.sampled_from(["png-L", "png-LA", "png-RGBA", "png-I16", "png-P", "png-1", "jpeg-L",
                                        "jpeg-CMYK", "raw-uint16", "raw-rgba", "zlib-uint16", "zlib-rgba"]))
        gray = pixels.mean(axis=2).astype(np.uint8)
        rgba = np.dstack([pixels, np.full((h, w), 255, np.uint8)])
        if variant == "png-L":
            return kind, TileEncoding.PNG, image_bytes(gray, "PNG")
        if variant == "png-LA":
            return kind, TileEncoding.PNG, image_bytes(gray, "PNG", convert="LA")
        if variant == "png-RGBA":
            return kind, TileEncoding.PNG, image_bytes(rgba, "PNG")
        if variant == "png-I16":
            return kind, TileEncoding.PNG, image_bytes(gray.astype(np.uint16) * 257, "PNG")
        if variant == "png-P":
            return kind, TileEncoding.PNG, image_bytes(pixels, "PNG", convert="P")
        if variant == "png-1":
            return kind, TileEncoding.PNG, image_bytes(gray, "PNG", convert="1")
        if variant == "jpeg-L":
            return kind, TileEncoding.JPEG, image_bytes(gray, "JPEG")
        if variant == "jpeg-CMYK":
            return kind, TileEncoding.JPEG, image_bytes(pixels, "JPEG", convert="CMYK")
        wide = pixels.astype(np.uint16) * 257 if variant.endswith("uint16") else rgba
        raw = np.ascontiguousarray(wide).tobytes()
        if variant.startswith("raw"):
            return kind, TileEncoding.RAW, raw
        return kind, TileEncoding.ZLIB, zlib.compress(raw)
    if kind == "corrupt-header":  # PNG signature or IHDR (covered by its CRC), JPEG SOI marker
        enc = draw(st.sampled_from([TileEncoding.PNG, TileEncoding.JPEG]))
        data = bytearray(encode_pixels(pixels, enc))
        pos = draw(st.sampled_from([*range(0, 8), *range(12, 33)]) if enc == TileEncoding.PNG
                   else st.integers(0, 1))
        data[pos] ^= draw(st.integers(1, 255))
        return kind, enc, bytes(data)
    # corrupt-zlib: bytes flipped anywhere in a zlib stream (header, deflate data or the Adler-32 check)
    data = bytearray(encode_pixels(pixels, TileEncoding.ZLIB))
    for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4, unique=True)):
        data[pos] ^= draw(st.integers(1, 255))
    # a flip in the padding bits after the last deflate block changes nothing: those pixels are intact
    try:
        assume(zlib.decompress(bytes(data)) != pixels.tobytes())
    except zlib.error:
        pass
    return kind, TileEncoding.ZLIB, bytes(data)


@st.composite
def mixed_case(draw, image: np.ndarray):
    """4-9 tiles in a grid over tissue; at least one good and one bad."""
    n = draw(st.integers(4, 9))
    oy, ox = draw(st.integers(400, 1400)), draw(st.integers(300, 1900))
    bad = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda b: any(b) and not all(b)))
    tiles = []
    for i in range(n):
        x, y = (i % 3) * TILE, (i // 3) * TILE
        pixels = np.ascontiguousarray(image[oy + y: oy + y + TILE, ox + x: ox + x + TILE])
        if bad[i]:
            kind, enc, payload = bad_payload(draw, pixels)
            tiles.append(CraftedTile(x, y, np.zeros_like(pixels), payload=payload, encoding=enc, kind=kind))
        else:
            tiles.append(GoodTile(x, y, pixels, wire_encoding=draw(st.sampled_from(LOSSLESS))))
    return tiles


# what each kind of refusal must say, besides naming the tile
REASONS = {
    "garbage": r"cannot be decoded|zlib payload is corrupt|zlib stream is truncated|inflates to|stray bytes",
    "foreign": r"cannot be decoded",
    "truncated": r"cannot be decoded|truncated|raw payload is \d+ bytes, expected",
    "raw-size": r"raw payload is \d+ bytes, expected 7500 for 50x50x3",
    "zlib-size": r"zlib payload inflates to (more than )?\d+ bytes|expected 7500",
    "image-size": r"is RGB \d+x\d+, expected RGB 50x50",
    "dtype-channels": r"is (L|LA|RGBA|I;16|I|P|1|CMYK) 50x50, expected RGB 50x50|raw payload is \d+ bytes, "
                      r"expected 7500|zlib payload inflates to more than 7500",
    "corrupt-header": r"cannot be decoded",
    "corrupt-zlib": r"zlib payload is corrupt|zlib stream is truncated|inflates to|stray bytes",
}


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("tilefuzz")
    with open_pty() as pty:
        settings_ = load_settings(None, data_dir=tmp / "var", model_dir=MODEL_DIR, api_port=0)
        daemon = Daemon(settings_, port=pty.path, notify=lambda event: None, api=daemon_api)
        daemon.start()
        stats = {"examples": 0, "bad": 0, "good": 0, "kinds": {}}
        try:
            yield daemon, pty.transport(timeout=0.05), stats
        finally:
            daemon.stop()
            print(f"\ntile fuzz: {stats['examples']} cases through the daemon, {stats['bad']} bad tiles refused, "
                  f"{stats['good']} good tiles stored; bad tiles by kind: {dict(sorted(stats['kinds'].items()))}; "
                  f"host bad_tiles counter {daemon.link.counters.bad_tiles if daemon.link else '?'}")


_ids = itertools.count()


def stream_and_check(fuzz_daemon, tiles) -> None:
    daemon, transport, stats = fuzz_daemon
    case_id = f"FZ-{next(_ids):05d}"
    info = case_info_for(case_id, "S-FZ", tiles, 4.0, TILE)
    result = CraftingEmulator(transport, info, tiles, ack_timeout=5.0, heartbeat_interval=0).run()
    bad = {i for i, t in enumerate(tiles) if isinstance(t, CraftedTile)}
    good = [i for i in range(len(tiles)) if i not in bad]
    # every bad tile was refused with BAD_TILE, naming the tile and saying what is wrong; no good one was
    assert set(result.rejected) == bad, (result.rejected, bad)
    for i in bad:
        reason = result.rejected[i]
        assert reason.startswith(f"BAD_TILE: tile {i}: "), reason
        assert re.search(REASONS[tiles[i].kind], reason), (tiles[i].kind, reason)
    assert sorted(result.acked) == good
    # the daemon lives on and the case finished with exactly its good tiles, each bit-identical
    progress = daemon.wait_case(case_id, timeout=60)
    assert progress is not None and progress.done.is_set()
    ok, why = daemon.health()
    assert ok, why
    assert daemon.link.running
    case = daemon.store.get_case(case_id)
    assert case["status"] in ("done", "cannot-call") and case["tiles_received"] == len(good), case
    rows = {r["idx"]: r["sha256"] for r in daemon.store.tiles(case_id)}
    assert sorted(rows) == good
    spool = daemon.settings.spool_dir / case_id
    assert len(list(spool.glob("tile-*.npy"))) == len(good)
    for i in good:
        t = tiles[i]
        sent = hashlib.sha256(t.pixels.tobytes()).hexdigest()
        stored = np.load(spool / f"tile-{i:06d}_x{t.x}_y{t.y}.npy", allow_pickle=False)
        assert rows[i] == sent == hashlib.sha256(stored.tobytes()).hexdigest()
    stats["examples"] += 1
    stats["bad"] += len(bad)
    stats["good"] += len(good)
    for i in bad:
        stats["kinds"][tiles[i].kind] = stats["kinds"].get(tiles[i].kind, 0) + 1


IMAGE: list[np.ndarray] = []


def image() -> np.ndarray:
    """The demo case, read once."""
    if not IMAGE:
        IMAGE.append(tifffile.imread(DEMO_CASE))
    return IMAGE[0]


FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@settings(max_examples=30, **FUZZ)
@given(data=st.data())
def test_bad_tiles_are_refused_and_good_ones_kept(fuzz_daemon, data):
    stream_and_check(fuzz_daemon, data.draw(mixed_case(image())))


@pytest.mark.slow
@settings(max_examples=2000, **FUZZ)
@given(data=st.data())
def test_bad_tiles_are_refused_and_good_ones_kept_2000_cases(fuzz_daemon, data):
    stream_and_check(fuzz_daemon, data.draw(mixed_case(image())))
