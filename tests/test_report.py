"""HTML and PNG reports of real explanations (linlens.report), checked against the results they were drawn from.

The rich result (``report_result`` in conftest: spectra, an extra target, a contrast and a layer analysis) comes
from the real server; the lean ones (attributions only, a short generation) are cheap. Every number checked here is
recomputed from the result's own arrays, not read back from the report's code. The browser test is
tests/test_report_browser.py.
"""

from __future__ import annotations

import dataclasses
import html
import html.parser
import math
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPORT_LAYERS, REPORT_PROMPT

from linlens.client import Client, ExplainMethod, ExplainOptions, ExplainResult, Generation
from linlens.client.display import report_fragment, show_results_in_jupyter
from linlens.report import VIZ_INSTALL, MissingExtraError, fragment, save_html, save_png, to_html
from linlens.report.content import build

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
#: The PNG reports' width: 12 inches at 100 dpi.
PNG_WIDTH = 1200


class Elements(html.parser.HTMLParser):
    """Every start tag of a document with its attributes, and the document's text."""

    def __init__(self, document: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, **wanted: str) -> list[dict[str, str]]:
        found = []
        for _, attrs in self.tags:
            if all(attrs.get(key.replace("_", "-")) == value for key, value in wanted.items()):
                found.append(attrs)
        return found


@pytest.fixture(scope="module")
def lean(target: str) -> tuple[ExplainResult, Generation]:
    """An explanation with attributions only (no spectra, no layers) and a two-token generation, both explained."""
    with Client(target, timeout=300) as client:
        plain = client.explain(REPORT_PROMPT, options=ExplainOptions(top_k=0))
        generation = client.generate(REPORT_PROMPT, max_new_tokens=2, explain=ExplainOptions(steps="all", top_k=0))
    return plain, generation


@pytest.fixture(scope="module")
def default_result(target: str) -> ExplainResult:
    """The default request (the top 3 at the last position, method AUTO): matrix-free on SmolLM2. The rich result
    is not: with its layer analysis reaching the last layer, AUTO takes J_n from the layer chain (FULL)."""
    with Client(target, timeout=300) as client:
        return client.explain(REPORT_PROMPT)


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _colours(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    return {(int(r), int(g), int(b)) for r, g, b in np.unique(pixels.reshape(-1, 3), axis=0)}


def test_the_emergence_series_follow_from_the_layer_analysis(report_result: ExplainResult) -> None:
    exp = report_result.explanation
    matrix = exp.layer_attributions
    assert matrix is not None
    view = build(report_result).sections[0]
    series = view.emergence
    assert series is not None
    # cumulative share, summed here layer by layer in plain Python
    running = sum(float(v) for v in matrix.direct)
    expected = []
    for attention, mlp in zip(matrix.attention_logits, matrix.mlp_logits, strict=True):
        running += float(attention) + float(mlp)
        expected.append(running / matrix.logit)
    assert series.cumulative_share == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert len(series.layers) == 30
    # after the last layer the residual stream holds the whole logit (the matrix is complete)
    assert series.cumulative_share[-1] == pytest.approx(1.0, abs=1e-4)
    # ranks: the explained token's place in each analysed layer's first decoded list, by text here
    assert series.rank_layers == tuple(sorted(REPORT_LAYERS))
    for layer, rank in zip(series.rank_layers, series.ranks, strict=True):
        (result,) = [r for r in exp.layers if r.layer == layer]
        assert result.up_to_layer is not None
        texts = [t.text for t in result.up_to_layer.components[0].left_tokens]
        assert rank == (texts.index(exp.explained.text) + 1 if exp.explained.text in texts else None)
    assert dict(zip(series.rank_layers, series.ranks, strict=True)) == {10: None, 29: 1}


def test_the_html_report_is_self_contained_and_carries_the_results_numbers(
    report_result: ExplainResult, tmp_path: Path
) -> None:
    exp = report_result.explanation
    path = save_html(report_result, tmp_path / "report.html")
    document = path.read_text(encoding="utf-8")
    assert document == to_html(report_result)
    assert document.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in document
    # offline: nothing to fetch, no script; the only URL is the SVG namespace, which is a name, not a fetch
    lowered = document.lower()
    for needle in ("<script", "<link", "<img", "<iframe", "src=", "href=", "url(", "@import", "@font-face"):
        assert needle not in lowered, needle
    assert set(re.findall(r"https?://[^\"' )]+", document)) == {"http://www.w3.org/2000/svg"}

    page = Elements(document)
    text = "".join(page.text)
    for token in exp.input_tokens:
        assert token in text
    assert exp.predicted.text in text and report_result.model in text and REPORT_PROMPT in text

    # one shaded row per attribution, each token's value exact in data-value and to 4 decimals in its title
    rows = page.having(**{"class": "attribution"})
    assert [r["data-kind"] for r in rows] == ["explained", "target", "contrast"]
    assert [r["data-label"] for r in rows] == [a.label for a in exp.attributions]
    spans = [attrs for tag, attrs in page.tags if tag == "span" and "data-index" in attrs]
    assert len(spans) == len(exp.attributions) * len(exp.input_tokens)
    for row, attribution in enumerate(exp.attributions):
        for i, value in enumerate(attribution.per_token):
            span = spans[row * len(exp.input_tokens) + i]
            assert span["data-token"] == exp.input_tokens[i]
            assert float(span["data-value"]) == float(value)
            assert span["title"] == f"{exp.input_tokens[i]!r} (position {i}): {float(value):+.4f}"

    # the heat map: one cell per layer and token, plus the direct path, each with its exact value
    matrix = exp.layer_attributions
    assert matrix is not None
    cells = [attrs for tag, attrs in page.tags if tag == "td" and "data-layer" in attrs]
    assert len(cells) == (matrix.per_layer.shape[0] + 1) * len(exp.input_tokens)
    for cell in cells:
        i = int(cell["data-index"])
        value = matrix.direct[i] if cell["data-layer"] == "direct" else matrix.per_layer[int(cell["data-layer"]), i]
        assert float(cell["data-value"]) == float(value)

    # the charts: the spectrum marks the top-k singular values, the bars are the per-layer logits, the ranks
    (spectrum,) = exp.spectra
    marks = page.having(data_kind="singular-value")
    assert [float(m["data-value"]) for m in marks] == [float(v) for v in spectrum.singular_values[:3]]
    assert [c.value for c in spectrum.components] == pytest.approx([float(m["data-value"]) for m in marks])
    bars = page.having(data_kind="attention") + page.having(data_kind="mlp")
    assert len(bars) == 2 * 30
    for bar in bars:
        source = matrix.attention_logits if bar["data-kind"] == "attention" else matrix.mlp_logits
        assert float(bar["data-value"]) == float(source[int(bar["data-layer"])])
    ranks = {m["data-layer"]: m["data-value"] for m in page.having(data_kind="rank")}
    assert ranks == {"10": "", "29": "1"}
    # the decoded singular vectors appear with their scores
    for component in spectrum.components:
        for scored in component.left_tokens:
            assert any(
                float(a["data-value"]) == float(scored.score) for a in page.having(data_token_id=str(scored.token_id))
            )


def test_the_report_says_how_the_spectra_were_found(default_result: ExplainResult) -> None:
    """The default request runs matrix-free: the page names the method, shows each triplet's certificate and marks
    what is estimated or missing (the stable rank, the singular values past the top k)."""
    exp = default_result.explanation
    assert exp.method is ExplainMethod.MATRIX_FREE
    document = html.unescape(to_html(default_result))
    assert "spectra matrix-free" in document
    assert f"{exp.vjp_count} vector-Jacobian and {exp.jvp_count} Jacobian-vector products" in document
    spectrum = exp.spectra[-1]
    assert not spectrum.singular_values_complete and len(spectrum.singular_values) == 3
    assert "the top 3 singular values (matrix-free: the rest were not computed)" in document
    assert f"≈ {spectrum.stable_rank:.2f} ± {spectrum.stable_rank_error:.2f} (estimated)" in document
    for component in spectrum.components:
        assert 0 < component.residual_left < 1e-3 and 0 < component.residual_right < 1e-3
        assert f"residuals {component.residual_left:.1e} / {component.residual_right:.1e}" in document


def test_panels_without_their_data_are_absent(lean: tuple[ExplainResult, Generation], tmp_path: Path) -> None:
    plain, generation = lean
    assert not plain.explanation.spectra and plain.explanation.layer_attributions is None
    document = to_html(plain)
    page = Elements(document)
    assert not page.having(data_chart="spectrum") and not page.having(data_chart="emergence")
    assert not page.having(**{"class": "layers-panel"}) and 'class="heatmap"' not in document
    # every explanation reports its reconstruction (one JVP), attributions-only ones too
    reconstruction = plain.explanation.reconstruction
    assert reconstruction is not None
    assert f"relative error {reconstruction.relative_error_vs_model:.2e} vs the model" in document
    assert [r["data-kind"] for r in page.having(**{"class": "attribution"})] == ["explained"]
    # each attribution row's head states its sum over the tokens, then the attribution's own total and completeness
    # error (SmolLM2 has no bias terms: no constant)
    attribution = plain.explanation.attributions[0]
    assert attribution.constant == 0.0
    assert (
        f"Σ tokens {float(np.sum(attribution.per_token, dtype=np.float64)):+.4f} = {attribution.total:+.4f} "
        f"(completeness error {attribution.completeness_error:.1e})</div>"
    ) in document

    # a generation: its text, then one section per explained step, in order
    gen_page = Elements(to_html(generation))
    steps = [s["data-step"] for s in gen_page.having(**{"class": "explanation"})]
    assert steps == ["0", "1"] and len(generation.explanations) == 2
    assert generation.text in "".join(gen_page.text)
    generated = [attrs for tag, attrs in gen_page.tags if "generated" in attrs.get("class", "").split()]
    assert [int(g["data-token-id"]) for g in generated] == [t.token_id for t in generation.tokens]
    assert [float(g["data-value"]) for g in generated] == [t.logprob for t in generation.tokens]
    # Jupyter: a fragment with its style scoped to it
    shown = fragment(generation)
    assert report_fragment(generation) == shown  # what linlens.client registers with IPython, by type name
    assert show_results_in_jupyter() is False  # no IPython session here: nothing is registered
    assert shown.startswith('<div class="linlens-report"><style>') and "<html" not in shown
    style = shown.split("<style>", 1)[1].split("</style>", 1)[0]
    selectors = [rule.split("{")[0].strip() for rule in style.split("}") if "{" in rule]
    assert selectors and all(s.strip().startswith(".linlens-report") for part in selectors for s in part.split(","))


def test_png_reports_have_the_expected_size_and_draw_the_attributions(
    report_result: ExplainResult, lean: tuple[ExplainResult, Generation], tmp_path: Path
) -> None:
    plain, generation = lean
    full = _png(save_png(report_result, tmp_path / "full.png"))
    small = _png(save_png(plain, tmp_path / "plain.png"))
    for path, pixels in ((tmp_path / "full.png", full), (tmp_path / "plain.png", small)):
        assert pixels.shape[1] == PNG_WIDTH
        assert pixels.std() > 10 and len(_colours(pixels)) > 50  # not blank
        assert path.stat().st_size < 300_000
    # the layer panels and the spectrum make the full report taller
    assert full.shape[0] > small.shape[0] + 800
    # every token chip of the lean report is filled with its value's colour on the diverging scale, red for the
    # largest value and ever lighter towards 0 (computed here from the ColorBrewer RdBu stops)
    colours = _colours(small)
    values = plain.explanation.attributions[0].per_token
    scale = float(np.abs(values).max())
    stops = np.array([(5, 113, 176), (146, 197, 222), (247, 247, 247), (244, 165, 130), (202, 0, 32)], float)
    for value in values:
        position = (float(value) / scale + 1) / 2 * 4
        low = min(int(position), 3)
        rgb = tuple(round(c) for c in stops[low] + (stops[low + 1] - stops[low]) * (position - low))
        assert rgb in colours, (value, rgb)
    # a generation's PNG: all explained steps, or one
    both = _png(save_png(generation, tmp_path / "generation.png"))
    one = _png(save_png(generation, tmp_path / "step1.png", step=1))
    assert both.shape[1] == one.shape[1] == PNG_WIDTH and both.shape[0] > one.shape[0]
    with pytest.raises(ValueError, match=r"no explained step 5 in this result \(explained steps: \[0, 1\]\)"):
        save_png(generation, tmp_path / "nope.png", step=5)


def test_token_text_is_escaped_in_html_and_drawn_plainly_in_png(
    lean: tuple[ExplainResult, Generation], tmp_path: Path
) -> None:
    plain, _ = lean
    hostile = ("<script>alert(1)</script>", "$a_$", "a\nb", "", ' "q" & ')
    tokens = hostile + plain.explanation.input_tokens[len(hostile) :]
    exp = dataclasses.replace(plain.explanation, input_tokens=tokens)
    result = dataclasses.replace(plain, explanation=exp, prompt_text="<b>bold?</b>")
    document = to_html(result)
    assert "<script" not in document and "<b>" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document and "&lt;b&gt;bold?&lt;/b&gt;" in document
    spans = [attrs for tag, attrs in Elements(document).tags if tag == "span" and "data-index" in attrs]
    assert [s["data-token"] for s in spans[: len(hostile)]] == list(hostile)
    pixels = _png(save_png(result, tmp_path / "hostile.png"))  # as mathtext, "$a_$" would not parse
    assert pixels.shape[1] == PNG_WIDTH


def test_a_missing_viz_extra_is_named_and_html_still_works(
    lean: tuple[ExplainResult, Generation], tmp_path: Path
) -> None:
    """In a process where matplotlib cannot be imported: the HTML works, the PNG (SDK and CLI) names the extra."""
    plain, _ = lean
    saved = tmp_path / "result.pkl"
    saved.write_bytes(pickle.dumps(plain))
    code = f"""
import pickle, sys
sys.modules["matplotlib"] = None  # as if it were not installed: importing it raises ImportError
from linlens.report import MissingExtraError, save_html, save_png
result = pickle.loads(open({str(saved)!r}, "rb").read())
save_html(result, {str(tmp_path / "ok.html")!r})
try:
    save_png(result, {str(tmp_path / "no.png")!r})
except MissingExtraError as error:
    print("SDK:", error)
from linlens.cli.main import main
status = main(["explain", "x", "--png", {str(tmp_path / "cli.png")!r}, "--server", "127.0.0.1:1"])
print("CLI status:", status)
"""
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ok.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not (tmp_path / "no.png").exists() and not (tmp_path / "cli.png").exists()
    assert f"SDK: PNG reports need matplotlib, which linlens installs with its viz extra: {VIZ_INSTALL}" in run.stdout
    assert "CLI status: 1" in run.stdout
    # the CLI says so before it tries to reach the (absent) server
    assert "linlens: --png: PNG reports need matplotlib" in run.stderr and VIZ_INSTALL in run.stderr
    assert "no linlens server answers" not in run.stderr
    assert time.monotonic() - started < 60
    assert issubclass(MissingExtraError, ImportError)


def test_pictures_of_nan_values_do_not_break(lean: tuple[ExplainResult, Generation], tmp_path: Path) -> None:
    """A degenerate result (a NaN attribution, all-zero values) still renders; the NaN is shown as such."""
    plain, _ = lean
    first = plain.explanation.attributions[0]
    values = np.zeros_like(first.per_token)
    values[1] = math.nan
    exp = dataclasses.replace(plain.explanation, attributions=(dataclasses.replace(first, per_token=values),))
    document = to_html(dataclasses.replace(plain, explanation=exp))
    assert ": +nan" in document and 'data-value="nan"' in document
    assert _png(save_png(dataclasses.replace(plain, explanation=exp), tmp_path / "nan.png")).shape[1] == PNG_WIDTH
