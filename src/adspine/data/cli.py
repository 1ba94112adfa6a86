"""``adspine data``: synthetic generator, magnetic tile adapter, dataset summary (any layout), LabelMe masks.

Imports no torch, numpy-heavy code or Pillow at module level: each command imports what it needs."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from adspine.clitools import TableFormat, fail, print_table
from adspine.data.errors import DatasetError

app = typer.Typer(
    no_args_is_help=True, help="Datasets: synthetic generator, layouts, magnetic tile adapter, summaries, LabelMe masks."
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable)


def one_line_errors(func: F) -> F:
    """Turn a DatasetError into one red line on stderr and exit status 2 (no traceback); print each warning
    (e.g. a LargeImageWarning naming a file) as one yellow line, once."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from adspine.data.images import LargeImageWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LargeImageWarning)
            try:
                return func(*args, **kwargs)
            except DatasetError as exc:
                fail(str(exc))
            finally:
                for message in dict.fromkeys(str(w.message) for w in caught):  # one line each, no repeats
                    err_console.print(f"[yellow]warning: {escape(message)}[/yellow]")

    return wrapper  # type: ignore[return-value]


@app.command()
@one_line_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder (absent or empty).")],
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    size: Annotated[int, typer.Option(help="Side of the stored square images, pixels.")] = 128,
    n_train: Annotated[int, typer.Option(help="train/good images per category.")] = 24,
    n_test_good: Annotated[int, typer.Option(help="test/good images per category.")] = 8,
    n_per_defect: Annotated[int, typer.Option(help="Test images per defect type and category.")] = 4,
    category: Annotated[list[str] | None, typer.Option(help="Only this category (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier synthetic dataset in --out.")] = False,
    aspect: Annotated[int, typer.Option(help="Images this many times as wide as high (rows of squares).")] = 1,
    masks: Annotated[bool, typer.Option(help="Write ground-truth masks (--no-masks: image-level only).")] = True,
    shortcut: Annotated[float, typer.Option(help="Defective test images darker overall by this fraction (a global "
                                            "cue for the shortcut check; 0 = none).")] = 0.0,
) -> None:
    """Generate the synthetic MVTec-format dataset (3 textures, 2 objects, exact masks), deterministic by seed."""
    from adspine.data.synth import generate

    start = time.perf_counter()
    root = generate(out, seed=seed, size=size, n_train=n_train, n_test_good=n_test_good,
                    n_per_defect=n_per_defect, categories=category or None, overwrite=overwrite, aspect=aspect,
                    masks=masks, shortcut=shortcut)
    images = sum(1 for p in root.rglob("*.png") if "ground_truth" not in p.parts)
    console.print(f"wrote {images} images to {escape(str(root))} (seed {seed}) in {time.perf_counter() - start:.1f} s")


@app.command("magnetic-tile")
@one_line_errors
def magnetic_tile(
    out: Annotated[Path, typer.Option("--out", help="Output folder, outside the repository (absent or empty).")],
    src: Annotated[Path, typer.Option("--src", help="The magnetic tile dataset (MT_*/Imgs).")] = Path(
        "../shared/data/magnetic-tile"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the train/test split.")] = 1024,
    train_fraction: Annotated[float, typer.Option(help="Share of MT_Free used as train/good.")] = 0.6,
    n_train: Annotated[int | None, typer.Option(help="train/good count (overrides --train-fraction).")] = None,
    limit_per_class: Annotated[int | None, typer.Option(help="Keep only N images per source folder.")] = None,
    n_test_good: Annotated[int | None, typer.Option(help="test/good count (default: all MT_Free not in train).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier conversion in --out.")] = False,
) -> None:
    """Convert the magnetic tile dataset into one MVTec-format category 'magnetic_tile' (+ split.json)."""
    import json

    from adspine.data.magnetic_tile import SPLIT_FILE, convert

    root = convert(src, out, seed=seed, train_fraction=train_fraction, n_train=n_train,
                   limit_per_class=limit_per_class, overwrite=overwrite, n_test_good=n_test_good)
    counts = json.loads((root / SPLIT_FILE).read_text())["counts"]
    text = ", ".join(f"{k} {v}" for k, v in counts.items())
    console.print(f"wrote {escape(str(root))}/magnetic_tile (seed {seed}): {text}")


@app.command()
@one_line_errors
def summary(
    root: Annotated[Path, typer.Argument(help="Dataset root (folder, or the CSV of a manifest).")],
    format: Annotated[str, typer.Option("--format", help="auto, mvtec, visa, folder or manifest.")] = "auto",
    mask_pattern: Annotated[str | None, typer.Option(help="Mask file name, e.g. '{stem}.png' (mvtec, folder).")] = None,
    quick: Annotated[bool, typer.Option(help="Skip decoding every image (headers only).")] = False,
    output_format: Annotated[TableFormat, typer.Option(help="table (never cut to a width when piped), plain "
                                                        "(tab-separated lines), csv or json.")] = TableFormat.table,
) -> None:
    """Per category: counts per split and defect type, masks (yes / no / partial), image sizes, skipped broken links
    (validates the dataset)."""
    from adspine.data.summary import dataset_name, size_text, summarize

    rows = summarize(root, verify=not quick, format=format, mask_pattern=mask_pattern)
    name = dataset_name(root)
    fmt = rows[0]["format"] if rows else format
    columns = []
    for column in ("category", "kind", "train", "test\ngood", "test\ndefective", "defect types", "masks",
                   "image size\n(WxH)"):
        numeric = column.startswith(("train", "test"))
        wrap = column.startswith("image")
        columns.append((column, {"justify": "right" if numeric else "left", "no_wrap": not wrap,
                                 "min_width": 9 if wrap else None}))
    cells = [[row["category"], row["kind"] or "-", row["train"], row["test_good"], row["test_defective"],
              "\n".join(f"{d} {n}" for d, n in row["defects"].items()), row["masks"], size_text(row)] for row in rows]
    print_table(columns, cells, fmt=output_format, title=f"{root} ({fmt}" + (f", {name})" if name else ")"),
                console=console, show_edge=False)
    notes = console if output_format is TableFormat.table else err_console
    for row in rows:
        if row["skipped"]:
            notes.print(f"{escape(row['category'])}: skipped {row['skipped']} broken or looping link(s)")


@app.command("masks-from-labelme")
@one_line_errors
def masks_from_labelme(
    src: Annotated[Path, typer.Argument(help="A folder of LabelMe .json files (searched recursively) or one file.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the masks and labels.csv (absent or empty).")],
    images: Annotated[Path | None, typer.Option("--images", help="Folder of the photos (searched by file name, "
                                                "recursively) when imagePath does not lead to them.")] = None,
) -> None:
    """Rasterise LabelMe polygons, rectangles and circles into 0/255 PNG masks; prints the counts. Every image must
    exist (imagePath relative to its JSON, else by name in --images) and have the annotated size."""
    from adspine.data.labelme import LABELS_FILE
    from adspine.data.labelme import masks_from_labelme as convert

    counts = convert(src, out, images)
    shapes = ", ".join(f"{k} {v}" for k, v in counts["shapes"].items()) or "none"
    defects = ", ".join(f"{k} {v}" for k, v in counts["defects"].items()) or "none"
    console.print(f"{counts['files']} files: {counts['defective']} defective with masks, {counts['good']} good "
                  f"(empty masks), {counts['image_level']} defective without shapes (image level)")
    console.print(f"shapes: {shapes}; defects: {defects}")
    console.print(f"wrote masks and {LABELS_FILE} to {escape(str(out))}")


@app.command()
@one_line_errors
def split(
    source: Annotated[Path, typer.Argument(help="A CSV (path, label[, mask, defect]), a folder with good/ and one "
                                           "folder per defect type, or a folder of LabelMe .json files.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (absent or empty): <name>.csv, "
                                      "<name>.split.json, LabelMe masks.")],
    images: Annotated[Path | None, typer.Option("--images", help="LabelMe: the photos folder (default SOURCE); "
                                                "photos without a JSON are normal.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Manifest name = category (default: the --out "
                                             "folder's name).")] = None,
    train: Annotated[str, typer.Option("--train", help="Normal images for train: count or fraction.")] = "0.8",
    test_good: Annotated[str | None, typer.Option("--test-good", help="Normal images for test: count or fraction "
                                                  "(default: all that train leaves).")] = None,
    test_defective: Annotated[str, typer.Option("--test-defective", help="Defective images for test: count or "
                                                "fraction, stratified by defect type.")] = "1.0",
    seed: Annotated[int, typer.Option(help="Seed of the draw (recorded in <name>.split.json).")] = 0,
) -> None:
    """Draw a seeded train / test split of a labelled pool into a manifest CSV (defective images only in test);
    'adspine data convert' writes it in any layout."""
    from adspine.data.split import split_pool

    record = split_pool(source, out, images, name, train, test_good, test_defective, seed)
    counts = record["counts"]
    defects = ", ".join(f"{k} {v}" for k, v in counts["test_defective"].items())
    console.print(f"train {counts['train']}, test good {counts['test_good']}, test defective "
                  f"{sum(counts['test_defective'].values())} ({escape(defects)}), unused {counts['unused']} "
                  f"(seed {seed})")
    console.print(f"wrote {escape(record['manifest'])}")


@app.command()
@one_line_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Dataset root (folder, or the CSV of a manifest).")],
    category: Annotated[str, typer.Option(help="The category to write.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (other exported categories may be there).")],
    format: Annotated[str, typer.Option("--format", help="mvtec, visa, folder or manifest.")],
    src_format: Annotated[str, typer.Option(help="Layout of SRC (auto, mvtec, visa, folder, manifest).")] = "auto",
) -> None:
    """Write one category again in another layout (images copied byte for byte); prints the root to read."""
    from adspine.data.convert import export_layout

    root = export_layout(src, category, out, format, src_format)
    console.print(f"wrote {escape(category)} as {format} to {escape(str(root))}")


@app.command()
@one_line_errors
def baselines(
    root: Annotated[Path, typer.Argument(help="Dataset root (folder, or the CSV of a manifest).")],
    category: Annotated[list[str] | None, typer.Option(help="Only this category (repeatable).")] = None,
    format: Annotated[str, typer.Option("--format", help="auto, mvtec, visa, folder or manifest.")] = "auto",
    mask_pattern: Annotated[str | None, typer.Option(help="Mask file name, e.g. '{stem}.png' (mvtec, folder).")] = None,
    protocol: Annotated[str, typer.Option(help="Preprocessing as in the study: paper, resize, aspect-crop.")] = "paper",
    size: Annotated[int, typer.Option(help="Model input side in pixels, as in the study.")] = 224,
    output_format: Annotated[TableFormat | None, typer.Option(help="table, plain (tab-separated lines), csv or json "
                                                              "(default: table on a terminal, plain when piped).")]
    = None,
) -> None:
    """Trivial baselines per category, no CNN (raw pixels at 32 px nearest neighbour, grey-level mean/std, colour
    histogram): image AUROC with its 95 % DeLong interval. One close to what a backbone reaches means the image-level
    figures measure global appearance (the shortcut check)."""
    from adspine.baselines import category_baselines
    from adspine.data import list_categories, scan

    cats = category or list_categories(root, format)
    rows = []
    for cat in cats:
        data = scan(root, cat, format=format, masks="optional", mask_pattern=mask_pattern)
        for r in category_baselines(data, protocol, size):
            ci = "–" if r["image_auroc_lo"] is None else \
                f"[{100 * r['image_auroc_lo']:.1f}, {100 * r['image_auroc_hi']:.1f}]"
            rows.append([cat, r["baseline"], f"{100 * r['image_auroc']:.1f}", ci])
    right = {"justify": "right"}
    print_table(["category", "baseline", ("image AUROC %", right), ("95 % CI", right)], rows, fmt=output_format,
                title=f"{root}: trivial baselines ({protocol}, {size} px)", console=console, show_edge=False)
