"""Build the IDC patch classifier (idc-resnet); models/tools/build_idc_model.py is its command line."""
from __future__ import annotations
