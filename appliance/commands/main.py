"""The `appliance` command: thin edges over the library; named errors become one clear line and exit 1."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from firmware_bridge.pixels import TileEncoding

from appliance import RESEARCH_USE_NOTICE, __version__
from appliance.commands.access import tls, users
from appliance.commands.common import ENGINES, accession_option, friendly_errors
from appliance.commands.common import settings_for as _settings
from appliance.commands.config import config
from appliance.commands.models import models
from appliance.commands.site import site
from appliance.offline.progress import Progress
from appliance.offline.sources import DEFAULT_TILE_SIZE
from appliance.terms import BatchStatus

ENCODINGS = [e.name.lower() for e in TileEncoding]  # the scanner link's tile encodings


@click.group()
@click.version_option(__version__, prog_name="appliance")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Settings file (TOML). Default: /etc/appliance/appliance.toml if it exists.")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Bench triage appliance. For research and triage only, not for diagnosis."""
    ctx.obj = {"config_file": config_file}


@main.command()
@click.option("--tile-size", default=DEFAULT_TILE_SIZE, show_default=True, help="Scanner tile size in pixels.")
@click.option("--encoding", type=click.Choice(ENCODINGS), default="zlib", show_default=True)
@click.option("--engine", type=ENGINES, default=None, help="Inference engine (default from settings).")
@click.option("--api-port", type=int, default=None, help="Status API port (0 picks a free one).")
@click.option("--tui/--no-tui", default=None,
              help="Show the terminal UI while the case streams (default: when run in a terminal).")
@click.pass_context
@friendly_errors
def demo(ctx, tile_size: int, encoding: str, engine: str | None, api_port: int | None, tui: bool | None) -> None:
    """Stream the bundled demo case from the scanner emulator over a real pty into the daemon."""
    from appliance.commands.demo import run_demo

    settings = _settings(ctx, engine=engine, api_port=api_port)
    if tui is None:
        tui = sys.stdin.isatty() and sys.stdout.isatty()
    outcome = run_demo(settings, tile_size=tile_size, encoding=encoding, tui=tui)
    sys.exit(outcome.exit_code)


@main.command()
@click.option("--port", default=None, help="Scanner device path or pyserial URL (default from settings).")
@click.pass_context
@friendly_errors
def run(ctx, port: str | None) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C (systemd: Type=notify, WatchdogSec=)."""
    from appliance.api.app import daemon_api
    from appliance.service.daemon import Daemon, serve
    from appliance.service.events import Event, TileStored
    from appliance.service.heap import tune_allocator
    from appliance.service.systemd import SystemdNotifier

    tune_allocator()  # before the engine's and the link's threads allocate: a steady RSS for months
    settings = _settings(ctx, serial_port=port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def notify(event: Event) -> None:
        if not isinstance(event, TileStored):
            click.echo(f"[{event.kind}] " + ", ".join(f"{k}={v}" for k, v in event.data().items()), err=True)

    daemon = Daemon(settings, notify=notify, api=daemon_api)
    daemon.start()
    if settings.fault_injection and daemon.pipeline is not None:
        signal.signal(signal.SIGUSR1, lambda *_: daemon.pipeline.hang.set())
        click.echo("[fault-injection] on: SIGUSR1 hangs the pipeline thread", err=True)
    try:
        serve(daemon, SystemdNotifier(), stop)
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stop()


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the result here.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write overlay.png, case.ome.tif, heatmap.ome.tif, regions.geojson and summary.json here.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Microns per pixel of INPUT. A slide file's own metadata is used when it states one; "
                   "other images default to the model's own (no resampling).")
@click.option("--engine", type=ENGINES, default=None)
@click.option("--tile-size", default=DEFAULT_TILE_SIZE, show_default=True,
              help="Tile size used to cut a single image into scanner tiles.")
@click.option("--geojson-tiles", is_flag=True,
              help="Also put every scored patch in regions.geojson, as a locked QuPath tile with its probability.")
@click.option("--accession", callback=accession_option, default=None,
              help="The lab's accession / order number of the case (recorded in summary.json).")
@click.pass_context
@friendly_errors
def triage(ctx, input_path: Path, json_out: Path | None, out_dir: Path | None, mpp: float | None,
           engine: str | None, tile_size: int, geojson_tiles: bool, accession: str | None) -> None:
    """Triage a case on disk: a slide file (SVS, NDPI, MRXS, SCN, Philips/generic pyramid TIFF, DICOM WSI),
    one image, or a folder of tiles named like '..._x<X>_y<Y>.png'."""
    from appliance.model.engine import load_engine
    from appliance.offline.triage import triage_path

    if json_out is None and out_dir is None:
        raise click.UsageError("say where the result goes: --json FILE and/or --out DIR")
    if geojson_tiles and out_dir is None:
        raise click.UsageError("--geojson-tiles goes into regions.geojson: give --out DIR")
    from appliance.store.points import read_point, thresholds_in_force

    settings = _settings(ctx, engine=engine)
    eng = load_engine(settings.model_dir, settings.engine)
    thresholds = thresholds_in_force(read_point(settings.db_path), eng.manifest)
    bar = Progress("tiles", None)

    def progress(n: int, total: int | None, score: float) -> None:
        bar.total = total
        bar.update(n, f"running score {score:.3f}")

    result = triage_path(eng, input_path, tile_size=tile_size, batch_size=settings.batch_size, out_dir=out_dir,
                         microns_per_pixel=mpp, progress=progress, geojson_tiles=geojson_tiles,
                         thresholds=thresholds, accession=accession)
    bar.close()
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
    click.echo(f"{result['verdict']}  score {result['score']:.3f}  threshold {result['threshold']:.3f} "
               f"({thresholds.words()})  ({len(result['patches'])} patches, {result['tiles']} tiles)")
    if result["early_positive"]:
        click.echo(f"  early positive after {result['early_positive_after_tiles']} tiles")
    for r in result["reasons"]:
        click.echo(f"  cannot call: {r['message']} [{r['code']}]")
    for r in result["warnings"]:
        click.echo(f"  warning: {r['message']} [{r['code']}]")
    for s in result["skipped_inputs"]:
        click.echo(f"  skipped {s['name']}: {s['reason']}", err=True)
    wrote = [str(p) for p in (json_out, out_dir) if p is not None]
    click.echo(f"wrote {', '.join(wrote)}. {RESEARCH_USE_NOTICE}")


@main.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1, type=click.Path(path_type=Path))
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV of inputs: a 'path' (or 'input') column and an optional 'specimen' column.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Each case's files go into OUT/<case id> (default: the daemon's cases folder, served by the API).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one CSV row per input here: input, specimen, status, verdict, score, reasons, ...")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Worker processes of the embedded cluster (default: one per 2 cores).")
@click.option("--scheduler", default=None, help="A Dask scheduler to submit to instead, e.g. tcp://10.0.0.5:8786.")
@click.option("--retry-failed", is_flag=True, help="Try again the inputs that failed on an earlier run.")
@click.option("--deliver", is_flag=True,
              help="Queue each call for the lab's systems (the LIS settings), for the daemon's outbox to send. "
                   "Off by default: a batch's calls stay in the case store.")
@click.pass_context
@friendly_errors
def batch(ctx, inputs: tuple[Path, ...], manifest: Path | None, out_dir: Path | None, report: Path | None,
          workers: int | None, scheduler: str | None, retry_failed: bool, deliver: bool) -> None:
    """Re-triage an archive (slide files, images, tile folders) on Dask: an embedded cluster by default, a
    lab's scheduler with --scheduler. Every case is recorded in the case store; a rerun skips what is done
    with the same model, and a run stopped halfway resumes."""
    from appliance.lis.outbox import destinations_of
    from appliance.offline.batch import Tally, connect, read_inputs, run_batch, write_report

    settings = _settings(ctx)
    destinations = destinations_of(settings)
    if deliver and not destinations:
        raise click.UsageError("--deliver: no LIS destination is set (lis_mllp, lis_fhir_url)")
    items = read_inputs(inputs, manifest)
    click.echo(f"LIS: each call is queued for {', '.join(d.name for d in destinations)} (sent by the daemon's outbox)"
               if deliver else "LIS: the calls are not sent to the lab's systems (--deliver sends them)", err=True)
    bar, tally = Progress("slides", len(items)), Tally(len(items))

    def on_row(row, finished: int, total: int) -> None:
        tally.add(row)
        bar.update(finished, tally.line())

    with connect(scheduler, workers) as (client, threads):
        click.echo(f"{len(items)} inputs on {len(client.scheduler_info()['workers'])} workers "
                   f"({scheduler or 'embedded cluster'}); dashboard: {client.dashboard_link or 'not available'}",
                   err=True)
        rows = run_batch(items, settings, client, out_root=out_dir, threads=threads, retry_failed=retry_failed,
                         deliver=deliver, on_row=on_row)
    bar.close(tally.summary())
    if report is not None:
        write_report(report, rows)
    for row in rows:
        if row.status == BatchStatus.FAILED:
            click.echo(f"  failed {row.input}: {row.reasons}", err=True)
    click.echo(f"{tally.summary()}{f'; report {report}' if report else ''}. {RESEARCH_USE_NOTICE}")
    if tally.counts[BatchStatus.FAILED]:
        ctx.exit(1)


@main.command()
@click.option("--port", required=True, help="Serial device path or pyserial URL to write to.")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--encoding", type=click.Choice(ENCODINGS), default="zlib", show_default=True)
@click.option("--faults", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of frames damaged: bit flips, dropped bytes, truncation, duplication, reordering.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tile-size", default=DEFAULT_TILE_SIZE, show_default=True)
@click.option("--case-id", default=None, help="Case id to announce (default: derived from INPUT and time).")
@click.option("--accession", callback=accession_option, default=None,
              help="The lab's accession / order number to announce with the case (the LIS matches the call by it).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Microns per pixel of INPUT (a slide file's own metadata is used when it states one; "
                   "otherwise 4.0, the bundled case's).")
@click.pass_context
@friendly_errors
def emulate(ctx, port: str, input_path: Path, encoding: str, faults: float, seed: int, tile_size: int,
            case_id: str | None, accession: str | None, mpp: float | None) -> None:
    """Act as the scanner: stream INPUT (slide file, image or tile folder) to PORT tile by tile. A slide is
    sent at the pyramid level nearest the model's resolution, tissue tiles only, announced at that level's µm/px;
    each slide tile is read when it is sent, so the slide is never held in memory."""
    import contextlib
    import functools
    import time

    from firmware_bridge import Faults, ScannerEmulator, TileOnDemand, TileToSend
    from firmware_bridge.transport import open_port

    from appliance.model.manifest import read_manifest
    from appliance.offline.demo import DEMO_CASE_MPP, case_info_for
    from appliance.offline.slides import Slide, is_slide
    from appliance.offline.sources import iter_case_tiles

    with contextlib.ExitStack() as stack:
        if is_slide(input_path):
            target = read_manifest(_settings(ctx).model_dir).input.microns_per_pixel
            slide = stack.enter_context(Slide(input_path, target, mpp))
            read = functools.lru_cache(maxsize=1)(slide.read)  # the tile being sent, read once, then let go
            tiles = [TileOnDemand(x, y, w, h, functools.partial(read, x, y, w, h))
                     for x, y, w, h in slide.tile_boxes(tile_size)]
            mpp = slide.info.level_microns_per_pixel
        else:
            tiles = [TileToSend(t.x, t.y, t.pixels) for t in iter_case_tiles(input_path, tile_size)]
        if not tiles:
            raise click.ClickException(f"{input_path}: no tissue tiles to send")
        case_id = case_id or time.strftime("CASE-%Y%m%d-%H%M%S")
        info = case_info_for(case_id, input_path.name, tiles, mpp or DEMO_CASE_MPP, tile_size, accession or "")
        bar = Progress("tiles acked", len(tiles))
        emulator = ScannerEmulator(
            open_port(port, timeout=0.1), info, tiles, encoding=encoding,
            faults=Faults(faults, seed) if faults > 0 else None,
            progress=lambda sent, acked, total: bar.update(acked),
        )
        result = emulator.run()
    summary = f"{result.tiles_sent} tiles sent, {result.retransmits} retransmits"
    if emulator.faults is not None:
        summary += f", {emulator.faults.total} faults injected ({dict(emulator.faults.counts)})"
    bar.close(summary)


@main.command()
@click.option("--url", default=None, help="API base URL (default: from settings, http://127.0.0.1:8470).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.pass_context
@friendly_errors
def status(ctx, url: str | None, as_json: bool) -> None:
    """Show the running daemon's live status (a client of GET /status)."""
    import httpx

    settings = _settings(ctx)
    url = (url or settings.api_url).rstrip("/")
    try:
        r = httpx.get(f"{url}/status", timeout=5, verify=settings.api_verify)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the appliance at {url}: {exc}") from None
    st = r.json()
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    link = st.get("link") or {}
    click.echo(f"appliance {st.get('version')}   {st.get('notice', RESEARCH_USE_NOTICE)}")
    click.echo(f"scanner link: {link.get('state', 'unknown')} on {link.get('port', '?')}"
               + (f"   last error: {link['last_error']}" if link.get("last_error") else ""))
    if st.get("problem"):
        click.echo(f"NOT READY: {st['problem']}")
    m = st.get("model")
    if m:
        click.echo(f"model: {m['name']} {m['version']} ({m['backend']}), sha256 {m['sha256'][:16]}...")
    c = st.get("case")
    if c:
        state = c.get("verdict") or ("EARLY POSITIVE" if c.get("early_positive") else "scanning")
        click.echo(f"case {c['case_id']} ({c.get('specimen_id') or '-'}): {c['tiles_received']}/"
                   f"{c.get('tiles_expected') or '?'} tiles received, {c['tiles_processed']} processed, "
                   f"score {c['score']:.3f}, {state}"
                   + (f", about {c['eta_s']:.0f} s to go" if c.get("eta_s") and not c.get("verdict") else ""))
        for w in c.get("warnings") or []:
            click.echo(f"  QC warning: {w['message']}")
    else:
        click.echo("no case yet")
    storage = st.get("storage") or {}
    if storage.get("free_bytes") is not None:
        click.echo(f"disk: {storage['free_bytes'] / 1e9:.1f} GB free"
                   + ("" if storage.get("accepting_cases", True) else f"   NOT ACCEPTING CASES: {storage['reason']}"))


@main.command()
@click.option("--api", "url", default=None, help="Status API URL (default from settings).")
@click.pass_context
@friendly_errors
def tui(ctx, url: str | None) -> None:
    """The technician's terminal UI over the status API (live scan, verdict cards, history, sign-off)."""
    from appliance.tui.app import TriageApp

    settings = _settings(ctx)
    url = url or settings.api_url
    TriageApp(url, settings.token_path, verify=settings.api_verify).run()


main.add_command(config)
main.add_command(models)
main.add_command(site)
main.add_command(tls)
main.add_command(users)

if __name__ == "__main__":
    main()
