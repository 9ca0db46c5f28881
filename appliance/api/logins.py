"""Personal logins for the browser viewer: reviewers' passwords hashed with argon2 (argon2-cffi), sessions
held by the daemon (a restart logs everyone out), a CSRF token per session for every form that changes
something, and a limit on failed logins. Machines keep using the API token (appliance.api.auth)."""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

USER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
MIN_PASSWORD = 12
SESSION_COOKIE = "appliance_session"
SESSION_HOURS = 12.0  # a working day; then log in again
FAILURES_ALLOWED = 5  # failed logins per name within FAILURE_WINDOW_S
FAILURES_ALLOWED_PER_ADDRESS = 20  # and per client address (a shared reading-room PC: names tried in turn)
FAILURE_WINDOW_S = 300.0

_hasher = PasswordHasher()
_UNKNOWN_USER_HASH = _hasher.hash(secrets.token_urlsafe(16))  # checked for unknown names too: same time taken


def check_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise ValueError(f"{name!r} is not a reviewer name: a letter, then letters, digits, '.', '_' or '-' (max 64)")
    return name


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def password_matches(password_hash: str | None, password: str) -> bool:
    """argon2 verification; an unknown name (None) costs the same and fails."""
    try:
        return _hasher.verify(password_hash or _UNKNOWN_USER_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str
    expires: float  # time.monotonic()


@dataclass
class Sessions:
    """The daemon's live sessions: an unguessable id in an HttpOnly cookie -> who, and its CSRF token."""

    hours: float = SESSION_HOURS
    _by_id: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, user: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), time.monotonic() + self.hours * 3600)
        with self._lock:
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._by_id.get(sid)
            if session is not None and session.expires < time.monotonic():
                del self._by_id[sid]
                return None
            return session

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

    def end_all(self, user: str) -> None:
        """A disabled reviewer's sessions end at once."""
        with self._lock:
            for sid in [s for s, v in self._by_id.items() if v.user == user]:
                del self._by_id[sid]


@dataclass
class LoginLimiter:
    """At most FAILURES_ALLOWED failed logins per name (key ``name:...``) and FAILURES_ALLOWED_PER_ADDRESS per
    client address (``address:...``) in FAILURE_WINDOW_S; past that, every attempt is refused (right password
    or not) until the oldest failure leaves the window."""

    allowed: int = FAILURES_ALLOWED
    allowed_per_address: int = FAILURES_ALLOWED_PER_ADDRESS
    window_s: float = FAILURE_WINDOW_S
    _failures: dict[str, deque] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, *keys: str) -> float:
        """0 if a login may be tried now, else how many seconds until it may."""
        now = time.monotonic()
        with self._lock:
            waits = []
            for key in keys:
                q = self._failures.get(key)
                while q and q[0] <= now - self.window_s:
                    q.popleft()
                limit = self.allowed_per_address if key.startswith("address:") else self.allowed
                if q and len(q) >= limit:
                    waits.append(q[0] + self.window_s - now)
            return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, name_key: str) -> None:
        with self._lock:
            self._failures.pop(name_key, None)
