"""`appliance models`: list, verify and evaluate model folders. Registered on the `appliance` command by
appliance.cli."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance import RESEARCH_USE_NOTICE
from appliance.commands.common import ENGINES, friendly_errors
from appliance.commands.common import settings_for as _settings
from appliance.model.ref import ModelRef
from appliance.offline.progress import Progress
from appliance.terms import CaseRule, rule_words


@click.group()
def models() -> None:
    """Inspect and evaluate models."""


@models.command("list")
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Folder of model folders (default: the parent of the configured model folder).")
@click.pass_context
@friendly_errors
def models_list(ctx, root: Path | None) -> None:
    """List model folders with their version, hash status and headline metrics."""
    from appliance.errors import ManifestError
    from appliance.model.manifest import find_model_dirs, read_manifest, verify_files

    settings = _settings(ctx)
    root = root or settings.model_dir.parent
    dirs = find_model_dirs(root)
    if not dirs:
        raise click.ClickException(f"no model folders (with manifest.json) under {root}")
    for d in dirs:
        mark = "*" if d.resolve() == settings.model_dir.resolve() else " "
        try:
            m = read_manifest(d)
        except ManifestError as exc:
            click.echo(f"{mark} {d.name:<20} INVALID MANIFEST: {str(exc).splitlines()[0]}")
            continue
        problems = verify_files(d, m)
        state = "hashes ok" if not problems else f"{len(problems)} FILE(S) FAIL THEIR HASH"
        click.echo(f"{mark} {d.name:<20} {m.name} {m.version}  sha256 {m.digest[:12]}  {state}  ({d})")
        for p in problems:
            click.echo(f"    {p}")
    click.echo("* = the model the appliance uses (settings.model_dir)")


@models.command("verify")
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--engine", type=ENGINES, default=None)
@click.pass_context
@friendly_errors
def models_verify(ctx, model_dir: Path | None, engine: str | None) -> None:
    """Check a model folder's manifest and hashes and load it."""
    from appliance.model.engine import load_engine

    settings = _settings(ctx, engine=engine, model_dir=model_dir)
    eng = load_engine(settings.model_dir, settings.engine)
    click.echo(json.dumps(eng.model_ref.to_dict(), indent=1))


@models.command("evaluate")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--predictions", type=click.Path(path_type=Path), required=True, help="CSV to write, one row per image.")
@click.option("--engine", type=ENGINES, default=None)
@click.option("--model-dir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write metrics as JSON.")
@click.pass_context
@friendly_errors
def models_evaluate(ctx, dataset: Path, predictions: Path, engine: str | None, model_dir: Path | None,
                    json_out: Path | None) -> None:
    """Score a folder laid out as <patient>/<0|1>/*.png and print patch- and patient-level metrics."""
    from appliance.model.engine import load_engine
    from appliance.offline.evaluation import evaluate_folder

    settings = _settings(ctx, engine=engine, model_dir=model_dir)
    eng = load_engine(settings.model_dir, settings.engine)
    bar = Progress("images", None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    metrics = evaluate_folder(eng, dataset, predictions, progress=progress)
    bar.close()
    click.echo(format_metrics(metrics, eng.model_ref))
    if json_out:
        json_out.write_text(json.dumps(metrics | {"model": eng.model_ref.to_dict()}, indent=1))
    click.echo(f"wrote {predictions}. {RESEARCH_USE_NOTICE}")


def format_metrics(m: dict, model: ModelRef) -> str:
    def f(v):
        return "  n/a" if v is None else f"{v:.3f}"

    rows = [f"model {model.name} {model.version} ({model.backend})",
            f"{'level':<10}{'n':>7}{'pos':>6}{'AUC':>7}{'BalAcc':>8}{'F1':>7}{'Sens':>7}{'Spec':>7}"]
    for level in ("patches", "patients"):
        x = m[level]
        rows.append(f"{level:<10}{x['n']:>7}{x['positives']:>6}{f(x['auc']):>7}{f(x['balanced_accuracy']):>8}"
                    f"{f(x['f1']):>7}{f(x['sensitivity']):>7}{f(x['specificity']):>7}")
    first = m.get("patches_first_stage")
    if m.get("context_stage") and first:
        rows.append(f"{'1st stage':<10}{first['n']:>7}{first['positives']:>6}{f(first['auc']):>7}"
                    f"{f(first['balanced_accuracy']):>8}{f(first['f1']):>7}{f(first['sensitivity']):>7}"
                    f"{f(first['specificity']):>7}   (patch classifier alone, before the context stage)")
    rule = rule_words(m.get("case_rule", CaseRule.TOP_K_MEAN), m["top_k"])
    rows.append(f"patients: {m['n_patients']}; mean per-patient balanced accuracy "
                f"{f(m['mean_patient_balanced_accuracy'])} over {m['patients_with_both_classes']} patients with "
                f"both classes; patch threshold {m['patch_threshold']:.3f}; patient score = {rule} "
                f"vs {m['case_threshold']:.3f}")
    if m.get("unreadable"):
        rows.append(f"{len(m['unreadable'])} unreadable images were left out: " + "; ".join(m["unreadable"][:5]))
    return "\n".join(rows)
