"""Thesis-style family tables and the overall ranking, computed from ``ResultStore.rows()``.

Aggregation rules (also stated in the report):

* Family tables: a cell is the mean over Rd seeds of one (category, backbone, init, method); a mean row is the mean
  of those cells over the categories that have a value (marked ``*`` when some category is missing).
* Ranking: for one (dataset, backbone, init, method), each Rd seed is first averaged over categories; the table shows
  the mean and the sample standard deviation (ddof=1) of those per-seed means. Methods without Rd count as one seed.
  Latencies and predict times are medians over jobs, peak memory the maximum over jobs.

Metrics are stored as fractions in [0, 1] and shown in percent; missing values (None/NaN) are shown as ``-``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHOD_NAMES = {"padim": "PaDiM", "spade": "SPADE", "patchcore": "PatchCore", "cflow": "CFLOW-AD"}
RANDOM_INITS = ("random", "kaiming_normal", "xavier_uniform", "orthogonal")
KIND_ORDER = {"texture": 0, "object": 1}


# -- small helpers -----------------------------------------------------------------------------------------------
def method_name(m: str) -> str:
    """Display name of a method (``padim`` -> ``PaDiM``)."""
    return METHOD_NAMES.get(str(m).lower(), str(m))


def is_pretrained(init: str | None) -> bool:
    """True for ImageNet (``imagenet``, ``imagenet:TAG``) and file-loaded weights; False for random schemes."""
    return bool(init) and str(init).split(":")[0] not in RANDOM_INITS


def num(v: Any) -> float | None:
    """A float, or None for None/NaN/non-numbers."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def mean_or_none(values) -> float | None:
    vals = [v for v in (num(x) for x in values) if v is not None]
    return float(np.mean(vals)) if vals else None


def std_or_none(values) -> float | None:
    """Sample standard deviation (ddof=1) of the non-missing values; None with fewer than two."""
    vals = [v for v in (num(x) for x in values) if v is not None]
    return float(np.std(vals, ddof=1)) if len(vals) >= 2 else None


def median_or_none(values) -> float | None:
    vals = [v for v in (num(x) for x in values) if v is not None]
    return float(np.median(vals)) if vals else None


def pct(v: Any, digits: int = 1) -> str:
    f = num(v)
    return "-" if f is None else f"{100 * f:.{digits}f}"


def fmt(v: Any, digits: int = 1) -> str:
    f = num(v)
    return "-" if f is None else f"{f:.{digits}f}"


def fmt_big(v: Any) -> str:
    """Human-readable count: 11.2M, 1.8G."""
    f = num(v)
    if f is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(f) >= div:
            return f"{f / div:.1f}{suf}"
    return f"{f:.0f}"


def slug(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def latex_escape(s: Any) -> str:
    s = str(s)
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(rep.get(c, c) for c in s)


def md_escape(s: Any) -> str:
    return str(s).replace("|", r"\|")


def _first(values):
    for v in values:
        if v is not None:
            return v
    return None


def _uniq(seq):
    return list(dict.fromkeys(seq))


def category_order(rows: list[dict]) -> list[tuple[str, str | None]]:
    """(category, kind) pairs: textures first, then objects, then unknown kinds; alphabetical within a kind."""
    kinds = {}
    for r in rows:
        kinds.setdefault(r["category"], r.get("category_kind"))
    return sorted(kinds.items(), key=lambda kv: (KIND_ORDER.get(kv[1], 2), str(kv[0])))


def datasets(rows: list[dict]) -> list[str]:
    return _uniq(str(r.get("dataset") or "dataset") for r in rows)


def _ds(r: dict) -> str:
    return str(r.get("dataset") or "dataset")


# -- family tables -----------------------------------------------------------------------------------------------
@dataclass
class TableRow:
    method: str
    label: str  # category name or 'mean' / 'texture mean' / 'object mean'
    is_mean: bool
    cells: list[tuple[float | None, float | None]]  # (image AUROC, pixel AUROC) per variant, fractions
    incomplete: list[bool] = field(default_factory=list)  # mean rows: some category had no value


@dataclass
class FamilyTable:
    dataset: str
    family: str
    variants: list[str]  # column labels
    keys: list[tuple[str, str]]  # (backbone, init) per column
    rows: list[TableRow]

    @property
    def name(self) -> str:
        return f"{slug(self.dataset)}_{slug(self.family)}"

    def best_index(self, row: TableRow) -> int | None:
        vals = [(c[0], i) for i, c in enumerate(row.cells) if c[0] is not None]
        return max(vals)[1] if len(vals) > 1 else None

    def _cell(self, row: TableRow, i: int) -> str:
        img, pix = row.cells[i]
        star = "*" if row.incomplete and row.incomplete[i] else ""
        return f"{pct(img)} / {pct(pix)}{star}"

    def to_markdown(self) -> str:
        head = ["method", "category", *self.variants]
        lines = [
            f"**{md_escape(self.family)}** on {md_escape(self.dataset)}: image ROC-AUC / pixel ROC-AUC (%), "
            "mean over Rd seeds",
            "",
            "| " + " | ".join(md_escape(h) for h in head) + " |",
            "|" + "|".join(["---", "---"] + ["---:"] * len(self.variants)) + "|",
        ]
        for r in self.rows:
            label = f"**{r.label}**" if r.is_mean else r.label
            cells = [self._cell(r, i) for i in range(len(self.variants))]
            lines.append("| " + " | ".join([method_name(r.method), md_escape(label), *cells]) + " |")
        if any(any(r.incomplete) for r in self.rows):
            lines += ["", "\\* mean over the categories that have a value."]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        n = len(self.variants)
        out = [
            r"% needs \usepackage{booktabs}",
            r"\begin{table}[htbp]",
            r"\centering",
            r"\caption{" + latex_escape(f"{self.family} on {self.dataset}") +
            r": image / pixel ROC-AUC (\%), mean over Rd seeds; best image ROC-AUC per row in bold.}",
            r"\label{tab:" + slug(self.name).replace("_", "-") + "}",
            r"\begin{tabular}{ll" + "c" * n + "}",
            r"\toprule",
            "Method & Category & " + " & ".join(latex_escape(v) for v in self.variants) + r" \\",
            r"\midrule",
        ]
        prev_method, prev_mean = None, False
        for r in self.rows:
            if prev_method is not None and r.method != prev_method:
                out.append(r"\midrule")
            elif prev_method == r.method and r.is_mean and not prev_mean:
                out.append(r"\cmidrule(lr){2-" + str(n + 2) + "}")
            prev_mean = r.is_mean
            best = self.best_index(r)
            cells = []
            for i in range(n):
                img, pix = r.cells[i]
                star = "$^*$" if r.incomplete and r.incomplete[i] else ""
                a = pct(img)
                a = rf"\textbf{{{a}}}" if i == best else a
                cells.append(f"{a} / {pct(pix)}{star}")
            label = rf"\textit{{{latex_escape(r.label)}}}" if r.is_mean else latex_escape(r.label)
            m = latex_escape(method_name(r.method)) if r.method != prev_method else ""
            out.append(f"{m} & {label} & " + " & ".join(cells) + r" \\")
            prev_method = r.method
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        head = ["dataset", "family", "method", "category", "is_mean"]
        for v in self.variants:
            head += [f"{v} image_auroc", f"{v} pixel_auroc"]
        w.writerow(head)
        for r in self.rows:
            line = [self.dataset, self.family, r.method, r.label, int(r.is_mean)]
            for img, pix in r.cells:
                line += ["" if img is None else f"{img:.6f}", "" if pix is None else f"{pix:.6f}"]
            w.writerow(line)
        return buf.getvalue()


def variant_labels(keys: list[tuple[str, str]]) -> list[str]:
    """Column labels: the backbone name, plus the init where the family has several inits."""
    several = len({k[1] for k in keys}) > 1
    return [f"{b} ({i})" if several else str(b) for b, i in keys]


def family_tables(rows: list[dict]) -> list[FamilyTable]:
    """One table per (dataset, family) from the flat store rows."""
    tables = []
    for ds in datasets(rows):
        drows = [r for r in rows if _ds(r) == ds]
        for fam in _uniq(str(r.get("family") or r["backbone"]) for r in drows):
            frows = [r for r in drows if str(r.get("family") or r["backbone"]) == fam]
            keys = _uniq((r["backbone"], r["init"]) for r in frows)
            methods = _uniq(r["method"] for r in frows)
            cats = category_order(frows)
            # (method, category, key) -> list of (image, pixel) over seeds
            acc: dict[tuple, list] = defaultdict(list)
            for r in frows:
                acc[(r["method"], r["category"], (r["backbone"], r["init"]))].append(
                    (num(r.get("image_auroc")), num(r.get("pixel_auroc"))))
            trows: list[TableRow] = []
            for m in methods:
                cat_cells: dict[str, list] = {}
                for c, _k in cats:
                    cells = []
                    for key in keys:
                        vals = acc.get((m, c, key), [])
                        cells.append((mean_or_none(v[0] for v in vals), mean_or_none(v[1] for v in vals)))
                    cat_cells[c] = cells
                    if any(a is not None or b is not None for a, b in cells):
                        trows.append(TableRow(m, str(c), False, cells))
                groups = [("mean", [c for c, _ in cats])]
                kinds_present = _uniq(k for _, k in cats if k in KIND_ORDER)
                if kinds_present:
                    for kind in sorted(kinds_present, key=KIND_ORDER.get):
                        groups.append((f"{kind} mean", [c for c, k in cats if k == kind]))
                for label, members in groups:
                    cells, inc = [], []
                    for j in range(len(keys)):
                        col_img = [cat_cells[c][j][0] for c in members]
                        col_pix = [cat_cells[c][j][1] for c in members]
                        img, pix = mean_or_none(col_img), mean_or_none(col_pix)
                        cells.append((img, pix))
                        partial = lambda col, v: v is not None and any(x is None for x in col)  # noqa: E731
                        inc.append(partial(col_img, img) or partial(col_pix, pix))
                    trows.append(TableRow(m, label, True, cells, inc))
            tables.append(FamilyTable(ds, fam, variant_labels(keys), keys, trows))
    return tables


# -- ranking -----------------------------------------------------------------------------------------------------
RANKING_CSV_COLUMNS = [
    "dataset", "rank", "backbone", "family", "init", "weights_tag", "method", "n_categories", "n_seeds",
    "image_auroc_mean", "image_auroc_std", "pixel_auroc_mean", "pixel_auroc_std", "aupro_mean", "aupro_std",
    "backbone_ms_b1", "backbone_ms_bn", "predict_ms", "total_ms_b1", "peak_rss_mb", "params", "flops",
    "imagenet_top1", "fit_s", "model_bytes", "device",
]


def ranking(rows: list[dict]) -> list[dict]:
    """One entry per (dataset, backbone, init, method), sorted per dataset by mean image AUROC (missing last)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(_ds(r), r["backbone"], r["init"], r["method"])].append(r)
    out = []
    for (ds, bb, init, m), g in groups.items():
        by_seed: dict[Any, list[dict]] = defaultdict(list)
        for r in g:
            by_seed[r.get("rd_seed")].append(r)
        entry: dict[str, Any] = {
            "dataset": ds, "backbone": bb, "init": init, "method": m,
            "family": _first(r.get("family") for r in g), "weights_tag": _first(r.get("weights_tag") for r in g),
            "n_categories": len({r["category"] for r in g}), "n_seeds": len(by_seed),
            "seeds": sorted(by_seed, key=lambda s: (s is None, s)),
        }
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            per_seed = [mean_or_none(r.get(metric) for r in sr) for sr in by_seed.values()]
            per_seed = [v for v in per_seed if v is not None]
            entry[f"{metric}_per_seed"] = per_seed
            entry[f"{metric}_mean"] = mean_or_none(per_seed)
            entry[f"{metric}_std"] = std_or_none(per_seed)
        jobs = {r["job_id"]: r for r in g}.values()
        entry["backbone_ms_b1"] = median_or_none(j.get("backbone_ms_b1") for j in jobs)
        entry["backbone_ms_bn"] = median_or_none(j.get("backbone_ms_bn") for j in jobs)
        entry["predict_ms"] = median_or_none(r.get("predict_ms") for r in g)
        b1, pr = entry["backbone_ms_b1"], entry["predict_ms"]
        entry["total_ms_b1"] = None if b1 is None else b1 + (pr or 0.0)
        rss = [v for v in (num(r.get("peak_rss_mb")) for r in g) if v is not None]
        entry["peak_rss_mb"] = max(rss) if rss else None
        entry["params"] = _first(j.get("params") for j in jobs)
        entry["flops"] = _first(j.get("flops") for j in jobs)
        entry["imagenet_top1"] = _first(j.get("imagenet_top1") for j in jobs)
        entry["fit_s"] = median_or_none(r.get("fit_s") for r in g)
        entry["model_bytes"] = median_or_none(r.get("model_bytes") for r in g)
        entry["device"] = _first(j.get("device") for j in jobs)
        out.append(entry)
    order = {d: i for i, d in enumerate(datasets(rows))}
    out.sort(key=lambda e: (order[e["dataset"]], e["image_auroc_mean"] is None, -(e["image_auroc_mean"] or 0),
                            -(e["pixel_auroc_mean"] or 0), e["total_ms_b1"] if e["total_ms_b1"] is not None else 1e18))
    rank: dict[str, int] = defaultdict(int)
    for e in out:
        rank[e["dataset"]] += 1
        e["rank"] = rank[e["dataset"]]
    return out


def config_label(e: dict) -> str:
    """``backbone (init) + Method``."""
    return f"{e['backbone']} ({e['init']}) + {method_name(e['method'])}"


def mean_std(e: dict, metric: str, pm: str = "±") -> str:
    m, s = e.get(f"{metric}_mean"), e.get(f"{metric}_std")
    if m is None:
        return "-"
    return f"{pct(m)} {pm} {pct(s)}" if s is not None else pct(m)


RANKING_HEAD = ["#", "backbone", "init", "method", "image AUROC", "pixel AUROC", "AUPRO", "seeds",
                "backbone ms b1", "backbone ms bN", "method ms", "peak MB", "params", "FLOPs"]


def ranking_cells(e: dict, pm: str = "±") -> list[str]:
    return [str(e["rank"]), str(e["backbone"]), str(e["init"]), method_name(e["method"]),
            mean_std(e, "image_auroc", pm), mean_std(e, "pixel_auroc", pm), mean_std(e, "aupro", pm),
            str(e["n_seeds"]), fmt(e["backbone_ms_b1"]), fmt(e["backbone_ms_bn"]), fmt(e["predict_ms"]),
            fmt(e["peak_rss_mb"], 0), fmt_big(e["params"]), fmt_big(e["flops"])]


def ranking_markdown(entries: list[dict], dataset: str) -> str:
    lines = [
        f"**Ranking on {md_escape(dataset)}**: metrics in %, mean ± std over Rd seeds of the mean over categories; "
        "latency in ms per image (median over jobs), peak resident memory in MB (max over jobs).",
        "",
        "| " + " | ".join(RANKING_HEAD) + " |",
        "|" + "|".join(["---:", "---", "---", "---"] + ["---:"] * (len(RANKING_HEAD) - 4)) + "|",
    ]
    for e in entries:
        lines.append("| " + " | ".join(md_escape(c) for c in ranking_cells(e)) + " |")
    return "\n".join(lines) + "\n"


def ranking_latex(entries: list[dict], dataset: str) -> str:
    out = [
        r"% needs \usepackage{booktabs} and \usepackage{graphicx}", r"\begin{table}[htbp]", r"\centering",
        r"\caption{" + latex_escape(f"Ranking on {dataset}") + r": ROC-AUC and AUPRO in \%, mean $\pm$ std over Rd "
        r"seeds; latency in ms per image; peak memory in MB.}",
        r"\label{tab:ranking-" + slug(dataset).replace("_", "-") + "}",
        r"\resizebox{\textwidth}{!}{%",
        r"\begin{tabular}{rlll" + "r" * (len(RANKING_HEAD) - 4) + "}", r"\toprule",
        " & ".join(latex_escape(h) for h in RANKING_HEAD) + r" \\", r"\midrule",
    ]
    for e in entries:
        out.append(" & ".join(latex_escape(c).replace("±", r"$\pm$") for c in ranking_cells(e)) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(out) + "\n"


def ranking_csv(entries: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(RANKING_CSV_COLUMNS)
    for e in entries:
        w.writerow(["" if e.get(c) is None else e.get(c) for c in RANKING_CSV_COLUMNS])
    return buf.getvalue()
