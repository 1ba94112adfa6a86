"""Backbone precision fp32 | bf16 (int8 routed to the OpenVINO backend): the extractor, the Detector and its CLI,
the study axis (plan, job ids, store) and the report's precision column."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adspine.backbones.extractor import build_extractor
from adspine.backbones.precision import PrecisionError
from adspine.data.synth import generate
from adspine.detector.detector import Detector, DetectorError

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, seed=3, size=SIZE, n_train=10, n_test_good=3, n_per_defect=1, categories=["fabric"])
    return root


# -- extractor -------------------------------------------------------------------------------------------------------
def _reference_maps(images: torch.Tensor, init_seed: int) -> list[torch.Tensor]:
    """layer1..3 of the same random-init ResNet-18 run by hand in float64 (torchvision modules, no adspine code)."""
    from adspine.backbones.init import build_model
    from adspine.backbones.registry import get_spec

    spec = get_spec("resnet18")
    m, _ = build_model(spec, "random", init_seed=init_seed)
    m = m.double().eval()
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        x = m.maxpool(m.relu(m.bn1(m.conv1((images.double() - mean) / std))))
        outs = []
        for layer in (m.layer1, m.layer2, m.layer3):
            x = layer(x)
            outs.append(x)
    return outs


def test_bf16_features_are_float32_and_close_to_fp32():
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ref = _reference_maps(images, init_seed=5)
    fp32 = build_extractor("resnet18", "random", init_seed=5)
    bf16 = build_extractor("resnet18", "random", init_seed=5, precision="bf16")
    assert fp32.info["precision"] == "fp32" and bf16.info["precision"] == "bf16"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in bf16.body.parameters() if p.dim() == 4)
    for want, a, b in zip(ref, fp32(images), bf16(images)):
        for out in (a, b):
            assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == want.shape
        # fp32 as before: float32 rounding only
        np.testing.assert_allclose(a.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-4 * want.abs().max().item())
        # bf16: 8 significant bits per operation; close per image, but not the fp32 figures (autocast ran)
        cos = torch.nn.functional.cosine_similarity(b.double().flatten(1), want.flatten(1), dim=1)
        assert cos.min().item() > 0.99
        rel = ((b.double() - want).norm() / want.norm()).item()
        assert 1e-4 < rel < 0.05


def test_precision_switch_and_bad_values():
    ext = build_extractor("resnet18", "random", init_seed=5)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    before = [m.clone() for m in ext(x)]
    ext.set_precision("bf16")
    assert ext.precision == "bf16"
    assert ((ext(x)[0] - before[0]).norm() / before[0].norm()).item() > 1e-3  # bf16 rounding, not a reordering
    ext.set_precision("fp32")
    for a, b in zip(ext(x), before):
        assert torch.equal(a, b)
    with pytest.raises(PrecisionError, match=r"precision 'fp16' is not one of fp32, bf16, int8"):
        build_extractor("resnet18", "random", precision="fp16")
    with pytest.raises(PrecisionError, match="openvino_backend"):
        build_extractor("resnet18", "random", precision="int8")


# -- detector ----------------------------------------------------------------------------------------------------------
def _detector(precision: str) -> Detector:
    return Detector("resnet18", "random", "thesis", "padim", image_size=SIZE, d=40, init_seed=2, precision=precision)


def test_detector_bf16_fit_save_load(synth, tmp_path):
    train = synth / "fabric" / "train" / "good"
    tests = sorted((synth / "fabric" / "test").rglob("*.png"))
    det = _detector("bf16").fit(train)
    scores, maps = det.predict(tests)
    folder = det.save(tmp_path / "bf16")
    doc = json.loads((folder / "detector.json").read_text())
    assert doc["precision"] == "bf16"
    loaded = Detector.load(folder)
    assert loaded.precision == "bf16" and loaded.extractor.precision == "bf16"
    s2, m2 = loaded.predict(tests)
    np.testing.assert_array_equal(scores, s2)
    np.testing.assert_array_equal(maps, m2)
    # the same detector in fp32 scores nearly alike (the method is float32 either way)
    fp32_scores, _ = _detector("fp32").fit(train).predict(tests)
    assert np.corrcoef(scores, fp32_scores)[0, 1] > 0.99
    assert not np.array_equal(scores, fp32_scores)
    # an override runs the loaded detector's backbone in fp32
    s3, _ = loaded.set_precision("fp32").predict(tests)
    assert loaded.extractor.precision == "fp32" and not np.array_equal(s3, scores)


def test_detector_folder_without_precision_loads_as_fp32(synth, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _detector("fp32").fit(synth / "fabric" / "train" / "good").save(tmp_path / "old")
    doc = json.loads((folder / "detector.json").read_text())
    del doc["precision"]  # as written before precisions existed, re-signed as that version signed it
    (folder / "detector.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    tensors = load_file(str(folder / "detector.safetensors"))
    save_file(tensors, str(folder / "detector.safetensors"), metadata={"adspine_detector_json_sha256": digest})
    loaded = Detector.load(folder)
    assert loaded.precision == "fp32" and loaded.extractor.precision == "fp32"


@pytest.mark.parametrize("value, words", [("fp16", "not one of fp32, bf16, int8"), ("int8", "int8")])
def test_detector_refuses_other_precisions_in_one_line(value, words):
    with pytest.raises(DetectorError, match=words) as e:
        _detector(value)
    assert "\n" not in str(e.value)


def test_cli_fit_bf16_then_predict_evaluate_export(synth, tmp_path):
    from adspine.detector.cli import app

    runner = CliRunner()
    cat = synth / "fabric"
    out = tmp_path / "model"
    res = runner.invoke(app, ["fit", "--backbone", "resnet18", "--init", "random", "--set", "d=40", "--size",
                              str(SIZE), "--train", str(cat), "--out", str(out), "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    assert "(random, bf16)" in res.output
    assert json.loads((out / "detector.json").read_text())["precision"] == "bf16"
    ev = runner.invoke(app, ["evaluate", str(out), str(cat), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["precision"] == "bf16"
    ev32 = runner.invoke(app, ["evaluate", str(out), str(cat), "--json", "--precision", "fp32"])
    assert ev32.exit_code == 0 and json.loads(ev32.output)["precision"] == "fp32"
    pred = runner.invoke(app, ["predict", str(out), str(cat / "test" / "good"), "--no-progress"])
    assert pred.exit_code in (0, 1) and "3 image(s)" in pred.output, pred.output
    exp = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "d.onnx")])
    assert exp.exit_code == 0, exp.output
    assert "the ONNX graph is fp32" in exp.output
    bad = runner.invoke(app, ["fit", "--backbone", "resnet18", "--init", "random", "--train", str(cat), "--out",
                              str(tmp_path / "bad"), "--precision", "fp8"])
    assert bad.exit_code == 2 and "precision 'fp8'" in bad.output and not (tmp_path / "bad").exists()


def test_fit_command_carries_the_precision():
    from adspine.detector.cli import fit_command

    row = {"backbone": "resnet18", "init": "random", "layers": None, "layer_preset": "thesis", "method": "padim",
           "settings": "{}", "protocol": "resize", "image_size": 64}
    assert "--precision" not in fit_command(row) and "--precision" not in fit_command({**row, "precision": "fp32"})
    assert "--precision bf16" in fit_command({**row, "precision": "bf16"})


# -- study -------------------------------------------------------------------------------------------------------------
def _spec(root: Path, **over) -> dict:
    spec = {"name": "prec", "datasets": [{"root": str(root), "name": "synth", "categories": ["fabric"]}],
            "backbones": [{"names": ["resnet18"], "inits": ["random"]}], "init_seed": 7,
            "methods": [{"name": "padim", "settings": {"d": 40}}], "rd_seeds": [1], "protocol": "resize",
            "image_size": SIZE, "threads": 1, "batch_size": 4, "baselines": False,
            "timing": {"warmup": 0, "repeats": 1, "batch_n": 2, "budget_s": 0.01},
            "uncertainty": {"n_boot": 0}, "examples": {"count": 0}}
    spec.update(over)
    return spec


def _write(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_spec_precisions_validated(tmp_path):
    from adspine.study.spec import SpecError, load_spec

    assert load_spec(_write(tmp_path / "a.yaml", _spec(tmp_path))).precisions == ["fp32"]
    for bad, words in ((["fp16"], "precisions: precision 'fp16' is not one of"), (["bf16", "bf16"], "duplicate"),
                       ([], "at least 1")):
        with pytest.raises(SpecError, match=words):
            load_spec(_write(tmp_path / "b.yaml", _spec(tmp_path, precisions=bad)))


def test_job_ids_keep_fp32_and_add_precision_otherwise(tmp_path):
    from adspine.study.plan import expand, job_key
    from adspine.study.spec import load_spec

    spec = load_spec(_write(tmp_path / "a.yaml", _spec(tmp_path, precisions=["fp32", "bf16"])))
    jobs = expand(spec)
    assert [j.precision for j in jobs] == ["fp32", "bf16"] and jobs[1].label().endswith(" bf16")
    # the fp32 id is the hash of the key as it was before precisions existed
    key = job_key(spec, spec.datasets[0], "fabric", "resnet18", "random", "thesis")
    assert "precision" not in key
    expected = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert jobs[0].job_id == expected != jobs[1].job_id


def test_plan_int8_problem_and_bf16_note(tmp_path, synth, monkeypatch):
    from adspine.backbones import precision as prec
    from adspine.methods import screen
    from adspine.study.plan import PlanError, plan

    monkeypatch.setattr(prec, "int8_problem", lambda: "int8 needs OpenVINO/NNCF: openvino not installed here")
    with pytest.raises(PlanError) as e:
        plan(_write(tmp_path / "a.yaml", _spec(synth, precisions=["fp32", "int8"])))
    assert e.value.problems == ["precisions: int8 needs OpenVINO/NNCF: openvino not installed here"]
    monkeypatch.setattr(screen, "fast_bf16", lambda: False)
    p = plan(_write(tmp_path / "b.yaml", _spec(synth, precisions=["fp32", "bf16"])))
    assert p.notes == ["bf16 runs emulated here (no AMX / AVX512-BF16 on this CPU): slower than fp32"]
    monkeypatch.setattr(screen, "fast_bf16", lambda: True)
    assert plan(_write(tmp_path / "c.yaml", _spec(synth, precisions=["bf16"]))).notes == []


def test_study_runs_one_job_per_precision_and_stores_it(tmp_path, synth):
    from adspine.cli import app
    from adspine.report.tables import family_tables, ranking, ranking_markdown
    from adspine.study.store import ResultStore

    db = tmp_path / "r.sqlite"
    spec = _write(tmp_path / "s.yaml", _spec(synth, precisions=["fp32", "bf16"]))
    dry = CliRunner().invoke(app, ["study", str(spec), "--db", str(db), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    header = next(line for line in dry.output.splitlines() if "job id" in line)
    assert "precision" in header and sum(line.rstrip().endswith(" bf16") for line in dry.output.splitlines()) == 1
    res = CliRunner().invoke(app, ["study", str(spec), "--db", str(db), "--no-progress"])
    assert res.exit_code == 0, res.output
    with ResultStore(db, readonly=True) as store:
        rows = store.rows()
    assert sorted(r["precision"] for r in rows) == ["bf16", "fp32"]
    by = {r["precision"]: r for r in rows}
    assert by["fp32"]["job_id"] != by["bf16"]["job_id"]
    assert by["bf16"]["image_auroc"] is not None and by["bf16"]["backbone_ms_b1"] > 0
    entries = ranking(rows)
    assert sorted(e["precision"] for e in entries) == ["bf16", "fp32"]
    md = ranking_markdown(entries, "synth")
    assert "| precision |" in md and "| bf16 |" in md
    (table,) = family_tables(rows)
    assert table.variants == ["resnet18", "resnet18 bf16"]
    from sklearn.metrics import roc_auc_score

    from adspine.report.precision import precision_comparison, precision_markdown

    (e,) = precision_comparison(rows)
    auc = {p: roc_auc_score(r["test_labels"], r["test_scores"]) for p, r in by.items()}
    assert e["precision"] == "bf16" and e["image_auroc_delta"] == pytest.approx(auc["bf16"] - auc["fp32"])
    assert e["speedup"] == pytest.approx(by["fp32"]["backbone_ms_b1_min"] / by["bf16"]["backbone_ms_b1_min"])
    assert 0 <= e["p_holm_min"] <= 1 and "| bf16 |" in precision_markdown([e])
    from adspine.report.build import build_report

    page = build_report(db, tmp_path / "report").read_text()
    assert '<section id="precision">' in page and 'href="#precision"' in page
    assert "<td>bf16</td>" in page.split('<section id="precision">')[1].split("</section>")[0]


def _result(precision: str, category: str, labels, scores) -> dict:
    from sklearn.metrics import roc_auc_score

    return {"status": "done", "dataset": "d", "backbone": "resnet18", "init": "random", "method": "padim",
            "precision": None if precision == "fp32" else precision, "category": category, "rd_seed": 1,
            "test_labels": labels, "test_scores": scores, "image_auroc": roc_auc_score(labels, scores),
            "backbone_ms_b1_min": {"fp32": 4.0, "bf16": 2.5}[precision]}


def test_precision_view_pairs_with_fp32_and_tests_each_category():
    from adspine.report.precision import precision_comparison

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    good = labels + 0.3 * rng.normal(size=80)  # AUROC near 1
    noise = rng.normal(size=80)  # AUROC near 0.5
    rows = [_result("fp32", "a", labels, good), _result("fp32", "b", labels, good),
            _result("bf16", "a", labels, good.copy()), _result("bf16", "b", labels, noise)]
    (e,) = precision_comparison(rows)  # fp32 rows stored before precisions existed (NULL) count as fp32
    assert e["n_categories"] == 2 and e["speedup"] == pytest.approx(1.6)
    assert e["p_holm"]["a"] == 1.0 and e["p_holm"]["b"] < 0.05 and e["worse"]
    assert e["image_auroc_delta"] == pytest.approx((rows[3]["image_auroc"] - rows[1]["image_auroc"]) / 2)
    same = precision_comparison(rows[:3])
    assert same[0]["n_categories"] == 1 and not same[0]["worse"]
    assert precision_comparison(rows[2:]) == []  # no fp32 twin: nothing to compare


def _holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment written out (the reference for the report's)."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def _pixel_row(precision: str, category: str, values, boot, seed: int = 0) -> dict:
    labels = np.repeat([0, 1], 10)
    return {**_result(precision, category, labels, labels + np.linspace(0, 0.5, 20)), "pixel_auroc": values[0],
            "aupro": values[1], "pixel_boot": np.asarray(boot, dtype=np.float32), "pixel_boot_seed": seed,
            "pixel_auroc_lo": values[0] - 0.05, "pixel_auroc_hi": values[0] + 0.05, "aupro_lo": values[1] - 0.05,
            "aupro_hi": values[1] + 0.05}


def test_precision_view_tests_pixel_auroc_and_aupro_on_paired_replicates():
    from scipy.stats import norm

    from adspine.report.precision import precision_cells, precision_comparison

    rng = np.random.default_rng(1)
    shared = 0.9 + 0.02 * rng.normal(size=(50, 2))  # the resamples both precisions share
    boot = {"a32": shared, "a16": shared + 0.002 * rng.normal(size=(50, 2)),
            "b32": shared, "b16": shared + 0.002 * rng.normal(size=(50, 2)) - [0.0, 0.03]}
    rows = [_pixel_row("fp32", "a", (0.90, 0.80), boot["a32"]), _pixel_row("bf16", "a", (0.901, 0.801), boot["a16"]),
            _pixel_row("fp32", "b", (0.90, 0.80), boot["b32"]), _pixel_row("bf16", "b", (0.899, 0.77), boot["b16"])]
    (e,) = precision_comparison(rows)
    for col, metric in enumerate(("pixel_auroc", "aupro")):
        raw = []
        for cat, d in (("a", (0.901, 0.801)), ("b", (0.899, 0.77))):
            diff = d[col] - 0.80 - 0.10 * (col == 0)
            sd = np.std(boot[f"{cat}16"][:, col].astype(np.float32) - boot[f"{cat}32"][:, col].astype(np.float32),
                        ddof=1)
            raw.append(2 * norm.sf(abs(diff) / sd))
        want = dict(zip("ab", _holm(raw)))
        assert e[f"{metric}_p_holm"] == pytest.approx(want, rel=1e-6)
        assert e[f"{metric}_basis"] == ["paired bootstrap"]
    # a 3-point AUPRO drop against replicate noise of 0.3 points is significant; the pixel AUROC changes are not
    assert e["aupro_p_holm"]["b"] < 0.05 < e["pixel_auroc_p_holm_min"] and e["differs"] == ["AUPRO"]
    cells = precision_cells(e)
    assert cells[9].startswith("-1.45 (p ") and cells[10] == "differs: AUPRO"  # mean of +0.1 and -3.0
    # replicates of different bootstrap seeds do not pair: the unpaired test from the stored intervals, marked so
    rows[1]["pixel_boot_seed"] = rows[3]["pixel_boot_seed"] = 7
    (e,) = precision_comparison(rows)
    assert e["aupro_basis"] == ["unpaired intervals"] and "unpaired" in precision_cells(e)[9]
    assert e["differs"] == [] and precision_cells(e)[10] == "same"


def test_study_int8_job_runs_through_openvino(tmp_path, synth):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from adspine.study.plan import plan
    from adspine.study.store import ResultStore

    db = tmp_path / "r.sqlite"
    summary = plan(_write(tmp_path / "s.yaml", _spec(synth, precisions=["int8"]))).run(db)
    assert summary.ok
    with ResultStore(db, readonly=True) as store:
        (row,) = store.rows()
    assert row["precision"] == "int8" and row["image_auroc"] is not None and row["flops"] > 0
    backbone = json.loads(row["provenance"])["backbone"]
    assert backbone["precision"] == "int8" and backbone["openvino"]["calibration"]["count"] == 10


def test_precision_speedup_comes_from_the_final_round_robin_timing_when_both_twins_have_one():
    from adspine.report.precision import use_final_timings

    key = {"dataset": "d", "backbone": "resnet18", "init": "random", "method": "padim"}
    view = [{**key, "precision": "bf16", "backbone_ms_b1_min": 30.0, "backbone_ms_b1_min_fp32": 10.0,
             "speedup": 1 / 3, "speed_basis": "separate jobs"},
            {**key, "init": "imagenet", "precision": "bf16", "backbone_ms_b1_min": 4.0,
             "backbone_ms_b1_min_fp32": 8.0, "speedup": 2.0, "speed_basis": "separate jobs"}]
    entries = [{**key, "precision": "bf16", "final_ms_b1": 6.0}, {**key, "precision": "fp32", "final_ms_b1": 15.0},
               {**key, "init": "imagenet", "precision": "bf16", "final_ms_b1": 1.0},  # its fp32 twin has none
               {**key, "init": "imagenet", "precision": "fp32", "final_ms_b1": None}]
    use_final_timings(view, entries)
    assert view[0]["speedup"] == pytest.approx(15.0 / 6.0) and view[0]["speed_basis"] == "final round-robin"
    assert (view[1]["speedup"], view[1]["speed_basis"]) == (2.0, "separate jobs")
