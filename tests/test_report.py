"""Report generation from hand-made results stores (no network; overlays through the study's own preprocessing)."""

from __future__ import annotations

import csv
import itertools
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import typer
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from adspine.report import ReportError, build_report
from adspine.report.cli import register
from adspine.report.plots import pareto_front
from adspine.report.recommend import recommend
from adspine.report.tables import ranking
from adspine.study.store import ResultStore
from study_fixtures import holm_reference

CATS = {"carpet": "texture", "bottle": "object"}
BACKBONES = {  # name: (family, ImageNet top-1, relative cost)
    "resnet18": ("resnet", 69.8, 2.0),
    "resnet34": ("resnet", 73.3, 4.0),
    "mobilenetv2_100": ("mobilenet", 72.0, 1.0),
}
INITS = ("imagenet", "random")
SEEDS = (1024, 7)
S = 32  # model input size
SPEC = "name: t\ndatasets:\n  - root: data\n"


def _dataset(root, rng):
    """A tiny MVTec-format dataset: 40x48 images (non-square originals), one defect image with a mask per category."""
    for cat in CATS:
        for sub in ("train/good", "test/good", "test/hole", "ground_truth/hole"):
            (root / cat / sub).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cat / "test/hole" / f"{i}.png")
            m = np.zeros((40, 48), np.uint8)
            m[10:25, 12:30] = 255
            Image.fromarray(m).save(root / cat / "ground_truth/hole" / f"{i}_mask.png")
        for split in ("train", "test"):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cat / split / "good/0.png")


def _make_store(tmp):
    rng = np.random.default_rng(0)
    _dataset(tmp / "data", rng)
    store = ResultStore(tmp / "results.sqlite")
    store.record_spec("t", SPEC)
    labels = np.array([0] * 20 + [1] * 20, np.int8)
    results_all = []
    for n, (cat, bb, init) in enumerate(itertools.product(CATS, BACKBONES, INITS)):
        fam, top1, ms = BACKBONES[bb]
        pre = init == "imagenet"
        job = dict(job_id=f"job{n}", study="t", dataset="synth", category=cat, category_kind=CATS[cat], backbone=bb,
                   family=fam, init=init, weights_tag="tv_in1k" if pre else "random",
                   imagenet_top1=top1 if pre else None, protocol="paper", image_size=S, image_height=S,
                   image_width=S, device="cpu", threads=2, host_cpu="TestCPU", load_avg=1.5 + n / 10,
                   versions={"torch": "2.x", "adspine": "0.1"},
                   backbone_ms_b1=10 * ms + 3, backbone_ms_b1_min=10 * ms + rng.uniform(0, 1), backbone_ms_bn=8 * ms,
                   params=int(1e6 * ms), flops=1e9 * ms, status="done", started_at=f"2024-01-01 00:{n:02d}")
        results, examples = [], []
        for method, seeds in (("padim", SEEDS), ("patchcore", (None,))):
            for seed in seeds:
                sep = (2.0 if pre else 0.6) + rng.uniform(0, 0.3)
                scores = rng.normal(0, 1, 40) + sep * labels
                auc = roc_auc_score(labels, scores)
                r = dict(method=method, rd_seed=seed, d=100 if seed else None, status="done",
                         image_auroc=auc, image_auroc_lo=auc - 0.05, image_auroc_hi=min(auc + 0.05, 1.0),
                         pixel_auroc=None if fam == "mobilenet" else float(rng.uniform(0.8, 1.0)),
                         aupro=None if fam == "mobilenet" else float(rng.uniform(0.5, 0.9)),
                         fit_s=1.0, predict_ms=6.0 if method == "padim" else 21.0,
                         predict_ms_min=5.0 if method == "padim" else 20.0,
                         peak_rss_mb=float(900 + 200 * ms), method_peak_mb=float(200 * ms + rng.uniform(0, 50)),
                         memory_source="VmHWM", test_labels=labels, test_scores=scores, model_bytes=1000)
                results.append(r)
                results_all.append({**job, **r})
            for i in range(3):
                path = tmp / "data" / cat / "test/hole" / f"{i}.png"
                if n == 0 and i == 0:  # one example whose image file is gone
                    path = tmp / "data" / "missing.png"
                mask = np.zeros((S // 2, S // 2), bool)  # stored at half the model's size
                mask[4:10, 4:12] = True
                amap = (rng.uniform(0, 1, (S // 2, S // 2)) + 2 * mask).astype(np.float16)
                examples.append(dict(method=method, rd_seed=seeds[0], idx=i, image_path=str(path), label=1,
                                     defect="hole", score=float(amap.max()), amap=amap, mask=mask))
        results.append(dict(method="spade", rd_seed=None, status="failed", error="MemoryError: gallery too big"))
        store.record_job(job, results, examples)
    # image-level dataset: no pixel metrics anywhere
    for n, bb in enumerate(BACKBONES):
        sc = rng.normal(0, 1, 40) + labels
        store.record_job(dict(job_id=f"img{n}", dataset="imgs", category="parts", backbone=bb, family="f", init="imagenet",
                              pixel_level=0, image_size=S, backbone_ms_b1_min=float(n + 1), status="done"),
                         [dict(method="padim", rd_seed=None, status="done", image_auroc=roc_auc_score(labels, sc),
                               test_labels=labels, test_scores=sc)])
    store.record_job(dict(job_id="bad", dataset="synth", category="carpet", backbone="resnet50", family="resnet",
                          init="imagenet", status="failed", error="RuntimeError: out of memory in fit",
                          started_at="2024-01-02"))
    store.record_job(dict(job_id="dead", dataset="synth", category="bottle", backbone="resnet101", family="resnet",
                          init="imagenet", status="killed", attempts=2, started_at="2024-01-03",
                          error="killed: the process running attempt 2 died mid-job (e.g. out of memory)"))
    store.close()
    return tmp / "results.sqlite", results_all


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    db, rows = _make_store(tmp)
    before = db.read_bytes()
    app = typer.Typer()
    register(app)

    @app.command("noop")  # keep typer in multi-command mode so the name `report` is required
    def _noop() -> None:
        pass

    res = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp / "out"), "--budget-ms", "35"])
    assert res.exit_code == 0, res.output
    assert db.read_bytes() == before  # the input store is never written
    return tmp / "out", rows, res.output.strip()


def _md_table(path):
    """Rows of a Markdown table as dicts keyed by header."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def test_files_exist(report):
    out, _, printed = report
    assert printed.splitlines()[0].endswith("report.html")
    for stem in ("synth_resnet", "synth_mobilenet", "ranking_synth", "ranking_imgs"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{stem}.{ext}").stat().st_size > 0
    for p in ("quality_vs_latency", "quality_vs_memory", "init", "quality_vs_top1"):
        assert (out / "plots" / f"synth_{p}.png").read_bytes()[:4] == b"\x89PNG"
    for cat in CATS:
        assert (out / "examples" / f"synth_{cat}.png").is_file()
    assert "Recommendation" in (out / "recommendation.md").read_text()
    assert not list(out.parent.glob(".adspine-report-*"))  # temporary folder gone


def test_family_table_thesis_layout_and_means(report):
    out, rows, _ = report
    table = _md_table(out / "tables" / "synth_resnet.md")
    assert [r["category"] for r in table] == ["carpet", "bottle", "**texture mean**", "**object mean**", "**mean**"]
    col = "resnet18 (imagenet) · PaDiM"
    sel = [r for r in rows if r["backbone"] == "resnet18" and r["init"] == "imagenet" and r["method"] == "padim"]
    per_cat = {c: (np.mean([r["image_auroc"] for r in sel if r["category"] == c]),
                   np.mean([r["pixel_auroc"] for r in sel if r["category"] == c])) for c in CATS}
    got = {r["category"].strip("*"): r[col] for r in table}
    assert got["mean"] == f"{100 * np.mean([v[0] for v in per_cat.values()]):.1f} / " \
                          f"{100 * np.mean([v[1] for v in per_cat.values()]):.1f}"
    assert got["texture mean"] == got["carpet"] and got["object mean"] == got["bottle"]
    mob = _md_table(out / "tables" / "synth_mobilenet.md")
    assert all(r["mobilenetv2_100 (random) · PaDiM"].endswith("/ –") for r in mob)
    # the CSV carries the intervals: one seed-envelope per cell
    with open(out / "tables" / "synth_resnet.csv") as f:
        lines = [r for r in csv.DictReader(f) if r["category"] == "carpet" and r["backbone"] == "resnet18"
                 and r["init"] == "imagenet" and r["method"] == "padim"]
    (line,) = lines
    car = [r for r in sel if r["category"] == "carpet"]
    assert float(line["image_auroc_lo"]) == pytest.approx(min(r["image_auroc_lo"] for r in car), abs=1e-6)
    assert float(line["image_auroc_hi"]) == pytest.approx(max(r["image_auroc_hi"] for r in car), abs=1e-6)


def test_ranking_std_latency_memory(report):
    out, rows, _ = report
    with open(out / "tables" / "ranking_synth.csv") as f:
        table = list(csv.DictReader(f))
    means = [float(r["image_auroc_mean"]) for r in table]
    assert means == sorted(means, reverse=True)
    for bb, init in itertools.product(BACKBONES, INITS):
        sel = [r for r in rows if r["backbone"] == bb and r["init"] == init and r["method"] == "padim"]
        per_seed = [np.mean([r["image_auroc"] for r in sel if r["rd_seed"] == s]) for s in SEEDS]
        (line,) = [r for r in table if r["backbone"] == bb and r["init"] == init and r["method"] == "padim"]
        assert float(line["image_auroc_mean"]) == pytest.approx(np.mean(per_seed))
        assert float(line["image_auroc_std"]) == pytest.approx(np.std(per_seed, ddof=1))
        jobs = {r["job_id"]: r for r in sel}.values()
        assert float(line["total_ms_b1"]) == pytest.approx(min(j["backbone_ms_b1_min"] for j in jobs) + 5.0)
        assert line["latency_basis"] == "minimum"
        assert float(line["method_peak_mb"]) == pytest.approx(max(r["method_peak_mb"] for r in sel))
        assert line["memory_basis"] == "increment"
    assert all(r["pixel_auroc_mean"] == "" for r in table if r["backbone"] == "mobilenetv2_100")
    assert "spade" not in {r["method"] for r in table}  # failed results are listed, not ranked


def test_significance_marks_match_reference(report):
    """Per-category and mean marks against an independent DeLong (brute-force placements) + Holm."""
    from scipy.stats import norm

    out, rows, _ = report

    def delong(y, a, b):
        pos, neg = y == 1, y == 0
        def psi(s):
            x, z = s[pos][:, None], s[neg][None, :]
            return (x > z) + 0.5 * (x == z)
        pa, pb = psi(a), psi(b)
        v10 = np.stack([pa.mean(1), pb.mean(1)])
        v01 = np.stack([pa.mean(0), pb.mean(0)])
        cov = np.cov(v10) / pos.sum() + np.cov(v01) / neg.sum()
        d = pa.mean() - pb.mean()
        var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
        return d, var

    first = {}
    for r in sorted(rows, key=lambda r: r["rd_seed"] or 0):
        first.setdefault((r["backbone"], r["init"], r["method"], r["category"]), r)
    with open(out / "tables" / "ranking_synth.csv") as f:
        table = list(csv.DictReader(f))
    best = (table[0]["backbone"], table[0]["init"], table[0]["method"])
    keys, ps = [], []
    for t in table[1:]:
        k = (t["backbone"], t["init"], t["method"])
        ds, vs = zip(*(delong(first[(*best, c)]["test_labels"].astype(int), first[(*best, c)]["test_scores"],
                              first[(*k, c)]["test_scores"]) for c in CATS))
        z = np.mean(ds) / (np.sqrt(np.sum(vs)) / len(CATS))
        keys.append(k)
        ps.append(2 * norm.sf(abs(z)))
    adj = dict(zip(keys, holm_reference(np.array(ps))))
    for t in table[1:]:
        k = (t["backbone"], t["init"], t["method"])
        assert float(t["vs_best_p_holm"]) == pytest.approx(adj[k], rel=1e-4, abs=1e-9)
        assert t["indistinguishable_from_best"] == str(adj[k] >= 0.05)
    assert table[0]["indistinguishable_from_best"] == "True"
    assert any(t["indistinguishable_from_best"] == "False" for t in table)  # the test can tell them apart
    with open(out / "tables" / "significance_synth.csv") as f:
        sig = [r for r in csv.DictReader(f) if r["category"] == "carpet"]
    cells = {}
    for r in rows:
        if r["category"] == "carpet":
            cells.setdefault((r["backbone"], r["init"], r["method"]), []).append(r["image_auroc"])
    cbest = max(cells, key=lambda k: np.mean(cells[k]))
    keys = [k for k in cells if k != cbest]
    raw = []
    for k in keys:
        d, v = delong(first[(*cbest, "carpet")]["test_labels"].astype(int), first[(*cbest, "carpet")]["test_scores"],
                      first[(*k, "carpet")]["test_scores"])
        raw.append(2 * norm.sf(abs(d) / np.sqrt(v)))
    ref = dict(zip(keys, holm_reference(np.array(raw))))
    for r in sig:
        k = (r["backbone"], r["init"], r["method"])
        if k == cbest:
            assert r["is_best"] == "1"
        else:
            assert float(r["p_holm"]) == pytest.approx(ref[k], rel=1e-4, abs=1e-9)


def test_image_level_dataset_ranked_by_image_auroc(report):
    out, _, _ = report
    md = (out / "tables" / "ranking_imgs.md").read_text()
    assert "image-level" in md and "ranking uses image ROC-AUC only" in md
    with open(out / "tables" / "ranking_imgs.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and all(r["pixel_auroc_mean"] == "" and r["aupro_mean"] == "" for r in table)


def test_pareto_front_equals_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 25))
        xs = rng.integers(0, 8, n).astype(float)  # small ranges -> ties
        ys = rng.integers(0, 8, n).astype(float)
        brute = {i for i in range(n) if not any(
            xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j] < xs[i] or ys[j] > ys[i]) for j in range(n))}
        front = pareto_front(xs, ys)
        assert {(xs[i], ys[i]) for i in front} == {(xs[i], ys[i]) for i in brute}
        assert len(front) == len({(xs[i], ys[i]) for i in front})
    assert pareto_front([1.0, None, 3.0], [0.5, 0.9, 0.4]) == [0]


@pytest.mark.parametrize("n", [1, 3, 8, 25, 60])
def test_plot_labels_never_overlap(n):
    import matplotlib.pyplot as plt

    from adspine.report.plots import auroc_axis, place_labels

    rng = np.random.default_rng(n)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs, ys = rng.uniform(60, 85, n), rng.uniform(70, 99, n)
    ax.scatter(xs, ys)
    ax.set_xlim(55, 90)
    auroc_axis(ax, ys)
    assert ax.get_ylim()[0] == 50.0
    boxes, left = place_labels(ax, xs, ys, [f"backbone_{i:02d}" for i in range(n)])
    assert len(boxes) + len(left) == n
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    plt.close(fig)


def test_correlation_only_from_five_points():
    from scipy.stats import pearsonr

    from adspine.report.plots import pearson_text

    x, y = np.array([70.0, 72, 75, 78, 80]), np.array([80.0, 85, 83, 90, 92])
    assert pearson_text(x[:4], y[:4]) is None
    text = pearson_text(x, y)
    res = pearsonr(x, y)
    ci = res.confidence_interval(0.95)
    assert text == f"r = {res.statistic:.2f} [{ci.low:.2f}, {ci.high:.2f}], n = 5"


def test_overlay_uses_the_pixels_the_model_saw(report):
    from adspine.data.mvtec import ImageDataset, scan_category
    from adspine.report.examples import load_view

    out, rows, _ = report
    cat = scan_category(out.parent / "data", "carpet")
    item = ImageDataset(cat.test, protocol="paper", size=S)[1]
    img, mask = load_view(item["path"], (S, S), "paper", item["defect"])
    np.testing.assert_array_equal(img, item["image"].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(mask, item["mask"].numpy())


def test_recommendation_respects_budget(report):
    out, rows, _ = report
    entries = [e for e in ranking(rows) if e["dataset"] == "synth"]
    for budget in (15.0, 35.0, 60.0, 1e9):
        rec = recommend(entries, budget)
        fit = [e for e in entries if e["total_ms_b1"] <= budget]
        if not fit:
            assert rec.best is None
            continue
        assert rec.best["total_ms_b1"] <= budget
        assert rec.best["image_auroc_mean"] == max(e["image_auroc_mean"] for e in fit)
        assert all(e["total_ms_b1"] <= budget for e in rec.runner_ups)
    rec = recommend(entries, 1.0)
    assert rec.best is None and "Nothing" in rec.text
    best35 = recommend(entries, 35.0).best
    assert f"{best35['backbone']} ({best35['init']})" in (out / "recommendation.md").read_text()


def test_html_is_self_contained_and_complete(report):
    out, _, _ = report
    html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html and "<script" not in html.lower()
    assert html.count('src="data:image/png;base64,') >= 4 + len(CATS)
    assert "RuntimeError: out of memory in fit" in html and "killed" in html and "died mid-job" in html
    with open(out / "tables" / "failed_methods.csv") as f:
        assert sorted({r["method"] for r in csv.DictReader(f)}) == ["spade"]  # failed methods listed, not ranked
    assert "image file not found" in html and "missing.png" in html
    assert "datasets:" in html and "torch 2.x" in html and "TestCPU" in html and "load average" in html
    for section in ("Recommendation", "Overall ranking", "Family tables", "Failed jobs (2)", "Failed methods (12)",
                    "not distinguishable"):
        assert section in html


def _balanced(tex: str) -> bool:
    stack = []
    for kind, name in re.findall(r"\\(begin|end)\{([^}]*)\}", tex):
        if kind == "begin":
            stack.append(name)
        elif not stack or stack.pop() != name:
            return False
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return not stack and depth == 0


def test_latex_compiles_or_is_balanced(report, tmp_path):
    out, _, _ = report
    texs = sorted((out / "tables").glob("*.tex"))
    assert texs
    for t in texs:
        assert _balanced(t.read_text()), t
    assert not _balanced(r"\begin{table}\begin{tabular}{l}\end{table}")  # the check can fail
    engine = shutil.which("pdflatex") or shutil.which("lualatex")
    if engine is None:
        return
    body = "\n".join(t.read_text() for t in texs)
    doc = ("\\documentclass{article}\\usepackage[utf8]{inputenc}\\usepackage{booktabs}\\usepackage{graphicx}"
           "\\begin{document}\n" + body + "\n\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    res = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]


def test_bad_inputs(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        build_report(tmp_path / "nope.sqlite", tmp_path / "out")
    assert not (tmp_path / "nope.sqlite").exists()
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["--db", str(tmp_path / "nope.sqlite")])
    assert res.exit_code == 2 and "nope.sqlite: results store not found" in res.output  # bad input: exit 2
    assert len(res.output.strip().splitlines()) == 1


def test_unwritable_output_leaves_no_partial_report(tmp_path, monkeypatch):
    ResultStore(tmp_path / "r.sqlite").close()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, afile / "sub"):
        with pytest.raises(ReportError, match="is a file, not a folder") as e:
            build_report(tmp_path / "r.sqlite", bad)
        assert str(e.value).count("\n") == 0
    # a write failing half-way (disk full): nothing lands in out, and the temporary folder is removed
    import adspine.report.html as html_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "x.png"))

    monkeypatch.setattr(html_mod, "render", full)
    with pytest.raises(ReportError, match="No space left on device.*free disk space"):
        build_report(tmp_path / "r.sqlite", tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []
    assert not list(tmp_path.glob(".adspine-report-*"))


def test_empty_store(tmp_path):
    ResultStore(tmp_path / "empty.sqlite").close()
    html = build_report(tmp_path / "empty.sqlite", tmp_path / "out", budget_ms=10).read_text()
    assert "No results" in html and "No failed or killed jobs" in html


def test_fit_command_of_the_recommendation(tmp_path):
    db, _ = _make_store(tmp_path)
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["--db", str(db), "--out", str(tmp_path / "out2"), "--budget-ms", "1e6"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("build the recommendation: "))
    cmd = line.removeprefix("build the recommendation: ")
    assert cmd.startswith("adspine fit --backbone ") and " --method " in cmd and "None" not in cmd
    assert cmd in (tmp_path / "out2" / "report.html").read_text().replace("&#x27;", "'")
    assert cmd in (tmp_path / "out2" / "recommendation.md").read_text()


def test_cli_module_imports_nothing_heavy():
    code = ("import sys, adspine.report.cli; bad = [m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules];"
            " print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
