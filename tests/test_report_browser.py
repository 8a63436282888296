"""The HTML report in a real headless browser: Debian's chromium (installed by scripts/setup.sh), driven by Playwright
with ``executable_path`` (Playwright never downloads a browser here).

The page is opened from a file with every network request recorded: the report must need nothing but itself. Then:
no console errors and no page errors; every prompt token and the predicted token are in the rendered text; the shaded
tokens show their exact values on hover (``title``) and are painted in their value's colour (red raises, blue
lowers, the largest value the strongest); the charts are laid out at a real size; and a screenshot is not blank.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from linlens.client import ExplainResult
from linlens.report import save_html

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
#: Flags known to work for a headless chromium started as root in a container (Playwright adds --no-sandbox itself
#: unless chromium_sandbox is set).
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Any:
    if CHROMIUM is None:
        pytest.skip(
            "Debian's chromium is not installed: scripts/setup.sh installs it as root where apt-get works "
            "(LINLENS_NO_BROWSER=1 turns that off)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _rgb(css: str) -> tuple[int, int, int]:
    """``rgb(r, g, b)`` as the browser computes it."""
    r, g, b = (int(part) for part in css.removeprefix("rgb(").removesuffix(")").split(",")[:3])
    return r, g, b


def test_the_report_renders_offline_in_chromium(browser: Any, report_result: ExplainResult, tmp_path: Path) -> None:
    exp = report_result.explanation
    path = save_html(report_result, tmp_path / "report.html")
    url = path.resolve().as_uri()
    # Playwright launches chromium with a new, empty profile and gives each context a clean state of its own
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        page = context.new_page()
        requests: list[str] = []
        problems: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}"))
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
        page.goto(url, wait_until="load")

        # nothing but the file itself was requested, and nothing complained
        assert requests == [url]
        assert problems == []

        # every prompt token and the predicted token are on the page as it is rendered
        text = page.inner_text("body")
        for token in exp.input_tokens:
            assert token.strip() in text
        assert exp.predicted.text.strip() in text
        chips = page.eval_on_selector_all(
            ".attribution[data-kind=explained] .tok",
            "els => els.map(e => [e.textContent, e.title, e.dataset.value, getComputedStyle(e).backgroundColor, "
            "e.getBoundingClientRect().width, e.getBoundingClientRect().height])",
        )
        assert [c[0] for c in chips] == list(exp.input_tokens)
        # each token chip is really drawn (a hidden or collapsed chip has no box)
        assert all(width > 5 and height > 5 for *_, width, height in chips), chips
        values = exp.attributions[0].per_token
        strongest = int(np.argmax(np.abs(values)))
        for i, (_, title, value, background, _, _) in enumerate(chips):
            assert title == f"{exp.input_tokens[i]!r} (position {i}): {float(values[i]):+.4f}"
            assert float(value) == float(values[i])
            r, _, b = _rgb(background)
            if values[i] > 0.05 * abs(values[strongest]):
                assert r > b, (i, background)
            elif values[i] < -0.05 * abs(values[strongest]):
                assert b > r, (i, background)
        # the largest |value| gets the scale's end colour: ColorBrewer RdBu's strong red or strong blue
        assert _rgb(chips[strongest][3]) == ((202, 0, 32) if values[strongest] > 0 else (5, 113, 176))

        # the charts and the heat map are laid out at a real size
        sizes = page.eval_on_selector_all(
            "svg.chart, table.heatmap",
            "els => els.map(e => [e.dataset.chart || e.className.baseVal || e.className, "
            "e.getBoundingClientRect().width, e.getBoundingClientRect().height])",
        )
        kinds = [kind for kind, _, _ in sizes]
        assert kinds.count("spectrum") == len(exp.spectra) == 1
        assert "layer-shares" in kinds and "emergence" in kinds and "heatmap" in kinds
        assert all(width > 150 and height > 80 for _, width, height in sizes), sizes
        # hovering a heat-map cell shows its exact value (the title is what the browser's tooltip shows)
        matrix = exp.layer_attributions
        assert matrix is not None
        cell = page.get_attribute('td[data-layer="29"][data-index="0"]', "title")
        assert cell == f"layer 29, {exp.input_tokens[0]!r}: {float(matrix.per_layer[29, 0]):+.4f}"

        # a full-page screenshot that is not blank: many colours, much of it not white
        shot = tmp_path / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        context.close()
    from PIL import Image

    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] == 1200 and pixels.shape[0] > 1500
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    assert (pixels.min(axis=2) < 200).mean() > 0.02
