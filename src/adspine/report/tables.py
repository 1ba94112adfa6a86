"""Thesis-style family tables and the overall ranking, computed from ``ResultStore.rows()``.

Aggregation rules (also stated in the report):

* Family tables: a cell is the mean over Rd seeds of one (category, backbone, init, method); a mean row is the mean
  of those cells over the categories that have a value (marked ``*`` when some category is missing).
* Ranking: for one (dataset, backbone, init, method), each Rd seed is first averaged over categories; the table shows
  the mean and the sample standard deviation (ddof=1) of those per-seed means. Methods without Rd count as one seed.
  Entries are ranked by image ROC-AUC (the one metric every dataset has; pixel metrics are absent on image-level
  datasets). Latency is the per-job MINIMUM over many short repeats (least disturbed by other processes; median over
  jobs of it), with the median shown beside it; memory is the method's peak ABOVE the process baseline (maximum over
  jobs). Older stores without these columns fall back to the median latency and the process peak, and say so.
  Where the store holds a final round-robin re-timing of the entry's backbone configuration (``final_timing``,
  made at the end of the study with every configuration timed in the same rounds), the backbone part of the
  latency is that (latest) minimum instead; the method part stays the per-job minimum.

Metrics are stored as fractions in [0, 1] and shown in percent; missing values (None/NaN) are shown as ``–``.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KIND_ORDER = {"texture": 0, "object": 1}
MISSING = "–"  # shown for an absent value


# -- small helpers -----------------------------------------------------------------------------------------------
def method_name(m: str) -> str:
    """Display name of a method from its descriptor (``padim`` -> ``PaDiM``); unknown names as they are."""
    from adspine.methods import METHODS, method_info

    return method_info(str(m).lower()).display if str(m).lower() in METHODS else str(m)


def is_pretrained(init: str | None) -> bool:
    """True for ImageNet (``imagenet``, ``imagenet:TAG``) and file-loaded weights; False for random schemes."""
    from adspine.backbones.init_names import SEEDED_INITS

    return bool(init) and str(init).split(":")[0] not in SEEDED_INITS


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


def min_or_none(values) -> float | None:
    vals = [v for v in (num(x) for x in values) if v is not None]
    return min(vals) if vals else None


def pct(v: Any, digits: int = 1) -> str:
    f = num(v)
    return MISSING if f is None else f"{100 * f:.{digits}f}"


def fmt(v: Any, digits: int = 1) -> str:
    f = num(v)
    return MISSING if f is None else f"{f:.{digits}f}"


def fmt_big(v: Any) -> str:
    """Human-readable count: 11.2M, 1.8G."""
    f = num(v)
    if f is None:
        return MISSING
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(f) >= div:
            return f"{f / div:.1f}{suf}"
    return f"{f:.0f}"


def slug(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def latex_escape(s: Any) -> str:
    s = str(s)
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
           MISSING: "--", "±": r"$\pm$", "≈": r"$\approx$"}
    return "".join(rep.get(c, c) for c in s)


def md_escape(s: Any) -> str:
    """Text for a Markdown table: HTML escaped as in the HTML report (no raw tags), ``|`` escaped, one line."""
    return html.escape(" ".join(str(s).splitlines()), quote=False).replace("|", r"\|")


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


def is_done(r: dict) -> bool:
    """A result row with metrics (``status`` done, or absent in older stores)."""
    return r.get("status") in (None, "done")


Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def mean_interval(values, los, his) -> tuple[float | None, float | None]:
    """95 % interval of the mean of independent estimates, from their own 95 % intervals (normal approximation:
    se_i = (hi_i - lo_i) / (2 z), se_mean = sqrt(sum se_i^2) / n), kept inside [0, 1] as the metrics are; None
    where any interval is missing."""
    vals = [num(v) for v in values]
    lo_, hi_ = [num(v) for v in los], [num(v) for v in his]
    if not vals or any(v is None for v in vals + lo_ + hi_):
        return None, None
    se = math.sqrt(sum(((h - lo) / (2 * Z95)) ** 2 for lo, h in zip(lo_, hi_))) / len(vals)
    m = sum(vals) / len(vals)
    return max(0.0, m - Z95 * se), min(1.0, m + Z95 * se)


# -- family tables -----------------------------------------------------------------------------------------------
METRICS = ("image_auroc", "pixel_auroc")


@dataclass
class Cell:
    """Mean over Rd seeds of one (category, variant, method); intervals: the one seed's 95 % CI, or with several seeds
    the envelope (lowest lo, highest hi) of the seeds' CIs; mean rows: ``mean_interval`` over the categories."""

    values: dict[str, float | None] = field(default_factory=dict)  # metric -> value
    lo: dict[str, float | None] = field(default_factory=dict)
    hi: dict[str, float | None] = field(default_factory=dict)
    n_seeds: int = 0
    incomplete: bool = False  # mean rows: some category had no value

    def get(self, metric: str) -> float | None:
        return self.values.get(metric)


@dataclass
class TableRow:
    label: str  # category name, or 'texture mean' / 'object mean' / 'mean'
    is_mean: bool
    cells: dict[tuple[int, str], Cell]  # (variant index, method) -> cell


@dataclass
class FamilyTable:
    """Thesis layout: rows = categories (+ texture / object / overall means), column groups = variants, within each
    group one column per method; a cell is "image ROC-AUC / pixel ROC-AUC" in %."""

    dataset: str
    family: str
    variants: list[str]  # column-group labels
    keys: list[tuple[str, str, str]]  # (backbone, init, precision) per variant
    methods: list[str]
    columns: list[tuple[int, str]]  # (variant index, method) present in the data, in display order
    rows: list[TableRow]
    members: dict[str, list[str]] = field(default_factory=dict)  # mean row label -> its categories
    reference: dict[str, tuple[str, float] | None] = field(default_factory=dict)  # row -> best trivial baseline

    REFERENCE_HEAD = "trivial baseline (image)"

    def reference_text(self, row: TableRow) -> str:
        ref = self.reference.get(row.label)
        return MISSING if ref is None else f"{pct(ref[1])} ({ref[0]})"

    @property
    def name(self) -> str:
        return f"{slug(self.dataset)}_{slug(self.family)}"

    def best_columns(self, row: TableRow) -> set[tuple[int, str]]:
        """Per method, the variant(s) with the highest image ROC-AUC in this row (only with >= 2 values)."""
        best = set()
        for m in self.methods:
            vals = {c: row.cells[c].get("image_auroc") for c in self.columns if c[1] == m and c in row.cells}
            vals = {c: v for c, v in vals.items() if v is not None}
            if len(vals) > 1:
                top = max(vals.values())
                best |= {c for c, v in vals.items() if v == top}
        return best

    def cell_text(self, row: TableRow, col: tuple[int, str]) -> str:
        c = row.cells.get(col)
        if c is None:
            return f"{MISSING} / {MISSING}"
        return f"{pct(c.get('image_auroc'))} / {pct(c.get('pixel_auroc'))}" + ("*" if c.incomplete else "")

    def column_label(self, col: tuple[int, str]) -> str:
        return f"{self.variants[col[0]]} · {method_name(col[1])}"

    @property
    def has_incomplete(self) -> bool:
        return any(c.incomplete for r in self.rows for c in r.cells.values())

    def to_markdown(self) -> str:
        head = ["category", *(self.column_label(c) for c in self.columns)]
        ref = [self.REFERENCE_HEAD] if self.reference else []
        lines = [
            f"**{md_escape(self.family)}** on {md_escape(self.dataset)}: image ROC-AUC / pixel ROC-AUC (%), "
            f"mean over Rd seeds; {MISSING} = absent (e.g. no pixel ground truth)",
            "",
            "| " + " | ".join(md_escape(h) for h in head + ref) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(self.columns) + len(ref))) + "|",
        ]
        for r in self.rows:
            label = f"**{md_escape(r.label)}**" if r.is_mean else md_escape(r.label)
            refs = [md_escape(self.reference_text(r))] if ref else []
            lines.append("| " + " | ".join([label, *(self.cell_text(r, c) for c in self.columns), *refs]) + " |")
        if self.has_incomplete:
            lines += ["", "\\* mean over the categories that have a value."]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        n = len(self.columns) + bool(self.reference)
        groups = [(v, [c for c in self.columns if c[0] == v]) for v in range(len(self.variants))]
        groups = [(v, cs) for v, cs in groups if cs]
        head1, rules, start = ["Category"], [], 2
        for v, cs in groups:
            head1.append(r"\multicolumn{" + str(len(cs)) + "}{c}{" + latex_escape(self.variants[v]) + "}")
            rules.append(r"\cmidrule(lr){" + f"{start}-{start + len(cs) - 1}" + "}")
            start += len(cs)
        head2 = [""] + [latex_escape(method_name(m)) for _, m in self.columns]
        if self.reference:
            head1.append("")
            head2.append(latex_escape(self.REFERENCE_HEAD))
        out = [
            r"% needs \usepackage{booktabs}",
            r"\begin{table}[htbp]",
            r"\centering",
            r"\caption{" + latex_escape(f"{self.family} on {self.dataset}") +
            r": image / pixel ROC-AUC (\%), mean over Rd seeds; best image ROC-AUC per method and row in bold; "
            r"-- = absent.}",
            r"\label{tab:" + slug(self.name).replace("_", "-") + "}",
            r"\resizebox{\textwidth}{!}{%",
            r"\begin{tabular}{l" + "c" * n + "}",
            r"\toprule",
            " & ".join(head1) + r" \\",
            " ".join(rules),
            " & ".join(head2) + r" \\",
            r"\midrule",
        ]
        first_mean = True
        for r in self.rows:
            if r.is_mean and first_mean:
                out.append(r"\midrule")
                first_mean = False
            best = self.best_columns(r)
            cells = []
            for col in self.columns:
                c = r.cells.get(col)
                img, pix = (c.get("image_auroc"), c.get("pixel_auroc")) if c else (None, None)
                a = latex_escape(pct(img))
                a = rf"\textbf{{{a}}}" if col in best else a
                star = "$^*$" if c is not None and c.incomplete else ""
                cells.append(f"{a} / {latex_escape(pct(pix))}{star}")
            if self.reference:
                cells.append(latex_escape(self.reference_text(r)))
            label = rf"\textit{{{latex_escape(r.label)}}}" if r.is_mean else latex_escape(r.label)
            out.append(f"{label} & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
        return "\n".join(out) + "\n"

    CSV_COLUMNS = ["dataset", "family", "category", "is_mean", "variant", "backbone", "init", "precision", "method",
                   "n_seeds",
                   "image_auroc", "image_auroc_lo", "image_auroc_hi", "pixel_auroc", "pixel_auroc_lo",
                   "pixel_auroc_hi"]

    def to_csv(self) -> str:
        """Long format, one line per (row, variant, method), with the 95 % intervals (see ``Cell``)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.CSV_COLUMNS)
        for r in self.rows:
            for col in self.columns:
                c = r.cells.get(col)
                if c is None:
                    continue
                b, i, prec = self.keys[col[0]]
                line = [self.dataset, self.family, r.label, int(r.is_mean), self.variants[col[0]], b, i, prec,
                        col[1], c.n_seeds]
                for m in METRICS:
                    line += [_csv_num(c.values.get(m)), _csv_num(c.lo.get(m)), _csv_num(c.hi.get(m))]
                w.writerow(line)
        return buf.getvalue()


def _csv_num(v) -> str:
    f = num(v)
    return "" if f is None else f"{f:.6f}"


def variant_labels(keys: list[tuple[str, str, str]]) -> list[str]:
    """Column labels: the backbone name, plus the init where the family has several inits, plus the precision
    where it is not fp32."""
    several = len({k[1] for k in keys}) > 1
    return [(f"{b} ({i})" if several else str(b)) + ("" if p == "fp32" else f" {p}") for b, i, p in keys]


def precision_of(r: dict) -> str:
    """A row's backbone precision (stores written before precisions existed: fp32)."""
    return str(r.get("precision") or "fp32")


def _cell(rows: list[dict]) -> Cell:
    by_seed: dict[Any, list[dict]] = defaultdict(list)
    for r in rows:
        by_seed[r.get("rd_seed")].append(r)
    c = Cell(n_seeds=len(by_seed))
    for m in METRICS:
        c.values[m] = mean_or_none(r.get(m) for r in rows)
        los = [num(r.get(f"{m}_lo")) for r in rows]
        his = [num(r.get(f"{m}_hi")) for r in rows]
        ok = c.values[m] is not None and rows and all(v is not None for v in los + his)
        c.lo[m] = min(los) if ok else None
        c.hi[m] = max(his) if ok else None
    return c


def _mean_cell(cells: list[Cell | None]) -> Cell | None:
    present = [c for c in cells if c is not None]
    if not present:
        return None
    out = Cell(n_seeds=max(c.n_seeds for c in present))
    for m in METRICS:
        vals = [c.get(m) if c else None for c in cells]
        have = [c for c in present if c.get(m) is not None]
        out.values[m] = mean_or_none(vals)
        out.incomplete |= out.values[m] is not None and len(have) < len(cells)
        lo, hi = mean_interval([c.get(m) for c in have], [c.lo.get(m) for c in have], [c.hi.get(m) for c in have])
        out.lo[m], out.hi[m] = (lo, hi) if len(have) == len(cells) else (None, None)
    return out


def family_tables(rows: list[dict]) -> list[FamilyTable]:
    """One table per (dataset, family) from the flat store rows (failed result rows are skipped)."""
    rows = [r for r in rows if is_done(r)]
    tables = []
    for ds in datasets(rows):
        drows = [r for r in rows if _ds(r) == ds]
        for fam in _uniq(str(r.get("family") or r["backbone"]) for r in drows):
            frows = [r for r in drows if str(r.get("family") or r["backbone"]) == fam]
            keys = _uniq((r["backbone"], r["init"], precision_of(r)) for r in frows)
            methods = _uniq(r["method"] for r in frows)
            cats = category_order(frows)
            acc: dict[tuple, list[dict]] = defaultdict(list)
            for r in frows:
                acc[(r["category"], keys.index((r["backbone"], r["init"], precision_of(r))), r["method"])].append(r)
            columns = [(v, m) for v in range(len(keys)) for m in methods
                       if any((c, v, m) in acc for c, _ in cats)]
            per_cat = {c: {col: _cell(acc[(c, *col)]) for col in columns if (c, *col) in acc} for c, _ in cats}
            trows = [TableRow(str(c), False, per_cat[c]) for c, _ in cats if per_cat[c]]
            groups = [(f"{kind} mean", [c for c, k in cats if k == kind])
                      for kind in sorted(_uniq(k for _, k in cats if k in KIND_ORDER), key=KIND_ORDER.get)]
            groups.append(("mean", [c for c, _ in cats]))
            for label, members in groups:
                cells = {}
                for col in columns:
                    mc = _mean_cell([per_cat[c].get(col) for c in members])
                    if mc is not None:
                        cells[col] = mc
                trows.append(TableRow(label, True, cells))
            tables.append(FamilyTable(ds, fam, variant_labels(keys), keys, methods, columns, trows,
                                      members={label: [str(c) for c in m] for label, m in groups}))
    return tables


# -- ranking -----------------------------------------------------------------------------------------------------
RANKING_CSV_COLUMNS = [
    "dataset", "rank", "backbone", "family", "init", "precision", "weights_tag", "method", "n_categories", "n_seeds",
    "image_auroc_mean", "image_auroc_std", "image_auroc_lo", "image_auroc_hi", "pixel_auroc_mean", "pixel_auroc_std",
    "aupro_mean", "aupro_std", "max_in_mask_mean", "vs_best_p_holm", "indistinguishable_from_best", "localisation",
    "aupro_vs_best_p", "pixel_auroc_vs_best_p", "backbone_ms_b1_min",
    "backbone_ms_b1", "backbone_ms_bn_min", "backbone_ms_bn", "predict_ms_min", "predict_ms", "total_ms_b1",
    "latency_basis", "method_peak_mb", "peak_rss_mb", "memory_basis", "memory_source", "params", "flops",
    "imagenet_top1", "fit_s", "model_bytes", "device", "threads", "load_avg_max", "rd_scheme",
    "final_ms_b1", "final_ms_bn", "final_load", "final_cores", "final_timed_at",
]


def _layer_names(v) -> Any:
    """A stored JSON layer list as a tuple (other values as they are), so equal lists compare equal."""
    import json

    try:
        return tuple(json.loads(v)) if isinstance(v, str) else v
    except ValueError:
        return v


def _timing_key(r: dict, threads_key: str) -> tuple:
    """What decides a backbone's speed, from a job row (``timing_threads``) or a final timing row (``threads``)."""
    return (r.get("backbone"), r.get("init"), precision_of(r), _layer_names(r.get("layers")), r.get("image_height"),
            r.get("image_width"), r.get("device") or "cpu", r.get(threads_key))


def _final_for(jobs: list[dict], final: dict[tuple, dict]) -> dict | None:
    """The latest final timing of the one backbone configuration all ``jobs`` share (None: none, or several)."""
    keys = {_timing_key(j, "timing_threads") for j in jobs}
    return final.get(keys.pop()) if len(keys) == 1 else None


def overloaded(e: dict) -> bool:
    """Whether the 1-minute load exceeded the usable cores while the entry's final timing ran."""
    return e.get("final_load") is not None and bool(e.get("final_cores")) and e["final_load"] > e["final_cores"]


def backbone_b1(e: dict) -> float | None:
    """The backbone's batch-1 ms/img behind ``total_ms_b1``: final round-robin, else the per-job minimum, else the
    median."""
    for key in ("final_ms_b1", "backbone_ms_b1_min", "backbone_ms_b1"):
        if e.get(key) is not None:
            return e[key]
    return None


def load_note(entries: list[dict]) -> str | None:
    """One line where the load exceeded the cores while the final timing of some entries ran."""
    busy = [e for e in entries if overloaded(e)]
    if not busy:
        return None
    worst = max(busy, key=lambda e: e["final_load"] / e["final_cores"])
    return (f"Timing note: while the backbones were re-timed, the 1-minute load average (up to "
            f"{worst['final_load']:.1f}) exceeded the {worst['final_cores']} usable core(s): the latencies are "
            "slower than on an idle machine; the round-robin rounds shared that load, so their order is the "
            "fairer comparison.")


def _job_median(jobs, key) -> float | None:
    return median_or_none(j.get(key) for j in jobs)


def ranking(rows: list[dict], final_timings: list[dict] | None = None) -> list[dict]:
    """One entry per (dataset, backbone, init, precision, method), ranked per dataset by mean image AUROC (missing
    last).

    Latency ``total_ms_b1`` = backbone batch-1 ms/img + method predict ms/img, each the minimum over the repeats of
    every job that timed it (one timing window per category, minutes apart: this pools them, as the network and
    input size are the same) where the store has it (``latency_basis`` = "minimum"), else the medians over jobs
    ("median"). A window that caught a slow phase of a shared or virtual machine then does not decide the figure.
    With ``final_timings`` (``ResultStore.final_timings()``), an entry whose jobs share one backbone configuration
    that was re-timed takes the latest such row's minimum for the backbone ("final round-robin").
    """
    rows = [r for r in rows if is_done(r)]
    final = {_timing_key(f, "threads"): f for f in final_timings or ()}  # oldest first: the latest wins
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(_ds(r), r["backbone"], r["init"], precision_of(r), r["method"])].append(r)
    out = []
    for (ds, bb, init, precision, m), g in groups.items():
        by_seed: dict[Any, list[dict]] = defaultdict(list)
        for r in g:
            by_seed[r.get("rd_seed")].append(r)
        entry: dict[str, Any] = {
            "dataset": ds, "backbone": bb, "init": init, "precision": precision, "method": m,
            "family": _first(r.get("family") for r in g), "weights_tag": _first(r.get("weights_tag") for r in g),
            "n_categories": len({r["category"] for r in g}), "n_seeds": len(by_seed),
            "seeds": sorted(by_seed, key=lambda s: (s is None, s)),
            "categories": _uniq(r["category"] for r in g),
        }
        for metric in ("image_auroc", "pixel_auroc", "aupro", "max_in_mask"):
            per_seed = [mean_or_none(r.get(metric) for r in sr) for sr in by_seed.values()]
            per_seed = [v for v in per_seed if v is not None]
            entry[f"{metric}_per_seed"] = per_seed
            entry[f"{metric}_mean"] = mean_or_none(per_seed)
            entry[f"{metric}_std"] = std_or_none(per_seed)
        # 95 % interval of the category mean for the first seed (per-category DeLong intervals combined)
        first = by_seed[entry["seeds"][0]]
        entry["image_auroc_lo"], entry["image_auroc_hi"] = mean_interval(
            [r.get("image_auroc") for r in first], [r.get("image_auroc_lo") for r in first],
            [r.get("image_auroc_hi") for r in first])
        jobs = list({r["job_id"]: r for r in g}.values())
        for key in ("backbone_ms_b1", "backbone_ms_bn"):
            entry[key] = _job_median(jobs, key)
            entry[key + "_min"] = min_or_none(j.get(key + "_min") for j in jobs)
        entry["predict_ms"] = median_or_none(r.get("predict_ms") for r in g)
        entry["predict_ms_min"] = min_or_none(r.get("predict_ms_min") for r in g)
        b1min, prmin = entry["backbone_ms_b1_min"], entry["predict_ms_min"]
        b1, pr = entry["backbone_ms_b1"], entry["predict_ms"]
        entry["total_ms_b1_median"] = None if b1 is None else b1 + (pr or 0.0)
        if b1min is not None:
            entry["total_ms_b1"] = b1min + (prmin if prmin is not None else (pr or 0.0))
            entry["latency_basis"] = "minimum" if prmin is not None or pr is None else "minimum (backbone only)"
        else:
            entry["total_ms_b1"] = entry["total_ms_b1_median"]
            entry["latency_basis"] = None if b1 is None else "median"
        f = _final_for(jobs, final)
        if f is not None and num(f.get("backbone_ms_b1_min")) is not None:
            entry.update(final_ms_b1=f["backbone_ms_b1_min"], final_ms_bn=f.get("backbone_ms_bn_min"),
                         final_timed_at=f.get("timed_at"), final_cores=f.get("cores"),
                         final_load=max((v for v in (num(f.get("load_before")), num(f.get("load_after")))
                                         if v is not None), default=None))
            entry["total_ms_b1"] = f["backbone_ms_b1_min"] + (prmin if prmin is not None else (pr or 0.0))
            if num(f.get("backbone_ms_b1")) is not None:
                entry["total_ms_b1_median"] = f["backbone_ms_b1"] + (pr or 0.0)
            entry["latency_basis"] = "final round-robin"
        inc = [v for v in (num(r.get("method_peak_mb")) for r in g) if v is not None]
        rss = [v for v in (num(r.get("peak_rss_mb")) for r in g) if v is not None]
        entry["method_peak_mb"] = max(inc) if inc else None
        entry["peak_rss_mb"] = max(rss) if rss else None
        entry["memory_mb"] = entry["method_peak_mb"] if inc else entry["peak_rss_mb"]
        entry["memory_basis"] = "increment" if inc else ("process peak" if rss else None)
        entry["memory_source"] = ", ".join(sorted({str(r["memory_source"]) for r in g if r.get("memory_source")}))
        entry["params"] = _first(j.get("params") for j in jobs)
        entry["flops"] = _first(j.get("flops") for j in jobs)
        entry["imagenet_top1"] = _first(j.get("imagenet_top1") for j in jobs)
        entry["fit_s"] = median_or_none(r.get("fit_s") for r in g)
        entry["model_bytes"] = median_or_none(r.get("model_bytes") for r in g)
        entry["device"] = _first(j.get("device") for j in jobs)
        entry["threads"] = _first(j.get("threads") for j in jobs)
        loads = [v for v in (num(j.get("load_avg")) for j in jobs) if v is not None]
        entry["load_avg_max"] = max(loads) if loads else None
        entry["rd_scheme"] = ", ".join(sorted({str(r["rd_scheme"]) for r in g if r.get("rd_scheme")}))
        entry["pixel_level"] = entry["pixel_auroc_mean"] is not None
        entry["vs_best_p_holm"] = None
        entry["indistinguishable_from_best"] = None
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
    """``backbone (init) + Method``, with the precision after the init where it is not fp32."""
    precision = "" if precision_of(e) == "fp32" else f", {precision_of(e)}"
    return f"{e['backbone']} ({e['init']}{precision}) + {method_name(e['method'])}"


def mean_std(e: dict, metric: str, pm: str = "±") -> str:
    m, s = e.get(f"{metric}_mean"), e.get(f"{metric}_std")
    if m is None:
        return MISSING
    return f"{pct(m)} {pm} {pct(s)}" if s is not None else pct(m)


def vs_best(e: dict) -> str:
    """``best``, ``≈ p=0.31`` (not distinguishable from the best), ``p=0.002`` (worse), or ``–`` (no paired test)."""
    if e.get("is_best"):
        return "best"
    p = e.get("vs_best_p_holm")
    if p is None:
        return MISSING
    return f"{'≈ ' if e.get('indistinguishable_from_best') else ''}p={p:.2g}"


RANKING_HEAD = ["#", "backbone", "init", "precision", "method", "image AUROC", "95 % CI", "vs best", "pixel AUROC",
                "AUPRO", "max-in-mask", "localisation", "seeds",
                "backbone ms b1 (min)", "method ms (min)", "total ms (min)", "total ms (median)", "method MB",
                "params", "FLOPs"]


def interval(e: dict, key: str) -> str:
    """``[lo, hi]`` in % of a stored 95 % interval, or the missing mark."""
    lo, hi = e.get(f"{key}_lo"), e.get(f"{key}_hi")
    return MISSING if lo is None or hi is None else f"[{pct(lo)}, {pct(hi)}]"


def ranking_cells(e: dict, pm: str = "±") -> list[str]:
    return [str(e["rank"]), str(e["backbone"]), str(e["init"]), precision_of(e), method_name(e["method"]),
            mean_std(e, "image_auroc", pm), interval(e, "image_auroc"), vs_best(e), mean_std(e, "pixel_auroc", pm),
            mean_std(e, "aupro", pm), pct(e.get("max_in_mask_mean")), localisation_cell(e), str(e["n_seeds"]),
            fmt(backbone_b1(e)),
            fmt(e.get("predict_ms_min") if e.get("predict_ms_min") is not None else e.get("predict_ms")),
            fmt(e["total_ms_b1"]), fmt(e.get("total_ms_b1_median")), fmt(e.get("memory_mb"), 0),
            fmt_big(e["params"]), fmt_big(e["flops"])]


def localisation_cell(e: dict) -> str:
    """``best``, ``ok`` (AUPRO and pixel AUROC not materially below the best's), ``below: aupro`` or ``–``."""
    loc = e.get("localisation")
    if loc == "below":
        return "below: " + ", ".join(m.replace("_", " ") for m in e.get("localisation_below", []))
    return loc or MISSING


def ranking_note(entries: list[dict], mode: str = "image") -> str:
    """What the ranking's numbers are, stated from the data actually present (``mode``: the ranking criterion)."""
    if mode == "localisation":
        parts = ["Ranked on localisation (masks exist): configurations whose AUPRO or pixel ROC-AUC is "
                 "significantly more than 5 / 2 points below the best's ('localisation' = below; one-sided paired "
                 "bootstrap over test images, Holm, 5 %) come last; within each group by mean image ROC-AUC (%), "
                 "then AUPRO. Per Rd seed the mean over categories, then mean ± sample std (ddof=1) over seeds."]
    else:
        parts = ["Ranked by mean image ROC-AUC (%): per Rd seed the mean over categories, then mean ± sample std "
                 "(ddof=1) over seeds."]
    if any(e.get("max_in_mask_mean") is not None for e in entries):
        parts.append("max-in-mask: share of defective test images whose map maximum lies in the ground truth or "
                     "within 4 px of it.")
    if entries and not any(e.get("pixel_level") for e in entries):
        parts.append("This dataset has no pixel ground truth (image-level): pixel ROC-AUC and AUPRO are absent and "
                     "the ranking uses image ROC-AUC only.")
    if any(e.get("vs_best_p_holm") is not None for e in entries):
        parts.append("'vs best': paired DeLong test of image ROC-AUC against rank 1 on the same test images, "
                     "combined over categories, Holm-corrected over all configurations; ≈ = not distinguishable "
                     "from the best at the 5 % level.")
    bases = {e.get("latency_basis") for e in entries if e.get("latency_basis")}
    if "final round-robin" in bases:
        bases.discard("final round-robin")
        parts.append("Backbone latency: re-timed at the end of the study with every backbone configuration in one "
                     "process, round-robin (one call of each per round, so load hit them alike), minimum over the "
                     "rounds; method latency: the per-job minimum" + (" (others: per-job figures)." if bases
                                                                      else "."))
        if load_note(entries):
            parts.append(load_note(entries))
    if bases == {"minimum"}:
        parts.append("Latency: minimum over many short repeats (least disturbed by other processes) in all the "
                     "jobs that timed the configuration (timing windows minutes apart); the median-based total "
                     "is shown beside it.")
    elif bases:
        parts.append("Latency basis: " + ", ".join(sorted(bases)) + " (older stores hold only the median).")
    mem = {e.get("memory_basis") for e in entries if e.get("memory_basis")}
    if mem == {"increment"}:
        parts.append("Memory: the method's peak above the process baseline before it ran (max over jobs).")
    elif mem:
        parts.append("Memory: " + ", ".join(sorted(mem)) + " (process peak where the increment is not stored).")
    return " ".join(parts)


def ranking_markdown(entries: list[dict], dataset: str, mode: str = "image", baselines: list[dict] | None = None,
                     warning: str | None = None) -> str:
    lines = [
        f"**Ranking on {md_escape(dataset)}**. {ranking_note(entries, mode)}{baseline_note(baselines)}",
        "",
        "| " + " | ".join(RANKING_HEAD) + " |",
        "|" + "|".join(["---:", "---", "---", "---", "---"] + ["---:"] * (len(RANKING_HEAD) - 5)) + "|",
    ]
    for b in baselines or ():  # the reference first: what no CNN reaches on this split
        lines.append("| " + " | ".join(md_escape(c) for c in baseline_cells(b)) + " |")
    for e in entries:
        lines.append("| " + " | ".join(md_escape(c) for c in ranking_cells(e)) + " |")
    if warning:
        lines += ["", f"**{md_escape(warning)}**"]
    return "\n".join(lines) + "\n"


def ranking_latex(entries: list[dict], dataset: str, mode: str = "image", baselines: list[dict] | None = None) -> str:
    out = [
        r"% needs \usepackage{booktabs} and \usepackage{graphicx}", r"\begin{table}[htbp]", r"\centering",
        r"\caption{" + latex_escape(f"Ranking on {dataset}. {ranking_note(entries, mode)}"
                                    f"{baseline_note(baselines)}") + "}",
        r"\label{tab:ranking-" + slug(dataset).replace("_", "-") + "}",
        r"\resizebox{\textwidth}{!}{%",
        r"\begin{tabular}{rllll" + "r" * (len(RANKING_HEAD) - 5) + "}", r"\toprule",
        " & ".join(latex_escape(h) for h in RANKING_HEAD) + r" \\", r"\midrule",
    ]
    for b in baselines or ():  # the reference first
        out.append(" & ".join(latex_escape(c) for c in baseline_cells(b)) + r" \\")
    if baselines:
        out.append(r"\midrule")
    for e in entries:
        out.append(" & ".join(latex_escape(c) for c in ranking_cells(e)) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(out) + "\n"


def dicts_csv(rows: list[dict], columns: list[str]) -> str:
    """CSV text of ``rows`` with ``columns`` (absent values empty)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()


def ranking_csv(entries: list[dict]) -> str:
    return dicts_csv(entries, RANKING_CSV_COLUMNS)


# -- trivial baselines (the shortcut check) ------------------------------------------------------------------------
BASELINE_CSV_COLUMNS = ["dataset", "category", "baseline", "protocol", "image_height", "image_width", "n_train",
                        "n_test", "image_auroc", "image_auroc_lo", "image_auroc_hi"]


def baseline_rows_for(baseline_rows: list[dict], rows: list[dict]) -> list[dict]:
    """The stored baselines of the categories and input (protocol, size) of the result ``rows`` (one per
    category, baseline and input; the latest where stored twice)."""
    inputs = {(r["category"], r.get("protocol"), r.get("image_height"), r.get("image_width")) for r in rows}
    keep: dict[tuple, dict] = {}
    for b in baseline_rows:
        if (b["category"], b.get("protocol"), b.get("image_height"), b.get("image_width")) in inputs:
            keep[(b["category"], b["baseline"], b.get("protocol"), b.get("image_height"), b.get("image_width"))] = b
    return list(keep.values())


def baseline_entries(baseline_rows: list[dict], dataset: str) -> list[dict]:
    """One reference entry per baseline: image AUROC per category and its mean over categories, with the 95 %
    interval of the mean (``mean_interval`` of the per-category DeLong intervals); best first."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in baseline_rows:
        groups[b["baseline"]].append(b)
    out = []
    for name, g in groups.items():
        vals = [b.get("image_auroc") for b in g]
        lo, hi = mean_interval(vals, [b.get("image_auroc_lo") for b in g], [b.get("image_auroc_hi") for b in g])
        out.append({"dataset": dataset, "baseline": name, "n_categories": len(g), "image_auroc_mean":
                    mean_or_none(vals), "image_auroc_lo": lo, "image_auroc_hi": hi,
                    "per_category": {b["category"]: num(b.get("image_auroc")) for b in g}})
    return sorted(out, key=lambda e: -(e["image_auroc_mean"] or 0))


def baseline_cells(b: dict) -> list[str]:
    """A reference row of the ranking: rank 'ref', the baseline's name, image AUROC and interval; the rest empty."""
    return ["ref", f"trivial: {b['baseline']}", "–", "–", "no CNN", pct(b["image_auroc_mean"]),
            interval(b, "image_auroc"), *[MISSING] * (len(RANKING_HEAD) - 7)]


def baseline_note(baselines: list[dict] | None) -> str:
    if not baselines:
        return ""
    return (" Rows 'ref' (first): trivial baselines (no CNN, same split and preprocessing: raw pixels at 32 px nearest "
            "neighbour, grey-level mean/std, colour histogram), image ROC-AUC with its 95 % DeLong interval; a "
            "baseline close to the top means the image-level figures measure global appearance.")


def baseline_csv(baseline_rows: list[dict]) -> str:
    return dicts_csv(baseline_rows, BASELINE_CSV_COLUMNS)


def add_baselines(tables: list[FamilyTable], baselines: dict[str, list[dict]]) -> None:
    """Give each family table the best trivial baseline per row (category, or the mean over a mean row's
    categories) as a reference column."""
    for t in tables:
        entries = baselines.get(t.dataset) or []
        if not entries:
            continue
        for r in t.rows:
            members = t.members.get(r.label, []) if r.is_mean else [r.label]
            best = None
            for e in entries:
                vals = [e["per_category"].get(c) for c in members]
                if members and all(v is not None for v in vals):
                    v = float(np.mean(vals))
                    if best is None or v > best[1]:
                        best = (e["baseline"], v)
            t.reference[r.label] = best
