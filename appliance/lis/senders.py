"""Sending one message to one destination, once: HL7 v2 over MLLP (python-hl7's MLLP streams) or a FHIR POST.

Each returns an Outcome: delivered (HL7 ACK AA/CA, FHIR 2xx), failed (a rejection: HL7 AE/AR/CE/CR, FHIR 4xx;
retrying the same message would be refused again, so an operator decides), or pending (network down,
timeout, a FHIR 5xx: try again later). The outbox (outbox.py) picks the sender for a destination and turns
outcomes into the delivery's state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from appliance.terms import DeliveryStatus

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Outcome:
    status: DeliveryStatus
    detail: str | None = None


# ------------------------------------------------------------------------------------------------ MLLP
def send_mllp(address: str, message: str, timeout: float = TIMEOUT_S) -> Outcome:
    """Send ``message`` framed by MLLP and wait for its ACK."""
    import hl7

    host, _, port = address.rpartition(":")
    try:
        ack = asyncio.run(_exchange(host, int(port), message, timeout))
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        return Outcome(DeliveryStatus.PENDING, f"{address}: {type(exc).__name__}: {exc}".rstrip(": "))
    try:
        msa = ack.segment("MSA")
    except (KeyError, IndexError):
        return Outcome(DeliveryStatus.PENDING, f"{address}: the answer has no MSA segment: {str(ack)[:200]!r}")
    code = str(msa[1])
    sent_id = str(hl7.parse(message).segment("MSH")[10])
    if len(msa) > 2 and str(msa[2]) and str(msa[2]) != sent_id:
        return Outcome(DeliveryStatus.PENDING, f"{address}: the ACK is for message {msa[2]}, not {sent_id}")
    if code in ("AA", "CA"):
        return Outcome(DeliveryStatus.DELIVERED)
    text = str(msa[3]) if len(msa) > 3 else ""
    return Outcome(DeliveryStatus.FAILED, f"{address} answered {code}{': ' + text if text else ''}")


async def _exchange(host: str, port: int, message: str, timeout: float):
    import hl7.mllp

    reader, writer = await asyncio.wait_for(hl7.mllp.open_hl7_connection(host, port), timeout)
    try:
        writer.writemessage(message)
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ FHIR
def send_fhir(base: str, body: str, token_file: Path | None, timeout: float = TIMEOUT_S) -> Outcome:
    """POST the DiagnosticReport to ``<base>/DiagnosticReport`` with the bearer token from ``token_file``."""
    import httpx

    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token_file is not None:
        try:
            if Path(token_file).stat().st_mode & 0o077:
                return Outcome(DeliveryStatus.PENDING, f"the FHIR token file {token_file} is readable by others; "
                                                       f"chmod 600 it (nothing is sent until then)")
            headers["Authorization"] = f"Bearer {Path(token_file).read_text().strip()}"
        except OSError as exc:
            return Outcome(DeliveryStatus.PENDING, f"the FHIR token file {token_file} cannot be read: {exc}")
    url = f"{base}/DiagnosticReport"
    try:
        resp = httpx.post(url, content=body.encode(), headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return Outcome(DeliveryStatus.PENDING, f"{url}: {type(exc).__name__}: {exc}")
    if 200 <= resp.status_code < 300:
        return Outcome(DeliveryStatus.DELIVERED)
    detail = f"{url} answered {resp.status_code}: {resp.text[:500]}"
    if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
        return Outcome(DeliveryStatus.FAILED, detail)
    return Outcome(DeliveryStatus.PENDING, detail)
