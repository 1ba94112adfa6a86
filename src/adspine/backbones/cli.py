"""``adspine backbones``: list the registry, show a variant's layer shapes (random init on the meta device); tables
as ``clitools.print_table`` prints them (``--format``)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from adspine.clitools import TABLE_FORMAT_HELP, TableFormat, fail, print_table, table_format

app = typer.Typer(no_args_is_help=True, help="The backbone registry: list variants, show layer shapes.")
console = Console()


def _offline_here(spec) -> str:
    from adspine.backbones.weights import weights_location

    loc = weights_location(spec)
    return ("packaged" if spec.source == "offline" else "cached") if loc.cached else "no"


FormatOption = Annotated[TableFormat | None, typer.Option("--format", help=TABLE_FORMAT_HELP)]


@app.command("list")
def list_cmd(family: Annotated[str | None, typer.Option(help="Only this family (case-insensitive).")] = None,
             fmt: FormatOption = None) -> None:
    """Every registry variant: layers, dim a, d, weight tags (top-1 %) and whether weights are available here
    (loads no torch). A * after dim a: measured here (not stated by the study); after d: chosen here (rule of
    thumb); after a tag: the default 'imagenet' tag."""
    from adspine.backbones.registry import list_specs, weight_tags

    try:
        specs = list_specs(family)
    except KeyError as exc:
        fail(exc)
    columns = [(col, {"no_wrap": col not in ("thesis layers", "weights (top-1 %)"), "overflow": "fold"})
               for col in ("name", "family", "source", "thesis layers", "dim a", "d", "weights (top-1 %)",
                           "offline here")]
    rows = []
    for s in specs:
        tags = ", ".join(f"{t}{'*' if t == s.default_tag else ''}" + (f" ({a:.2f})" if a is not None else "")
                         for t, a in weight_tags(s).items())
        rows.append([s.name, s.family, s.source, ", ".join(s.thesis), f"{s.dim_a}{'' if s.dim_a_stated else '*'}",
                     f"{s.d if s.d is not None else 'none'}{'*' if s.d_chosen_here else ''}", tags, _offline_here(s)])
    print_table(columns, rows, fmt=fmt, title=f"{len(specs)} backbones", console=console)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Registry name, e.g. resnet18.")],
    size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 224,
    layers: Annotated[str, typer.Option(help="'thesis', 'stride' or comma-separated module names.")] = "thesis",
    fmt: FormatOption = None,
) -> None:
    """Shape and measured stride of each chosen layer for a SIZE x SIZE input (meta device: no weights, no compute)."""
    from adspine.backbones.extractor import LayerError, probe, resolve_layers
    from adspine.backbones.registry import get_spec

    try:
        spec = get_spec(name)
        outputs = probe(spec, size)
        names = resolve_layers(spec, layers, outputs)
    except (KeyError, LayerError) as exc:
        fail(exc)
    rows = [[n, outputs[n].shape[1], f"{outputs[n].shape[2]} x {outputs[n].shape[3]}", outputs[n].stride]
            for n in names]
    print_table(("layer", "channels", "height x width", "stride"), rows, fmt=fmt, console=console,
                title=f"{spec.name} ({spec.family}, {spec.source}) at {size} x {size}, layers={layers}")
    total = sum(outputs[n].shape[1] for n in names)
    notes = console if table_format(fmt, console) is TableFormat.table else Console(stderr=True)
    notes.print(f"dim a = {total} (registry thesis dim a = {spec.dim_a}), default d = {spec.d}", highlight=False,
                soft_wrap=True)
