"""The one validated settings object: a TOML file plus APPLIANCE_* environment variables; unknown keys are errors."""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from appliance.errors import ConfigError
from appliance.terms import DEFAULT_FHIR_SYSTEM_BASE, EngineName

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "idc-resnet"
INSTALLED_CONFIG = Path("/etc/appliance/appliance.toml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("var"), description="Where the database, spool and outputs live.")
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Model folder with manifest.json.")
    engine: EngineName = Field(EngineName.OPENVINO, description="Inference engine: openvino, or onnxruntime "
                                                               "(the fallback).")
    serial_port: str = Field("/dev/scanner", description="Scanner device path or pyserial URL.")
    api_host: str = Field("127.0.0.1", description="Address the status API listens on (loopback unless "
                                                   "api_allow_remote, and then over TLS).")
    api_port: int = Field(8470, ge=0, le=65535, description="Port of the status API (0: any free port).")
    api_allow_remote: bool = Field(
        False, description="Allow api_host to be a non-loopback address; then every endpoint needs the token.")
    api_token_file: Path | None = Field(None, description="API token file (0600); default <data_dir>/api-token.")
    api_tls_cert: Path | None = Field(
        None, description="PEM certificate: the API serves HTTPS (with api_tls_key). `appliance tls self-signed "
                          "--host NAME` makes one; a non-loopback api_host needs it.")
    api_tls_key: Path | None = Field(None, description="PEM private key of api_tls_cert (0600).")
    batch_size: int = Field(128, ge=1, le=4096, description="Patches per inference batch.")
    min_free_mb: int = Field(
        1024, ge=0, description="New cases are refused over the link while the data disk has less free space.")
    retention_days: float | None = Field(
        None, gt=0, description="Remove the files (spool, outputs) of finished cases older than this; off if unset.")
    retention_max_gb: float | None = Field(
        None, gt=0, description="Keep case files under this total, oldest finished cases first; off if unset.")
    retention_unsigned: bool = Field(
        False, description="Let retention remove cases nobody has signed off (normally they are always kept).")
    retention_interval_s: float = Field(3600.0, gt=0, description="How often retention runs.")
    case_timeout_s: float = Field(
        600.0, gt=0, description="A case with no tile and no CASE_END for this long is marked abandoned.")
    pipeline_stall_s: float = Field(
        120.0, gt=0, description="The pipeline counts as stuck (no systemd WATCHDOG=1) after this long on one item.")
    fault_injection: bool = Field(
        False, description="Reliability testing only: SIGUSR1 makes the pipeline thread hang, as a hung model would.")
    lis_mllp: list[str] = Field(
        default_factory=list, description="HL7 v2 MLLP receivers (host:port) each call is delivered to (ORU^R01).")
    lis_fhir_url: str | None = Field(
        None, description="FHIR base URL; each call is POSTed as a DiagnosticReport to <url>/DiagnosticReport.")
    lis_fhir_token_file: Path | None = Field(
        None, description="File (0600) holding the bearer token for lis_fhir_url.")
    lis_sending_application: str = Field(
        "BENCH-TRIAGE", description="MSH-3 of the HL7 messages (an HD: name, or name^universal id^type).")
    lis_sending_facility: str = Field("BENCH", description="MSH-4: the facility the appliance stands in (an HD).")
    lis_receiving_application: str = Field("LIS", description="MSH-5: the receiving application (an HD).")
    lis_receiving_facility: str = Field("LAB", description="MSH-6: the receiving facility (an HD).")
    lis_fhir_system_base: str = Field(
        DEFAULT_FHIR_SYSTEM_BASE, description="Base URL of the FHIR identifier and code systems: <base>/message-id, "
                                         "<base>/case-id, <base>/observation-code (and accession, specimen-id "
                                         "unless set below). Set a URL your organisation controls.")
    lis_fhir_accession_system: str | None = Field(
        None, description="The FHIR system of the lab's accession numbers (usually the LIS's own URL); "
                          "default <lis_fhir_system_base>/accession.")
    lis_fhir_specimen_system: str | None = Field(
        None, description="The FHIR system of specimen ids; default <lis_fhir_system_base>/specimen-id.")

    dicom_uid_root: str = Field(
        "1.2.826.0.1.3680043.8.498.", description="Root of the UIDs of the case's DICOM objects (digits and dots, "
                                               "ending in a dot, at most 32 characters). The default is pydicom's "
                                               "root; set your organisation's own.")

    @field_validator("dicom_uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        parts = value.split(".")
        if (len(value) > 32 or parts[-1] != "" or not all(p.isdigit() and (p == "0" or not p.startswith("0"))
                                                         for p in parts[:-1])):
            raise ValueError(f"{value!r} is not a UID root: digits and dots, no leading zeros, a dot at the end, "
                             f"at most 32 characters (a UID is at most 64)")
        return value

    @field_validator("lis_mllp")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for item in value:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port (e.g. lis.example.org:2575)")
        return value

    @field_validator("lis_fhir_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/") if value else value

    @field_validator("lis_sending_application", "lis_sending_facility", "lis_receiving_application",
                     "lis_receiving_facility")
    @classmethod
    def _hl7_hd(cls, value: str) -> str:
        """An HL7 HD: up to three ^-separated components, none holding a field, repetition, escape or
        sub-component separator (|~\\&) or a line break."""
        if not value.strip() or any(c in value for c in "|~\\&\r\n") or value.count("^") > 2:
            raise ValueError(f"{value!r} is not an HL7 HD (a name, or name^universal id^universal id type, "
                             f"without | ~ \\ & or line breaks)")
        return value

    @field_validator("lis_fhir_system_base", "lis_fhir_accession_system", "lis_fhir_specimen_system")
    @classmethod
    def _fhir_system(cls, value: str | None) -> str | None:
        """An absolute URL (http or https) or an OID or UUID URN, as FHIR wants an identifier system."""
        if value is None:
            return value
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?|urn:oid:[0-2](\.(0|[1-9][0-9]*))+|"
                            r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", value):
            raise ValueError(f"{value!r} is not a FHIR identifier system: use an http(s) URL your organisation "
                             f"controls, or urn:oid:... / urn:uuid:...")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ValueError("api_tls_cert and api_tls_key go together: set both (HTTPS) or neither")
        return self

    @property
    def api_tls_files(self) -> tuple[Path, Path] | None:
        """(certificate, key) when the API serves HTTPS."""
        return (self.api_tls_cert, self.api_tls_key) if self.api_tls_cert is not None else None

    @property
    def api_scheme(self) -> str:
        return "https" if self.api_tls_files else "http"

    @property
    def api_url(self) -> str:
        """Where the local tools (status, tui, site) reach the API."""
        return f"{self.api_scheme}://{self.api_host}:{self.api_port}"

    @property
    def api_verify(self) -> ssl.SSLContext | bool:
        """What an HTTPS client of the API (httpx ``verify=``) checks it against: the configured certificate (a
        self-signed one is its own authority)."""
        return ssl.create_default_context(cafile=str(self.api_tls_cert)) if self.api_tls_files else True

    @property
    def db_path(self) -> Path:
        return self.data_dir / "appliance.db"

    @property
    def token_path(self) -> Path:
        return self.api_token_file or self.data_dir / "api-token"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def cases_dir(self) -> Path:
        """Each case's output files: cases/<case id>/overlay.png, case.ome.tif, ..."""
        return self.data_dir / "cases"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then the TOML file, then defaults.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **overrides) -> Settings:
    """Build the effective settings; ``config_file`` defaults to /etc/appliance/appliance.toml if present."""
    if config_file is None and INSTALLED_CONFIG.exists():
        config_file = INSTALLED_CONFIG
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"settings file {config_file} does not exist")

    unknown = sorted(k for k in os.environ if k.startswith("APPLIANCE_")
                     and k[len("APPLIANCE_"):].lower() not in Settings.model_fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) in the environment: {', '.join(unknown)}; "
                          f"known settings are {', '.join(Settings.model_fields)}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})

    try:
        return _FromFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid settings{where}:\n{exc}") from None


def settings_reference() -> str:
    """docs/settings.md: every setting with its environment variable, type, default and meaning, made from
    Settings itself (`appliance config reference > docs/settings.md`; a test checks the file is current)."""
    rows = ["# Settings reference", "",
            "Generated from `appliance/config.py` by `appliance config reference > docs/settings.md` (a test checks",
            "it is current). Each key goes in the TOML file (`--config FILE`, or `/etc/appliance/appliance.toml` when",
            "installed) or in its environment variable, which wins over the file. Unknown keys are an error.", "",
            "| key | environment variable | type | default | what it is |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation)
        kind = kind.replace("pathlib.", "").replace("typing.", "").replace(" | ", " or ")
        if field.default_factory is not None:
            default = f"`{field.default_factory()!r}`"
        elif field.default is None:
            default = "unset"
        elif isinstance(field.default, Path) and field.default.is_relative_to(REPO_ROOT):
            default = f"`{field.default.relative_to(REPO_ROOT)}` in the checkout"
        else:
            default = f"`{getattr(field.default, 'value', field.default)}`"
        what = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `APPLIANCE_{name.upper()}` | {kind} | {default} | {what} |")
    return "\n".join(rows) + "\n"
