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

console = Console()
err_console = Console(stderr=True)

class ExportFormat(str, Enum):
    onnx = "onnx"


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
    (JSON list or None), method, settings (JSON), protocol, image_size)."""
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
    args += ["--train", train, "--out", out]
    return shlex.join(args)


def fit(
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="Registry name (adspine backbones list)."),
    init: str = typer.Option("imagenet", "--init", help="imagenet, imagenet:TAG, random, kaiming_normal, "
                             "xavier_uniform, orthogonal, file:PATH."),
    method: str = typer.Option("padim", "--method", help="padim, patchcore, spade, cflow."),
    train: Path = typer.Option(..., "--train", help="A folder of normal images, or an MVTec category folder "
                               "(its train/good is used)."),
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
) -> None:
    """Fit a detector on normal images and set its alarm thresholds on a held-out share of them."""
    from adspine.detector.detector import Detector

    try:
        layer_arg = layers if layers in ("thesis", "stride") else [n.strip() for n in layers.split(",") if n.strip()]
        det = Detector(backbone, init, layer_arg, method, init_seed=init_seed, protocol=protocol, image_size=size,
                       holdout=holdout, holdout_seed=holdout_seed, fpr=fpr, **parse_settings(settings))
        start = time.perf_counter()
        det.fit(train)
        seconds = time.perf_counter() - start
        det.save(out)
    except ValueError as e:
        fail(str(e))
    rec = det.holdout_record
    console.print(f"fitted {det.method.name} on {backbone} ({init}) with {rec['n_fit']} images in {seconds:.1f} s; "
                  f"threshold {det.threshold:.6g} ({rec['rule']} of {rec['count']} held-out images), pixel "
                  f"threshold {det.pixel_threshold:.6g}; wrote {out}", highlight=False)


def _load_any(model: Path):
    """A saved detector folder or an exported ``.onnx`` file."""
    if model.suffix.lower() == ".onnx":
        from adspine.detector.onnx_export import OnnxDetector

        return OnnxDetector(model)
    from adspine.detector.detector import Detector

    return Detector.load(model)


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


def predict(
    model: Path = typer.Argument(..., help="Detector folder (adspine fit) or exported .onnx file."),
    images: list[str] = typer.Argument(..., help="Image files, folders or glob patterns."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for predictions.csv and per-image overlay and "
                                       "mask PNGs (default: print the table only)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Score images; exit code 0 = every image read and none flagged, 1 = some image flagged or unreadable."""
    from rich.progress import track

    from adspine.data.images import DatasetError
    from adspine.detector.detector import load_image
    from adspine.detector.sources import collect_images

    try:
        det = _load_any(model)
        paths = collect_images(images)
    except ValueError as e:
        fail(str(e))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows, flagged, unreadable = [], 0, 0
    stems = _unique_stems(paths)
    for path, stem in zip(track(paths, description="predict", console=err_console, disable=not progress), stems):
        try:
            x = load_image(path, det.protocol, det.image_size)
        except DatasetError as e:
            unreadable += 1
            err_console.print(f"[yellow]skipped:[/yellow] {e}", highlight=False, soft_wrap=True)
            rows.append((str(path), "", "unreadable"))
            continue
        scores, maps = det.predict(x[None])
        bad = bool(det.flag(scores)[0])
        flagged += bad
        rows.append((str(path), f"{scores[0]:.6g}", "anomalous" if bad else "good"))
        if out is not None:
            write_pngs(out, stem, x.permute(1, 2, 0).numpy(), maps[0], det.flag_pixels(maps)[0],
                       2 * det.pixel_threshold)
    if out is not None:
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "score", "verdict"])
            writer.writerows(rows)
    for path, score, verdict in rows:
        console.print(f"{verdict:10s} {score:>12s}  {path}", highlight=False, markup=False)
    console.print(f"{len(rows)} image(s): {flagged} anomalous, {len(rows) - flagged - unreadable} good, "
                  f"{unreadable} unreadable (threshold {det.threshold:.6g})", highlight=False)
    from adspine.clitools import EXIT_FAILED, EXIT_OK

    raise typer.Exit(EXIT_FAILED if flagged or unreadable else EXIT_OK)


def evaluate_detector(det, source: Path) -> dict[str, Any]:
    """The study's metrics of a saved detector on labelled test images, plus its verdicts at the saved threshold."""
    import numpy as np
    import torch

    from adspine.data.transforms import ImageDataset
    from adspine.detector.sources import labelled_samples
    from adspine.metrics import evaluate

    samples, pixel_level = labelled_samples(source)
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
            "predict_ms_per_image": ms, "pixel_metrics": "computed" if pixel_level else "absent (no masks)"}


def evaluate_cmd(
    model: Path = typer.Argument(..., help="Detector folder (adspine fit)."),
    data: Path = typer.Argument(..., help="An MVTec category folder, or a folder with good/ and one folder per "
                                "defect type (masks optional in ground_truth/<defect>/)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """The study's metrics (image / pixel ROC-AUC, AUPRO, F1-max) and the threshold's verdicts on labelled images."""
    from adspine.detector.detector import Detector

    try:
        res = evaluate_detector(Detector.load(model), data)
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
    format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="Export format."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: MODEL/detector.onnx)."),
) -> None:
    """Export a fitted PaDiM or PatchCore detector as one ONNX graph (image in, score and map out), checked
    against the torch path with onnxruntime."""
    from adspine.detector.detector import Detector
    from adspine.detector.onnx_export import TOLERANCE, export_onnx

    try:
        res = export_onnx(Detector.load(model), out or model / "detector.onnx")
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
