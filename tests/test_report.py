"""Report generation from a small hand-made results store (no torch, no network)."""

from __future__ import annotations

import csv
import itertools
import re

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from adspine.report import ReportError, build_report
from adspine.report.cli import register
from adspine.report.plots import pareto_front
from adspine.report.recommend import recommend
from adspine.report.tables import ranking
from adspine.study.store import ResultStore

CATS = {"carpet": "texture", "bottle": "object"}
BACKBONES = {  # name: (family, ImageNet top-1, relative cost)
    "resnet18": ("resnet", 69.8, 2.0),
    "resnet34": ("resnet", 73.3, 4.0),
    "mobilenetv2_100": ("mobilenet", 72.0, 1.0),
}
INITS = ("imagenet", "random")
SEEDS = (1024, 7)
S = 32  # map size


def _make_store(tmp):
    rng = np.random.default_rng(0)
    img_dir = tmp / "imgs"
    img_dir.mkdir()
    store = ResultStore(tmp / "results.sqlite")
    results_all = []
    for n, (cat, bb, init) in enumerate(itertools.product(CATS, BACKBONES, INITS)):
        fam, top1, ms = BACKBONES[bb]
        pre = init == "imagenet"
        job = dict(job_id=f"job{n}", study="t", dataset="synth", category=cat, category_kind=CATS[cat], backbone=bb,
                   family=fam, init=init, weights_tag="tv_in1k" if pre else "random",
                   imagenet_top1=top1 if pre else None,
                   protocol="paper", image_size=S, device="cpu", threads=2, host_cpu="TestCPU",
                   backbone_ms_b1=10 * ms + rng.uniform(0, 1), backbone_ms_bn=8 * ms, params=int(1e6 * ms),
                   flops=1e9 * ms, status="done", started_at=f"2024-01-01 00:{n:02d}")
        results, examples = [], []
        for method, seeds in (("padim", SEEDS), ("patchcore", (None,))):
            for seed in seeds:
                base = 0.9 if pre else 0.7
                r = dict(method=method, rd_seed=seed, d=100 if seed else None,
                         image_auroc=float(np.clip(base + rng.uniform(-0.1, 0.1), 0, 1)),
                         # mobilenet: no pixel ground truth -> None
                         pixel_auroc=None if fam == "mobilenet" else float(rng.uniform(0.8, 1.0)),
                         aupro=None if fam == "mobilenet" else float(rng.uniform(0.5, 0.9)),
                         fit_s=1.0, predict_ms=5.0 if method == "padim" else 20.0,
                         peak_rss_mb=float(200 * ms + rng.uniform(0, 50)), model_bytes=1000)
                results.append(r)
                results_all.append({**job, **r})
            for i in range(3):
                label = int(i < 2)
                mask = np.zeros((S, S), bool)
                if label:
                    mask[8 + 4 * i:20, 10:22] = True
                path = img_dir / f"{cat}_{i}.png"
                if not path.exists():
                    Image.fromarray((rng.uniform(0, 255, (40, 40, 3))).astype(np.uint8)).save(path)
                if n == 0 and i == 0:  # one example whose image file is gone
                    path = img_dir / "missing.png"
                amap = (rng.uniform(0, 1, (S, S)) + 2 * mask).astype(np.float16)
                examples.append(dict(method=method, rd_seed=seeds[0], idx=i, image_path=str(path), label=label,
                                     defect="hole" if label else "good", score=float(amap.max()), amap=amap, mask=mask))
        store.record_job(job, results, examples)
    store.record_job(dict(job_id="bad", dataset="synth", category="carpet", backbone="resnet50", family="resnet",
                          init="imagenet", status="failed", error="RuntimeError: out of memory in fit",
                          started_at="2024-01-02"))
    store.close()
    return tmp / "results.sqlite", results_all


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    db, rows = _make_store(tmp)
    app = typer.Typer()
    register(app)

    @app.command("noop")  # keep typer in multi-command mode so the name `report` is required
    def _noop() -> None:
        pass

    res = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp / "out"), "--budget-ms", "35"])
    assert res.exit_code == 0, res.output
    return tmp / "out", rows, res.output.strip()


def _md_table(path):
    """Rows of a Markdown table as dicts keyed by header."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def test_files_exist(report):
    out, _, printed = report
    assert printed.endswith("report.html")
    for stem in ("synth_resnet", "synth_mobilenet", "ranking_synth"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{stem}.{ext}").stat().st_size > 0
    for p in ("quality_vs_latency", "quality_vs_memory", "init", "quality_vs_top1"):
        assert (out / "plots" / f"synth_{p}.png").read_bytes()[:4] == b"\x89PNG"
    for cat in CATS:
        assert (out / "examples" / f"synth_{cat}.png").is_file()
    assert "Recommendation" in (out / "recommendation.md").read_text()
    tex = (out / "tables" / "synth_mobilenet.tex").read_text()
    assert r"\begin{tabular}" in tex and r"mobilenetv2\_100" in tex


def test_family_mean_row_matches_hand_computation(report):
    out, rows, _ = report
    table = _md_table(out / "tables" / "synth_resnet.md")
    col = "resnet18 (imagenet)"
    sel = [r for r in rows if r["backbone"] == "resnet18" and r["init"] == "imagenet" and r["method"] == "padim"]
    per_cat = {c: (np.mean([r["image_auroc"] for r in sel if r["category"] == c]),
                   np.mean([r["pixel_auroc"] for r in sel if r["category"] == c])) for c in CATS}
    mean_img = np.mean([v[0] for v in per_cat.values()])
    mean_pix = np.mean([v[1] for v in per_cat.values()])
    padim = [r for r in table if r["method"] in ("PaDiM", "")]
    got = {r["category"].strip("*"): r[col] for r in padim}
    assert got["mean"] == f"{100 * mean_img:.1f} / {100 * mean_pix:.1f}"
    assert got["texture mean"] == f"{100 * per_cat['carpet'][0]:.1f} / {100 * per_cat['carpet'][1]:.1f}"
    assert got["object mean"] == got["bottle"]
    # categories ordered texture first; missing pixel metric shown as "-"
    assert [r["category"] for r in table][:2] == ["carpet", "bottle"]
    mob = _md_table(out / "tables" / "synth_mobilenet.md")
    assert all(r["mobilenetv2_100 (random)"].endswith("/ -") for r in mob)


def test_ranking_std_over_seeds_equals_numpy(report):
    out, rows, _ = report
    with open(out / "tables" / "ranking_synth.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["image_auroc_mean"]) for r in table] == sorted((float(r["image_auroc_mean"]) for r in table),
                                                                   reverse=True)
    for bb, init in itertools.product(BACKBONES, INITS):
        sel = [r for r in rows if r["backbone"] == bb and r["init"] == init and r["method"] == "padim"]
        per_seed = [np.mean([r["image_auroc"] for r in sel if r["rd_seed"] == s]) for s in SEEDS]
        (line,) = [r for r in table if r["backbone"] == bb and r["init"] == init and r["method"] == "padim"]
        assert float(line["image_auroc_mean"]) == pytest.approx(np.mean(per_seed))
        assert float(line["image_auroc_std"]) == pytest.approx(np.std(per_seed, ddof=1))
        assert line["n_seeds"] == "2"
        (pc,) = [r for r in table if r["backbone"] == bb and r["init"] == init and r["method"] == "patchcore"]
        assert pc["image_auroc_std"] == "" and pc["n_seeds"] == "1"  # one (None) seed: no std
    # pixel metrics missing everywhere for mobilenet
    mob = [r for r in table if r["backbone"] == "mobilenetv2_100"]
    assert all(r["pixel_auroc_mean"] == "" for r in mob)


def test_pareto_front_equals_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 25))
        xs = rng.integers(0, 8, n).astype(float)  # small ranges -> ties
        ys = rng.integers(0, 8, n).astype(float)
        brute = {i for i in range(n) if not any(
            xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j] < xs[i] or ys[j] > ys[i]) for j in range(n))}
        front = pareto_front(xs, ys)
        # exact duplicates of a front point are kept once; compare on coordinates
        assert {(xs[i], ys[i]) for i in front} == {(xs[i], ys[i]) for i in brute}
        assert len(front) == len({(xs[i], ys[i]) for i in front})
    assert pareto_front([1.0, None, 3.0], [0.5, 0.9, 0.4]) == [0]


def test_recommendation_respects_budget(report):
    out, rows, _ = report
    entries = ranking(rows)
    for budget in (15.0, 35.0, 60.0, 1e9):
        rec = recommend(entries, budget)
        fit = [e for e in entries if e["total_ms_b1"] <= budget]
        if not fit:
            assert rec.best is None
            continue
        assert rec.best["total_ms_b1"] <= budget
        assert rec.best["image_auroc_mean"] == max(e["image_auroc_mean"] for e in fit)
        assert all(e["total_ms_b1"] <= budget for e in rec.runner_ups)
        assert rec.best["backbone"] in rec.text
    rec = recommend(entries, 1.0)
    fastest = min(entries, key=lambda e: e["total_ms_b1"])
    assert rec.best is None and "Nothing" in rec.text and fastest["backbone"] in rec.text
    text = (out / "recommendation.md").read_text()
    best35 = recommend(entries, 35.0).best
    assert f"{best35['backbone']} ({best35['init']})" in text


def test_html_is_self_contained(report):
    out, _, _ = report
    html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html and "<script" not in html.lower()
    assert html.count('src="data:image/png;base64,') >= 4 + len(CATS)
    assert "RuntimeError: out of memory in fit" in html  # failed job listed
    assert "image file not found" in html and "missing.png" in html
    for section in ("Recommendation", "Overall ranking", "Family tables", "Failed jobs (1)"):
        assert section in html


def test_bad_inputs(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        build_report(tmp_path / "nope.sqlite", tmp_path / "out")
    assert not (tmp_path / "nope.sqlite").exists()
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["--db", str(tmp_path / "nope.sqlite")])
    assert res.exit_code == 1 and "nope.sqlite: results store not found" in res.output


def test_empty_store(tmp_path):
    ResultStore(tmp_path / "empty.sqlite").close()
    html = build_report(tmp_path / "empty.sqlite", tmp_path / "out", budget_ms=10).read_text()
    assert "No results" in html and "No failed jobs" in html


def test_family_table_marks_incomplete_means():
    from adspine.report.tables import family_tables

    def row(cat, bb, v):
        return dict(dataset="d", family="f", category=cat, category_kind=None, backbone=bb, init="imagenet",
                    method="padim", rd_seed=None, job_id=f"{cat}{bb}", image_auroc=v, pixel_auroc=None)

    (t,) = family_tables([row("a", "x", 0.8), row("b", "x", 0.9), row("a", "y", 0.7)])
    md = t.to_markdown()
    assert "| PaDiM | **mean** | 85.0 / - | 70.0 / -* |" in md
    assert "texture mean" not in md  # kinds unknown: no kind means
    assert "mean over the categories that have a value" in md
