"""Shared fixtures: the committed model, the bundled demo case and the committed IDC patients; a real pty pair,
a case store."""

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings

from tests.ptys import open_pty

# Hypothesis draws the same examples in every run of the default tier (a suite that fails by chance fails a
# submission; a case it finds is kept as an explicit test); HYPOTHESIS_PROFILE=explore draws new ones.
hypothesis_settings.register_profile("repeatable", derandomize=True, database=None)
hypothesis_settings.register_profile("explore")
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "idc-resnet"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
IDC = FIXTURES / "idc"
DEMO_CASE = ROOT / "appliance" / "offline" / "demo_case" / "idc-10253.tif"


@pytest.fixture(scope="session")
def ov_engine():
    from appliance.model.engine import load_engine

    return load_engine(MODEL_DIR, "openvino")


@pytest.fixture(scope="session")
def ort_engine():
    from appliance.model.engine import load_engine

    return load_engine(MODEL_DIR, "onnxruntime")


@pytest.fixture(scope="session")
def demo_image() -> np.ndarray:
    import tifffile

    return tifffile.imread(DEMO_CASE)


@pytest.fixture(scope="session")
def dask_scheduler() -> str:
    """One embedded Dask cluster (2 single-threaded worker processes) for the tests that triage many cases: its
    address, for `--scheduler` or ``connect(scheduler=...)``. Its workers keep the model they loaded, as a lab's
    cluster does. Tests of the embedded cluster itself (killed workers, a killed driver) start their own."""
    from appliance.offline.batch import local_cluster

    with local_cluster(2) as cluster:
        yield cluster.scheduler_address


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def chromium(tmp_path):
    """Debian's headless Chromium under selenium, with a fresh profile and no background network (make test
    installs chromium and chromium-driver when it runs as root)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    f"apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,2400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def settings(tmp_path):
    from appliance.config import load_settings

    return load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0)


@pytest.fixture
def store(settings):
    """The case store at ``settings.db_path`` (tests.stores.open_store), closed after the test."""
    from tests.stores import open_store

    opened = open_store(settings.db_path)
    yield opened
    opened.close()


@pytest.fixture
def pty_pair():
    """A real pty (tests.ptys.PtyPair): the scanner's side on the master, a host opens ``pty_pair.path``."""
    with open_pty() as pair:
        yield pair


# --- systemd's notify socket, as `appliance run` sees it under systemd ---------------------------
def receive_datagrams(sock: socket.socket, seconds: float) -> list[str]:
    """Every datagram already queued or arriving within ``seconds``."""
    out, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 or not out:
        sock.settimeout(max(left, 0.001))
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, as `appliance tls self-signed` makes it."""
    from appliance.api.tls import self_signed, write_pair

    return write_pair(tmp_path / "tls", *self_signed(["localhost", "127.0.0.1"]))


# The longest modules (the site validations triage hundreds of cases) start first: on the 2 processes of `make test` the
# other process runs the rest beside them instead of waiting for them at the end.
LONG_MODULES = ("tests/appliance/test_site.py", "tests/appliance/test_site_agreement.py", "tests/test_determinism.py",
                "tests/reliability/test_kill_restart.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONG_MODULES)  # stable: the rest keep their order
