"""A self-signed certificate for the bench's host name, so the API can be opened to the lab's network over
HTTPS only (`appliance tls self-signed --host NAME`). Clients trust it by its file (Settings.api_verify) or by
its fingerprint, as a lab's own CA would otherwise vouch for it."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from pathlib import Path

from appliance.durable import write_durably

DEFAULT_DAYS = 825  # the longest validity browsers accept for a server certificate


def self_signed(hosts: list[str], days: int = DEFAULT_DAYS, now: datetime | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): an EC P-256 key, the first host as the subject, every host (names
    and IP addresses) in the subject alternative names, valid for ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("a certificate needs at least one host name")
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.now(timezone.utc)
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench triage appliance (self-signed)")])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            # its own authority: a client given this file as its trust anchor accepts it
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint, as browsers show it (AB:CD:...)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def write_pair(out_dir: Path, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """cert.pem (0644) and key.pem (0600) in ``out_dir``, each whole or absent after a power cut."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert, key = out_dir / "cert.pem", out_dir / "key.pem"
    write_durably(key, key_pem, 0o600)
    write_durably(cert, cert_pem, 0o644)
    return cert, key
