"""One self-contained HTML page: inline CSS, PNGs inlined as base64 data URIs, no scripts, no external requests."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from adspine.report.tables import (RANKING_HEAD, FamilyTable, baseline_cells, baseline_note, config_label,
                                   method_name, pct, ranking_cells, ranking_note, slug)

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
tr.close td{background:#f1f8f1}
tr.ref td{background:#f7f3ea;font-style:italic}
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
    groups = [(v, [c for c in t.columns if c[0] == v]) for v in range(len(t.variants))]
    head1 = '<th rowspan="2">category</th>' + "".join(
        f'<th colspan="{len(cs)}">{escape(t.variants[v])}</th>' for v, cs in groups if cs)
    head2 = "".join(f"<th>{escape(method_name(m))}</th>" for _, m in t.columns)
    if t.reference:
        head1 += f'<th rowspan="2">{escape(t.REFERENCE_HEAD)}</th>'
    body, prev_mean = [], False
    for r in t.rows:
        best = t.best_columns(r)
        cls = [c for c, on in (("mean", r.is_mean), ("first", r.is_mean and not prev_mean)) if on]
        cells = "".join(f'<td class="n{" best" if col in best else ""}">{escape(t.cell_text(r, col))}</td>'
                        for col in t.columns)
        if t.reference:
            cells += f'<td class="n">{escape(t.reference_text(r))}</td>'
        body.append(f'<tr class="{" ".join(cls)}"><td>{escape(r.label)}</td>{cells}</tr>')
        prev_mean = r.is_mean
    note = ('<p class="muted">* mean over the categories that have a value.</p>' if t.has_incomplete else "")
    return (f'<div class="scroll"><table><thead><tr>{head1}</tr><tr>{head2}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>' + note)


def ranking_html(entries: list[dict], baselines: list[dict] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in RANKING_HEAD)
    body = []
    for b in baselines or ():  # the reference first: what no CNN reaches on this split
        tds = "".join(f'<td{"" if j in (1, 2, 3) else " class=n"}>{escape(c)}</td>'
                      for j, c in enumerate(baseline_cells(b)))
        body.append(f'<tr class="ref">{tds}</tr>')
    for e in entries:
        cells = ranking_cells(e)
        cls = ' class="close"' if e.get("is_best") or e.get("indistinguishable_from_best") else ""
        tds = "".join(f'<td{"" if j in (1, 2, 3) else " class=n"}>{escape(c)}</td>' for j, c in enumerate(cells))
        body.append(f"<tr{cls}>{tds}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def significance_html(entries: list[dict], sig) -> str:
    from adspine.report.significance import category_table

    if not sig.available:
        return f'<p class="muted">{escape(sig.reason)}.</p>'
    cats, lines = category_table(entries, sig)
    if not cats:
        return '<p class="muted">No category has paired scores.</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in ["#", "configuration", *cats])
    body = []
    for e, cells in lines:
        tds = "".join(f'<td class="n{" best" if c == "best" else ""}">{escape(c)}</td>' for c in cells)
        body.append(f"<tr><td class=n>{e['rank']}</td><td>{escape(config_label(e))}</td>{tds}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def failed_html(failed: list[dict]) -> str:
    if not failed:
        return '<p class="muted">No failed or killed jobs.</p>'
    keys = ("status", "attempts", "dataset", "category", "backbone", "init", "started_at")
    head = "".join(f"<th>{h}</th>" for h in [*keys, "error"])
    rows = []
    for j in failed:
        err = (j.get("error") or "").strip()
        if not err and j.get("status") == "killed":
            err = "the process died mid-job (e.g. out of memory)"
        err = err if len(err) < 1500 else "... " + err[-1500:]  # the end of a traceback says most
        rows.append("<tr>" + "".join(f"<td>{escape(str(j.get(k) if j.get(k) is not None else '–'))}</td>"
                                     for k in keys) + f"<td><pre>{escape(err) or '–'}</pre></td></tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def failed_methods_html(failed: list[dict]) -> str:
    if not failed:
        return '<p class="muted">No method failed inside a finished job.</p>'
    keys = ("dataset", "category", "backbone", "init", "method", "rd_seed")
    head = "".join(f"<th>{h}</th>" for h in [*keys, "error"])
    rows = ["<tr>" + "".join(f"<td>{escape(str(r.get(k) if r.get(k) is not None else '–'))}</td>" for k in keys)
            + f"<td><pre>{escape((r.get('error') or '').strip()[-1500:]) or '–'}</pre></td></tr>" for r in failed]
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def provenance_html(meta: dict) -> str:
    parts = [f"<p>{escape(meta['hosts'])}</p>", f"<p>{escape(meta['load'])}</p>"]
    if meta["versions"]:
        parts.append("<p>Package versions:</p><ul>" + "".join(f"<li><code>{escape(v)}</code></li>"
                                                             for v in meta["versions"]) + "</ul>")
    else:
        parts.append('<p class="muted">Package versions: not recorded in this store.</p>')
    if meta["specs"]:
        for name, spec in meta["specs"].items():
            parts.append(f"<h3>Study spec: {escape(str(name))}</h3><pre>{escape(spec or '')}</pre>")
    else:
        parts.append('<p class="muted">The study spec is not recorded in this store (older store).</p>')
    return "".join(parts)


def render(ctx: dict) -> str:
    """The page from the build context (see ``build.build_report``)."""
    parts = []
    nav = [("recommendation", "Recommendation"), ("ranking", "Ranking"), ("plots", "Plots"),
           ("families", "Family tables"), ("examples", "Examples"), ("failed", "Failed jobs"),
           ("provenance", "Spec and machine"), ("notes", "Notes")]
    precision_views = {ds: v for ds, v in ctx.get("precision", {}).items() if v}  # bf16 / int8 beside fp32
    if precision_views:
        nav.insert(2, ("precision", "Precision"))
    meta = ctx["meta"]
    parts.append(
        "<header><h1>adspine backbone study report</h1>"
        f"<p>{escape(meta['summary'])}</p><p>{escape(meta['hosts'])}</p><p>{escape(meta['load'])}</p></header>"
    )
    parts.append("<nav>" + "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in nav) + "</nav><main>")

    if not ctx["datasets"]:
        parts.append('<section><h2>No results</h2><p class="warn">The store holds no finished results.</p></section>')

    sec = ['<section id="recommendation"><h2>Recommendation</h2>']
    for rec in ctx["recommendations"]:
        text = rec.text.replace(rec.warning, "").strip() if rec.warning else rec.text
        sec.append(f"<h3>{escape(rec.dataset)}</h3><div class=\"rec\">{escape(text)}</div>")
        if rec.warning:
            sec.append(f'<p class="warn">{escape(rec.warning)}</p>')
        if rec.fit_command:
            sec.append(f"<p>Build it:</p><pre>{escape(rec.fit_command)}</pre>")
    sec.append('<p class="muted">Latency = backbone forward ms/img at batch 1 + method predict ms/img, each the '
               "minimum over short repeats and over the jobs that timed it, where stored; the backbone part from the "
               "final round-robin re-timing at the end of the study where it ran. Quality = mean over "
               "categories (mean over Rd seeds); each recommendation states its criterion (--rank-by).</p></section>")
    parts.append("".join(sec))

    sec = ['<section id="ranking"><h2>Overall ranking</h2>',
           '<p class="muted">Per backbone + init + method. Latency in ms per image, memory in MB, parameters and '
           "FLOPs of the truncated backbone. Green rows: the best and those not distinguishable from it.</p>"]
    for ds in ctx["datasets"]:
        entries = ctx["ranking"][ds]
        refs = ctx.get("baselines", {}).get(ds)
        mode = ctx.get("rank_mode", {}).get(ds, "image")
        sec.append(f"<h3>{escape(ds)}</h3><p class=\"muted\">{escape(ranking_note(entries, mode))}"
                   f"{escape(baseline_note(refs))}</p>" + ranking_html(entries, refs))
        warning = ctx.get("shortcut", {}).get(ds)
        if warning:
            sec.append(f'<p class="warn">{escape(warning)}</p>')
        sig = ctx.get("significance", {}).get(ds)
        if sig is not None:
            sec.append(f"<h4>{escape(ds)}: per category, against the category's best</h4>"
                       '<p class="muted">Holm-adjusted p of the paired DeLong test of image ROC-AUC (first Rd seed), '
                       "Holm over the configurations of each category; ≈ = not distinguishable from the best at "
                       "5 %.</p>" + significance_html(entries, sig))
    parts.append("".join(sec) + "</section>")

    if precision_views:
        from adspine.report.precision import precision_html

        parts.append('<section id="precision"><h2>Backbone precision against fp32</h2>' + "".join(
            f"<h3>{escape(ds)}</h3>{precision_html(v)}" for ds, v in precision_views.items()) + "</section>")

    sec = ['<section id="plots"><h2>Plots</h2>']
    for ds in ctx["datasets"]:
        sec.append(f"<h3>{escape(ds)}</h3><div class=\"grid\">")
        plots = ctx["plots"].get(ds, {})
        captions = {
            "quality vs latency": "Filled = pretrained, hollow = random init; ringed points and the dashed step are "
                                  "the Pareto front (no other configuration is both faster and better). Points at "
                                  "the minimum latency; horizontal bars reach the median; vertical bars = 95 % "
                                  "interval of the category-mean ROC-AUC (± std over Rd seeds where no interval is "
                                  "stored).",
            "quality vs memory": "Pareto front over the method's memory and image ROC-AUC; bars as above.",
            "pretrained vs random init": "Mean image ROC-AUC per backbone and initialization; error bars = std over "
                                         "Rd seeds.",
            "quality vs ImageNet top-1": "Pretrained configurations whose weights have a known ImageNet top-1; "
                                         "Pearson r with its 95 % interval only from 5 points on.",
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
           "best, bottom row = worst backbone by image ROC-AUC. Drawn at the resolution the model saw, through the "
           "study's own preprocessing. Green contour = ground truth; cyan dashed = the pixel threshold with the "
           "highest F1 over the shown images (an illustration chosen on test data); colour = anomaly score "
           "(continuous map, one scale per row, colour bar on the right).</p>"]
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

    fm = ctx.get("failed_methods", [])
    parts.append(f'<section id="failed"><h2>Failed jobs ({len(ctx["failed"])})</h2>{failed_html(ctx["failed"])}'
                 f"<h3>Failed methods ({len(fm)})</h3>{failed_methods_html(fm)}</section>")
    parts.append(f'<section id="provenance"><h2>Spec and machine</h2>{provenance_html(meta)}</section>')

    files = "".join(f"<li><code>{escape(f)}</code></li>" for f in ctx["files"])
    parts.append(
        '<section id="notes"><h2>Notes</h2><ul>'
        "<li>ROC-AUC and AUPRO are shown in %; '–' marks an absent value (e.g. no pixel ground truth). Intervals "
        "(95 %) are in the CSV tables.</li>"
        "<li>Family table cells: mean over Rd seeds per category; the mean rows average those cells over categories."
        "</li><li>Ranking: per seed the mean over categories first, then mean and sample std (ddof=1) over seeds."
        "</li><li>F1 figures are not shown: their threshold is chosen on the test set.</li></ul>"
        f"<p>Files written next to this page:</p><ul>{files}</ul></section>"
    )
    parts.append("</main>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>adspine report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
