"""The engineer's commands: ``fit``, ``predict``, ``evaluate``, ``export`` (``register(app)`` adds them), and
``fit_command(row)``, the ``adspine fit`` line that rebuilds a study result's configuration."""

from __future__ import annotations

import csv
import json
import shlex
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from adspine.clitools import fail
from rich.console import Console
from rich.markup import escape

# soft_wrap: a long line stays one line (no wrapping at 80 columns when the output is not a terminal)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

class ExportFormat(str, Enum):
    onnx = "onnx"
    openvino = "openvino"


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs -> settings; values are JSON (``100``, ``null``, ``[1,2]``, ``true``) or else plain strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def fit_command(row: dict, train: str = "TRAIN_DIR", out: str = "model") -> str:
    """The ``adspine fit`` command line for a results row (keys backbone, init, init_seed, layer_preset, layers
    (JSON list or None), method, settings (JSON), protocol, image_size, precision)."""
    layers = row.get("layers")
    layers = json.loads(layers) if isinstance(layers, str) and layers.startswith("[") else layers
    settings = row.get("settings") or {}
    settings = json.loads(settings) if isinstance(settings, str) else settings
    if row.get("image_height") and row.get("image_width"):
        size = f"{row['image_height']}x{row['image_width']}"
    else:
        size = row.get("image_size")
        if isinstance(size, str) and size.startswith("["):
            size = json.loads(size)
        size = "x".join(str(s) for s in size) if isinstance(size, (list, tuple)) else size
    from adspine.backbones.init_names import SEEDED_INITS, parse_init

    args = ["adspine", "fit", "--backbone", row["backbone"], "--init", row["init"]]
    if row.get("init_seed") is not None and parse_init(str(row["init"]))[0] in SEEDED_INITS:
        args += ["--init-seed", str(row["init_seed"])]
    args += ["--layers", ",".join(layers) if layers else str(row.get("layer_preset") or "thesis")]
    args += ["--method", row["method"]]
    from adspine.methods import get_method_class

    defaults = get_method_class(row["method"]).defaults()
    for k, v in sorted(settings.items()):
        if k not in defaults or defaults[k] != v:  # settings left at their defaults need no flag
            args += ["--set", f"{k}={json.dumps(v, separators=(',', ':'))}"]
    if row.get("protocol"):
        args += ["--protocol", str(row["protocol"])]
    if size:
        args += ["--size", str(size)]
    if row.get("precision") not in (None, "fp32"):
        args += ["--precision", str(row["precision"])]
    args += ["--train", train, "--out", out]
    return shlex.join(args)


def fit(
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="Registry name (adspine backbones list)."),
    init: str = typer.Option("imagenet", "--init", help="imagenet, imagenet:TAG, random, kaiming_normal, "
                             "xavier_uniform, orthogonal, file:PATH."),
    method: str = typer.Option("padim", "--method", help="padim, patchcore, spade, cflow."),
    train: Path = typer.Option(..., "--train", help="A folder of normal images, an MVTec category folder (its "
                               "train/good is used) or a manifest CSV (its train rows)."),
    category: Optional[str] = typer.Option(None, "--category", help="The manifest CSV's category, when it holds "
                                           "several."),
    out: Path = typer.Option(..., "--out", help="Detector folder to write."),
    layers: str = typer.Option("thesis", "--layers", help="thesis, stride, or module names (comma-separated)."),
    settings: list[str] = typer.Option([], "--set", help="Method setting KEY=VALUE (JSON value); repeatable."),
    init_seed: int = typer.Option(0, "--init-seed", help="Seed of random initialisations."),
    protocol: str = typer.Option("resize", "--protocol", help="Preprocessing: resize, paper, aspect-crop."),
    size: str = typer.Option("224", "--size", help="Model input size: N or HxW."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share of the normal images held out for thresholds."),
    holdout_seed: int = typer.Option(0, "--holdout-seed", help="Seed of the hold-out draw."),
    fpr: Optional[float] = typer.Option(None, "--fpr", help="False-alarm rate on held-out images (default: their "
                                        "maximum score, i.e. none flagged)."),
    precision: str = typer.Option("fp32", "--precision", help="Backbone precision: fp32, bf16 (autocast, "
                                  "channels_last) or int8 (through the OpenVINO export)."),
) -> None:
    """Fit a detector on normal images and set its alarm thresholds on a held-out share of them; says the fitted
    model's estimated size first and warns above 500 MB with what to change."""
    import warnings

    from adspine.detector import sizing
    from adspine.detector import threshold as th
    from adspine.detector.detector import Detector, DetectorWarning
    from adspine.detector.sources import normal_images

    try:
        layer_arg = layers if layers in ("thesis", "stride") else [n.strip() for n in layers.split(",") if n.strip()]
        det = Detector(backbone, init, layer_arg, method, init_seed=init_seed, protocol=protocol, image_size=size,
                       holdout=holdout, holdout_seed=holdout_seed, fpr=fpr, precision=precision,
                       **parse_settings(settings))
        paths = normal_images(train, category)
        fit_idx, _ = th.holdout_split(len(paths), holdout, det.min_holdout, holdout_seed)
        line, too_big = sizing.describe(det.method.name, det.estimate_bytes(len(fit_idx)))
        console.print(f"{line}, {len(fit_idx)} training image(s)", highlight=False)
        if too_big:
            err_console.print(f"[yellow]warning:[/yellow] {escape(too_big)}", highlight=False)
        from adspine.backbones.precision import precision_note

        if note := precision_note(det.precision):
            err_console.print(f"note: {escape(note)}", highlight=False)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DetectorWarning)  # the size warning is printed above
            det.fit(paths)
        seconds = time.perf_counter() - start
        det.save(out)
    except ValueError as e:
        fail(str(e))
    rec = det.holdout_record
    console.print(f"fitted {det.method.name} on {backbone} ({init}, {det.precision}) with {rec['n_fit']} images in "
                  f"{seconds:.1f} s; "
                  f"threshold {det.threshold:.6g} ({rec['rule']} of {rec['count']} held-out images), pixel "
                  f"threshold {det.pixel_threshold:.6g}; wrote {out}", highlight=False)


def _load_any(model: Path):
    """A saved detector folder, an exported ``.onnx`` file or an OpenVINO ``.xml`` (or a folder holding one)."""
    if model.suffix.lower() == ".onnx":
        from adspine.detector.onnx_export import OnnxDetector

        return OnnxDetector(model)
    from adspine.detector.openvino_export import OpenVinoDetector, openvino_path

    if openvino_path(model) is not None:
        return OpenVinoDetector(openvino_path(model))
    from adspine.detector.detector import Detector

    return Detector.load(model)


PRECISION_OVERRIDE_HELP = "Run the backbone in this precision (fp32, bf16) instead of the detector's own."


def _with_precision(det, precision: str | None):
    """``det`` running its backbone in ``precision`` (None: the detector's own, recorded when it was fitted)."""
    if precision is None:
        return det
    if not hasattr(det, "set_precision"):
        raise ValueError(f"--precision {precision}: {getattr(det, 'path', 'this model')} is an exported graph with "
                         f"a fixed precision")
    return det.set_precision(precision)


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems, prefixed with the parent folder's name where stems repeat, numbered if that still repeats."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    out: list[str] = []
    for p in paths:
        name = p.stem if counts[p.stem] == 1 else f"{p.parent.name}_{p.stem}"
        out.append(name if name not in out else f"{name}_{len(out)}")
    return out


def write_pngs(folder: Path, stem: str, image, amap, mask, scale: float) -> None:
    """``<stem>_overlay.png`` (map over the image, 0 .. 2 x pixel threshold in the jet colour map) and
    ``<stem>_mask.png`` (pixels above the threshold, 255)."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    heat = colormaps["jet"](np.clip(amap / scale, 0, 1))[..., :3]
    overlay = (0.5 * image + 0.5 * heat).clip(0, 1)
    Image.fromarray((overlay * 255).round().astype(np.uint8)).save(folder / f"{stem}_overlay.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{stem}_mask.png")


def _score_one(det, x) -> tuple[float, Any, str | None]:
    """Score, map and the reason it got none (None when valid) of one preprocessed image (3, H, W)."""
    import numpy as np

    if hasattr(det, "inspect"):
        res = det.inspect(x[None])
        return float(res.scores[0]), res.maps[0], res.invalid.get(0)
    scores, maps = det.predict(x[None])  # ONNX: the graph has no validity output
    ok = bool(np.isfinite(scores[0]) and np.isfinite(maps[0]).all())
    return float(scores[0]), maps[0], None if ok else "the score or map is not finite (NaN/inf)"


def predict(
    model: Path = typer.Argument(..., help="Detector folder (adspine fit), exported .onnx file or OpenVINO .xml "
                                 "file (or its folder)."),
    images: list[str] = typer.Argument(..., help="Image files, folders or glob patterns."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for predictions.csv and per-image overlay and "
                                       "mask PNGs (default: print the table only)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on a terminal)."),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_OVERRIDE_HELP),
) -> None:
    """Score images; exit code 0 = every image read and scored and none flagged, 1 = some image flagged, invalid or
    unreadable."""
    from rich.progress import track

    from adspine.data.images import DatasetError
    from adspine.data.transforms import preprocess
    from adspine.detector.detector import read_image, size_mismatch
    from adspine.detector.sources import collect_images

    try:
        det = _with_precision(_load_any(model), precision)
        paths = collect_images(images)
    except ValueError as e:
        fail(str(e))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows, sizes = [], []
    counts = {"anomalous": 0, "good": 0, "invalid": 0, "unreadable": 0}
    stems = _unique_stems(paths)
    bar = progress and err_console.is_terminal
    start_all = time.perf_counter()
    for path, stem in zip(track(paths, description="predict", console=err_console, disable=not bar), stems):
        start = time.perf_counter()
        try:
            raw = read_image(path)
        except DatasetError as e:
            counts["unreadable"] += 1
            err_console.print(f"[yellow]skipped:[/yellow] {escape(str(e))}", highlight=False)
            rows.append((str(path), "", "unreadable", "", str(e)))
            continue
        sizes.append(raw.shape[:2])
        x = preprocess(raw, None, det.protocol, det.image_size)[0]
        score, amap, reason = _score_one(det, x)
        verdict = "invalid" if reason else "anomalous" if bool(det.flag([score])[0]) else "good"
        counts[verdict] += 1
        if out is not None and not reason:
            write_pngs(out, stem, x.permute(1, 2, 0).numpy(), amap, det.flag_pixels(amap), 2 * det.pixel_threshold)
        ms = 1000 * (time.perf_counter() - start)
        rows.append((str(path), "" if reason else f"{score:.6g}", verdict, f"{ms:.1f}", reason or ""))
    total_s = time.perf_counter() - start_all
    if out is not None:
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "score", "verdict", "ms", "reason"])
            writer.writerows(rows)
    for path, score, verdict, ms, reason in rows:
        line = f"{verdict:10s} {score:>12s} {ms:>9s} ms  {path}" + (f"  ({reason})" if verdict == "invalid" else "")
        console.print(line, highlight=False, markup=False)
    mismatch = size_mismatch(getattr(det, "input_sizes", None), sizes)
    if mismatch:
        err_console.print(f"[yellow]warning:[/yellow] {escape(mismatch)}", highlight=False)
    console.print(f"{len(rows)} image(s): {counts['anomalous']} anomalous, {counts['good']} good, {counts['invalid']} "
                  f"invalid, {counts['unreadable']} unreadable (threshold {det.threshold:.6g}); "
                  f"{1000 * total_s / max(1, len(rows)):.1f} ms/img", highlight=False)
    from adspine.clitools import EXIT_FAILED, EXIT_OK

    raise typer.Exit(EXIT_FAILED if counts["anomalous"] + counts["invalid"] + counts["unreadable"] else EXIT_OK)


def evaluate_detector(det, source: Path, category: str | None = None) -> dict[str, Any]:
    """The study's metrics of a saved detector on labelled test images, plus its verdicts at the saved threshold."""
    import numpy as np
    import torch

    from adspine.data.transforms import ImageDataset
    from adspine.detector.sources import labelled_samples
    from adspine.metrics import evaluate

    samples, pixel_level = labelled_samples(source, category)
    ds = ImageDataset(samples, protocol=det.protocol, size=det.image_size)
    items = [ds[i] for i in range(len(ds))]
    start = time.perf_counter()
    scores, maps = det.predict(torch.stack([it["image"] for it in items]))
    ms = 1000 * (time.perf_counter() - start) / len(items)
    labels = np.array([s.label for s in samples])
    masks = np.stack([it["mask"].numpy() for it in items]) if pixel_level else None
    flags = det.flag(scores)
    good, bad = labels == 0, labels == 1
    return {**evaluate(labels, scores, masks, maps if pixel_level else None),
            "n_good": int(good.sum()), "n_defective": int(bad.sum()), "threshold": det.threshold,
            "false_alarms": int(flags[good].sum()), "false_alarm_rate": float(flags[good].mean()),
            "detected": int(flags[bad].sum()), "detection_rate": float(flags[bad].mean()),
            "predict_ms_per_image": ms, "pixel_metrics": "computed" if pixel_level else "absent (no masks)",
            "precision": getattr(det, "precision", "fp32")}


def evaluate_cmd(
    model: Path = typer.Argument(..., help="Detector folder (adspine fit)."),
    data: Path = typer.Argument(..., help="An MVTec category folder, a folder with good/ and one folder per "
                                "defect type (masks optional in ground_truth/<defect>/), or a manifest CSV (its "
                                "test rows)."),
    category: Optional[str] = typer.Option(None, "--category", help="The manifest CSV's category, when it holds "
                                           "several."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_OVERRIDE_HELP),
) -> None:
    """The study's metrics (image / pixel ROC-AUC, AUPRO, F1-max) and the threshold's verdicts on labelled images."""
    from adspine.detector.detector import Detector

    try:
        res = evaluate_detector(_with_precision(Detector.load(model), precision), data, category)
    except ValueError as e:
        fail(str(e))
    if as_json:
        console.print_json(json.dumps(res))
        return
    for k, v in res.items():
        console.print(f"{k:22s} {'absent' if v is None else f'{v:.4f}' if isinstance(v, float) else v}",
                      highlight=False)


def export(
    model: Path = typer.Argument(..., help="Detector folder (adspine fit)."),
    format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="Export format: onnx, or openvino (an "
                                        "IR .xml + .bin)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: MODEL/detector.onnx, "
                                       "MODEL/openvino-PRECISION/detector.xml)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="OpenVINO precision: fp32, bf16 or int8 "
                                            "(default the detector's own; ONNX is fp32)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="int8: the normal training images "
                                               "(folder, MVTec category or manifest CSV); up to 64 are drawn."),
    calibration_seed: int = typer.Option(0, "--calibration-seed", help="Seed of the calibration images' draw."),
) -> None:
    """Export a fitted PaDiM or PatchCore detector as one ONNX graph or OpenVINO model (image in, score and map
    out), checked against the torch path (maps within a tolerance, the same verdicts)."""
    from adspine.detector import sizing
    from adspine.detector.detector import Detector
    from adspine.detector.onnx_export import TOLERANCE, export_onnx

    try:
        det = Detector.load(model)
        if det.precision != "fp32" and format == ExportFormat.onnx:
            console.print(f"the ONNX graph is fp32 (the detector's backbone ran {det.precision} in torch)",
                          highlight=False)
        size = sizing.export_bytes(det)
        console.print(f"exporting about {size / 2**20:.1f} MB of weights ({det.method.name})", highlight=False)
        if size > sizing.LIMIT_BYTES:
            advice = sizing.ADVICE.get(det.method.name, "coarser layers or a smaller --size")
            err_console.print(f"[yellow]warning:[/yellow] the graph will be larger than "
                              f"{sizing.LIMIT_BYTES / 2**20:.0f} MB; refit with {escape(advice)}", highlight=False)
        if format == ExportFormat.openvino:
            from adspine.detector.openvino_export import export_command

            console.print(export_command(det, model, out, precision, calibration, calibration_seed),
                          highlight=False)
            return
        if precision not in (None, "fp32") or calibration is not None:
            raise ValueError(f"--precision {precision} / --calibration: the ONNX graph is fp32; use --format "
                             f"openvino for bf16 and int8")
        res = export_onnx(det, out or model / "detector.onnx")
    except ValueError as e:
        fail(str(e))
    console.print(f"wrote {res['path']}; onnxruntime vs torch: map max difference {res['max_abs_diff']:.3g} "
                  f"({res['relative_diff']:.2e} relative, limit {TOLERANCE:g}), score {res['score_relative_diff']:.2e} "
                  f"relative", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``fit``, ``predict``, ``evaluate`` and ``export`` to ``app``."""
    app.command("fit")(fit)
    app.command("predict")(predict)
    app.command("evaluate")(evaluate_cmd)
    app.command("export")(export)


app = typer.Typer(help="The engineer's path: fit, predict, evaluate, export.", no_args_is_help=True,
                  add_completion=False)
register(app)
