"""Recommendation: the best backbone + method under a per-image latency budget, in plain words.

Latency of a configuration = backbone forward ms/img at batch 1 + the method's predict ms/img, each the minimum over
short repeats and jobs where the store has it (see ``tables.ranking``); where the study re-timed its backbones
round-robin at its end (``final_timing``), the backbone part is that minimum, and when the load exceeded the cores
while it ran the recommendation says so. Configurations without a measured latency cannot be checked against a
budget and are left out of it.

Criterion (``rank_by``; the report's ``--rank-by``, the study spec's ``rank_by``):

* ``image``: mean image AUROC, then pixel AUROC, then speed.
* ``localisation``: a configuration whose AUPRO or pixel AUROC is significantly more than a margin (AUPRO 5, pixel
  AUROC 2 points) below the best's (one-sided paired bootstrap over test images, Holm, 5 %:
  ``significance.compare_localisation``) is never recommended; the others are ranked
  by image AUROC, then AUPRO, then speed (configurations that could not be tested come after the tested ones).
  A high image AUROC can come from global appearance (brightness, framing) while the maps miss the defects.
* ``auto`` (default): ``localisation`` where the dataset has pixel masks, else ``image``.

Shortcut check: where a trivial baseline (``adspine.baselines``, no CNN) reaches the lower end of the best
configuration's 95 % image AUROC interval, the recommendation warns that image-level separation is explained by
global appearance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adspine.report.tables import backbone_b1, config_label, fmt, load_note, mean_std, pct


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
    rank_by: str = "image"  # the criterion used: 'image' or 'localisation'
    warning: str | None = None  # the shortcut warning (a trivial baseline within the best's interval)


RANK_BY = ("auto", "image", "localisation")
SHORTCUT = "image-level separation here is explained by global appearance; judge by localisation"
_TIER = {"best": 0, "ok": 0, None: 1, "below": 2}


def resolve_rank_by(rank_by: str | None, entries: list[dict]) -> str:
    """``image`` or ``localisation``: ``auto`` (or None) is ``localisation`` where pixel metrics exist."""
    rank_by = rank_by or "auto"
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by: {rank_by!r} is not one of {', '.join(RANK_BY)}")
    pixel = any(e.get("aupro_mean") is not None or e.get("pixel_auroc_mean") is not None for e in entries)
    return "localisation" if rank_by != "image" and pixel else "image"


def rank_key(mode: str):
    """Sort key of ranking entries under ``mode`` (``image`` or ``localisation``); missing latency last."""
    def key(e: dict):
        lat = e["total_ms_b1"] if e.get("total_ms_b1") is not None else 1e18
        if mode == "localisation":
            return (e.get("image_auroc_mean") is None, _TIER.get(e.get("localisation"), 1),
                    -(e.get("image_auroc_mean") or 0), -(e.get("aupro_mean") or 0), lat)
        return (e.get("image_auroc_mean") is None, -(e.get("image_auroc_mean") or 0),
                -(e.get("pixel_auroc_mean") or 0), lat)
    return key


def order(entries: list[dict], mode: str) -> list[dict]:
    """``entries`` of one dataset sorted under ``mode``, ``rank`` renumbered from 1."""
    out = sorted(entries, key=rank_key(mode))
    for i, e in enumerate(out, start=1):
        e["rank"] = i
    return out


def criterion_text(mode: str, rank_by: str | None) -> str:
    if mode == "localisation":
        why = "the dataset has pixel masks" if (rank_by or "auto") == "auto" else "asked for (--rank-by)"
        return (f"Criterion: localisation ({why}): a configuration whose AUPRO or pixel AUROC is significantly more "
                "than 5 / 2 points below the best's (one-sided paired bootstrap over test images, Holm, 5 %) is not "
                "recommended, since a high image "
                "AUROC alone can come from global appearance; among the rest, highest image AUROC, then AUPRO, then "
                "speed.")
    why = ("no pixel masks" if (rank_by or "auto") != "image" else "asked for (--rank-by image)")
    return f"Criterion: image AUROC, then pixel AUROC, then speed ({why})."


def shortcut_warning(entries: list[dict], baselines: list[dict] | None) -> str | None:
    """The shortcut warning where a trivial baseline reaches the best configuration's image AUROC interval (its
    lower end; the best's mean where no interval is stored)."""
    top = max((e for e in entries if e.get("image_auroc_mean") is not None),
              key=lambda e: e["image_auroc_mean"], default=None)
    have = [b for b in baselines or () if b.get("image_auroc_mean") is not None]
    if top is None or not have:
        return None
    lo = top.get("image_auroc_lo") if top.get("image_auroc_lo") is not None else top["image_auroc_mean"]
    b = max(have, key=lambda b: b["image_auroc_mean"])
    if b["image_auroc_mean"] < lo:
        return None
    ci = f"95 % interval [{pct(top.get('image_auroc_lo'))}, {pct(top.get('image_auroc_hi'))}] %" \
        if top.get("image_auroc_lo") is not None else "mean"
    return (f"Warning: the trivial baseline '{b['baseline']}' (no CNN) reaches image AUROC "
            f"{pct(b['image_auroc_mean'])} %, within the best configuration's {ci} ({config_label(top)}, "
            f"{pct(top['image_auroc_mean'])} %): {SHORTCUT}.")


def _describe(e: dict) -> str:
    parts = [f"image AUROC {mean_std(e, 'image_auroc')} %"]
    if e.get("pixel_auroc_mean") is not None:
        parts.append(f"pixel AUROC {mean_std(e, 'pixel_auroc')} %")
    if e.get("aupro_mean") is not None:
        parts.append(f"AUPRO {mean_std(e, 'aupro')} %")
    if e.get("max_in_mask_mean") is not None:
        parts.append(f"max-in-mask {pct(e['max_in_mask_mean'])} %")
    b1 = backbone_b1(e)
    pr = e.get("predict_ms_min") if e.get("predict_ms_min") is not None else e.get("predict_ms")
    lat = f"{fmt(e['total_ms_b1'])} ms/img (backbone {fmt(b1)} + method {fmt(pr)}; {e.get('latency_basis')})"
    parts.append(lat)
    if e.get("memory_mb") is not None:
        what = "method memory (peak above baseline)" if e.get("memory_basis") == "increment" else "peak memory"
        parts.append(f"{what} {fmt(e['memory_mb'], 0)} MB")
    return ", ".join(parts)


def recommend(entries: list[dict], budget_ms: float | None, runners: int = 3, rank_by: str | None = "auto",
              baselines: list[dict] | None = None) -> Recommendation:
    """Pick the best configuration of one dataset's ranking ``entries`` whose latency fits ``budget_ms``, under the
    criterion ``rank_by`` (see the module); ``baselines``: the dataset's trivial baseline entries
    (``tables.baseline_entries``) for the shortcut warning."""
    ds = entries[0]["dataset"] if entries else "dataset"
    mode = resolve_rank_by(rank_by, entries)
    key = rank_key(mode)
    timed = [e for e in entries if e.get("total_ms_b1") is not None and e.get("image_auroc_mean") is not None]
    fastest = min(timed, key=lambda e: (e["total_ms_b1"], key(e))) if timed else None
    allowed = [e for e in timed if mode == "image" or e.get("localisation") != "below"]
    fit = sorted((e for e in allowed if budget_ms is None or e["total_ms_b1"] <= budget_ms), key=key)
    rec = Recommendation(ds, budget_ms, fit[0] if fit else None, fit[1:1 + runners], fastest, len(fit), len(timed))
    rec.rank_by = mode
    lines = [criterion_text(mode, rank_by)]
    where = f"on {ds}"
    excluded = [e for e in timed if e not in allowed]
    if excluded:
        top = max(excluded, key=lambda e: e["image_auroc_mean"])
        lines.append(f"Not recommended: {len(excluded)} configuration(s) localise significantly worse than the best, "
                     f"e.g. {config_label(top)} (image AUROC {pct(top['image_auroc_mean'])} %, AUPRO "
                     f"{pct(top.get('aupro_mean'))} %, pixel AUROC {pct(top.get('pixel_auroc_mean'))} %; below in "
                     f"{' and '.join(m.replace('_', ' ') for m in top.get('localisation_below', []))}).")
    if mode == "localisation" and timed and all(e.get("localisation") is None for e in timed):
        lines.append("No localisation test was possible (no bootstrap replicates or intervals stored): ranked as "
                     "if by image AUROC.")
    if not timed:
        lines.append(f"No configuration {where} has both a measured latency and an image AUROC; nothing to recommend.")
    elif rec.best is None:
        what = "localises as well as the best and " if mode == "localisation" else ""
        lines.append(
            f"Nothing {where} {what}fits within {fmt(budget_ms)} ms/img (backbone at batch 1 + method). The fastest "
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
    if timed and load_note(timed):
        lines.append(load_note(timed))
    rec.warning = shortcut_warning(entries, baselines)
    if rec.warning:
        lines.append(rec.warning)
    rec.text = " ".join(lines)
    return rec


def to_markdown(recs: list[Recommendation]) -> str:
    out = ["# Recommendation", ""]
    for r in recs:
        out += [f"## {r.dataset}", "", r.text, ""]
        if r.fit_command:
            out += ["Build it:", "", "```", r.fit_command, "```", ""]
    return "\n".join(out)
