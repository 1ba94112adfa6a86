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


def auroc_axis(ax, values) -> None:
    """ROC-AUC y axis (in %) from chance (50 %) to 100 %, extended below 50 only if a value lies there."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    ax.set_ylim(min([50.0] + [v - 2 for v in vals]), 101)
    ax.axhline(50, color="0.6", lw=0.8, ls=":", zorder=0)


OFFSETS = [(6, 6, "left", "bottom"), (6, -6, "left", "top"), (-6, 6, "right", "bottom"), (-6, -6, "right", "top"),
           (0, 10, "center", "bottom"), (0, -10, "center", "top"), (12, 0, "left", "center"),
           (-12, 0, "right", "center"), (14, 16, "left", "bottom"), (-14, -16, "right", "top"),
           (14, -16, "left", "top"), (-14, 16, "right", "bottom")]


def place_labels(ax, xs, ys, texts, fontsize: float = 7.5) -> tuple[list, list[int]]:
    """Annotate points without overlaps: each label takes the first candidate offset whose box overlaps no placed
    label and stays inside the axes; labels with no free place are left out. Returns (the drawn labels' boxes in
    display units, the indices left out)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    placed, left_out = [], []
    for i, (x, y, t) in enumerate(zip(xs, ys, texts)):
        for dx, dy, ha, va in OFFSETS:
            a = ax.annotate(t, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, zorder=5)
            bb = a.get_window_extent(renderer)
            inside = bb.x0 >= box.x0 and bb.x1 <= box.x1 and bb.y0 >= box.y0 and bb.y1 <= box.y1
            if inside and not any(bb.overlaps(o) for o in placed):
                placed.append(bb)
                break
            a.remove()
        else:
            left_out.append(i)
    return placed, left_out


def _yerr(e) -> tuple[float, float] | None:
    """Error bar of a point in %: the 95 % interval where stored, else ± std over Rd seeds."""
    m, lo, hi = e.get("image_auroc_mean"), e.get("image_auroc_lo"), e.get("image_auroc_hi")
    if lo is not None and hi is not None and m is not None:
        return 100 * max(m - lo, 0.0), 100 * max(hi - m, 0.0)
    s = e.get("image_auroc_std")
    return None if s is None else (100 * s, 100 * s)


def quality_vs(entries: list[dict], xkey: str, xlabel: str, title: str, path: Path,
               xspread_key: str | None = None) -> tuple[Path, list[dict]] | None:
    """Scatter of mean image AUROC against ``xkey`` with the Pareto front (low x, high quality) marked.

    Vertical bars: the 95 % interval of the category-mean AUROC (else ± std over seeds). With ``xspread_key``
    (e.g. the median latency beside the minimum) a horizontal bar runs from x to that value. Front points are
    labelled with their ranking number; returns the PNG path and the front entries (by x).
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
        yerr = _yerr(e)
        x2 = num(e.get(xspread_key)) if xspread_key else None
        xerr = [[0.0], [max(x2 - xs[i], 0.0)]] if x2 is not None else None
        if yerr is not None or xerr is not None:
            ax.errorbar(xs[i], ys[i], yerr=None if yerr is None else [[yerr[0]], [yerr[1]]], xerr=xerr, color=c,
                        lw=0.9, capsize=2, alpha=0.7, zorder=2)
    fx, fy = xs[front], ys[front]
    ax.step(fx, fy, where="post", color="0.25", lw=1.2, ls="--", zorder=1)
    ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4, label="Pareto front")
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
    auroc_axis(ax, list(ys) + [y - (_yerr(e) or (0, 0))[0] for y, e in zip(ys, pts)])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    place_labels(ax, fx, fy, [f"#{pts[i].get('rank', i + 1)}" for i in front], fontsize=8)
    return _save(fig, path), [pts[i] for i in front]


def _bar_labels_fit(n_bars: int) -> bool:
    return n_bars <= 24


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
    width_in = max(6.0, 0.32 * len(backbones) * len(inits) + 3)  # grows with the bar count: labels keep their room
    fig, axes = plt.subplots(len(methods), 1, figsize=(width_in, 3.2 * len(methods)), squeeze=False)
    width = 0.8 / len(inits)
    n_bars = len(backbones) * len(inits)
    for ax, m in zip(axes[:, 0], methods):
        x = np.arange(len(backbones))
        allv = []
        for j, init in enumerate(inits):
            vals, errs = [], []
            for b in backbones:
                e = lookup.get((b, init, m))
                v = e["image_auroc_mean"] if e else None
                vals.append(np.nan if v is None else 100 * v)
                s = e.get("image_auroc_std") if e else None
                errs.append(0.0 if s is None else 100 * s)
            allv += [v - err for v, err in zip(vals, errs) if not np.isnan(v)]
            pos = x + (j - (len(inits) - 1) / 2) * width
            ax.bar(pos, vals, width, yerr=errs, capsize=2, label=init, color=cmap(j % 8), edgecolor="0.3",
                   linewidth=0.5)
            if _bar_labels_fit(n_bars):
                for xi, v, err in zip(pos, vals, errs):
                    if not np.isnan(v):
                        ax.text(xi, v + err + 0.4, f"{v:.1f}", ha="center", va="bottom", fontsize=6.5,
                                rotation=90 if n_bars > 8 else 0)
        rotate = len(backbones) > 4 or max(len(b) for b in backbones) * len(backbones) > 60
        ax.set_xticks(x, backbones, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                      rotation_mode="anchor" if rotate else "default", fontsize=8)
        auroc_axis(ax, allv)
        ax.set_ylim(top=112 if _bar_labels_fit(n_bars) else 101)
        ax.set_yticks([t for t in range(0, 101, 10) if t >= ax.get_ylim()[0]])
        ax.set_ylabel("image ROC-AUC (%)")
        ax.set_title(method_name(m), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


MIN_POINTS_FOR_R = 5


def pearson_text(x, y) -> str | None:
    """``r = 0.62 [-0.10, 0.91]`` (95 % interval, Fisher z) with at least 5 points and spread in both; else None."""
    from scipy.stats import pearsonr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < MIN_POINTS_FOR_R or np.std(x) == 0 or np.std(y) == 0:
        return None
    res = pearsonr(x, y)
    ci = res.confidence_interval(0.95)
    return f"r = {res.statistic:.2f} [{ci.low:.2f}, {ci.high:.2f}], n = {len(x)}"


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
        r = pearson_text(x, y)
        label = method_name(m) + (f" (Pearson {r})" if r else f" (n = {len(sub)}: too few points for r)"
                                  if len(sub) > 1 else "")
        ax.scatter(x, y, color=colors[m], s=40, label=label, zorder=3)
    auroc_axis(ax, [100 * e["image_auroc_mean"] for e in pts])
    ax.set_xlabel("ImageNet top-1 of the weights (%)")
    ax.set_ylabel("mean image ROC-AUC (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    best: dict[str, dict] = {}
    for e in pts:  # one label per backbone, at its best point
        if e["backbone"] not in best or e["image_auroc_mean"] > best[e["backbone"]]["image_auroc_mean"]:
            best[e["backbone"]] = e
    names = list(best)
    place_labels(ax, [num(best[b]["imagenet_top1"]) for b in names],
                 [100 * best[b]["image_auroc_mean"] for b in names], names)
    return _save(fig, path)


def dataset_plots(entries: list[dict], dataset: str, folder: Path, prefix: str) -> dict[str, dict]:
    """All plots of one dataset: name -> {"path", "front" (Pareto entries or None), "wide"}; absent = no data."""
    device = next((e.get("device") for e in entries if e.get("device")), None) or "cpu"
    out: dict[str, dict] = {}
    basis = next((e.get("latency_basis") for e in entries if e.get("latency_basis")), "median")
    r = quality_vs(entries, "total_ms_b1", f"latency on {device}: backbone (batch 1) + method, ms/img ({basis})",
                   f"{dataset}: quality vs latency", folder / f"{prefix}_quality_vs_latency.png",
                   xspread_key="total_ms_b1_median" if basis.startswith(("minimum", "final")) else None)
    if r:
        out["quality vs latency"] = {"path": r[0], "front": r[1], "wide": False}
    mem = next((e.get("memory_basis") for e in entries if e.get("memory_basis")), "process peak")
    mlabel = ("method memory: peak above the baseline (MB)" if mem == "increment" else
              "peak resident memory of the process (MB)")
    r = quality_vs(entries, "memory_mb", mlabel, f"{dataset}: quality vs memory",
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
