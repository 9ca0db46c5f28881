"""`appliance site`: validate the appliance on the lab's own cases, and accept, undo or show a site operating
point (docs/site-validation.md). Registered on the `appliance` command by appliance.cli."""

from __future__ import annotations

from pathlib import Path

import click

from appliance import RESEARCH_USE_NOTICE
from appliance.commands.common import friendly_errors
from appliance.commands.common import settings_for as _settings
from appliance.offline.progress import Progress


@click.group()
def site() -> None:
    """Validate the appliance on your lab's own cases, and accept or undo a site operating point."""


@site.command("validate")
@click.option("--manifest", "manifest_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV of the lab's cases: path (slide file, image or tile folder), label (malignant/benign or "
                   "1/0) and an optional specimen.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html and report.json.")
@click.option("--scheduler", default=None, help="A Dask scheduler to submit to, e.g. tcp://10.0.0.5:8786.")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Worker processes of the embedded cluster (default: one per 2 cores).")
@click.option("--target-sensitivity", "target", type=click.FloatRange(0, 1, min_open=True), default=0.98,
              show_default=True, help="The sensitivity the recommended site threshold must reach.")
@click.pass_context
@friendly_errors
def site_validate(ctx, manifest_csv: Path, out_dir: Path, scheduler: str | None, workers: int | None,
                  target: float) -> None:
    """Triage the lab's labelled cases (Dask, resumable: a rerun skips what is done) and write a report: AUC,
    sensitivity and specificity with CIs, a recommended site threshold, cannot-call reasons, the model card's
    figures beside the lab's, and the drift reference of these cases."""
    from appliance.offline.batch import Tally, connect
    from appliance.site.validate import read_site_cases, validate

    settings = _settings(ctx)
    total = len(read_site_cases(manifest_csv))
    bar, tally = Progress("cases", total), Tally(total)

    def on_row(row, finished: int, _total: int) -> None:
        tally.add(row)
        bar.update(finished, tally.line())

    with connect(scheduler, workers) as (client, threads):
        report, written = validate(manifest_csv, out_dir, settings, client, target=target, threads=threads,
                                   on_row=on_row)
    bar.close(tally.summary())
    auc = report["auc"]
    shipped = report["shipped"]
    click.echo(f"{report['counts']['callable_malignant']} malignant and {report['counts']['callable_benign']} "
               f"benign callable cases; {report['counts']['cannot_call']} cannot call, "
               f"{report['counts']['failed']} failed")
    if auc:
        click.echo(f"AUC {auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]; at the model's threshold "
                   f"{shipped['threshold']:.4f}: sensitivity {shipped['sensitivity']}, specificity "
                   f"{shipped['specificity']}")
    click.echo(report["recommendation_note"])
    click.echo(f"wrote {written['html']} and {written['json']} (sha256 {written['sha256'][:16]}...). "
               f"{RESEARCH_USE_NOTICE}")
    if report["counts"]["failed"]:
        ctx.exit(1)


def _initials(ctx, param, value: str) -> str:
    import re

    from appliance.terms import INITIALS_PATTERN

    if not re.match(INITIALS_PATTERN, value) or len(value) > 16:
        raise click.BadParameter("initials: letters, spaces, '.', \"'\" and '-', at most 16, starting with a letter")
    return value


def _site_change(ctx, action: str, report_dir: Path | None, url: str | None, initials: str) -> dict:
    """Accept or reset the site point, audited with ``initials``: as root straight into the case store,
    otherwise through the API with its token (POST /site/accept, /site/reset)."""
    import os

    import httpx

    from appliance.api.auth import ensure_token
    from appliance.site.report import read_report

    settings = _settings(ctx)
    report = read_report(report_dir) if report_dir is not None else None
    if os.geteuid() == 0:
        from appliance.model.manifest import read_manifest
        from appliance.store.points import point_from_report
        from appliance.store import CaseStore

        store = CaseStore(settings.db_path)
        try:
            if report is not None:
                return store.accept_site_point(point_from_report(report, read_manifest(settings.model_dir)),
                                               by=initials, via="cli")
            return store.reset_site_point(by=initials, via="cli")
        finally:
            store.close()
    url = (url or settings.api_url).rstrip("/")
    token = ensure_token(settings.token_path)
    try:
        body = {"initials": initials} | ({"report": report} if report is not None else {})
        r = httpx.post(f"{url}/site/{action}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                       verify=settings.api_verify)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"not root, and cannot reach the appliance at {url}: {exc}") from None
    if r.status_code >= 400:
        raise click.ClickException(f"the appliance refused: {r.json().get('detail', r.text)}")
    return r.json()


@site.command("accept")
@click.argument("report_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--initials", required=True, callback=_initials, help="Who accepts it (kept in the audit trail).")
@click.option("--api", "url", default=None, help="API URL, when not root (default from settings).")
@click.pass_context
@friendly_errors
def site_accept(ctx, report_dir: Path, initials: str, url: str | None) -> None:
    """Put the site threshold of a validation report in force from the next case on (root, or the API
    token). The report must be unchanged since it was written and be of the model the appliance runs."""
    point = _site_change(ctx, "accept", report_dir, url, initials)
    click.echo(f"site threshold {point['threshold']:.4f} in force from the next case (accepted {point['accepted_at']} "
               f"by {point['accepted_by']}, report {point['report_sha256'][:16]}...). Undo: appliance site reset")


@site.command("reset")
@click.option("--initials", required=True, callback=_initials, help="Who undoes it (kept in the audit trail).")
@click.option("--api", "url", default=None, help="API URL, when not root (default from settings).")
@click.pass_context
@friendly_errors
def site_reset(ctx, initials: str, url: str | None) -> None:
    """End the site operating point: the model's own threshold decides from the next case on."""
    point = _site_change(ctx, "reset", None, url, initials)
    click.echo(f"site threshold {point['threshold']:.4f} ended ({point['ended_at']}); the model's threshold "
               f"decides from the next case on")


@site.command("show")
@click.pass_context
@friendly_errors
def site_show(ctx) -> None:
    """The threshold in force, and every site operating point accepted so far."""
    from appliance.model.manifest import read_manifest
    from appliance.store.points import read_point, thresholds_in_force

    settings = _settings(ctx)
    manifest = read_manifest(settings.model_dir)
    point = read_point(settings.db_path)
    click.echo(f"in force: {thresholds_in_force(point, manifest).words()}; the model's own is "
               f"{manifest.decision.case_threshold:.4f}")
    if point is not None and point["model_sha256"] != manifest.digest:
        click.echo("  (the accepted site point is for another model; validate this model to set one for it)")
    if point is not None:
        click.echo(f"  site point {point['id']}: threshold {point['threshold']:.4f} for sensitivity "
                   f"{point['target_sensitivity']:g}, from {point['malignant']} malignant and {point['benign']} benign "
                   f"cases; accepted {point['accepted_at']} by {point['accepted_by']} ({point['accepted_via']}); "
                   f"report sha256 {point['report_sha256']}")
