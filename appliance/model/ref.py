"""Which model made a call: name, version, the manifest's sha256 and the engine that ran it. One type, so the
store's columns, the API's JSON, the LIS messages and the logs all say it the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    sha256: str
    backend: str  # the engine's name as plain text (openvino, onnxruntime)

    def to_dict(self) -> dict:
        return asdict(self)

    def columns(self) -> dict:
        """As the cases table stores it."""
        return {"model_name": self.name, "model_version": self.version, "model_sha256": self.sha256,
                "engine": self.backend}

    @classmethod
    def from_columns(cls, row: dict) -> "ModelRef":
        """From a cases row; unknown parts (a case that never started its model) read as '?'."""
        return cls(row.get("model_name") or "?", row.get("model_version") or "?", row.get("model_sha256") or "?",
                   row.get("engine") or "?")

    def words(self) -> str:
        return f"{self.name} {self.version} sha256 {self.sha256}"
