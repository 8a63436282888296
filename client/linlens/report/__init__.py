"""Pictures of an explanation: HTML and PNG reports of linlens results.

    from linlens.report import save_html, save_png, to_html

    save_html(result, "report.html")   # one self-contained file, works offline; no extra needed
    save_png(result, "report.png")     # matplotlib: pip install 'linlens[viz]'

``result`` is an ``ExplainResult``, an ``Explanation`` or a ``Generation``. The reports are functions of the results
(the results import nothing of the reports, so the arrow goes one way); in Jupyter the results display as reports
(``fragment``, registered with IPython by ``linlens.client.display``). A report shows: the model, the prompt, the
predicted and the explained token with their probabilities, the reconstruction errors, the method and its cost; the
input tokens shaded by their exact attribution (one row per target and contrast); per explained position the
singular-value spectrum (log scale) with the captured shares and the decoded singular vectors; and, with a layer
analysis, the layers x tokens heat map, the attention and MLP contribution per layer and the emergence chart.

Importing this package imports neither matplotlib nor torch: ``linlens.report.png`` imports matplotlib when it draws,
and says which extra to install when it is missing (``MissingExtraError``, an ImportError).
"""

from __future__ import annotations

from pathlib import Path

from linlens.report.content import Report, Reportable, build
from linlens.report.extra import VIZ_INSTALL, MissingExtraError, require_viz
from linlens.report.html import document, fragment


def to_html(result: Reportable) -> str:
    """The report as one self-contained HTML document (a string)."""
    return document(result)


def save_html(result: Reportable, path: str | Path) -> Path:
    """Write the HTML report to ``path`` (UTF-8) and return the path."""
    target = Path(path)
    target.write_text(document(result), encoding="utf-8")
    return target


def save_png(result: Reportable, path: str | Path, *, step: int | None = None) -> Path:
    """Write the report as one PNG image (1200 pixels wide; needs the viz extra) and return the path.

    For a Generation, every explained step is drawn one under the other, or only ``step``.
    """
    require_viz()
    from linlens.report import png

    return png.save_png(result, path, step=step)


__all__ = [
    "VIZ_INSTALL",
    "MissingExtraError",
    "Report",
    "Reportable",
    "build",
    "document",
    "fragment",
    "require_viz",
    "save_html",
    "save_png",
    "to_html",
]
