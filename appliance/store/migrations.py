"""The case database's schema, as named migration steps (sqlite-utils ``Migrations``), applied in order
when the store opens; each step runs once per database. Add a step, never edit a released one, and keep
``SCHEMA.md`` in step."""

from __future__ import annotations

import sqlite_utils
from sqlite_utils.migrations import Migrations

migrations = Migrations("appliance")


@migrations(name="0001_cases_and_tiles")
def _initial(db: sqlite_utils.Database) -> None:
    db["cases"].create(
        {
            "id": str,
            "specimen_id": str,
            "source": str,
            "status": str,
            "received_at": str,
            "finished_at": str,
            "tiles_expected": int,
            "tiles_received": int,
            "patches_scored": int,
            "verdict": str,
            "score": float,
            "threshold": float,
            "reasons": str,
            "early_positive": int,
            "early_positive_after_tiles": int,
            "model_name": str,
            "model_version": str,
            "model_sha256": str,
            "engine": str,
            "timings_ms": str,
            "research_use_only": int,
        },
        pk="id",
    )
    db["tiles"].create(
        {"case_id": str, "idx": int, "x": int, "y": int, "w": int, "h": int, "sha256": str, "stored_at": str},
        pk=("case_id", "idx"),
        foreign_keys=[("case_id", "cases", "id")],
    )
    db["cases"].create_index(["received_at"])


@migrations(name="0002_events_audit_models_signoff")
def _events_audit_models(db: sqlite_utils.Database) -> None:
    db["cases"].add_column("signed_off_by", str)
    db["cases"].add_column("signed_off_at", str)
    db["cases"].add_column("sign_off_comment", str)
    db["tiles"].add_column("qc", str)
    db["events"].create(
        {"id": int, "at": str, "case_id": str, "kind": str, "detail": str}, pk="id",
    )
    db["events"].create_index(["case_id"])
    db["audit"].create(
        {"id": int, "at": str, "actor": str, "via": str, "action": str, "case_id": str, "detail": str}, pk="id",
    )
    db["audit"].create_index(["case_id"])
    db["models"].create(
        {"sha256": str, "name": str, "version": str, "backend": str, "first_seen": str, "last_seen": str},
        pk="sha256",
    )


@migrations(name="0003_warnings_patch_threshold")
def _warnings_patch_threshold(db: sqlite_utils.Database) -> None:
    db["cases"].add_column("warnings", str)
    db["cases"].add_column("patch_threshold", float)


@migrations(name="0004_case_rule")
def _case_rule(db: sqlite_utils.Database) -> None:
    db["cases"].add_column("case_rule", str)


@migrations(name="0005_revision_and_deliveries")
def _deliveries(db: sqlite_utils.Database) -> None:
    """The outbox: one row per (message, destination), written in the transaction that records the call."""
    db["cases"].add_column("revision", int)
    db["deliveries"].create(
        {
            "id": str,  # <message id>.<first 10 hex of the destination's sha256>: URL-safe
            "case_id": str,
            "revision": int,
            "message_id": str,  # <case id>.r<revision>: the same on every retry
            "destination": str,  # mllp:host:port or fhir:<base url>
            "kind": str,  # hl7 or fhir
            "payload": str,  # exactly what is sent, every time it is sent
            "status": str,  # pending, delivered or failed
            "attempts": int,
            "next_attempt_at": str,
            "last_error": str,
            "created_at": str,
            "delivered_at": str,
        },
        pk="id",
        foreign_keys=[("case_id", "cases", "id")],
    )
    db["deliveries"].create_index(["status", "next_attempt_at"])
    db["deliveries"].create_index(["case_id"])


@migrations(name="0006_early_rule")
def _early_rule(db: sqlite_utils.Database) -> None:
    """The early positive's own rule and threshold, beside the final rule's (case_rule, threshold)."""
    db["cases"].add_column("early_rule", str)
    db["cases"].add_column("early_threshold", float)
    db["cases"].add_column("early_score", float)


@migrations(name="0007_site_operating_point")
def _site_operating_point(db: sqlite_utils.Database) -> None:
    """Whose threshold decided each call, what the drift watch follows per case, and the site operating points
    a lab accepted from its own validation (one in force at a time; never deleted, for the audit)."""
    db["cases"].add_column("threshold_source", str)  # model or site
    db["cases"].add_column("site_accepted_at", str)
    db["cases"].add_column("site_report_sha256", str)
    db["cases"].add_column("measures", str)  # JSON: stain_h_deg, stain_e_deg, focus, tissue_mm2
    db["site_points"].create(
        {
            "id": int,
            "model_sha256": str,  # the point applies to this model only
            "threshold": float,
            "target_sensitivity": float,
            "malignant": int,  # callable cases of each label in the validation
            "benign": int,
            "report_sha256": str,
            "report": str,  # JSON: the report's figures and the drift reference (its case list left out)
            "accepted_at": str,
            "accepted_by": str,
            "accepted_via": str,
            "ended_at": str,  # reset, or replaced by a newer point
            "ended_by": str,
            "ended_why": str,
        },
        pk="id",
    )


@migrations(name="0008_users")
def _users(db: sqlite_utils.Database) -> None:
    """The reviewers who log in to the browser viewer: a name, an argon2 hash of the password (never the
    password), and when the account was made, changed and disabled (never deleted: the audit names them)."""
    db["users"].create(
        {"name": str, "password_hash": str, "created_at": str, "changed_at": str, "disabled_at": str},
        pk="name",
    )


@migrations(name="0009_accession")
def _accession(db: sqlite_utils.Database) -> None:
    """The lab's accession / order number of a case, when the scanner or the operator gave one: the LIS matches
    the result to its order by it (HL7 OBR-2/3 and SPM-2, FHIR basedOn and the Specimen's accession)."""
    db["cases"].add_column("accession", str)
