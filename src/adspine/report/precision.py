"""Precision view: every configuration run in bf16 or int8 beside its fp32 twin (same dataset, backbone, init,
method), with the quality change, a paired test and the backbone's speed-up.

Pairs are results of the same category and Rd seed on the same test images (equal stored labels). The test is the
paired DeLong test of image AUROC per category (``metrics.uncertainty.delong_paired`` on the stored test scores),
Holm-adjusted over the configuration's categories; ``worse`` = some category significantly below fp32 at 5 %.
Latency is the backbone's batch-1 minimum (``backbone_ms_b1_min``, pooled over jobs as in the ranking).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from adspine.report.tables import (MISSING, _ds, fmt, is_done, md_escape, mean_or_none, min_or_none, pct,
                                   precision_of)

ALPHA = 0.05
HEAD = ["backbone", "init", "method", "precision", "categories", "image AUROC", "vs fp32", "p (Holm, min)",
        "pixel AUROC vs fp32", "AUPRO vs fp32", "backbone ms b1 (min)", "fp32 ms", "speed-up"]


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


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
            for metric in ("image_auroc", "pixel_auroc", "aupro"):
                entry[metric] = mean_or_none(r.get(metric) for _, r in pairs)
                entry[f"{metric}_fp32"] = mean_or_none(ref.get(metric) for ref, _ in pairs)
                entry[f"{metric}_delta"] = _delta(entry[metric], entry[f"{metric}_fp32"])
            entry["backbone_ms_b1_min"] = min_or_none(r.get("backbone_ms_b1_min") for _, r in pairs)
            entry["backbone_ms_b1_min_fp32"] = min_or_none(ref.get("backbone_ms_b1_min") for ref, _ in pairs)
            ms, ms32 = entry["backbone_ms_b1_min"], entry["backbone_ms_b1_min_fp32"]
            entry["speedup"] = ms32 / ms if ms and ms32 else None
            out.append(entry)
    return out


def _signed_pct(v: float | None) -> str:
    return MISSING if v is None else f"{100 * v:+.1f}"


def precision_cells(e: dict) -> list[str]:
    p = e.get("p_holm_min")
    return [str(e["backbone"]), str(e["init"]), str(e["method"]), e["precision"], str(e["n_categories"]),
            pct(e.get("image_auroc")), _signed_pct(e.get("image_auroc_delta")),
            MISSING if p is None else f"{p:.2g}" + (" (worse)" if e.get("worse") else ""),
            _signed_pct(e.get("pixel_auroc_delta")), _signed_pct(e.get("aupro_delta")),
            fmt(e.get("backbone_ms_b1_min"), 2), fmt(e.get("backbone_ms_b1_min_fp32"), 2),
            MISSING if e.get("speedup") is None else f"{e['speedup']:.2f}x"]


def precision_markdown(entries: list[dict]) -> str:
    """The precision table (empty string when no configuration ran in another precision than fp32)."""
    if not entries:
        return ""
    lines = ["**Backbone precision against fp32** (same test images; differences in percentage points; paired "
             "DeLong test per category, Holm over categories; speed-up = fp32 / this backbone ms at batch 1).", "",
             "| " + " | ".join(HEAD) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(HEAD) - 4)) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in precision_cells(e)) + " |" for e in entries]
    return "\n".join(lines) + "\n"
