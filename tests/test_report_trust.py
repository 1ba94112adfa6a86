"""Recommendations that weigh localisation, and the shortcut check (trivial baselines beside the ranking)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import typer
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from adspine.report import build_report
from adspine.report.cli import register
from adspine.report.recommend import SHORTCUT, recommend
from adspine.report.tables import ranking
from adspine.study.store import ResultStore
from study_fixtures import holm_reference

CATS = ("c1", "c2")
N_BOOT = 200
# name: (image separation, pixel AUROC, AUPRO, latency ms); A = the case: best image AUROC, poor maps
CONFIGS = {"A": (3.0, 0.76, 0.21, 5.0), "B": (1.5, 0.99, 0.80, 20.0), "C": (1.2, 0.988, 0.79, 10.0)}


def _store(path, spec_yaml="name: t\n", baselines=True, replicates=True):
    """Three configurations on two categories with paired bootstrap replicates (a shared resample effect plus a
    small own one), and trivial baselines almost as good as the best image AUROC."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20, np.int8)
    common = {c: rng.normal(size=(N_BOOT, 2)) for c in CATS}
    rows = []
    with ResultStore(path) as store:
        store.record_spec("t", spec_yaml)
        for n, (name, (sep, pix, aupro, ms)) in enumerate(CONFIGS.items()):
            for c in CATS:
                scores = rng.normal(size=40) + sep * labels
                auc = roc_auc_score(labels, scores)
                p, a = pix + rng.uniform(-0.005, 0.005), aupro + rng.uniform(-0.01, 0.01)
                boot = np.array([p, a]) + 0.03 * common[c] + 0.01 * rng.normal(size=(N_BOOT, 2))
                r = dict(method="padim", rd_seed=None, status="done", image_auroc=auc, image_auroc_lo=auc - 0.03,
                         image_auroc_hi=min(1.0, auc + 0.03), pixel_auroc=p, aupro=a, max_in_mask=0.5,
                         pixel_auroc_lo=p - 0.06, pixel_auroc_hi=p + 0.06, aupro_lo=a - 0.06, aupro_hi=a + 0.06,
                         test_labels=labels, test_scores=scores, predict_ms_min=1.0)
                if replicates:
                    r.update(pixel_boot=boot.astype(np.float32), pixel_boot_seed=0)
                job = dict(job_id=f"{name}-{c}", study="t", dataset="d", category=c, backbone=f"net{name}",
                           family="f", init="imagenet", protocol="resize", image_size=64, image_height=64,
                           image_width=64, backbone_ms_b1_min=ms, status="done", started_at=f"2024-01-01 {n}")
                store.record_job(job, [r])
                rows.append({**job, **r})
        if baselines:
            store.record_baselines([dict(dataset="d", category=c, protocol="resize", image_height=64, image_width=64,
                                         baseline="intensity mean/std", image_auroc=0.975, image_auroc_lo=0.93,
                                         image_auroc_hi=1.0) for c in CATS])
    return rows


def _report(db, out, *args):
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    with open(out / "tables" / "ranking_d.csv") as f:
        return list(csv.DictReader(f)), (out / "recommendation.md").read_text()


def test_localisation_criterion_never_recommends_poor_maps(tmp_path):
    rows = _store(tmp_path / "r.sqlite")
    table, rec = _report(tmp_path / "r.sqlite", tmp_path / "out")
    by = {t["backbone"]: t for t in table}
    # independent paired test: per category the replicate differences' variance, z on the mean, Holm
    first = {(r["backbone"], r["category"]): r for r in rows}
    for metric, col in (("aupro", 1), ("pixel_auroc", 0)):
        means = {k: np.mean([first[(f"net{k}", c)][metric] for c in CATS]) for k in CONFIGS}
        best = max(means, key=means.get)
        others = [k for k in CONFIGS if k != best]
        ps, diffs = [], []
        for k in others:
            d = [first[(f"net{best}", c)][metric] - first[(f"net{k}", c)][metric] for c in CATS]
            v = [np.var(first[(f"net{best}", c)]["pixel_boot"][:, col].astype(float)
                        - first[(f"net{k}", c)]["pixel_boot"][:, col], ddof=1) for c in CATS]
            margin = {"aupro": 0.05, "pixel_auroc": 0.02}[metric]  # one-sided against the margin
            ps.append(norm.sf((np.mean(d) - margin) / (np.sqrt(np.sum(v)) / len(CATS))))
            diffs.append(np.mean(d))
        for k, p in zip(others, holm_reference(np.array(ps))):
            assert float(by[f"net{k}"][f"{metric}_vs_best_p"]) == pytest.approx(p, rel=1e-4, abs=1e-12)
    assert by["netA"]["localisation"] == "below" and by["netC"]["localisation"] == "ok"
    assert by["netB"]["localisation"] == "best"
    assert [t["backbone"] for t in table] == ["netB", "netC", "netA"]  # ranked on localisation
    assert float(by["netA"]["image_auroc_mean"]) > float(by["netB"]["image_auroc_mean"])  # A wins on image AUROC
    assert "Criterion: localisation" in rec and "The best configuration on d is netB (imagenet) + PaDiM" in rec
    assert "Not recommended: 1 configuration(s)" in rec and "netA (imagenet) + PaDiM" in rec
    assert SHORTCUT in rec  # the baseline 0.975 lies within A's interval
    md = (tmp_path / "out" / "tables" / "ranking_d.md").read_text()
    assert "| ref | trivial: intensity mean/std |" in md and SHORTCUT in md
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert body[0].startswith("| ref |") and body[1].startswith("| 1 |")  # the reference row heads the table
    fam = (tmp_path / "out" / "tables" / "d_f.md").read_text()
    assert "trivial baseline (image)" in fam and "97.5 (intensity mean/std)" in fam
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'class="ref"' in html and SHORTCUT in html
    # asked for image AUROC: the choice comes back
    table, rec = _report(tmp_path / "r.sqlite", tmp_path / "out2", "--rank-by", "image")
    assert table[0]["backbone"] == "netA" and "The best configuration on d is netA" in rec
    assert "Criterion: image AUROC" in rec


def test_a_significant_but_immaterial_localisation_gap_does_not_exclude(tmp_path, monkeypatch):
    """C: best image AUROC, AUPRO 2 points below B's with tiny variance (two-sided paired p < 0.025): below the 5-point
    margin, so C is recommended; D: 15 points below: excluded."""
    monkeypatch.setitem(CONFIGS, "C", (3.0, 0.985, 0.78, 10.0))
    monkeypatch.setitem(CONFIGS, "A", (1.2, 0.99, 0.65, 5.0))
    rows = _store(tmp_path / "r.sqlite")
    table, rec = _report(tmp_path / "r.sqlite", tmp_path / "out")
    by = {t["backbone"]: t for t in table}
    first = {(r["backbone"], r["category"]): r for r in rows}
    d = [first[("netB", c)]["aupro"] - first[("netC", c)]["aupro"] for c in CATS]
    v = [np.var(first[("netB", c)]["pixel_boot"][:, 1].astype(float) - first[("netC", c)]["pixel_boot"][:, 1], ddof=1)
         for c in CATS]
    assert 2 * norm.sf(np.mean(d) / (np.sqrt(np.sum(v)) / len(CATS))) < 0.025  # significant (Holm x2), under the margin
    assert by["netC"]["localisation"] == "ok" and by["netA"]["localisation"] == "below"
    assert "The best configuration on d is netC (imagenet) + PaDiM" in rec


def test_rank_by_from_the_spec_and_bad_values(tmp_path):
    _store(tmp_path / "r.sqlite", spec_yaml="name: t\nrank_by: image\n", baselines=False)
    table, rec = _report(tmp_path / "r.sqlite", tmp_path / "out")
    assert table[0]["backbone"] == "netA" and "Criterion: image AUROC" in rec and SHORTCUT not in rec
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["report", "--db", str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "o"),
                                   "--rank-by", "pixels"])
    assert res.exit_code == 2 and "--rank-by pixels" in res.output and "Traceback" not in res.output


def test_unpaired_fallback_and_untested(tmp_path):
    rows = _store(tmp_path / "r.sqlite", replicates=False)
    entries = ranking(rows)
    from adspine.report.significance import compare_localisation

    compare_localisation(rows, entries)
    by = {e["backbone"]: e for e in entries}
    # unpaired: se per value = 0.12 / (2 z); A is 0.59 below B in AUPRO: far outside
    assert by["netA"]["localisation"] == "below" and by["netA"]["aupro_vs_best_basis"] == "unpaired intervals"
    assert by["netC"]["localisation"] == "ok"
    for r in rows:
        r.update(aupro_lo=None, aupro_hi=None, pixel_auroc_lo=None, pixel_auroc_hi=None)
    entries = ranking(rows)
    compare_localisation(rows, entries)
    assert {e["localisation"] for e in entries if e["backbone"] != "netB"} == {None}  # nothing to test with
    rec = recommend(entries, None)
    assert rec.best["backbone"] == "netA" and "No localisation test was possible" in rec.text


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_study_on_a_global_shortcut_warns_and_recommends_a_good_localiser(tmp_path):
    """Defective images darker overall plus a small bright square: a trivial baseline reaches the top, the report
    warns, and the recommended configuration's AUPRO is not significantly below the best's."""
    import yaml

    from test_baselines import shortcut_dataset

    from adspine.study.plan import plan
    from adspine.study.run import run_plan

    root = shortcut_dataset(tmp_path / "data")
    spec = {"name": "shortcut", "datasets": [{"root": str(root), "name": "shortcut"}],
            "backbones": [{"names": ["resnet18"], "layers": "thesis", "inits": ["random", "kaiming_normal"]}],
            "methods": [{"name": "padim"}], "protocol": "resize", "image_size": 64, "threads": 1, "batch_size": 8,
            "timing": {"warmup": 0, "repeats": 1, "batch_n": 2}, "examples": {"count": 2, "size": 16}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    db = tmp_path / "r.sqlite"
    assert run_plan(plan(tmp_path / "spec.yaml"), db).ok
    with ResultStore(db, readonly=True) as store:
        base = {b["baseline"]: b for b in store.baselines("shortcut")}
        rows = store.rows()
    assert base["intensity mean/std"]["image_auroc"] == 1.0  # the shortcut
    best_cnn = max(r["image_auroc"] for r in rows)
    assert max(b["image_auroc"] for b in base.values()) >= best_cnn  # a trivial baseline near the top
    assert all(0.0 <= r["max_in_mask"] <= 1.0 and r["pixel_boot"].shape == (200, 2) for r in rows)
    build_report(db, tmp_path / "out")
    rec = (tmp_path / "out" / "recommendation.md").read_text()
    print(rec)
    assert SHORTCUT in rec and "Criterion: localisation" in rec
    # the recommended configuration's AUPRO is not significantly below the best's (independent paired z-test)
    with open(tmp_path / "out" / "tables" / "ranking_shortcut.csv") as f:
        table = list(csv.DictReader(f))
    chosen = next(t for t in table if f"{t['backbone']} ({t['init']}) + PaDiM" in rec.split("Runners-up")[0])
    top = max(rows, key=lambda r: r["aupro"])
    mine = next(r for r in rows if r["init"] == chosen["init"])
    diff = top["aupro"] - mine["aupro"]
    se = np.std(top["pixel_boot"][:, 1].astype(float) - mine["pixel_boot"][:, 1], ddof=1)
    assert diff == 0 or 2 * norm.sf(diff / se) >= 0.05 or diff < 0
    assert chosen["localisation"] in ("best", "ok")
