"""The store's named errors as HTTP answers, the same for every route that changes a case."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException

from appliance.errors import CaseNotFoundError, CaseStateError, StoreError


@contextmanager
def store_errors_as_http() -> Iterator[None]:
    """404 for what is not there, 409 for a case in the wrong state, 503 when the database could not be
    written (nothing changed: try again)."""
    try:
        yield
    except CaseNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except CaseStateError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except StoreError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
