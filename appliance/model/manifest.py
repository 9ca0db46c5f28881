"""Model manifests: the validated I/O contract of a model folder, trusted only after its hashes check out."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.errors import ManifestError, ModelIntegrityError
from appliance.terms import MONOTONE_RULES, CaseRule

MANIFEST_NAME = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    channels: Literal[3]
    layout: Literal["NHWC"]
    dtype: Literal["uint8"]
    color: Literal["RGB"]
    microns_per_pixel: float = Field(gt=0)
    pad_value: int = Field(ge=0, le=255)
    normalisation: str
    mean: list[float]
    std: list[float]


class OutputSpec(_Strict):
    name: str
    kind: Literal["sigmoid-probability-of-positive"]


class PatchSpec(_Strict):
    size: int = Field(gt=0)
    stride: int = Field(gt=0)
    min_tissue_fraction: float = Field(ge=0, le=1)


def _check_rule(name: str, rule: CaseRule, region_threshold: float | None, threshold: float | None = None) -> None:
    """A region rule needs the region threshold; a top-k rule's threshold, when given, is a probability."""
    if rule in (CaseRule.LARGEST_REGION_AREA, CaseRule.LARGEST_REGION_MASS) and region_threshold is None:
        raise ValueError(f"{name} {rule!r} needs decision.region_threshold")
    if rule in (CaseRule.TOP_K_MEAN, CaseRule.TOP_K_MEAN_REFINED) and threshold is not None and threshold > 1:
        raise ValueError(f"the threshold of {name} {rule!r} is a probability (<= 1)")


class EarlySpec(_Strict):
    """The early positive: a rule on first-stage probabilities (it never falls as tiles arrive) and its own
    threshold. A case whose early rule passes it is suspicious, whatever the final rule says at the end. A
    top-k threshold above 1 can never be passed: the model then makes no early call (its build found a
    negative case scoring 1)."""

    rule: CaseRule
    top_k: int = Field(gt=0)
    threshold: float = Field(ge=0)


class DecisionSpec(_Strict):
    # a patch whose (refined, when the model has a context stage) probability is at or above it is drawn
    patch_threshold: float = Field(ge=0, le=1)
    top_k: int = Field(gt=0)
    case_threshold: float = Field(ge=0)
    min_patches: int = Field(default=15, gt=0)  # fewer tissue patches than this: cannot call, too little tissue
    # the final rule: the mean of the top-k first-stage (or, top-k-mean-refined, context-refined) probabilities,
    # or the area (cells) or mass (summed probability) of the largest 4-connected region of first-stage
    # probabilities >= region_threshold
    case_rule: CaseRule = CaseRule.TOP_K_MEAN
    region_threshold: float | None = Field(default=None, ge=0, le=1)
    # the early positive; without it, the final rule at case_threshold (which must then be a first-stage rule)
    early: EarlySpec | None = None

    @model_validator(mode="after")
    def _rules_are_runnable(self) -> "DecisionSpec":
        _check_rule("decision.case_rule", self.case_rule, self.region_threshold, self.case_threshold)
        if self.early is not None:
            if self.early.rule not in MONOTONE_RULES:
                raise ValueError(f"decision.early.rule {self.early.rule!r} can fall as tiles arrive; the early "
                                 f"positive needs a first-stage rule ({', '.join(sorted(MONOTONE_RULES))})")
            _check_rule("decision.early.rule", self.early.rule, self.region_threshold)  # above 1: never fires
            if self.case_rule in MONOTONE_RULES and (self.early.rule, self.early.top_k) != (self.case_rule, self.top_k):
                raise ValueError(f"decision.case_rule {self.case_rule!r} is a first-stage rule, so it is its own "
                                 f"early rule: decision.early must name the same rule and top_k")
        elif self.case_rule not in MONOTONE_RULES:
            raise ValueError(f"decision.case_rule {self.case_rule!r} is known only at the end of a case: the "
                             f"manifest must give decision.early (a first-stage rule and its threshold)")
        return self

    @property
    def early_rule(self) -> EarlySpec:
        """The early positive's rule, top_k and threshold (the final rule's own when no early rule is given)."""
        if self.early is not None:
            return self.early
        return EarlySpec(rule=self.case_rule, top_k=self.top_k, threshold=self.case_threshold)


class StainReference(_Strict):
    he: list[list[float]]  # 3 x 2: haematoxylin and eosin optical-density vectors (columns), RGB order
    max_c: list[float]  # 99th percentile stain strengths
    pixels: int = 0


class StainSpec(_Strict):
    normalisation: Literal["none", "macenko"] = "none"
    reference: StainReference | None = None
    rule: str = ""
    development_angles_deg: dict = Field(default_factory=dict)
    # the stain-out-of-range limit: the angle (deg) between the case's fitted H or E vector and the reference
    # beyond which the model is not trusted (None: the appliance's default, QcLimits.max_stain_angle)
    max_angle_deg: float | None = Field(default=None, gt=0, le=90)
    limit_rule: str = ""

    @model_validator(mode="after")
    def _reference_when_normalising(self) -> "StainSpec":
        if self.normalisation == "macenko" and self.reference is None:
            raise ValueError("stain.normalisation 'macenko' needs stain.reference")
        return self


class FilesSpec(_Strict):
    openvino: str
    openvino_weights: str
    onnx: str


class ContextSpec(_Strict):
    """The context stage: a second model over the case's patch grid of first-stage probabilities.

    Input ``grid`` float32 (1, 2, H, W): channel 0 the first-stage probability, channel 1 = 1 where a tissue
    patch was scored; output ``probability`` float32 (1, 1, H, W), the refined probability of each cell."""

    kind: Literal["patch-grid-refinement"]
    rings: int = Field(gt=0)
    openvino: str
    openvino_weights: str
    onnx: str
    description: str = ""

    @property
    def file_names(self) -> tuple[str, str, str]:
        return self.openvino, self.openvino_weights, self.onnx


class CamSpec(_Strict):
    """Class-activation maps of the first stage (models/tools/build_cam.py): its last feature maps, one per
    ensemble member (``feature_maps``: tensor names in the first stage, added as outputs at load), go through
    a head (inputs f0, f1, ...; output ``cam`` float32 (N, members, h, w)) whose maps average, over their
    positions, to each member's logit."""

    method: str
    feature_maps: list[str] = Field(min_length=1)
    members: int = Field(gt=0)
    map_size: list[int]
    openvino: str
    openvino_weights: str
    onnx: str

    @property
    def file_names(self) -> tuple[str, str, str]:
        return self.openvino, self.openvino_weights, self.onnx


class OodSpec(_Strict):
    """The out-of-distribution gate (appliance.model.ood): the first stage's pooled penultimate features, one
    tensor per ensemble member (``features``: names in the first stage, added as outputs at load), their
    development reference (``file``: mean and principal directions, hashed like every model file) and the case
    score beyond which the case is refused (``max_score``, set by models/tools/calibrate_gates.py)."""

    features: list[str] = Field(min_length=1)
    file: str
    max_score: float = Field(gt=0)
    rule: str = ""

    @property
    def file_names(self) -> tuple[str]:
        return (self.file,)


class ModelManifest(_Strict):
    schema_version: Literal[1]
    name: str
    version: str
    task: Literal["patch-classification"]
    labels: list[str]
    input: InputSpec
    output: OutputSpec
    patch: PatchSpec
    decision: DecisionSpec
    stain: StainSpec = StainSpec()
    files: FilesSpec
    context: ContextSpec | None = None
    sha256: dict[str, str]
    training: dict
    metrics: dict
    # the drift watch's development reference (appliance.service.drift): cases, each followed measure's
    # 5th/50th/95th percentiles and the cannot-call counts by reason; None: no development reference
    drift: dict | None = None
    cam: CamSpec | None = None  # None: the model draws no class-activation maps
    ood: OodSpec | None = None  # None: no out-of-distribution gate (the stain and image QC still apply)

    @model_validator(mode="after")
    def _every_file_hashed(self) -> "ModelManifest":
        listed = [self.files.openvino, self.files.openvino_weights, self.files.onnx]
        if self.context is not None:
            listed += self.context.file_names
        if self.cam is not None:
            listed += self.cam.file_names
        if self.ood is not None:
            listed += self.ood.file_names
        for f in listed:
            if f not in self.sha256:
                raise ValueError(f"the manifest lists {f!r} but sha256 has no entry for it")
        if self.patch.size != self.input.width or self.input.width != self.input.height:
            raise ValueError("patch.size must equal input width and height (square patches)")
        if self.decision.case_rule == CaseRule.TOP_K_MEAN_REFINED and self.context is None:
            raise ValueError("decision.case_rule 'top-k-mean-refined' needs a context stage (the manifest's context)")
        return self

    @property
    def digest(self) -> str:
        """One sha256 naming this exact model: the hash of its OpenVINO weights file."""
        return self.sha256[self.files.openvino_weights]


def read_manifest(model_dir: Path) -> ModelManifest:
    """Parse and validate ``model_dir/manifest.json`` (no file hashes checked yet)."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"no model manifest at {path}; is the model folder right?") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    try:
        return ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path} is not a valid model manifest:\n{exc}") from None


def read_verified(model_dir: Path, filename: str, manifest: ModelManifest) -> bytes:
    """Return the bytes of a model file after checking them against the manifest's sha256.

    The engine loads exactly these bytes, so a file swapped after the check cannot slip in.
    """
    path = Path(model_dir) / filename
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelIntegrityError(f"model file {path} is missing (listed in {MANIFEST_NAME})") from None
    expected = manifest.sha256.get(filename)
    if expected is None:
        raise ModelIntegrityError(f"model file {path} has no sha256 in {MANIFEST_NAME}; refusing to load it")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelIntegrityError(
            f"model file {path} failed its integrity check: sha256 mismatch "
            f"(manifest {expected}, file {actual}). The file was changed or corrupted; "
            f"reinstall the model folder."
        )
    return data


def verify_files(model_dir: Path, manifest: ModelManifest) -> list[str]:
    """Check every hashed file of a model folder; return the problems found (empty when all match)."""
    problems = []
    for filename in manifest.sha256:
        try:
            read_verified(model_dir, filename, manifest)
        except ModelIntegrityError as exc:
            problems.append(str(exc))
    return problems


def find_model_dirs(root: Path) -> list[Path]:
    """Folders directly under ``root`` that hold a manifest."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file()) if root.is_dir() else []
