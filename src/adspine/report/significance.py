"""Which configurations are not distinguishable from the best: paired DeLong tests of image ROC-AUC, Holm-corrected.

Per category: every configuration against the category's best (highest seed-mean image ROC-AUC) on the same test
images, ``adspine.metrics.uncertainty.delong_paired``, Holm over the configurations of that category. On the mean
over categories: the mean of the per-category differences, with its standard error from the per-category DeLong
tests (se_c = |diff_c| / z(p_c), categories independent), z-test, Holm over configurations. Scores come from the
first Rd seed of each configuration (the stored per-image ``test_scores``). Without stored scores, or without the
uncertainty module, nothing is marked and the report says so.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from adspine.report.tables import Z95, is_done, mean_or_none

ALPHA = 0.05


@dataclass
class CategoryTest:
    category: str
    best: tuple  # (backbone, init, method)
    p_holm: dict[tuple, float] = field(default_factory=dict)  # config -> Holm-adjusted p vs best

    def indistinguishable(self, key: tuple) -> bool | None:
        if key == self.best:
            return True
        p = self.p_holm.get(key)
        return None if p is None else p >= ALPHA


@dataclass
class Significance:
    available: bool
    reason: str = ""
    per_category: dict[str, CategoryTest] = field(default_factory=dict)


def _array(v) -> np.ndarray | None:
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return np.load(io.BytesIO(bytes(v)), allow_pickle=False)
    return np.asarray(v)


def _key(r: dict) -> tuple:
    return (r["backbone"], r["init"], r.get("precision") or "fp32", r["method"])


def _first_seed_rows(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """config -> category -> the result row of its first Rd seed (lowest; None last)."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    order = lambda r: (r.get("rd_seed") is None, r.get("rd_seed") or 0)  # noqa: E731
    for r in sorted(rows, key=order):
        out[_key(r)].setdefault(r["category"], r)
    return out


def compare_to_best(rows: list[dict], entries: list[dict]) -> Significance:
    """Mark the ranking ``entries`` of ONE dataset in place (``vs_best_p_holm``, ``indistinguishable_from_best``,
    ``is_best``) and return the per-category tests."""
    from scipy.stats import norm

    from adspine.metrics import uncertainty as unc

    rows = [r for r in rows if is_done(r)]
    seed_rows = _first_seed_rows(rows)
    data: dict[tuple, dict[str, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for key, cats in seed_rows.items():
        for cat, r in cats.items():
            lab, sc = _array(r.get("test_labels")), _array(r.get("test_scores"))
            if lab is not None and sc is not None and len(lab) == len(sc) and min((lab == 0).sum(), (lab == 1).sum()) >= 2:
                data[key][cat] = (lab.astype(int), sc.astype(float))
    if not data:
        return Significance(False, "paired tests not run: the store holds no per-image test scores")
    cell_mean = defaultdict(dict)
    groups = defaultdict(list)
    for r in rows:
        groups[(_key(r), r["category"])].append(r.get("image_auroc"))
    for (key, cat), vals in groups.items():
        v = mean_or_none(vals)
        if v is not None:
            cell_mean[cat][key] = v

    sig = Significance(True)
    for cat in sorted({c for d in data.values() for c in d}):
        cands = [k for k in data if cat in data[k] and k in cell_mean[cat]]
        if not cands:
            continue
        best = max(cands, key=lambda k: cell_mean[cat][k])
        lab_b, sc_b = data[best][cat]
        raw = {}
        for k in cands:
            lab, sc = data[k][cat]
            if k == best or not np.array_equal(lab, lab_b):
                continue
            _, p = unc.delong_paired(lab_b, sc_b, sc)
            raw[k] = float(p)
        keys = list(raw)
        adj = unc.holm([raw[k] for k in keys]) if keys else []
        sig.per_category[cat] = CategoryTest(cat, best, dict(zip(keys, map(float, adj))))

    # on the mean: against rank 1, over the categories both were tested on
    top = next((e for e in entries if e.get("image_auroc_mean") is not None), None)
    if top is None:
        return sig
    best = _key(top)
    raw = {}
    for e in entries:
        key = _key(e)
        if key == best:
            continue
        cats = [c for c in data.get(best, {}) if c in data.get(key, {})
                and np.array_equal(data[best][c][0], data[key][c][0])]
        if not cats or len(cats) < len(data[best]):
            continue  # not tested on every category of the best: no claim
        d_sum, var = 0.0, 0.0
        for c in cats:
            lab, sb = data[best][c]
            sk = data[key][c][1]
            diff, p = unc.delong_paired(lab, sb, sk)
            diff, p = float(diff), float(p)
            d_sum += diff
            if diff != 0.0:
                z = norm.isf(p / 2) if p > 0 else math.inf
                var += (abs(diff) / z) ** 2 if z > 0 else math.inf
            else:  # identical AUROCs: the unpaired intervals bound the variance from above
                for s in (sb, sk):
                    _, lo, hi = unc.auroc_ci(lab, s)
                    var += ((hi - lo) / (2 * Z95)) ** 2
        n = len(cats)
        se = math.sqrt(var) / n
        mean_diff = d_sum / n
        raw[key] = 1.0 if mean_diff == 0 else (0.0 if se == 0 else float(2 * norm.sf(abs(mean_diff) / se)))
    keys = list(raw)
    adj = dict(zip(keys, map(float, unc.holm([raw[k] for k in keys])))) if keys else {}
    for e in entries:
        key = _key(e)
        e["is_best"] = key == best
        if key == best:
            e["indistinguishable_from_best"] = True
        elif key in adj:
            e["vs_best_p_holm"] = adj[key]
            e["indistinguishable_from_best"] = adj[key] >= ALPHA
    return sig


def category_table(entries: list[dict], sig: Significance) -> tuple[list[str], list[tuple[dict, list[str]]]]:
    """(categories, [(entry, cell per category)]): 'best', '≈ p' (not distinguishable), 'p' (worse) or '–'."""
    cats = list(sig.per_category)
    out = []
    for e in entries:
        key = _key(e)
        cells = []
        for c in cats:
            t = sig.per_category[c]
            if key == t.best:
                cells.append("best")
            elif key in t.p_holm:
                p = t.p_holm[key]
                cells.append(f"{'≈ ' if p >= ALPHA else ''}{p:.2g}")
            else:
                cells.append("–")
        out.append((e, cells))
    return cats, out


def category_csv_rows(entries: list[dict], sig: Significance) -> list[list]:
    """Long rows: dataset, category, backbone, init, method, is_best, p_holm, indistinguishable, precision."""
    rows = []
    for c, t in sig.per_category.items():
        for e in entries:
            key = _key(e)
            if key != t.best and key not in t.p_holm:
                continue
            p = t.p_holm.get(key)
            rows.append([e["dataset"], c, e["backbone"], e["init"], e["method"], int(key == t.best),
                         "" if p is None else f"{p:.6g}", int(bool(t.indistinguishable(key))), key[2]])
    return rows


# -- localisation: AUPRO and pixel AUROC against the best's ---------------------------------------------------------
LOCALISATION_METRICS = ("aupro", "pixel_auroc")
# Differences below these (AUPRO 5 points, pixel AUROC 2 points, as fractions) are not reasons to exclude a
# configuration: with hundreds of paired test images a 0.5-point AUPRO gap is "significant" yet immaterial, and
# excluding on it leaves a model with a poor image AUROC as the only "localiser" (seen on the demo data).
LOCALISATION_MARGIN = {"aupro": 0.05, "pixel_auroc": 0.02}


def _category_difference(rb: dict, rk: dict, metric: str) -> tuple[float, float, str] | None:
    """(best - other, its variance, basis) on one category: paired when both rows hold bootstrap replicates of the
    same resamples (same seed, count and test labels), else unpaired from the two stored 95 % intervals."""
    vb, vk = rb.get(metric), rk.get(metric)
    if vb is None or vk is None:
        return None
    col = {"pixel_auroc": 0, "aupro": 1}[metric]  # the replicates' columns (adspine.metrics.localisation)
    bb, bk = _array(rb.get("pixel_boot")), _array(rk.get("pixel_boot"))
    lb, lk = _array(rb.get("test_labels")), _array(rk.get("test_labels"))
    if (bb is not None and bk is not None and bb.shape == bk.shape and len(bb) > 1
            and rb.get("pixel_boot_seed") == rk.get("pixel_boot_seed") and lb is not None and lk is not None
            and np.array_equal(lb, lk)):
        return float(vb - vk), float(np.var(bb[:, col].astype(float) - bk[:, col], ddof=1)), "paired bootstrap"
    ends = [rb.get(f"{metric}_lo"), rb.get(f"{metric}_hi"), rk.get(f"{metric}_lo"), rk.get(f"{metric}_hi")]
    if any(v is None for v in ends):
        return None
    var = ((ends[1] - ends[0]) / (2 * Z95)) ** 2 + ((ends[3] - ends[2]) / (2 * Z95)) ** 2
    return float(vb - vk), float(var), "unpaired intervals"


def compare_localisation(rows: list[dict], entries: list[dict]) -> dict[str, tuple | None]:
    """Mark ONE dataset's ranking ``entries`` in place: per metric of ``LOCALISATION_METRICS`` the Holm-adjusted p
    of the difference to the configuration with the best mean (``{metric}_vs_best_p``), and ``localisation``:
    'best', 'ok' (neither metric materially below the best's), 'below' (AUPRO or pixel AUROC significantly
    more than its margin ``LOCALISATION_MARGIN`` below the best's at 5 %) or None (not tested: no pixel metrics,
    replicates or intervals).

    The test, one-sided against the margin m: on the mean over categories (first Rd seed of each), z = (mean of the
    per-category differences - m) / (sqrt(sum of their variances) / n), p = P(Z > z), variances from the paired
    bootstrap replicates (same resamples of the test images for every configuration), else from the two stored
    intervals; Holm over the configurations. Returns the best configuration per metric."""
    rows = [r for r in rows if is_done(r)]
    seed_rows = _first_seed_rows(rows)
    best_of: dict[str, tuple | None] = {}
    verdict: dict[tuple, set[str]] = defaultdict(set)
    tested: set[tuple] = set()  # compared with the best on at least one metric
    compared: dict[str, bool] = {}
    for metric in LOCALISATION_METRICS:
        have = [e for e in entries if e.get(f"{metric}_mean") is not None]
        if not have:
            best_of[metric] = None
            continue
        top = max(have, key=lambda e: e[f"{metric}_mean"])
        best = _key(top)
        best_of[metric] = best
        raw, diffs = {}, {}
        for e in have:
            key = _key(e)
            if key == best:
                continue
            cats = list(seed_rows.get(best, {}))
            parts = [_category_difference(seed_rows[best][c], seed_rows[key][c], metric)
                     for c in cats if c in seed_rows.get(key, {})]
            if not cats or len(parts) < len(cats) or any(p is None for p in parts):
                continue  # not comparable on every category of the best: no claim
            diff = sum(p[0] for p in parts) / len(parts)
            se = math.sqrt(sum(p[1] for p in parts)) / len(parts)
            margin = LOCALISATION_MARGIN[metric]
            if se == 0:
                raw[key] = 0.0 if diff > margin else 1.0
            else:
                raw[key] = norm_sf((diff - margin) / se)
            diffs[key] = diff
            e[f"{metric}_vs_best_basis"] = ", ".join(sorted({p[2] for p in parts}))
        keys = list(raw)
        adj = dict(zip(keys, holm_list([raw[k] for k in keys]))) if keys else {}
        compared[metric] = bool(adj)
        for e in have:
            key = _key(e)
            if key in adj:
                e[f"{metric}_vs_best_p"] = adj[key]
                tested.add(key)
                if adj[key] < ALPHA and diffs[key] > LOCALISATION_MARGIN[metric]:
                    verdict[key].add(metric)
    lead = next((best_of[m] for m in LOCALISATION_METRICS if compared.get(m)), None)
    for e in entries:
        key = _key(e)
        e["localisation_below"] = sorted(verdict.get(key, ()))
        if key in verdict:
            e["localisation"] = "below"
        elif key == lead:
            e["localisation"] = "best"
        else:
            e["localisation"] = "ok" if key in tested else None
    return best_of


def norm_sf(z: float) -> float:
    from scipy.stats import norm

    return float(norm.sf(z))


def holm_list(pvalues: list[float]) -> list[float]:
    from adspine.metrics.uncertainty import holm

    return [float(p) for p in holm(pvalues)]
