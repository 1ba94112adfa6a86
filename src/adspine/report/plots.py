"""Report plots (matplotlib, Agg backend, PNG) from the ranking entries of one dataset."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from adspine.report.tables import is_pretrained, method_name, num  # noqa: E402

DPI = 110
_PNG_META = {"Software": None}  # keep the PNGs free of URLs and version strings


def pareto_front(xs, ys) -> list[int]:
    """Indices of the points not dominated when minimizing x and maximizing y, sorted by x.

    A point is dominated when another has x <= and y >= with at least one strict. Points with a missing
    coordinate are never on the front.
    """
    pts = [(num(x), num(y), i) for i, (x, y) in enumerate(zip(xs, ys))]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    pts.sort(key=lambda p: (p[0], -p[1]))
    front, best_y = [], -np.inf
    for x, y, i in pts:
        if y > best_y:
            front.append(i)
            best_y = y
    return front


def _style(entries):
    methods = list(dict.fromkeys(e["method"] for e in entries))
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    return methods, colors


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata=_PNG_META)
    plt.close(fig)
    return path


def _short(e) -> str:
    tag = "" if is_pretrained(e["init"]) else " (rand)"
    return f"{e['backbone']}{tag}"


def quality_vs(entries: list[dict], xkey: str, xlabel: str, title: str, path: Path) -> tuple[Path, list[dict]] | None:
    """Scatter of mean image AUROC against ``xkey`` with the Pareto front (low x, high quality) marked.

    Front points are labelled with their ranking number; returns the PNG path and the front entries (by x).
    """
    pts = [e for e in entries if num(e.get(xkey)) is not None and e.get("image_auroc_mean") is not None]
    if not pts:
        return None
    methods, colors = _style(pts)
    xs = np.array([num(e[xkey]) for e in pts])
    ys = np.array([100 * e["image_auroc_mean"] for e in pts])
    front = pareto_front(xs, ys)
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for i, e in enumerate(pts):
        c = colors[e["method"]]
        pre = is_pretrained(e["init"])
        ax.scatter(xs[i], ys[i], s=46, marker="o", facecolors=c if pre else "white", edgecolors=c, linewidths=1.6,
                   zorder=3)
        err = e.get("image_auroc_std")
        if err is not None:
            ax.errorbar(xs[i], ys[i], yerr=100 * err, color=c, lw=1, capsize=2, zorder=2)
    fx, fy = xs[front], ys[front]
    ax.step(fx, fy, where="post", color="0.25", lw=1.2, ls="--", zorder=1)
    ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4, label="Pareto front")
    for i in front:
        ax.annotate(f"#{pts[i].get('rank', i + 1)}", (xs[i], ys[i]), xytext=(5, -11), textcoords="offset points",
                    fontsize=8, fontweight="bold")
    if xs.min() > 0 and xs.max() / xs.min() > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    for m in methods:
        ax.scatter([], [], color=colors[m], label=method_name(m))
    ax.scatter([], [], facecolors="0.4", edgecolors="0.4", label="pretrained (filled)")
    ax.scatter([], [], facecolors="white", edgecolors="0.4", label="random init (hollow)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean image ROC-AUC (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path), [pts[i] for i in front]


def init_comparison(entries: list[dict], title: str, path: Path) -> Path | None:
    """Paired bars per backbone: mean image AUROC for each init, one panel per method (backbones with >= 2 inits)."""
    inits_of: dict[str, list[str]] = {}
    for e in entries:
        inits_of.setdefault(e["backbone"], [])
        if e["init"] not in inits_of[e["backbone"]]:
            inits_of[e["backbone"]].append(e["init"])
    backbones = [b for b, i in inits_of.items() if len(i) >= 2]
    if not backbones:
        return None
    inits = sorted({i for b in backbones for i in inits_of[b]}, key=lambda s: (not is_pretrained(s), s))
    methods, _ = _style(entries)
    methods = [m for m in methods if any(e["method"] == m and e["backbone"] in backbones for e in entries)]
    lookup = {(e["backbone"], e["init"], e["method"]): e for e in entries}
    cmap = plt.get_cmap("Set2")
    fig, axes = plt.subplots(len(methods), 1, figsize=(max(6.0, 1.1 * len(backbones) + 3), 3.0 * len(methods)),
                             squeeze=False)
    width = 0.8 / len(inits)
    for ax, m in zip(axes[:, 0], methods):
        x = np.arange(len(backbones))
        for j, init in enumerate(inits):
            vals, errs = [], []
            for b in backbones:
                e = lookup.get((b, init, m))
                v = e["image_auroc_mean"] if e else None
                vals.append(np.nan if v is None else 100 * v)
                s = e.get("image_auroc_std") if e else None
                errs.append(0.0 if s is None else 100 * s)
            ax.bar(x + (j - (len(inits) - 1) / 2) * width, vals, width, yerr=errs, capsize=2, label=init,
                   color=cmap(j % 8), edgecolor="0.3", linewidth=0.5)
            for xi, v, err in zip(x, vals, errs):
                if not np.isnan(v):
                    ax.text(xi + (j - (len(inits) - 1) / 2) * width, v + err + 0.5, f"{v:.1f}", ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(x, backbones, rotation=20 if len(backbones) > 5 else 0, ha="right" if len(backbones) > 5
                      else "center")
        allv = [100 * e["image_auroc_mean"] for e in entries if e["image_auroc_mean"] is not None]
        lo = max(0.0, min(allv) - 10) if allv else 0.0
        ax.set_ylim(lo, 107)
        ax.set_yticks([t for t in ax.get_yticks() if lo <= t <= 100])
        ax.set_ylabel("image ROC-AUC (%)")
        ax.set_title(method_name(m), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def quality_vs_top1(entries: list[dict], title: str, path: Path) -> Path | None:
    """Mean image AUROC against the weights' ImageNet top-1 (pretrained configurations with a known top-1)."""
    pts = [e for e in entries if is_pretrained(e["init"]) and num(e.get("imagenet_top1")) is not None
           and e.get("image_auroc_mean") is not None]
    if not pts:
        return None
    methods, colors = _style(pts)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in methods:
        sub = [e for e in pts if e["method"] == m]
        x = np.array([num(e["imagenet_top1"]) for e in sub])
        y = np.array([100 * e["image_auroc_mean"] for e in sub])
        label = method_name(m)
        if len(sub) >= 3 and np.std(x) > 0 and np.std(y) > 0:
            label += f" (Pearson r = {np.corrcoef(x, y)[0, 1]:.2f})"
        ax.scatter(x, y, color=colors[m], s=40, label=label, zorder=3)
    best: dict[str, dict] = {}
    for e in pts:  # one label per backbone, at its best point
        if e["backbone"] not in best or e["image_auroc_mean"] > best[e["backbone"]]["image_auroc_mean"]:
            best[e["backbone"]] = e
    for b, e in best.items():
        ax.annotate(b, (num(e["imagenet_top1"]), 100 * e["image_auroc_mean"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=7)
    ax.set_xlabel("ImageNet top-1 of the weights (%)")
    ax.set_ylabel("mean image ROC-AUC (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def dataset_plots(entries: list[dict], dataset: str, folder: Path, prefix: str) -> dict[str, dict]:
    """All plots of one dataset: name -> {"path", "front" (Pareto entries or None), "wide"}; absent = no data."""
    device = next((e.get("device") for e in entries if e.get("device")), None) or "cpu"
    out: dict[str, dict] = {}
    r = quality_vs(entries, "total_ms_b1", f"latency on {device}: backbone (batch 1) + method, ms/img",
                   f"{dataset}: quality vs latency", folder / f"{prefix}_quality_vs_latency.png")
    if r:
        out["quality vs latency"] = {"path": r[0], "front": r[1], "wide": False}
    r = quality_vs(entries, "peak_rss_mb", "peak resident memory (MB)", f"{dataset}: quality vs memory",
                   folder / f"{prefix}_quality_vs_memory.png")
    if r:
        out["quality vs memory"] = {"path": r[0], "front": r[1], "wide": False}
    p = quality_vs_top1(entries, f"{dataset}: quality vs ImageNet top-1", folder / f"{prefix}_quality_vs_top1.png")
    if p:
        out["quality vs ImageNet top-1"] = {"path": p, "front": None, "wide": False}
    p = init_comparison(entries, f"{dataset}: pretrained vs random initialization", folder / f"{prefix}_init.png")
    if p:
        out["pretrained vs random init"] = {"path": p, "front": None, "wide": True}
    return out
