"""The API token: made on first run into a file only the service user can read (0600); actions need it.

Reads need no token on loopback. Bound to any other address (which needs ``api_allow_remote``), every
endpoint needs it.
"""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from appliance.durable import write_durably
from appliance.api.logins import SESSION_COOKIE, Session
from appliance.errors import ApplianceError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_token(path: Path) -> str:
    """Read the token, creating it (0600, atomically and durably: a power cut leaves it whole or absent) on
    first run; refuse a file others can read."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        write_durably(path, (token + "\n").encode(), 0o600)
        return token
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ApplianceError(f"the API token file {path} is readable by others (mode {mode:o}); chmod 600 it")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ApplianceError(f"the API token in {path} is too short; delete the file to make a new one")
    return token


_bearer = HTTPBearer(auto_error=False)


def require_token(request: Request,
                  cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """401 without a bearer token, 403 with a wrong one; returns the token holder's name for the audit."""
    expected = request.app.state.token
    if cred is None or cred.scheme.lower() != "bearer" or not cred.credentials:
        raise HTTPException(status_code=401, detail="this needs the API token: Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(cred.credentials.encode(), expected.encode()):
        raise HTTPException(status_code=403, detail="the API token is wrong")
    return "token"


def viewer_session(request: Request) -> Session | None:
    """The logged-in reviewer's session (from its cookie), if any and if the reviewer is still enabled."""
    sessions = getattr(request.app.state, "sessions", None)
    sid = request.cookies.get(SESSION_COOKIE)
    session = sessions.get(sid) if sessions is not None else None
    if session is None:
        return None
    user = request.app.state.store.user(session.user)
    if user is None or user["disabled_at"]:
        sessions.end_all(session.user)
        return None
    return session


def reads_need_token(request: Request,
                     cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """On a non-loopback bind every endpoint needs the token, or a reviewer's session; the viewer's own pages
    check their session themselves (its login page needs none)."""
    if not request.app.state.remote or request.url.path.startswith("/viewer/"):
        return
    if viewer_session(request) is None:
        require_token(request, cred)
