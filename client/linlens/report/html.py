"""The HTML report: one self-contained document (inline CSS and SVG, no script, nothing fetched) that works offline.

``document(result)`` is the whole file; ``fragment(result)`` the same report as one ``<div>`` with its style scoped
to it, for Jupyter (a result's display) and for pages that embed several reports. Hover values are plain ``title``
attributes (SVG ``<title>`` children in charts); every shaded token, heat-map cell and chart mark also carries its
number at full precision in ``data-value``, so a script (or a test) can check the page against the result.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from linlens.contract.results import GeneratedToken, LayerAttributions, LayerResult, PositionSpectrum, TokenScore
from linlens.report import svg
from linlens.report.colors import DIVERGING_STOPS, css, diverging_rgb, ink_for
from linlens.report.content import (
    AttributionRow,
    ExplanationView,
    Report,
    Reportable,
    build,
    certificate_text,
    explained_rank,
    spectrum_extent,
    stable_rank_text,
    token_label,
)

#: The class of the report's root element; every CSS rule is scoped under it.
ROOT_CLASS = "linlens-report"
#: The heat map's colour compression (a signed square root: see colors.signed_ratio).
HEATMAP_GAMMA = 0.5

_CSS = """
.R { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d1d1f;
  background: #fff; line-height: 1.4; max-width: 1100px; padding: 8px 4px; }
.R h1 { font-size: 1.35em; margin: 0.2em 0 0.5em; }
.R h2 { font-size: 1.15em; margin: 1.4em 0 0.4em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.R h3 { font-size: 1em; margin: 1.1em 0 0.3em; }
.R dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0.4em 0; }
.R dl.facts dt { color: #555; }
.R dl.facts dd { margin: 0; white-space: pre-wrap; word-break: break-word; }
.R .note { color: #555; font-size: 0.9em; margin: 0.2em 0 0.5em; }
.R .tokens { display: flex; flex-wrap: wrap; gap: 3px; margin: 0.3em 0 0.6em; }
.R .tok { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre;
  padding: 2px 4px; border-radius: 3px; border: 1px solid #e3e3e3; }
.R .attribution .head { font-size: 0.95em; }
.R .attribution .head code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre; }
.R .legend { display: flex; align-items: center; gap: 6px; font-size: 0.8em; color: #555; margin: 0.2em 0; }
.R .legend .bar { width: 180px; height: 10px; border: 1px solid #ccc; }
.R figure { margin: 0.4em 0 1em; }
.R figcaption { font-size: 0.9em; color: #444; }
.R svg.chart { width: 100%; max-width: 680px; height: auto; display: block; }
.R svg.chart text { font-family: inherit; }
.R svg.chart .tick { font-size: 10px; fill: #444; }
.R svg.chart .axis { font-size: 11px; fill: #222; }
.R table { border-collapse: collapse; font-size: 0.88em; }
.R table.vectors td, .R table.vectors th, .R table.layers td, .R table.layers th { border-bottom: 1px solid #eee;
  padding: 3px 6px; text-align: left; vertical-align: top; }
.R table.vectors .tok, .R table.layers .tok { background: #f4f4f4; font-size: 0.92em; }
.R .chips { display: flex; flex-wrap: wrap; gap: 2px; }
.R .scroll { overflow-x: auto; max-width: 100%; }
.R table.heatmap td { width: 2.6em; min-width: 2.6em; height: 1.05em; padding: 0; border: 1px solid #fff; }
.R table.heatmap th { font-weight: normal; font-size: 0.85em; padding: 0 4px; white-space: pre; }
.R table.heatmap thead th { vertical-align: bottom; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.R table.heatmap td.total { width: auto; padding: 0 6px; text-align: right; font-variant-numeric: tabular-nums;
  background: #fff; }
.R .hit { outline: 2px solid #ca0020; }
.R footer { margin-top: 2em; font-size: 0.8em; color: #777; }
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _shown(text: str) -> str:
    """A token's text as shown: itself (spaces kept), with line breaks and tabs as visible marks."""
    if text == "":
        return "\u2205"
    return text.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u21e5")


def style() -> str:
    """The report's CSS, every rule scoped under ``.linlens-report``."""
    return _CSS.replace(".R", f".{ROOT_CLASS}")


def _facts(facts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in facts)
    return f'<dl class="facts">{rows}</dl>'


def _legend(scale: float, what: str, *, gamma: float = 1.0) -> str:
    stops = ", ".join(css(rgb) for rgb in DIVERGING_STOPS)
    compress = "" if gamma == 1.0 else " (colour ∝ signed square root)"
    return (
        f'<div class="legend"><span>{-scale:+.3g}</span><span class="bar" '
        f'style="background: linear-gradient(to right, {stops})"></span><span>{scale:+.3g}</span>'
        f"<span>{_e(what)}{compress}</span></div>"
    )


def _shaded(text: str, value: float, scale: float, title: str, attributes: str, *, gamma: float = 1.0) -> str:
    background = diverging_rgb(value, scale, gamma=gamma)
    return (
        f'<span class="tok" {attributes} data-token="{_e(text)}" data-value="{value!r}" title="{_e(title)}" '
        f'style="background:{css(background)};color:{css(ink_for(background))}">{_e(_shown(text))}</span>'
    )


def _attribution(row: AttributionRow) -> str:
    values = np.asarray(row.values, dtype=np.float64)
    what = {"explained": "the explained token's logit", "target": "the logit of", "contrast": "the logit difference"}
    attribution = row.attribution
    head = (
        f'<div class="head">Attribution to {what[row.kind]} <code>{_e(attribution.label)}</code>: '
        f"Σ tokens {float(values.sum()):+.4f}"
        + (f" + constant {float(attribution.constant):+.4f}" if attribution.constant else "")
        + f" = {float(attribution.total):+.4f} (completeness error {float(attribution.completeness_error):.1e})</div>"
    )
    spans = "".join(
        _shaded(
            token,
            value,
            row.scale,
            f"{token_label(token)} (position {index}): {value:+.4f}",
            f'data-index="{index}"',
        )
        for index, (token, value) in enumerate(zip(row.tokens, row.values, strict=True))
    )
    return (
        f'<div class="attribution" data-kind="{_e(row.kind)}" data-label="{_e(attribution.label)}">{head}'
        f'<div class="tokens">{spans}</div>{_legend(row.scale, "logit contribution per token")}</div>'
    )


def _chips(scores: Sequence[TokenScore], what: str, highlight: int | None = None) -> str:
    return (
        '<div class="chips">'
        + "".join(
            f'<span class="tok{" hit" if s.token_id == highlight else ""}" data-token-id="{s.token_id}" '
            f'data-value="{float(s.score)!r}" '
            f'title="{_e(f"{token_label(s.text)} (id {s.token_id}): {what} {s.score:.4f}")}">'
            f"{_e(_shown(s.text))}</span>"
            for s in scores
        )
        + "</div>"
    )


def _spectrum(spectrum: PositionSpectrum) -> str:
    shares = ", ".join(f"{s:.3f}" for s in spectrum.captured_share)
    caption = (
        f"J_{spectrum.position} of {token_label(spectrum.token_text)} (position {spectrum.position}), "
        f"{spectrum_extent(spectrum)}: stable rank {stable_rank_text(spectrum)}; share of its term J_i x_i kept at "
        f"rank 1..{len(spectrum.captured_share)}: {shares}; ‖J_i x_i‖ = {spectrum.term_norm:.3g}"
    )
    chart = svg.spectrum_chart(spectrum.singular_values, len(spectrum.components), caption)
    rows = "".join(
        f"<tr><td>#{c.rank}</td><td>{c.value:.4g}</td><td>{_chips(c.left_tokens, 'logit')}</td>"
        f"<td>{_chips(c.right_tokens, 'cosine')}</td><td>{_e(certificate_text(c))}</td></tr>"
        for c in spectrum.components
    )
    table = (
        '<table class="vectors"><thead><tr><th>rank</th><th>σ</th><th>left: output side (through the LM head)</th>'
        f"<th>right: input side (nearest embeddings)</th><th>certificate</th></tr></thead><tbody>{rows}</tbody></table>"
        if spectrum.components
        else ""
    )
    return (
        f'<div class="spectrum" data-position="{spectrum.position}"><figure>{chart}'
        f"<figcaption>{_e(caption)}</figcaption></figure>{table}</div>"
    )


def _heatmap(attributions: LayerAttributions) -> str:
    matrix = np.asarray(attributions.per_layer, dtype=np.float64)
    direct = np.asarray(attributions.direct, dtype=np.float64)
    finite = np.abs(np.concatenate([matrix.ravel(), direct.ravel()]))
    finite = finite[np.isfinite(finite)]
    scale = float(finite.max()) if finite.size else 0.0
    tokens = attributions.input_tokens
    head = "".join(f'<th title="{_e(f"position {i}")}">{_e(_shown(t))}</th>' for i, t in enumerate(tokens))

    def cells(values: np.ndarray, layer: str) -> str:
        return "".join(
            f'<td data-layer="{layer}" data-index="{i}" data-value="{float(v)!r}" '
            f'title="{_e(f"{layer_name(layer)}, {token_label(tokens[i])}: {float(v):+.4f}")}" '
            f'style="background:{css(diverging_rgb(float(v), scale, gamma=HEATMAP_GAMMA))}"></td>'
            for i, v in enumerate(values)
        )

    def layer_name(layer: str) -> str:
        return "direct path" if layer == "direct" else f"layer {layer}"

    rows = "".join(
        f"<tr><th>{layer}</th>{cells(matrix[layer], str(layer))}"
        f'<td class="total">{float(matrix[layer].sum()):+.3f}</td></tr>'
        for layer in range(matrix.shape[0])
    )
    rows += f'<tr><th>dir</th>{cells(direct, "direct")}<td class="total">{float(direct.sum()):+.3f}</td></tr>'
    return (
        f'<div class="scroll"><table class="heatmap"><thead><tr><th>layer</th>{head}<th>total</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
        + _legend(scale, "contribution to the logit through each layer", gamma=HEATMAP_GAMMA)
    )


def _layer_table(layers: Sequence[LayerResult], token_id: int) -> str:
    rows = []
    with_alone = any(r.layer_alone is not None for r in layers)
    for result in sorted(layers, key=lambda r: r.layer):
        up = result.up_to_layer
        if up is not None and up.components:
            rank = explained_rank(up, token_id)
            decoded = (
                f"<td>{up.stable_rank:.2f}</td><td>{up.captured_share[0]:.3f}</td>"
                f"<td>{'' if rank is None else f'#{rank}'}</td>"
                f"<td>{_chips(up.components[0].left_tokens, 'logit', highlight=token_id)}</td>"
            )
        elif up is not None:
            decoded = f"<td>{up.stable_rank:.2f}</td><td>-</td><td></td><td>(layer top_k 0)</td>"
        else:
            decoded = "<td>-</td><td>-</td><td></td><td>(up-to-layer maps not computed)</td>"
        alone = result.layer_alone
        alone_cell = (
            f"<td>{_chips(alone.components[0].left_tokens, 'logit')}</td>"
            if alone is not None and alone.components
            else "<td></td>"
            if with_alone
            else ""
        )
        rows.append(
            f'<tr data-layer="{result.layer}"><td>{result.layer}</td><td>{result.attention.logit:+.3f}</td>'
            f"<td>{result.mlp.logit:+.3f}</td>{decoded}{alone_cell}</tr>"
        )
    return (
        '<div class="scroll"><table class="layers"><thead><tr><th>layer</th><th>attention → logit</th>'
        "<th>MLP → logit</th><th>stable rank (up to layer)</th><th>rank-1 share</th><th>explained token</th>"
        "<th>1st singular vector, up to this layer (decoded logit-lens style)</th>"
        + ("<th>1st singular vector, layer alone</th>" if with_alone else "")
        + "</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _layers(view: ExplanationView) -> str:
    attributions = view.layer_attributions
    if attributions is None:
        return ""
    explained = token_label(attributions.explained.text)
    parts = [
        "<h3>Layer by layer</h3>",
        f'<p class="note">Entry [l, i]: the exact contribution of input token i, through layer l\'s attention and '
        f"MLP, to the logit of {_e(explained)} ({attributions.logit:.4f}); with the direct path it sums to the logit "
        f"(completeness error {attributions.completeness_error:.1e}, decomposition error of y "
        f"{attributions.decomposition_error:.1e}).</p>",
        f'<div class="layer-heatmap">{_heatmap(attributions)}</div>',
    ]
    shares_caption = f"Attention and MLP contribution of each layer to the logit of {explained}"
    chart = svg.layer_shares_chart(
        np.asarray(attributions.attention_logits),
        np.asarray(attributions.mlp_logits),
        attributions.logit,
        shares_caption,
    )
    parts.append(f"<figure>{chart}<figcaption>{_e(shares_caption)}</figcaption></figure>")
    if view.emergence is not None:
        em_caption = (
            f"Emergence of {explained}: the share of its logit the residual stream holds after each layer (line, "
            "left); its rank among the decoded tokens of the first singular vector of each analysed layer's "
            "up-to-layer map (red, right)"
        )
        parts.append(
            f"<figure>{svg.emergence_chart(view.emergence, em_caption)}<figcaption>{_e(em_caption)}</figcaption>"
            "</figure>"
        )
    if view.layers:
        parts.append(_layer_table(view.layers, attributions.explained.token_id))
    return f'<div class="layers-panel">{"".join(parts)}</div>'


def _section(view: ExplanationView) -> str:
    exp = view.explanation
    parts = [f'<section class="explanation" data-step="{exp.step}">', f"<h2>{_e(view.heading)}</h2>"]
    parts.append(_facts(view.facts))
    parts.append("<h3>Input tokens, shaded by attribution</h3>")
    parts.append(
        '<p class="note">Red raises the logit (or the logit difference), blue lowers it; each row is scaled to its '
        "largest |value|. Hover a token for its exact contribution.</p>"
    )
    parts.extend(_attribution(row) for row in view.attributions)
    if exp.spectra:
        parts.append("<h3>Singular values and decoded singular vectors</h3>")
        parts.extend(_spectrum(spectrum) for spectrum in exp.spectra)
    parts.append(_layers(view))
    parts.append("</section>")
    return "".join(parts)


def _generated_title(token: GeneratedToken) -> str:
    return f"step {token.index}, id {token.token_id}: log p {token.logprob:.4f}, p = {math.exp(token.logprob):.4f}"


def fragment(result: Reportable | Report, *, with_style: bool = True) -> str:
    """The report as one ``<div class="linlens-report">``, by default with its scoped ``<style>`` inside (for
    notebooks, where the fragment is all there is)."""
    report = result if isinstance(result, Report) else build(result)
    parts = [
        f'<div class="{ROOT_CLASS}">',
        f"<style>{style()}</style>" if with_style else "",
        f"<h1>{_e(report.title)}</h1>",
    ]
    parts.append(_facts(report.facts))
    if report.continuation is not None:
        chips = "".join(
            f'<span class="tok generated" data-step="{t.index}" data-token-id="{t.token_id}" '
            f'data-value="{t.logprob!r}" title="{_e(_generated_title(t))}">{_e(_shown(t.text))}</span>'
            for t in report.generated
        )
        parts.append(
            '<h3>Generated text</h3><p class="note">Each generated token with its probability on hover.</p>'
            f'<div class="tokens">{chips}</div>'
        )
    if not report.sections:
        parts.append('<p class="note">No explained steps (generate with explain to see them).</p>')
    parts.extend(_section(view) for view in report.sections)
    parts.append(
        "<footer>linlens report: exact linear explanations (detached Jacobian, arXiv 2505.24293). This file is "
        "self-contained and works offline.</footer></div>"
    )
    return "".join(parts)


def document(result: Reportable | Report) -> str:
    """The report as a whole HTML5 document, one self-contained file."""
    report = result if isinstance(result, Report) else build(result)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(report.title)}</title><style>{style()}</style></head>"
        f"<body>{fragment(report, with_style=False)}</body></html>\n"
    )
