"""Example overlays: for the best and the worst backbone of a category, test images with the anomaly map, the
ground-truth contour and a threshold contour on top.

Backbones are compared with the method fixed (the dataset's top-ranked method, where it ran on the category), so the
two rows differ by backbone and initialization only. Every panel is drawn at the resolution the model saw: the image
goes through ``adspine.data.mvtec.preprocess`` with the job's protocol and size (the exact pixels the model saw); the
ground truth is the dataset's mask file through the same code where it can be found, else the stored mask; a stored
map smaller than the model's input is resized to it (bilinear). Colours: one continuous colour map per row, scaled
from that row's lowest to highest map value (colour bar = raw scores). Threshold contour: the pixel threshold that
maximizes F1 over the row's shown pixels (chosen on these test images: an illustration, not an operating point).
If the image file is missing, the map is shown alone and the panel says so.
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
            per[(r["backbone"], r["init"], r.get("precision") or "fp32", r["method"])].append(r)
        picks = []
        for (b, i, _precision, mm), rs in per.items():
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


def model_size(job: dict, default: tuple[int, int]) -> tuple[int, int]:
    """(H, W) the model saw: ``image_height`` / ``image_width``, else square ``image_size``, else ``default``."""
    h, w = job.get("image_height"), job.get("image_width")
    if h and w:
        return int(h), int(w)
    s = job.get("image_size")
    return (int(s), int(s)) if s else default


def _size_arg(hw: tuple[int, int]):
    return hw[0] if hw[0] == hw[1] else hw


def _mask_file(image_path: Path, defect: str | None) -> Path | None:
    """The MVTec-format mask of a test image (``<category>/ground_truth/<defect>/...``), or None."""
    from adspine.data.mvtec import mask_path_for

    if not defect or defect == "good" or len(image_path.parents) < 3:
        return None
    try:
        return mask_path_for(image_path.parents[2], defect, image_path)
    except OSError:
        return None


def load_view(path: str | None, hw: tuple[int, int], protocol: str | None, defect: str | None = None
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(image float (H, W, 3), mask bool (H, W) or None) exactly as the model saw them, via the study's own
    ``preprocess``; (None, None) if the image file is missing or unreadable."""
    from adspine.data.images import load_mask, load_rgb
    from adspine.data.mvtec import preprocess

    if not path or not Path(path).is_file():
        return None, None
    try:
        image = load_rgb(Path(path))
        mpath = _mask_file(Path(path), defect)
        mask = load_mask(mpath) if mpath is not None else None
        if mask is not None and mask.shape != image.shape[:2]:
            mask = None
        img, msk = preprocess(image, mask, protocol or "resize", _size_arg(hw))
    except (OSError, ValueError):
        return None, None
    return img.permute(1, 2, 0).numpy(), (msk.numpy() if mask is not None else None)


def to_grid(a: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """A stored map (bilinear) or mask (nearest) brought to the model's (H, W)."""
    import torch

    a = np.asarray(a)
    if a.shape == tuple(hw):
        return a
    t = torch.as_tensor(a.astype(np.float32))[None, None]
    if nearest:
        return torch.nn.functional.interpolate(t, size=hw, mode="nearest-exact")[0, 0].numpy() > 0.5
    return torch.nn.functional.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def f1_threshold(maps: list[np.ndarray], masks: list[np.ndarray]) -> float | None:
    """Pixel threshold with the highest F1 over the given maps and masks; None without both classes."""
    from sklearn.metrics import precision_recall_curve

    y = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    if y.all() or not y.any():
        return None
    s = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    prec, rec, thr = precision_recall_curve(y, s)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def _examples_for(store, pick: Pick, n: int) -> list[dict]:
    seeds = sorted({r.get("rd_seed") for r in pick.jobs}, key=lambda s: (s is None, s or 0))
    for r in sorted(pick.jobs, key=lambda r: seeds.index(r.get("rd_seed"))):
        ex = store.examples(r["job_id"], r["method"], r.get("rd_seed"))
        ex = [e for e in ex if e.get("amap") is not None]
        if ex:
            for e in ex:
                e["job"] = r
            return _select(ex, n)
    return []


CMAP = "inferno"


def render_category(store, item: CategoryExamples, path: Path, n: int = 4) -> Path | None:
    """Draw the best (top row) and worst (bottom row) configuration of one category; None if no maps stored."""
    picks = [("best", item.best)] + ([("worst", item.worst)] if item.worst else [])
    rows = [(tag, p, _examples_for(store, p, n)) for tag, p in picks]
    rows = [r for r in rows if r[2]]
    if not rows:
        return None
    ncol = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol + 1, figsize=(2.6 * ncol + 0.5, 2.9 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * ncol + [0.06]})
    for ax in axes.ravel():
        ax.axis("off")
    for ri, (tag, pick, exs) in enumerate(rows):
        views = []
        for e in exs:
            hw = model_size(e["job"], tuple(np.asarray(e["amap"]).shape))
            img, gt = load_view(e.get("image_path"), hw, e["job"].get("protocol"), e.get("defect"))
            if gt is None and e.get("mask") is not None:
                gt = to_grid(e["mask"], hw, nearest=True)
            views.append((img, gt, to_grid(np.asarray(e["amap"], dtype=np.float32), hw)))
        maps = [v[2] for v in views]
        lo = float(min(np.nanmin(m) for m in maps))
        hi = float(max(np.nanmax(m) for m in maps))
        hi = hi if hi > lo else lo + 1.0
        thr = f1_threshold(maps, [v[1] if v[1] is not None else np.zeros(v[2].shape, bool) for v in views])
        for ci, (e, (img, gt, amap)) in enumerate(zip(exs, views)):
            ax = axes[ri, ci]
            if img is None:
                im = ax.imshow(amap, cmap=CMAP, vmin=lo, vmax=hi)
                note = "image missing: map only"
                item.notes.append(f"{tag} {pick.label}: image file not found, map shown alone: {e.get('image_path')}")
            else:
                ax.imshow(img)
                im = ax.imshow(amap, cmap=CMAP, vmin=lo, vmax=hi, alpha=0.5)
                note = None
            if gt is not None and np.asarray(gt).any():
                ax.contour(np.asarray(gt, dtype=float), levels=[0.5], colors="lime", linewidths=1.2)
            if thr is not None and lo < thr < hi and (amap > thr).any():
                ax.contour(amap, levels=[thr], colors="cyan", linewidths=1.0, linestyles="dashed")
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
                h, w = amap.shape
                ax.set_ylabel(f"{tag}: {pick.backbone}\n({pick.init})\n{pct(pick.image_auroc)} % | {w}x{h}px",
                              fontsize=8)
        cax = axes[ri, ncol]
        cax.axis("on")
        opaque = plt.cm.ScalarMappable(norm=im.norm, cmap=im.cmap)  # the bar without the overlay's transparency
        fig.colorbar(opaque, cax=cax).ax.tick_params(labelsize=7)
    fig.suptitle(f"{item.dataset} / {item.category}: {method_name(rows[0][1].method)}; green = ground truth, "
                 f"cyan dashed = F1-max threshold over the shown pixels, colour = anomaly score", fontsize=9)
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
