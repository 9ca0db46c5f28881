"""The site validation report: report.json with its own sha256, and one self-contained printable HTML page."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from appliance.errors import InputError
from appliance.site.stats import RECOMMENDATION_RULE

CSS = """
body { font-family: sans-serif; max-width: 80em; margin: 1em auto; color: #111; }
.notice { border: 3px solid #b00; background: #fee; padding: .6em 1em; font-weight: bold; font-size: 1.1em; }
.note { border: 2px solid #a60; background: #fff4e0; padding: .5em 1em; font-weight: bold; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #999; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #eee; }
.side { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.side > div { flex: 1 1 30em; }
code { word-break: break-all; }
img { max-width: 100%; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ci(ci) -> str:
    return "—" if not ci else f"[{_num(ci[0])}, {_num(ci[1])}]"


def _rows(rows: list[tuple], header: tuple | None = None) -> str:
    """An HTML table; every cell is escaped here."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _png(fig: Figure) -> str:
    """The figure as a data: URI, drawn by Agg (no pyplot, so no global state)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _operating_points(report: dict) -> list[tuple[str, dict, str]]:
    points = [("shipped", report["shipped"], "tab:blue")]
    if report.get("recommended"):
        points.append(("recommended", report["recommended"], "tab:purple"))
    return points


def _roc_png(report: dict) -> str:
    fig = Figure(figsize=(6.4, 5.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(report["roc"]["fpr"], report["roc"]["tpr"], color="black", label="ROC (this lab)")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    for name, point, colour in _operating_points(report):
        if point["sensitivity"] is not None and point["specificity"] is not None:
            ax.plot(1 - point["specificity"], point["sensitivity"], "o", color=colour, markersize=9,
                    label=f"{name} threshold {point['threshold']:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.set_title("ROC curve on this lab's callable cases")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _scores_png(report: dict) -> str:
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    called = [c for c in report["cases"] if c["callable"] and c["score"] is not None]
    scores = [c["score"] for c in called]
    bins = np.linspace(min(scores + [0.0]), max(scores + [1.0]), 26)
    for label, name, colour in ((1, "malignant", "tab:red"), (0, "benign", "tab:green")):
        ax.hist([c["score"] for c in called if c["label"] == label], bins=bins, alpha=0.5, color=colour,
                edgecolor=colour, label=f"{name} cases")
    for name, point, colour in _operating_points(report):
        ax.axvline(point["threshold"], color=colour, linestyle="--", linewidth=2,
                   label=f"{name} threshold {point['threshold']:.3f}")
    ax.set(xlabel="case score", ylabel="number of cases")
    ax.set_title("Scores of callable cases" if called else "No callable cases")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _summary(report: dict) -> str:
    cases = report["cases"]
    n, n_callable = len(cases), sum(c["callable"] for c in cases)
    n_malignant = sum(c["label"] == 1 for c in cases)
    reasons = ", ".join(f"{code}: {k}" for code, k in sorted(report["cannot_call"]["by_reason"].items()))
    auc = report["auc"]
    rows = [
        ("Cases", n), ("Malignant / benign", f"{n_malignant} / {n - n_malignant}"), ("Callable", n_callable),
        ("Cannot call", f"{(n - n_callable) / n:.1%} ({n - n_callable} of {n})" if n else "—"),
        ("Cannot-call reasons", reasons or "none"),
        ("AUC [95% CI]", f"{_num(auc['value'])} {_ci(auc['ci95'])} ({auc['method']})" if auc else "not computable"),
    ]
    for name, point, _ in _operating_points(report):
        rows.append((f"{name.capitalize()} threshold", _num(point["threshold"])))
        rows += [(f"{name.capitalize()} {m} [95% CI]", f"{_num(point[m])} {_ci(point[m + '_ci95'])}")
                 for m in ("sensitivity", "specificity")]
    return "<div><h3>This lab</h3>" + _rows(rows) + "</div>"


CARD_MEASURES = {"auc": "AUC", "sensitivity": "sensitivity at the shipped threshold",
                 "specificity": "specificity at the shipped threshold"}


def _card(report: dict) -> str:
    card, agreement, shipped = report.get("model_card") or {}, report.get("agreement") or {}, report["shipped"]
    lab = {"auc": (report["auc"] or {}).get("value"), "auc_ci95": (report["auc"] or {}).get("ci95")} | shipped
    overlap = {True: "yes", False: "NO"}
    rows = [(label, f"{_num(lab.get(name))} {_ci(lab.get(name + '_ci95'))}",
             f"{_num(card.get(name))} {_ci(card.get(name + '_ci95'))}", overlap.get(agreement.get(name), "—"))
            for name, label in CARD_MEASURES.items()]
    rows.append(("threshold", _num(shipped["threshold"]), _num(card.get("threshold")), ""))
    rows += [(name, "", "", overlap[ok]) for name, ok in agreement.items() if name not in CARD_MEASURES]
    source = f"<p>Model card figures from: {_e(card['source'])}</p>" if card.get("source") else ""
    return ("<div><h3>This lab against the model card</h3>"
            + _rows(rows, ("measure", "this lab [95% CI]", "model card [95% CI]", "CIs overlap")) + source + "</div>")


def render_html(report: dict) -> str:
    """One self-contained HTML page (inline CSS, plots as data: URIs) for a lab technician to read or print."""
    notice, model = _e(report["notice"]), report["model"]
    rec = report.get("recommended")
    note = f'<p class="note">{_e(report.get("recommendation_note") or "No threshold recommended.")}</p>'
    roc = (f'<img id="roc" alt="ROC curve" src="{_roc_png(report)}">' if report.get("roc")
           else "<p>No ROC curve: the callable cases do not include both malignant and benign cases.</p>")
    cases = [(c["case_id"], c["input"], c["specimen"], "malignant" if c["label"] == 1 else "benign", c["status"],
              c["verdict"], _num(c["score"], 3), ", ".join(c["reasons"])) for c in report["cases"]]
    spreads = [(name, s["n"], _num(s["p05"]), _num(s["p50"]), _num(s["p95"])) if s else (name, 0, "—", "—", "—")
               for name, s in sorted(report["distributions"].items())]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Site validation</title><style>{CSS}</style></head><body>
<h1>Site validation</h1>
<p class="notice">{notice}</p>
<p>Model: <b>{_e(model["name"])} {_e(model["version"])}</b>, sha256 <code>{_e(model["sha256"])}</code><br>
Created: {_e(report["created_at"])}<br>Report sha256: <code>{_e(report.get("report_sha256", ""))}</code></p>
<h2>Summary</h2>{note}
<div class="side">{_summary(report)}{_card(report)}</div>
<h2>ROC curve</h2>{roc}
<h2>Case scores</h2><img id="scores" alt="Case scores by label" src="{_scores_png(report)}">
<h2>Cases</h2>
{_rows(cases, ("case", "input", "specimen", "label", "status", "verdict", "score", "cannot-call reasons"))}
<h2>Drift reference</h2>
<p>Once this report is accepted, the drift watch compares the lab's recent cases with these cases.</p>
{_rows(spreads, ("measure", "n", "5th percentile", "median", "95th percentile"))}
<h2>How the threshold is recommended</h2><p>{_e(rec["rule"] if rec else RECOMMENDATION_RULE)}</p>
<p class="notice">{notice}</p>
</body></html>
"""


def report_digest(report: dict) -> str:
    """sha256 of the report's canonical JSON, leaving out its own ``report_sha256``."""
    body = {k: v for k, v in report.items() if k != "report_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_report(out_dir: Path, report: dict) -> dict:
    """Stamp ``report`` with its sha256 and write report.json and report.html into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["report_sha256"] = digest = report_digest(report)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    _write_atomic(json_path, json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n")
    _write_atomic(html_path, render_html(report))
    return {"json": json_path, "html": html_path, "sha256": digest}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in a site report")


def read_report(out_dir: Path) -> dict:
    """The report.json in ``out_dir``, after checking its sha256; InputError if missing, malformed or changed."""
    path = Path(out_dir) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise InputError(f"No site report at {path}: run the site validation first.") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, or NaN/Infinity (which write_report never writes)
        raise InputError(f"The site report {path} is not valid JSON ({exc}).") from None
    if not isinstance(report, dict) or report.get("report_sha256") != report_digest(report):
        raise InputError(f"The site report {path} was changed after it was written: its report_sha256 does not match.")
    return report
