"""Precision view: every configuration run in bf16 or int8 beside its fp32 twin (same dataset, backbone, init,
method), with the quality change, a paired test and the backbone's speed-up.

Pairs are results of the same category and Rd seed on the same test images (equal stored labels). Image AUROC: the
paired DeLong test per category (``metrics.uncertainty.delong_paired`` on the stored test scores); pixel AUROC and
AUPRO: a z-test of the difference per category, its variance from the paired bootstrap replicates
(``significance._category_difference``: same seed and test images; else from the two stored 95 % intervals). Each
metric's p is Holm-adjusted over the configuration's categories; ``worse`` = some category's image AUROC
significantly below fp32 at 5 %, ``differs`` = the metrics with some category significantly different (either way).
Latency is the backbone's batch-1 minimum (``backbone_ms_b1_min``, pooled over jobs as in the ranking).
"""

from __future__ import annotations

import math
from collections import defaultdict
from html import escape
from typing import Any

import numpy as np

from adspine.report.tables import (MISSING, _ds, fmt, is_done, md_escape, mean_or_none, min_or_none, pct,
                                   precision_of)

ALPHA = 0.05
HEAD = ["backbone", "init", "method", "precision", "categories", "image AUROC", "vs fp32", "p (Holm, min)",
        "pixel AUROC vs fp32 (p)", "AUPRO vs fp32 (p)", "at 5 %", "backbone ms b1 (min)", "fp32 ms", "speed-up"]
PIXEL_METRICS = ("pixel_auroc", "aupro")


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _pixel_p(ref: dict, r: dict, metric: str) -> tuple[float, str] | None:
    """Two-sided p of ``r``'s ``metric`` against its fp32 twin ``ref`` on one category, and the test's basis."""
    from adspine.report.significance import _category_difference

    found = _category_difference(r, ref, metric)
    if found is None:
        return None
    diff, var, basis = found
    if var <= 0:
        return (1.0 if diff == 0 else 0.0), basis
    return math.erfc(abs(diff) / math.sqrt(2 * var)), basis


def precision_comparison(rows: list[dict]) -> list[dict[str, Any]]:
    """One entry per (dataset, backbone, init, method, precision other than fp32) that has fp32 results."""
    from adspine.metrics.uncertainty import delong_paired, holm

    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if is_done(r):
            groups[(_ds(r), r["backbone"], r["init"], r["method"])][precision_of(r)].append(r)
    out = []
    for (ds, bb, init, method), by_precision in groups.items():
        base = {(r["category"], r.get("rd_seed")): r for r in by_precision.get("fp32", [])}
        if not base:
            continue
        for precision, prows in by_precision.items():
            if precision == "fp32":
                continue
            pairs = [(base[k], r) for r in prows if (k := (r["category"], r.get("rd_seed"))) in base]
            if not pairs:
                continue
            first_seed: dict[str, tuple[dict, dict]] = {}
            for ref, r in sorted(pairs, key=lambda p: (p[1].get("rd_seed") is None, p[1].get("rd_seed") or 0)):
                first_seed.setdefault(r["category"], (ref, r))
            raw = {}
            for cat, (ref, r) in first_seed.items():
                labels, ref_labels = r.get("test_labels"), ref.get("test_labels")
                if labels is None or ref_labels is None or not np.array_equal(labels, ref_labels) or \
                        r.get("test_scores") is None or ref.get("test_scores") is None:
                    continue
                raw[cat] = delong_paired(labels, r["test_scores"], ref["test_scores"])[1]
            adjusted = dict(zip(raw, holm(list(raw.values())))) if raw else {}
            entry: dict[str, Any] = {"dataset": ds, "backbone": bb, "init": init, "method": method,
                                     "precision": precision, "n_categories": len({r["category"] for _, r in pairs}),
                                     "p_holm": adjusted, "p_holm_min": min(adjusted.values()) if adjusted else None,
                                     "worse": any(p <= ALPHA and first_seed[c][1]["image_auroc"]
                                                  < first_seed[c][0]["image_auroc"] for c, p in adjusted.items())}
            differs = ["image AUROC"] if any(p <= ALPHA for p in adjusted.values()) else []
            for metric in PIXEL_METRICS:
                tests = {c: t for c, (ref, r) in first_seed.items() if (t := _pixel_p(ref, r, metric))}
                held = dict(zip(tests, holm([p for p, _ in tests.values()]))) if tests else {}
                entry[f"{metric}_p_holm"] = held
                entry[f"{metric}_p_holm_min"] = min(held.values()) if held else None
                entry[f"{metric}_basis"] = sorted({b for _, b in tests.values()})
                if any(p <= ALPHA for p in held.values()):
                    differs.append({"pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}[metric])
            entry["differs"] = differs
            for metric in ("image_auroc", "pixel_auroc", "aupro"):
                entry[metric] = mean_or_none(r.get(metric) for _, r in pairs)
                entry[f"{metric}_fp32"] = mean_or_none(ref.get(metric) for ref, _ in pairs)
                entry[f"{metric}_delta"] = _delta(entry[metric], entry[f"{metric}_fp32"])
            entry["backbone_ms_b1_min"] = min_or_none(r.get("backbone_ms_b1_min") for _, r in pairs)
            entry["backbone_ms_b1_min_fp32"] = min_or_none(ref.get("backbone_ms_b1_min") for ref, _ in pairs)
            ms, ms32 = entry["backbone_ms_b1_min"], entry["backbone_ms_b1_min_fp32"]
            entry["speedup"] = ms32 / ms if ms and ms32 else None
            entry["speed_basis"] = "separate jobs"
            out.append(entry)
    return out


def use_final_timings(view: list[dict], entries: list[dict]) -> None:
    """Take the backbone figures of ``view`` from the ranking ``entries``' final round-robin timing (both the
    precision and its fp32 twin timed in the same interleaved rounds) where the store has it for both."""
    final = {(e["dataset"], e["backbone"], e["init"], e["method"], str(e.get("precision") or "fp32")):
             e.get("final_ms_b1") for e in entries}
    for v in view:
        key = (v["dataset"], v["backbone"], v["init"], v["method"])
        ms, ms32 = final.get((*key, v["precision"])), final.get((*key, "fp32"))
        if ms and ms32:
            v.update(backbone_ms_b1_min=ms, backbone_ms_b1_min_fp32=ms32, speedup=ms32 / ms,
                     speed_basis="final round-robin")


def _signed_pct(v: float | None) -> str:
    return MISSING if v is None else f"{100 * v:+.2f}"  # two decimals: bf16 changes are often below 0.1 point


def _delta_p(e: dict, metric: str) -> str:
    p = e.get(f"{metric}_p_holm_min")
    basis = ", unpaired" if "unpaired intervals" in e.get(f"{metric}_basis", ()) else ""
    return _signed_pct(e.get(f"{metric}_delta")) + ("" if p is None else f" (p {p:.2g}{basis})")


def _verdict(e: dict) -> str:
    tested = e.get("p_holm_min") is not None or any(e.get(f"{m}_p_holm_min") is not None for m in PIXEL_METRICS)
    if e.get("differs"):
        return "differs: " + ", ".join(e["differs"])
    return "same" if tested else MISSING


def precision_cells(e: dict) -> list[str]:
    p = e.get("p_holm_min")
    return [str(e["backbone"]), str(e["init"]), str(e["method"]), e["precision"], str(e["n_categories"]),
            pct(e.get("image_auroc")), _signed_pct(e.get("image_auroc_delta")),
            MISSING if p is None else f"{p:.2g}" + (" (worse)" if e.get("worse") else ""),
            _delta_p(e, "pixel_auroc"), _delta_p(e, "aupro"), _verdict(e),
            fmt(e.get("backbone_ms_b1_min"), 2), fmt(e.get("backbone_ms_b1_min_fp32"), 2),
            MISSING if e.get("speedup") is None else f"{e['speedup']:.2f}x"]


def precision_markdown(entries: list[dict]) -> str:
    """The precision table (empty string when no configuration ran in another precision than fp32)."""
    if not entries:
        return ""
    lines = [f"**Backbone precision against fp32** ({NOTE})", "",
             "| " + " | ".join(HEAD) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(HEAD) - 4)) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in precision_cells(e)) + " |" for e in entries]
    return "\n".join(lines) + "\n"


NOTE = ("same test images; differences in percentage points; p = the smallest Holm-adjusted p over categories: "
        "paired DeLong test of image AUROC, paired bootstrap z-test of pixel AUROC and AUPRO; 'at 5 %': same = no "
        "category differs significantly in any metric; speed-up = fp32 / this backbone ms at batch 1, from the "
        "study's final round-robin timing where it has one (both precisions in the same interleaved rounds), else "
        "from separate jobs (then not side by side: benchmarks/precision.py times them round-robin)")


def precision_html(entries: list[dict]) -> str:
    """The precision table as an HTML fragment for ``report.html`` (empty string without entries)."""
    if not entries:
        return ""
    head = "".join(f"<th>{escape(h)}</th>" for h in HEAD)
    body = "".join("<tr>" + "".join(f'<td{"" if j < 4 or j == 10 else " class=n"}>{escape(c)}</td>'
                                    for j, c in enumerate(precision_cells(e))) + "</tr>" for e in entries)
    return (f'<p class="muted">{escape(NOTE[0].upper() + NOTE[1:])}.</p><div class="scroll"><table><thead><tr>{head}'
            f"</tr></thead><tbody>{body}</tbody></table></div>")
