"""The browser viewer's speed (issue 28), in one run:

  (a) a deep-zoom tile (OpenSlide DeepZoomGenerator -> JPEG, the viewer's own code: appliance.api.deepzoom)
      from case.ome.tif of the bundled demo case called by the shipped model, and from an Aperio SVS of
      real tissue (the demo case tiled 4x4 and upsampled 4x: 40,000 x 32,000 px, written as bench/slide.py
      writes it; or --svs PATH): every tile of the top four levels of the case pyramid, and 400 of the SVS's
      (random addresses over its top four levels), in a shuffled order, p50/p95/max, the first open counted;
  (b) the case page usable: Debian's headless Chromium (selenium) opens the case page, logged in; the time
      from asking for the page to its first deep-zoom tile drawn (performance.now() at OpenSeadragon's
      first tile-loaded), median of --loads fresh loads;
  (c) the class-activation maps of the top patches (what the pipeline computes once a case ends: top-k of
      the model's decision rule) against OpenVINO INT8 inference of R1 (1,197 tiles of 450 px cut into all
      their 96,957 patches, an upper bound on the patches R1's pipeline scores), both measured here: the ratio.

    python bench/viewer.py [--json bench/results/viewer.json] [--svs PATH] [--loads 5]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "idc-resnet"
DEMO = ROOT / "appliance" / "offline" / "demo_case" / "idc-10253.tif"
DATA = ROOT.parent / "shared" / "data" / "idc_breast_histopathology"
PASSWORD = "bench password 0123"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def tile_latencies(path: Path, seed: int = 0, most: int = 400) -> dict:
    """Tiles of the top levels (down to 1/8 of full size), at most ``most`` of them, shuffled, from a fresh
    DeepZoom."""
    from appliance.api.deepzoom import DeepZoom

    dz = DeepZoom()
    t0 = time.perf_counter()
    gen = dz._generator(path)[1]
    open_ms = (time.perf_counter() - t0) * 1e3
    top = gen.level_count - 1
    addresses = [(lv, c, r) for lv in range(max(0, top - 3), top + 1)
                 for c in range(gen.level_tiles[lv][0]) for r in range(gen.level_tiles[lv][1])]
    random.Random(seed).shuffle(addresses)
    addresses = addresses[:most]
    ms = []
    for lv, c, r in addresses:
        t = time.perf_counter()
        dz.tile(path, lv, c, r)
        ms.append((time.perf_counter() - t) * 1e3)
    return {"file": path.name, "size": list(gen.level_dimensions[-1]), "tiles": len(ms), "open_ms": round(open_ms, 1),
            "p50_ms": round(pct(ms, 50), 2), "p95_ms": round(pct(ms, 95), 2), "max_ms": round(max(ms), 2)}


def called_case(engine, data: Path) -> tuple:
    """The demo case called as the daemon calls it, its files written; returns (settings, store)."""
    import tifffile

    from appliance.config import load_settings
    from appliance.pipeline import TriageSession
    from appliance.store import CaseStore

    settings = load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0)
    store = CaseStore(settings.db_path)
    image = tifffile.imread(DEMO)
    store.case_started("BENCH-1", specimen_id="S", model=engine.model_ref)
    session = TriageSession(engine, scanner_mpp=4.0, width=image.shape[1], height=image.shape[0])
    for y in range(0, image.shape[0], 200):
        for x in range(0, image.shape[1], 200):
            session.add_tile(x, y, np.ascontiguousarray(image[y:y + 200, x:x + 200]))
    result = session.finish()
    store.case_finished("BENCH-1", result)
    session.write_outputs(settings.cases_dir / "BENCH-1", "BENCH-1", result.summary("bench"))
    session.close()
    return settings, store, result


def page_loads(settings, store, loads: int) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from appliance.api.app import ApiServer, create_app
    from appliance.api.logins import hash_password

    store.set_user("bench", hash_password(PASSWORD), by="bench")
    server = ApiServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
    try:
        driver.get(f"{url}/viewer/login")
        driver.find_element(By.ID, "name").send_keys("bench")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "cases"))
        ms = []
        for _ in range(loads):
            driver.execute_cdp_cmd("Network.clearBrowserCache", {})
            driver.get(f"{url}/viewer/cases/BENCH-1")
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.review && window.review.firstTileMs"))
            ms.append(driver.execute_script("return window.review.firstTileMs"))
    finally:
        driver.quit()
        server.stop()
    return {"loads": loads, "first_tile_p50_ms": round(statistics.median(ms), 1), "first_tile_max_ms": round(max(ms), 1),
            "all_ms": [round(m, 1) for m in ms]}


def cam_vs_r1(engine, crops: np.ndarray, repeats: int = 7) -> dict:
    from r1 import r1_tiles  # bench/r1.py: R1's tiles, built once from the complete slides

    folder = r1_tiles(DATA)
    tiles = [np.load(p) for p in sorted(folder.glob("r1_*.npy"))]
    patches = np.concatenate([t.reshape(9, 50, 9, 50, 3).swapaxes(1, 2).reshape(81, 50, 50, 3) for t in tiles])
    engine.infer(patches[:4096])  # warm
    t0 = time.perf_counter()
    for i in range(0, len(patches), 4096):
        engine.infer(patches[i:i + 4096])
    r1_s = time.perf_counter() - t0
    engine.cam(crops)  # warm
    cam_ms = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.cam(crops)
        cam_ms.append((time.perf_counter() - t) * 1e3)
    cam = statistics.median(cam_ms)
    return {"top_k": len(crops), "cam_ms_median": round(cam, 2), "r1_patches": len(patches),
            "r1_inference_s": round(r1_s, 2), "cam_share_of_r1_inference": round(cam / 1e3 / r1_s, 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--svs", type=Path, default=None, help="an SVS to read (default: one made from the demo case)")
    ap.add_argument("--loads", type=int, default=5)
    args = ap.parse_args()

    from PIL import Image

    from appliance.api.deepzoom import DeepZoom
    from appliance.model.engine import load_engine

    engine = load_engine(MODEL_DIR, "openvino")
    with tempfile.TemporaryDirectory() as tmp:
        settings, store, result = called_case(engine, Path(tmp) / "var")
        case_ome = settings.cases_dir / "BENCH-1" / "case.ome.tif"
        svs = args.svs
        if svs is None:
            import tifffile

            from appliance.offline.slides import write_svs

            svs = Path(tmp) / "demo-40k.svs"
            write_svs(svs, np.tile(tifffile.imread(DEMO), (4, 4, 1)), upsample=4, mpp=0.25, downsamples=(1, 4, 16))
        tiles = [tile_latencies(case_ome), tile_latencies(svs)]
        page = page_loads(settings, store, args.loads)
        top = json.loads((settings.cases_dir / "BENCH-1" / "top_patches.json").read_text())["patches"]
        dz = DeepZoom()
        crops = np.stack([np.asarray(Image.open(io.BytesIO(dz.region_png(case_ome, p["x"], p["y"], p["w"], p["h"]))))
                          for p in top])
        cams = cam_vs_r1(engine, crops)
        store.close()

    print(f"\n{'deep-zoom tiles from':<22} {'size':>13} {'tiles':>6} {'open ms':>8} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7}")
    for t in tiles:
        print(f"{t['file']:<22} {t['size'][0]:>6}x{t['size'][1]:<6} {t['tiles']:>6} {t['open_ms']:>8} "
              f"{t['p50_ms']:>7} {t['p95_ms']:>7} {t['max_ms']:>7}")
    print(f"\ncase page, first deep-zoom tile drawn: median {page['first_tile_p50_ms']} ms over {page['loads']} "
          f"fresh loads (max {page['first_tile_max_ms']} ms)")
    print(f"CAMs of the top {cams['top_k']} patches: {cams['cam_ms_median']} ms; OpenVINO INT8 on R1's "
          f"{cams['r1_patches']} patches: {cams['r1_inference_s']} s; share {100 * cams['cam_share_of_r1_inference']:.4f}%")
    write_json(args.json, {"tiles": tiles, "page": page, "cam": cams, "verdict": str(result.verdict)})


if __name__ == "__main__":
    main()
