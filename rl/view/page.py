"""The viewer's page: one HTML document from `static/` (markup, style, script) and plotly's own bundled script.

The page is hand-written HTML and JavaScript rather than a web framework's output: it must also be one
self-contained file (`tiderl view --export`) that opens with no server, no build step and no network, and what it
shows that no charting or table library does (a conversation's think spans and tool calls, tokens colored by the
train-inference gap) is a few hundred lines of DOM code. The charts are plotly's, from the `plotly` Python package
(`plotly.offline.get_plotlyjs()`), so nothing is fetched at view time.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from rl.view.data import to_json

SCRIPTS = ("format.js", "charts.js", "conversation.js", "tokens.js", "samples.js", "app.js")


def plotly_js() -> str:
    """plotly.js as the `plotly` package ships it (the `view` extra)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def render_page(embedded: dict[str, Any] | None = None, plotly_src: str | None = None) -> str:
    """The page. With `embedded` (`rl.view.data.snapshot`), a self-contained file: the data and plotly inline;
    without, the served page, which loads plotly from `plotly_src` and polls the server's JSON API."""
    static = resources.files("rl.view") / "static"
    html = (static / "index.html").read_text()
    style = (static / "view.css").read_text()
    script = "\n".join((static / name).read_text() for name in SCRIPTS)
    if embedded is None:
        data = "window.TIDERL_EMBED = null;"
        plotly = f'<script src="{plotly_src or "plotly.min.js"}"></script>'
    else:
        data = "window.TIDERL_EMBED = " + _script_safe(to_json(embedded)) + ";"
        plotly = "<script>" + _script_safe(plotly_js()) + "</script>"
    return (
        html.replace("/*STYLE*/", style)
        .replace("<!--PLOTLY-->", plotly)
        .replace("/*DATA*/", data)
        .replace("/*SCRIPT*/", script)
    )


def _script_safe(text: str) -> str:
    """Text that cannot end the <script> element it sits in."""
    return text.replace("</", "<\\/")
