"""The status API as the terminal UI sees it: async HTTP calls whose failures are explained in words."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from appliance.status import DaemonStatus


class ApiUnavailable(Exception):
    """The daemon cannot be reached (down, restarting, wrong URL)."""


class BadAnswer(Exception):
    """The daemon answered, but not with what this UI can read (an error status, or not JSON)."""


class ActionRefused(Exception):
    """The daemon answered an action with an error; the message says why in words."""


class ApiClient:
    def __init__(self, url: str, token_path: Path | None = None, timeout: float = 5.0, verify: ssl.SSLContext | bool = True):
        """``verify``: for an HTTPS API, the certificate file to check it against (Settings.api_verify)."""
        self.url = url.rstrip("/")
        self.token_path = token_path
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, verify=verify)

    async def close(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str, **params) -> httpx.Response:
        try:
            r = await self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"cannot reach the appliance at {self.url}: {type(exc).__name__}") from None
        return r

    async def status(self) -> DaemonStatus:
        body = _json(await self._get("/status"))
        try:
            return DaemonStatus.from_dict(body)
        except (KeyError, TypeError) as exc:
            raise BadAnswer(f"GET /status answered a status this UI cannot read ({type(exc).__name__}: {exc})") \
                from None

    async def cases(self, *, verdict: str | None = None, signed_off: bool | None = None, limit: int = 200) -> list:
        return _json(await self._get("/cases", verdict=verdict, signed_off=signed_off, limit=limit))["cases"]

    async def case(self, case_id: str) -> dict | None:
        r = await self._get(f"/cases/{case_id}")
        return None if r.status_code == 404 else _json(r)

    async def file(self, case_id: str, name: str) -> bytes | None:
        """One of the case's output files, or None when it is not there (not written yet, or removed)."""
        r = await self._get(f"/cases/{case_id}/{name}")
        if r.status_code == 404:
            return None
        if r.status_code >= 400:
            raise BadAnswer(f"GET {r.request.url.path} answered {r.status_code}: {explain(r)}")
        return r.content

    def token(self) -> str:
        if self.token_path is None:
            raise ActionRefused("no API token is configured (api_token_file in the settings)")
        try:
            return Path(self.token_path).read_text().strip()
        except OSError as exc:
            raise ActionRefused(f"cannot read the API token at {self.token_path} ({exc.strerror}); run the "
                                f"terminal UI as the appliance's service user, or ask your administrator") from None

    async def sign_off(self, case_id: str, initials: str, comment: str) -> dict:
        headers = {"Authorization": f"Bearer {self.token()}"}
        try:
            r = await self._http.post(f"/cases/{case_id}/signoff", json={"initials": initials, "comment": comment},
                                      headers=headers)
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"the sign-off was not sent: the appliance at {self.url} cannot be reached "
                                 f"({type(exc).__name__}); try again when it is back") from None
        if r.status_code == 200:
            return r.json()
        raise ActionRefused(explain(r))

    async def events(self) -> AsyncIterator[tuple[str, dict]]:
        """Server-Sent Events from /events as (kind, data) until the connection ends."""
        try:
            async with self._http.stream("GET", "/events", timeout=httpx.Timeout(5.0, read=30.0)) as r:
                r.raise_for_status()
                kind = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind:
                        try:
                            data = json.loads(line[6:])
                        except ValueError:
                            raise BadAnswer(f"the event stream sent a {kind!r} event that is not JSON") from None
                        yield kind, data
                        kind = None
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"the event stream from {self.url} broke: {type(exc).__name__}") from None


def _json(r: httpx.Response):
    """A GET's JSON body; an error status or a body that is not JSON is a BadAnswer that says which."""
    if r.status_code >= 400:
        raise BadAnswer(f"GET {r.request.url.path} answered {r.status_code}: {explain(r)}")
    try:
        return r.json()
    except ValueError:
        raise BadAnswer(f"GET {r.request.url.path} did not answer JSON") from None


def explain(r: httpx.Response) -> str:
    """An action's error response, in words a technician can act on."""
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text[:200]
    if r.status_code == 401:
        return "the appliance wants the API token and none was sent"
    if r.status_code == 403:
        return "the API token was refused: it does not match the appliance's (was it rotated?)"
    if r.status_code == 422 and isinstance(detail, list):
        fields = ", ".join(str(d.get("loc", ["?"])[-1]) for d in detail)
        return f"check what you typed: {fields} not valid (initials are letters, up to 16)"
    return f"the appliance said no ({r.status_code}): {detail}"
