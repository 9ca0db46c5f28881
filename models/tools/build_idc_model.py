#!/usr/bin/env python3
"""Build the IDC patch classifier (idc-resnet) end to end.

Recipe (version 0.2.0):
  * patients split into K=3 folds (stratified by IDC fraction, complete-slide patients spread over the folds);
    four patients are reserved and never trained on (demo case 10253, test fixtures 9267/10269/12826);
  * a colour-histogram logistic-regression baseline is fitted and scored on the same folds;
  * one compact ResNet per fold is trained from scratch on the other two folds (dihedral + HSV/brightness
    augmentation, pos_weight for class imbalance, bf16 autocast on CPU, EMA weights);
  * out-of-fold (OOF) predictions give the cross-validated metrics, the TTA ablation and both thresholds;
  * each fold model is also exported + INT8-quantized alone, so FP32 vs INT8 is compared on patients the
    model never saw;
  * the shipped model is ONE graph: the average probability of the 3 fold models, each averaged over the
    8 flips/rotations (TTA) when TTA measurably helped on the OOF predictions;
  * ONNX FP32 export, OpenVINO IR, NNCF post-training INT8 (calibration patches from training patients),
    manifest.json (contract, thresholds + rules, sha256, metrics), MODEL_CARD.md and split.json.

Model I/O contract (the runtime depends on it):
  input  "image":       uint8 NHWC [N, 50, 50, 3] RGB, dynamic N; normalisation is in-graph
  output "probability": float32 [N, 1], sigmoid probability of IDC

Usage:
  python models/tools/build_idc_model.py --data /work/shared/data/idc_breast_histopathology \
      --out models/idc-resnet [--epochs N] [--seed N]
  python models/tools/build_idc_model.py --data ... --out /tmp/abl --ablation NAME --folds 0
      (trains only the listed folds with a recipe variant and writes OOF metrics to <out>/ablation-NAME.json;
       the numbers in models/tools/ablations.json were produced this way and are quoted in the model card)

FOR RESEARCH AND TRIAGE ONLY, NOT FOR DIAGNOSIS.
"""
from __future__ import annotations

from idc_build.build import main
from idc_build.errors import BuildError

__all__ = ["main"]

if __name__ == "__main__":
    try:
        main(description=__doc__, script=__file__)
    except BuildError as exc:
        raise SystemExit(f"build stopped: {exc}") from None
