"""A class-activation-map head for the first stage (CAM, Zhou et al. 2016). Each ensemble member ends in a
global average pool and a one-logit linear head; applied at every position of the member's last feature map
instead (a 1x1 convolution with the same weights), the head gives a map whose mean over positions is exactly
that member's logit: where in the patch the score came from. The first stage gives its last feature maps as
extra outputs (their tensor names are listed in the manifest; OpenVINO and ONNX Runtime add them at load), so
the shipped INT8 model is unchanged and the head alone is a new file: cam_head.onnx and cam_head.xml/.bin, a
few kB, in the manifest's ``cam`` section with their sha256.

    .venv-train/bin/python models/tools/build_cam.py --model-dir models/idc-resnet
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def cam_head(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The head over the members' feature maps (inputs f0, f1, ...; output ``cam`` (N, members, h, w)) and
    the names of those feature maps in ``model``."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    pooled_by = {n.output[0]: n for n in graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")}
    pairs = [(pooled_by[n.input[0]], n) for n in graph.node if n.op_type == "Gemm" and n.input[0] in pooled_by]
    if not pairs:
        raise SystemExit("no global average pool followed by a linear head: this model has no CAM")
    nodes, inputs, weights, maps, features = [], [], [], [], []
    for i, (pool, head) in enumerate(pairs):
        weight = numpy_helper.to_array(inits[head.input[1]])
        bias = numpy_helper.to_array(inits[head.input[2]])
        trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
        w = weight if trans_b else weight.T  # (1, C)
        channels = w.shape[1]
        inputs.append(helper.make_tensor_value_info(f"f{i}", onnx.TensorProto.FLOAT, ["N", channels, "h", "w"]))
        weights += [numpy_helper.from_array(w.reshape(w.shape[0], channels, 1, 1).astype(np.float32), f"w{i}"),
                    numpy_helper.from_array(bias.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [f"f{i}", f"w{i}", f"b{i}"], [f"m{i}"], kernel_shape=[1, 1]))
        maps.append(f"m{i}")
        features.append(pool.input[0])
    nodes.append(helper.make_node("Concat", maps, ["cam"], axis=1))
    out = helper.make_tensor_value_info("cam", onnx.TensorProto.FLOAT, ["N", len(maps), "h", "w"])
    head = helper.make_model(helper.make_graph(nodes, "cam_head", inputs, [out], weights),
                             opset_imports=[helper.make_opsetid("", 17)], producer_name="build_cam.py")
    head.ir_version = model.ir_version
    onnx.checker.check_model(head)
    return head, features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path("models/idc-resnet"))
    args = ap.parse_args()
    d = args.model_dir
    manifest = json.loads((d / "manifest.json").read_text())
    full = onnx.load(d / manifest["files"]["onnx"])
    head, features = cam_head(full)
    onnx.save(head, d / "cam_head.onnx")

    import openvino as ov
    import onnxruntime as ort

    ov.save_model(ov.convert_model(d / "cam_head.onnx"), d / "cam_head.xml", compress_to_fp16=False)
    # check on the fp32 model: the maps' means are the members' logits, whose sigmoids average to its output
    for name in features:
        full.graph.output.append(onnx.ValueInfoProto(name=name))
    probe = np.random.default_rng(0).integers(0, 256, (8, 50, 50, 3), dtype=np.uint8)
    prob, *maps = ort.InferenceSession(full.SerializeToString()).run(["probability", *features], {"image": probe})
    cam = ort.InferenceSession(str(d / "cam_head.onnx")).run(
        ["cam"], {f"f{i}": m for i, m in enumerate(maps)})[0]
    implied = (1 / (1 + np.exp(-cam.mean(axis=(2, 3))))).mean(axis=1)
    if not np.allclose(implied, prob[:, 0], atol=1e-5):
        raise SystemExit(f"the CAM head does not give the model's probability: its maps' means imply {implied}, the "
                         f"model gives {prob[:, 0]}")
    manifest["cam"] = {
        "method": "CAM: each member's linear head applied at every position of its last feature map (a 1x1 "
                  "convolution); the mean over positions of a member's map is that member's logit",
        "feature_maps": features, "members": len(features), "map_size": list(cam.shape[2:]),
        "onnx": "cam_head.onnx", "openvino": "cam_head.xml", "openvino_weights": "cam_head.bin",
    }
    for f in ("cam_head.onnx", "cam_head.xml", "cam_head.bin"):
        manifest["sha256"][f] = hashlib.sha256((d / f).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"cam_head.onnx, cam_head.xml/.bin: {len(features)} members, {cam.shape[2]}x{cam.shape[3]} maps per "
          f"patch; checked: the maps' means give the model's probability (max error "
          f"{np.abs(implied - prob[:, 0]).max():.1e})")


if __name__ == "__main__":
    main()
