"""Recommendation: the best backbone + method under a per-image latency budget, in plain words.

Latency of a configuration = backbone forward ms/img at batch 1 + the method's predict ms/img, each the minimum over
short repeats and jobs where the store has it (see ``tables.ranking``). Candidates are ranked by mean image AUROC,
then pixel AUROC, then speed. Configurations without a measured latency cannot be checked against a budget and are
left out of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adspine.report.tables import config_label, fmt, mean_std, pct


@dataclass
class Recommendation:
    dataset: str
    budget_ms: float | None
    best: dict | None
    runner_ups: list[dict] = field(default_factory=list)
    fastest: dict | None = None
    n_fit: int = 0
    n_total: int = 0
    text: str = ""
    fit_command: str | None = None  # ``adspine fit ...`` that builds ``best`` (where the detector module exists)


def _key(e: dict):
    return (-(e["image_auroc_mean"] or 0), -(e["pixel_auroc_mean"] or 0), e["total_ms_b1"])


def _describe(e: dict) -> str:
    parts = [f"image AUROC {mean_std(e, 'image_auroc')} %"]
    if e.get("pixel_auroc_mean") is not None:
        parts.append(f"pixel AUROC {mean_std(e, 'pixel_auroc')} %")
    b1 = e.get("backbone_ms_b1_min") if e.get("backbone_ms_b1_min") is not None else e.get("backbone_ms_b1")
    pr = e.get("predict_ms_min") if e.get("predict_ms_min") is not None else e.get("predict_ms")
    lat = f"{fmt(e['total_ms_b1'])} ms/img (backbone {fmt(b1)} + method {fmt(pr)}; {e.get('latency_basis')})"
    parts.append(lat)
    if e.get("memory_mb") is not None:
        what = "method memory (peak above baseline)" if e.get("memory_basis") == "increment" else "peak memory"
        parts.append(f"{what} {fmt(e['memory_mb'], 0)} MB")
    return ", ".join(parts)


def recommend(entries: list[dict], budget_ms: float | None, runners: int = 3) -> Recommendation:
    """Pick the best configuration of one dataset's ranking ``entries`` whose latency fits ``budget_ms``."""
    ds = entries[0]["dataset"] if entries else "dataset"
    timed = [e for e in entries if e.get("total_ms_b1") is not None and e.get("image_auroc_mean") is not None]
    fastest = min(timed, key=lambda e: (e["total_ms_b1"], _key(e))) if timed else None
    fit = sorted((e for e in timed if budget_ms is None or e["total_ms_b1"] <= budget_ms), key=_key)
    rec = Recommendation(ds, budget_ms, fit[0] if fit else None, fit[1:1 + runners], fastest, len(fit), len(timed))
    lines = []
    where = f"on {ds}"
    if not timed:
        lines.append(f"No configuration {where} has both a measured latency and an image AUROC; nothing to recommend.")
    elif rec.best is None:
        lines.append(
            f"Nothing {where} fits within {fmt(budget_ms)} ms/img (backbone at batch 1 + method). The fastest "
            f"configuration is {config_label(fastest)}: {_describe(fastest)}."
        )
    else:
        if budget_ms is None:
            lines.append(f"No latency budget given. The best configuration {where} is "
                         f"{config_label(rec.best)}: {_describe(rec.best)}.")
        else:
            lines.append(
                f"Within {fmt(budget_ms)} ms/img (backbone at batch 1 + method), {rec.n_fit} of {rec.n_total} "
                f"configurations {where} fit. The best is {config_label(rec.best)}: {_describe(rec.best)}."
            )
        if rec.runner_ups:
            lines.append("Runners-up: " + "; ".join(
                f"{i}. {config_label(e)} ({pct(e['image_auroc_mean'])} %, {fmt(e['total_ms_b1'])} ms/img)"
                for i, e in enumerate(rec.runner_ups, start=2)) + ".")
        if fastest is not None and fastest is not rec.best:
            lines.append(f"The fastest configuration is {config_label(fastest)} at {fmt(fastest['total_ms_b1'])} "
                         f"ms/img with image AUROC {pct(fastest['image_auroc_mean'])} %.")
    rec.text = " ".join(lines)
    return rec


def to_markdown(recs: list[Recommendation]) -> str:
    out = ["# Recommendation", ""]
    for r in recs:
        out += [f"## {r.dataset}", "", r.text, ""]
        if r.fit_command:
            out += ["Build it:", "", "```", r.fit_command, "```", ""]
    return "\n".join(out)
