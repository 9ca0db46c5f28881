"""Shared fixtures: the committed model, the bundled demo case and the committed IDC patients."""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "idc-resnet"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
IDC = FIXTURES / "idc"
DEMO_CASE = ROOT / "appliance" / "demo" / "idc-10253.tif"


@pytest.fixture(scope="session")
def ov_engine():
    from appliance.engine import load_engine

    return load_engine(MODEL_DIR, "openvino")


@pytest.fixture(scope="session")
def ort_engine():
    from appliance.engine import load_engine

    return load_engine(MODEL_DIR, "onnxruntime")


@pytest.fixture(scope="session")
def demo_image() -> np.ndarray:
    import tifffile

    return tifffile.imread(DEMO_CASE)


@pytest.fixture
def settings(tmp_path):
    from appliance.config import load_settings

    return load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0)
