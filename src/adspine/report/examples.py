"""Example overlays: for the best and the worst backbone of a category, test images with the ground-truth contour and
the anomaly map on top.

Backbones are compared with the method fixed (the dataset's top-ranked method, where it ran on the category), so the
two rows differ by backbone and initialization only. Images are read with Pillow from the stored ``image_path`` and
brought to the map's grid with the job's protocol (``paper``: resize to 256/224 of the size, centre crop; else plain
resize). If the file is missing, the map is shown alone and the panel says so. Each row's map is scaled to [0, 1]
with the min and max over that row's shown examples.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from adspine.report.tables import mean_or_none, method_name, pct  # noqa: E402

DPI = 100


@dataclass
class Pick:
    backbone: str
    init: str
    method: str
    image_auroc: float
    jobs: list[dict]  # result rows (any seed) of this configuration in this category

    @property
    def label(self) -> str:
        return f"{self.backbone} ({self.init}) + {method_name(self.method)}"


@dataclass
class CategoryExamples:
    dataset: str
    category: str
    method: str
    best: Pick
    worst: Pick | None
    path: Path | None = None
    notes: list[str] = field(default_factory=list)


def category_extremes(rows: list[dict], method: str | None) -> list[tuple[str, str, str, Pick, Pick | None]]:
    """(dataset, category, method, best, worst) per category by seed-mean image AUROC; worst None if only one."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(str(r.get("dataset") or "dataset"), r["category"])].append(r)
    out = []
    for (ds, cat), g in groups.items():
        m = method if method and any(r["method"] == method for r in g) else None
        sub = [r for r in g if m is None or r["method"] == m]
        per: dict[tuple, list[dict]] = defaultdict(list)
        for r in sub:
            per[(r["backbone"], r["init"], r["method"])].append(r)
        picks = []
        for (b, i, mm), rs in per.items():
            v = mean_or_none(r.get("image_auroc") for r in rs)
            if v is not None:
                picks.append(Pick(b, i, mm, v, rs))
        if not picks:
            continue
        picks.sort(key=lambda p: -p.image_auroc)
        worst = picks[-1] if len(picks) > 1 else None
        out.append((ds, cat, m or "", picks[0], worst))
    return out


def _select(examples: list[dict], n: int) -> list[dict]:
    """Up to ``n`` examples: defective ones first (by index), then one good image if room."""
    bad = [e for e in examples if e.get("label") == 1]
    good = [e for e in examples if e.get("label") != 1]
    chosen = bad[: max(n - 1, 1)] if good else bad[:n]
    chosen += good[: n - len(chosen)]
    return sorted(chosen, key=lambda e: e.get("idx", 0))


def load_view(path: str | None, shape: tuple[int, int], protocol: str | None) -> np.ndarray | None:
    """The test image as float RGB on the map's grid, or None if the file is missing or unreadable."""
    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            h, w = shape
            if protocol == "paper" and h == w:
                s = round(h * 256 / 224)
                im = im.resize((s, s), Image.BILINEAR)
                left = (s - w) // 2
                top = (s - h) // 2
                im = im.crop((left, top, left + w, top + h))
            else:
                im = im.resize((w, h), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0
    except OSError:
        return None


def _examples_for(store, pick: Pick, n: int) -> list[dict]:
    seeds = sorted({r.get("rd_seed") for r in pick.jobs}, key=lambda s: (s is not None, s))
    for r in sorted(pick.jobs, key=lambda r: seeds.index(r.get("rd_seed"))):
        ex = store.examples(r["job_id"], r["method"], r.get("rd_seed"))
        ex = [e for e in ex if e.get("amap") is not None]
        if ex:
            for e in ex:
                e["protocol"] = r.get("protocol")
            return _select(ex, n)
    return []


def render_category(store, item: CategoryExamples, path: Path, n: int = 4) -> Path | None:
    """Draw the best (top row) and worst (bottom row) configuration of one category; None if no maps stored."""
    picks = [("best", item.best)] + ([("worst", item.worst)] if item.worst else [])
    rows = [(tag, p, _examples_for(store, p, n)) for tag, p in picks]
    rows = [r for r in rows if r[2]]
    if not rows:
        return None
    ncol = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, 2.9 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ri, (tag, pick, exs) in enumerate(rows):
        maps = [np.asarray(e["amap"], dtype=np.float32) for e in exs]
        lo = float(min(np.nanmin(m) for m in maps))
        hi = float(max(np.nanmax(m) for m in maps))
        scale = hi - lo if hi > lo else 1.0
        for ci, (e, amap) in enumerate(zip(exs, maps)):
            ax = axes[ri, ci]
            norm = (amap - lo) / scale
            img = load_view(e.get("image_path"), amap.shape, e.get("protocol"))
            if img is None:
                ax.imshow(norm, cmap="jet", vmin=0, vmax=1)
                note = "image missing: map only"
                item.notes.append(f"{tag} {pick.label}: image file not found, map shown alone: {e.get('image_path')}")
            else:
                ax.imshow(img)
                ax.imshow(heat_rgba(norm))
                note = None
            mask = e.get("mask")
            if mask is not None and np.asarray(mask).any():
                ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="lime", linewidths=1.2)
            score = e.get("score")
            title = f"{e.get('defect') or ('good' if e.get('label') == 0 else '?')}"
            if score is not None:
                title += f" | score {score:.3g}"
            if note:
                title += f"\n({note})"
            ax.set_title(title, fontsize=8)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            if ci == 0:
                ax.set_ylabel(f"{tag}: {pick.backbone}\n({pick.init})\n{pct(pick.image_auroc)} %", fontsize=8)
    fig.suptitle(f"{item.dataset} / {item.category}: {method_name(rows[0][1].method)}; green = ground truth, "
                 f"colour = anomaly map", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as im:  # 256-colour palette: about 1/3 of the bytes of RGB for photo-like overlays
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    item.path = path
    return path


def heat_rgba(norm: np.ndarray, max_alpha: float = 0.75) -> np.ndarray:
    """Jet colours whose opacity grows with the map value, so the image stays visible where the map is low."""
    rgba = plt.get_cmap("jet")(np.clip(norm, 0, 1))
    rgba[..., 3] = max_alpha * np.clip(norm, 0, 1) ** 0.8
    return rgba
