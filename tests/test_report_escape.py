"""Markdown tables carry no raw HTML or table-breaking text from names in the store."""

from __future__ import annotations

import re

from adspine.report.tables import family_tables, ranking_markdown

EVIL = "<img src=x onerror=alert(1)>|a&b\nc"


def _row(category, kind, value):
    return {"dataset": "d<script>", "family": "resnet", "backbone": "resnet18", "init": "random", "method": "padim",
            "category": category, "category_kind": kind, "rd_seed": 1, "status": "done",
            "image_auroc": value, "pixel_auroc": value}


def _cells(line):
    """A Markdown table row split at its unescaped pipes."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_family_table_markdown_escapes_html_pipes_and_newlines():
    table, = family_tables([_row(EVIL, "object", 0.9), _row("carpet", "texture", 0.8)])
    md = table.to_markdown()
    assert "<" not in md and ">" not in md.replace("->", "")
    assert "&lt;img src=x onerror=alert(1)&gt;\\|a&amp;b c" in md
    assert "on d&lt;script&gt;:" in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 2 + 3  # header, rule, two categories, texture / object / overall means
    assert {len(_cells(line)) for line in rows} == {2}
    assert _cells(rows[3])[0].strip() == "&lt;img src=x onerror=alert(1)&gt;\\|a&amp;b c"


def test_ranking_markdown_title_is_escaped():
    md = ranking_markdown([], "<b>visa</b>")
    assert md.startswith("**Ranking on &lt;b&gt;visa&lt;/b&gt;**.") and "<b>" not in md
