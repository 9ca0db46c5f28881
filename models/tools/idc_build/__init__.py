"""Build the IDC patch classifier (idc-resnet); models/tools/build_idc_model.py is its command line."""
from __future__ import annotations

import sys
from pathlib import Path

# the repository root, so that `appliance` imports work from a plain checkout (as the build script always did)
ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
