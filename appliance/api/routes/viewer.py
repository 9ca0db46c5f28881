"""The pathologist's review in a browser, under /viewer/: a login, a worklist and a case page with a deep-zoom
view (OpenSeadragon, served from the daemon), the heatmap as an overlay, the regions outlined, the top
patches, the call with its reasons, and a sign-off. Reviewers log in personally (appliance.api.logins);
every form that changes something carries its session's CSRF token."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from appliance import RESEARCH_USE_NOTICE
from appliance.api.answers import store_errors_as_http
from appliance.api.auth import viewer_session
from appliance.api.logins import SESSION_COOKIE, Session, password_matches
from appliance.api.routes.cases import CaseId
from appliance.terms import CaseFile, CaseStatus, Verdict

VIEWER_DIR = Path(__file__).resolve().parents[1] / "viewer"
STATIC_DIR = VIEWER_DIR / "static"
OSD_DIR = VIEWER_DIR / "node_modules" / "openseadragon" / "build" / "openseadragon"
LAYERS = {"slide": CaseFile.CASE_OME, "heatmap": CaseFile.HEATMAP_OME}
CALL_ORDER = {Verdict.SUSPICIOUS: 0, Verdict.CANNOT_CALL: 1, Verdict.BENIGN: 2}

templates = Jinja2Templates(directory=VIEWER_DIR / "templates")
templates.env.globals["notice"] = RESEARCH_USE_NOTICE
router = APIRouter(prefix="/viewer", include_in_schema=False)


def reviewer(request: Request) -> Session:
    """The logged-in reviewer, or a redirect to the login page (coming back here after it)."""
    session = viewer_session(request)
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(status_code=303, headers={"Location": f"/viewer/login?next={quote(target)}"})
    return session


Reviewer = Annotated[Session, Depends(reviewer)]


def check_csrf(session: Session, token: str | None) -> None:
    if not token or not secrets.compare_digest(token.encode(), session.csrf.encode()):
        raise HTTPException(status_code=403, detail="this form has no valid CSRF token: reload the page and try again")


def _page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


def _next(target: str | None) -> str:
    return target if target and target.startswith("/viewer/") and not target.startswith("//") else "/viewer/"


# ------------------------------------------------------------------------------------------------ login
@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return _page(request, "login.html", next=_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, name: Annotated[str, Form(max_length=64)], password: Annotated[str, Form(max_length=1024)],
          next: Annotated[str | None, Form()] = None) -> Response:
    state = request.app.state
    keys = (f"name:{name}", f"address:{request.client.host if request.client else '?'}")
    wait = state.logins.wait_s(*keys)
    if wait > 0:
        return _page(request, "login.html", 429, next=_next(next),
                     error=f"Too many failed logins. Try again in {int(wait) + 1} s.")
    user = state.store.user(name)
    if user is None or user["disabled_at"] or not password_matches(user["password_hash"] if user else None, password):
        state.logins.failed(*keys)
        state.store.audit(name, "login-failed", detail={"address": keys[1].split(":", 1)[1]}, via="viewer")
        return _page(request, "login.html", 401, next=_next(next), error="Wrong name or password.")
    state.logins.succeeded(keys[0])
    sid, _ = state.sessions.begin(name)
    state.store.audit(name, "login", via="viewer")
    response = RedirectResponse(_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, secure=True, samesite="strict", path="/",
                        max_age=int(state.sessions.hours * 3600))
    return response


@router.post("/logout")
def logout(request: Request, session: Reviewer, csrf: Annotated[str | None, Form()] = None) -> Response:
    check_csrf(session, csrf)
    request.app.state.sessions.end(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/viewer/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


# ------------------------------------------------------------------------------------------------ pages
@router.get("/", response_class=HTMLResponse)
def worklist(request: Request, session: Reviewer, call: Verdict | None = None, status: CaseStatus | None = None,
             since: str | None = None, until: str | None = None) -> HTMLResponse:
    """The cases, suspicious first and the highest scores first within each call."""
    rows = request.app.state.store.list_cases(limit=500, verdict=call, since=since or None, until=until or None)
    if status is not None:
        rows = [r for r in rows if r["status"] == status]
    rows.sort(key=lambda r: (CALL_ORDER.get(r["verdict"], 3), -(r["score"] or 0.0), r["id"]))
    return _page(request, "worklist.html", session=session, cases=rows, calls=list(Verdict),
                 statuses=list(CaseStatus), chosen={"call": call, "status": status, "since": since or "",
                                                    "until": until or ""})


@router.get("/cases/{case_id}", response_class=HTMLResponse)
def case_page(request: Request, case_id: CaseId, session: Reviewer) -> HTMLResponse:
    state = request.app.state
    case = state.store.get_case(case_id)
    if case is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    folder = state.settings.cases_dir / case_id
    summary = _summary(folder)
    view = _view(request, case_id)
    width, height = state.deepzoom.size(view.path) if view.path else (0, 0)
    mpp = state.deepzoom.mpp(view.path) if view.path else None
    return _page(request, "case.html", session=session, case=case, summary=summary, width=width, height=height,
                 view=view, mpp=mpp, has_heatmap=(folder / CaseFile.HEATMAP_OME).is_file(),
                 has_regions=(folder / CaseFile.REGIONS).is_file(),
                 top_patches=_top_patches(folder, summary)[:12],
                 deliveries=state.store.deliveries(case_id),
                 comments=[a for a in state.store.audit_log(case_id) if a["action"] in ("comment", "sign-off")])


@dataclass(frozen=True)
class View:
    """What the deep zoom shows: the original slide file of an `appliance triage`/`batch` case while it is
    there and OpenSlide reads it, else the case pyramid; ``scale`` takes case.ome.tif's pixels (the top
    patches) to its pixels, ``regions_scale`` regions.geojson's units to its pixels."""

    path: Path | None
    name: str
    scale: float = 1.0
    regions_scale: float = 1.0


def _view(request: Request, case_id: str) -> View:
    import openslide

    state = request.app.state
    folder = state.settings.cases_dir / case_id
    pyramid = folder / CaseFile.CASE_OME
    slide = _summary(folder).get("slide") or {}
    source = Path((state.store.get_case(case_id) or {}).get("source") or "")
    ome_width = state.deepzoom.size(pyramid)[0] if pyramid.is_file() else 0
    if slide and source.is_file() and openslide.OpenSlide.detect_format(source):
        width = state.deepzoom.size(source)[0]
        return View(source, source.name, width / ome_width if ome_width else 1.0, 1.0)
    if pyramid.is_file():  # regions of a slide case are in the slide's level-0 pixels
        return View(pyramid, CaseFile.CASE_OME, 1.0, ome_width / slide["width"] if slide.get("width") else 1.0)
    return View(None, "")


def _top_patches(folder: Path, summary: dict) -> list[dict]:
    """The patches that drove the call, in case.ome.tif's pixels, with their class-activation maps
    (top_patches.json); from summary.json, without maps, for a case written before there were any."""
    try:
        return json.loads((folder / CaseFile.TOP_PATCHES_JSON).read_text())["patches"]
    except (OSError, ValueError, KeyError):
        return [dict(p, cam=None) for p in summary.get("top_patches", [])]


def _summary(folder: Path) -> dict:
    try:
        return json.loads((folder / CaseFile.SUMMARY).read_text())
    except (OSError, ValueError):
        return {}  # not written yet, removed by retention, or being made again after a power cut


# ------------------------------------------------------------------------------------------------ deep zoom
def _layer_file(request: Request, case_id: str, layer: str) -> Path:
    if layer not in LAYERS:
        raise HTTPException(status_code=404, detail=f"no layer {layer!r}; one of {', '.join(LAYERS)}")
    if layer == "slide":
        view = _view(request, case_id)
        if view.path is None:
            raise HTTPException(status_code=404, detail=f"case {case_id} has no {CaseFile.CASE_OME} and no slide file")
        return view.path
    path = request.app.state.settings.cases_dir / case_id / LAYERS[layer]
    if not path.is_file():
        raise HTTPException(status_code=404, detail=f"case {case_id} has no {LAYERS[layer]}")
    return path


@router.get("/cases/{case_id}/{layer}.dzi")
def dzi(request: Request, case_id: CaseId, layer: str, _session: Reviewer) -> Response:
    xml = request.app.state.deepzoom.dzi(_layer_file(request, case_id, layer))
    return Response(xml, media_type="application/xml")


@router.get("/cases/{case_id}/{layer}_files/{level}/{col}_{row}.jpeg")
def dz_tile(request: Request, case_id: CaseId, layer: str, level: int, col: int, row: int,
            _session: Reviewer) -> Response:
    path = _layer_file(request, case_id, layer)
    try:
        data = request.app.state.deepzoom.tile(path, level, col, row)
    except ValueError as exc:
        raise HTTPException(status_code=404, detail=f"no tile {level}/{col}_{row}: {exc}") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/cases/{case_id}/patch/{index}.png")
def patch(request: Request, case_id: CaseId, index: int, _session: Reviewer) -> Response:
    """The index-th of the patches that drove the call, cut from the case pyramid at full resolution."""
    folder = request.app.state.settings.cases_dir / case_id
    patches = _top_patches(folder, _summary(folder))
    if not 0 <= index < len(patches):
        raise HTTPException(status_code=404, detail=f"case {case_id} has no top patch {index}")
    p = patches[index]
    pyramid = folder / CaseFile.CASE_OME  # the patch as the model saw it: from the case pyramid
    if not pyramid.is_file():
        raise HTTPException(status_code=404, detail=f"case {case_id} has no {CaseFile.CASE_OME}")
    data = request.app.state.deepzoom.region_png(pyramid, p["x"], p["y"], p["w"], p["h"])
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


# ------------------------------------------------------------------------------------------------ changes
@router.post("/cases/{case_id}/signoff")
def sign_off(request: Request, case_id: CaseId, session: Reviewer, csrf: Annotated[str | None, Form()] = None,
             comment: Annotated[str, Form(max_length=2000)] = "") -> Response:
    check_csrf(session, csrf)
    with store_errors_as_http():
        request.app.state.store.sign_off(case_id, by=session.user, comment=comment, via="viewer")
    return RedirectResponse(f"/viewer/cases/{case_id}", status_code=303)


@router.post("/cases/{case_id}/comment")
def comment(request: Request, case_id: CaseId, session: Reviewer, csrf: Annotated[str | None, Form()] = None,
            comment: Annotated[str, Form(min_length=1, max_length=2000)] = "") -> Response:
    check_csrf(session, csrf)
    if request.app.state.store.get_case(case_id) is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    request.app.state.store.audit(session.user, "comment", case_id=case_id, detail={"comment": comment}, via="viewer")
    return RedirectResponse(f"/viewer/cases/{case_id}", status_code=303)
