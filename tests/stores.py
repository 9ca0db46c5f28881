"""The tests' one way to open a case store, so that a change to CaseStore's constructor is made here alone.

The `store` fixture in tests/conftest.py opens one at `settings.db_path` and closes it afterwards; a test that
needs another file, or LIS destinations, calls `open_store` (and closes what it opened)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from appliance.lis.outbox import Destination, Outbox
from appliance.store.database import CaseStore


def open_store(path: Path, destinations: Iterable[str] = ()) -> CaseStore:
    """The case store on the SQLite file ``path`` (made, with its folder, when missing). ``destinations`` are the
    LIS destinations as settings give them, ``"mllp:host:port"`` or ``"fhir:<base url>"``: each call written to
    the store is queued for each of them."""
    return CaseStore(path, Outbox(Destination.parse(d) for d in destinations))
