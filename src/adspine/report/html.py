"""One self-contained HTML page: inline CSS, PNGs inlined as base64 data URIs, no scripts, no external requests."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from adspine.report.tables import RANKING_HEAD, FamilyTable, config_label, method_name, pct, ranking_cells, slug

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#1d2430;
background:#f6f7f9;line-height:1.45}
header{background:#1f3a5f;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px 0;font-size:24px}
header p{margin:2px 0;font-size:13px;opacity:.9}
nav{background:#fff;border-bottom:1px solid #dde1e6;padding:8px 28px;font-size:14px;position:sticky;top:0;z-index:2}
nav a{margin-right:16px;color:#1f3a5f;text-decoration:none}
main{padding:8px 28px 40px 28px;max-width:1500px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:6px 20px 16px 20px;margin:18px 0}
h2{color:#1f3a5f;border-bottom:2px solid #e3e8ef;padding-bottom:4px}
h3{color:#2c4a70;margin-top:22px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d6dbe1;padding:3px 8px;white-space:nowrap}
th{background:#eef2f7;position:sticky;top:0}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.mean td{background:#f5f8fc;font-style:italic}
tr.first td{border-top:2px solid #8a99ad}
td.best{font-weight:700;color:#0b5d1e}
.rec{background:#eef7ee;border-left:5px solid #2e7d32;padding:10px 14px;margin:10px 0;font-size:15px}
.warn{background:#fff4e5;border-left:5px solid #e07b00;padding:8px 12px}
.muted{color:#5b6675;font-size:13px}
figure{margin:12px 0}
figure img{max-width:100%;border:1px solid #e3e8ef}
figcaption{font-size:13px;color:#5b6675}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid figure{flex:1 1 760px}
.grid figure.wide{flex:1 1 100%}
pre{white-space:pre-wrap;font-size:12px;background:#f3f4f6;padding:6px;margin:0}
"""


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def img(path: Path, alt: str, caption: str | None = None, wide: bool = False) -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    cls = ' class="wide"' if wide else ""
    return f'<figure{cls}><img src="{data_uri(path)}" alt="{escape(alt)}">{cap}</figure>'


def family_table_html(t: FamilyTable) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in ["method", "category", *t.variants])
    body, prev = [], None
    for r in t.rows:
        best = t.best_index(r)
        cls = [c for c, on in (("mean", r.is_mean), ("first", prev is not None and r.method != prev)) if on]
        cells = []
        for i, (a, b) in enumerate(r.cells):
            star = "*" if r.incomplete and r.incomplete[i] else ""
            cells.append(f'<td class="n{" best" if i == best else ""}">{pct(a)} / {pct(b)}{star}</td>')
        m = escape(method_name(r.method)) if r.method != prev else ""
        body.append(f'<tr class="{" ".join(cls)}"><td>{m}</td><td>{escape(r.label)}</td>{"".join(cells)}</tr>')
        prev = r.method
    note = ('<p class="muted">* mean over the categories that have a value.</p>'
            if any(any(r.incomplete) for r in t.rows) else "")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
            + note)


def ranking_html(entries: list[dict]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in RANKING_HEAD)
    body = []
    for e in entries:
        cells = ranking_cells(e)
        tds = "".join(f'<td{"" if j in (1, 2, 3) else " class=n"}>{escape(c)}</td>' for j, c in enumerate(cells))
        body.append(f"<tr>{tds}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def failed_html(failed: list[dict]) -> str:
    if not failed:
        return '<p class="muted">No failed jobs.</p>'
    head = "".join(f"<th>{h}</th>" for h in ["dataset", "category", "backbone", "init", "started", "error"])
    rows = []
    for j in failed:
        err = (j.get("error") or "").strip()
        err = err if len(err) < 1500 else "... " + err[-1500:]  # the end of a traceback says most
        rows.append("<tr>" + "".join(f"<td>{escape(str(j.get(k) or '-'))}</td>" for k in
                                     ("dataset", "category", "backbone", "init", "started_at"))
                    + f"<td><pre>{escape(err) or '-'}</pre></td></tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def render(ctx: dict) -> str:
    """The page from the build context (see ``build.build_report``)."""
    parts = []
    nav = [("recommendation", "Recommendation"), ("ranking", "Ranking"), ("plots", "Plots"),
           ("families", "Family tables"), ("examples", "Examples"), ("failed", "Failed jobs"), ("notes", "Notes")]
    meta = ctx["meta"]
    parts.append(
        "<header><h1>adspine backbone study report</h1>"
        f"<p>{escape(meta['summary'])}</p><p>{escape(meta['hosts'])}</p></header>"
    )
    parts.append("<nav>" + "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in nav) + "</nav><main>")

    if not ctx["datasets"]:
        parts.append('<section><h2>No results</h2><p class="warn">The store holds no finished results.</p></section>')

    sec = ['<section id="recommendation"><h2>Recommendation</h2>']
    for rec in ctx["recommendations"]:
        sec.append(f"<h3>{escape(rec.dataset)}</h3><div class=\"rec\">{escape(rec.text)}</div>")
    sec.append('<p class="muted">Latency = backbone forward ms/img at batch 1 + method predict ms/img (medians over '
               "jobs). Quality = mean image ROC-AUC over categories (mean over Rd seeds).</p></section>")
    parts.append("".join(sec))

    sec = ['<section id="ranking"><h2>Overall ranking</h2>',
           '<p class="muted">Per backbone + init + method, sorted by image ROC-AUC. Metrics in %: for each Rd seed the '
           "mean over categories, then mean ± sample std (ddof=1) over seeds (no ± with a single seed). "
           "Latency in ms "
           "per image (median over jobs; bN = batch N), peak resident memory in MB (max over jobs), parameters and "
           "FLOPs of the truncated backbone.</p>"]
    for ds in ctx["datasets"]:
        sec.append(f"<h3>{escape(ds)}</h3>" + ranking_html(ctx["ranking"][ds]))
    parts.append("".join(sec) + "</section>")

    sec = ['<section id="plots"><h2>Plots</h2>']
    for ds in ctx["datasets"]:
        sec.append(f"<h3>{escape(ds)}</h3><div class=\"grid\">")
        plots = ctx["plots"].get(ds, {})
        captions = {
            "quality vs latency": "Filled = pretrained, hollow = random init; ringed points and the dashed step are "
                                  "the Pareto front (no other configuration is both faster and better).",
            "quality vs memory": "Pareto front over peak resident memory and image ROC-AUC.",
            "pretrained vs random init": "Mean image ROC-AUC per backbone and initialization; error bars = std over "
                                         "Rd seeds.",
            "quality vs ImageNet top-1": "Pretrained configurations whose weights have a known ImageNet top-1.",
        }
        for name, info in plots.items():
            cap = f"{name}: {captions.get(name, '')}"
            if info.get("front"):
                cap += " Pareto front (numbers = ranking #): " + "; ".join(
                    f"#{e['rank']} {config_label(e)}" for e in info["front"]) + "."
            sec.append(img(info["path"], f"{ds} {name}", cap, wide=info.get("wide", False)))
        if not plots:
            sec.append('<p class="muted">Not enough data for plots.</p>')
        missing = [k for k in captions if k not in plots]
        if plots and missing:
            sec.append(f'<p class="muted">Not drawn (no data): {escape(", ".join(missing))}.</p>')
        sec.append("</div>")
    parts.append("".join(sec) + "</section>")

    sec = ['<section id="families"><h2>Family tables</h2>',
           '<p class="muted">Cells: image ROC-AUC / pixel ROC-AUC in %, mean over Rd seeds; best image ROC-AUC per '
           "row in bold; mean rows average the categories. Markdown, LaTeX and CSV versions are in "
           "<code>tables/</code>.</p>"]
    for t in ctx["family_tables"]:
        sec.append(f'<h3 id="fam-{slug(t.name)}">{escape(t.family)} <span class="muted">({escape(t.dataset)})</span>'
                   f"</h3>" + family_table_html(t))
    parts.append("".join(sec) + "</section>")

    sec = ['<section id="examples"><h2>Examples: best and worst backbone per category</h2>',
           '<p class="muted">Method fixed per dataset (its top-ranked method where it ran on the category); top row = '
           "best, bottom row = worst backbone by image ROC-AUC. Green contour = ground truth; colour = anomaly map, "
           "scaled per row.</p>"]
    shown = [x for x in ctx["examples"] if x.path is not None]
    for x in shown:
        sec.append(f"<h3>{escape(x.dataset)} / {escape(x.category)}</h3>")
        sec.append(img(x.path, f"{x.dataset} {x.category} examples",
                       f"best: {x.best.label} ({pct(x.best.image_auroc)} %)"
                       + (f"; worst: {x.worst.label} ({pct(x.worst.image_auroc)} %)" if x.worst else "")))
        for note in dict.fromkeys(x.notes):
            sec.append(f'<p class="warn">{escape(note)}</p>')
    if not shown:
        sec.append('<p class="muted">No example maps in the store.</p>')
    parts.append("".join(sec) + "</section>")

    parts.append(f'<section id="failed"><h2>Failed jobs ({len(ctx["failed"])})</h2>{failed_html(ctx["failed"])}'
                 "</section>")

    files = "".join(f"<li><code>{escape(f)}</code></li>" for f in ctx["files"])
    parts.append(
        '<section id="notes"><h2>Notes</h2><ul>'
        "<li>ROC-AUC and AUPRO are shown in %; '-' marks a value that is missing (e.g. no pixel ground truth).</li>"
        "<li>Family table cells: mean over Rd seeds per category; the mean rows average those cells over categories."
        "</li><li>Ranking: per seed the mean over categories first, then mean and sample std (ddof=1) over seeds."
        "</li><li>F1 figures are not shown: their threshold is chosen on the test set.</li></ul>"
        f"<p>Files written next to this page:</p><ul>{files}</ul></section>"
    )
    parts.append("</main>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>adspine report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
