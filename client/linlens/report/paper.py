"""The paper's figure types (arXiv 2505.24293), drawn from the report's blocks (``linlens.report.png``).

Only ``scripts/paper_figures.py`` uses them: the singular values of every J_i overlaid (``spectra_figure``), the top
singular vectors decoded (``singular_vectors_figure``) and the layer-by-layer formation (``layers_figure``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from linlens.contract.results import Explanation, TokenScore
from linlens.report.colors import ACCENT_RGB, ATTENTION_RGB, LINE_RGB, unit
from linlens.report.content import emergence, stable_rank_text, token_label
from linlens.report.png import (
    LEFT_IN,
    MONO,
    RIGHT_IN,
    WIDTH_IN,
    Block,
    Page,
    compose,
    drawing,
    emergence_block,
    heatmap_block,
    text_block,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def spectra_figure(exp: Explanation, title: str) -> Figure:
    """The paper's spectrum figure: the singular values of every explained position's J_i, log scale, overlaid."""
    if not exp.spectra:
        raise ValueError("this explanation has no spectra (explain with top_k > 0)")
    height = 4.6

    def draw(page: Page, top: float) -> None:
        import matplotlib

        ax = page.axes(top + 0.45, height - 1.05, LEFT_IN, 7.4)
        colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(exp.spectra)))
        for colour, spectrum in zip(colours, exp.spectra, strict=True):
            values = np.asarray(spectrum.singular_values, dtype=np.float64)
            keep = np.isfinite(values) & (values > 0)
            ax.semilogy(
                np.arange(1, len(values) + 1)[keep],
                values[keep],
                color=colour,
                linewidth=1.2,
                label=(
                    f"{spectrum.position} {token_label(spectrum.token_text)}: stable rank {stable_rank_text(spectrum)}"
                ),
            )
        ax.set_xlabel("index (1 = largest)", fontsize=9)
        ax.set_ylabel("singular value of J_i", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), prop={"family": MONO, "size": 7.5})
        ax.set_title(title, fontsize=10, parse_math=False)

    with drawing():
        return compose([Block(height, draw)])


def _token_bars(ax: Axes, scores: Sequence[TokenScore], title: str, colour: tuple[float, float, float]) -> None:
    y = np.arange(len(scores))
    ax.barh(y, [s.score for s in scores], color=colour)
    ax.set_yticks(y, labels=[token_label(s.text) for s in scores], family=MONO, fontsize=7.5, parse_math=False)
    ax.set_ylim(len(scores) - 0.5, -0.5)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=8.5, parse_math=False)
    ax.grid(True, axis="x", alpha=0.3)


def singular_vectors_figure(exp: Explanation, title: str, *, position: int | None = None) -> Figure:
    """The paper's decoded singular vectors: for each component of one position's J_i (the last by default), the
    tokens its left vector raises most (through the LM head) and the input embeddings nearest its right vector."""
    spectra = [s for s in exp.spectra if position is None or s.position == position]
    if not spectra:
        raise ValueError("no spectrum for that position (explain with top_k > 0)")
    spectrum = spectra[-1]
    rows = len(spectrum.components)
    per = 0.24 + 0.16 * max((len(c.left_tokens) for c in spectrum.components), default=1)
    height = 0.55 + rows * (per + 0.45)
    half = (WIDTH_IN - LEFT_IN - RIGHT_IN - 1.6) / 2

    def draw(page: Page, top: float) -> None:
        page.canvas(top, 0.5).text(RIGHT_IN, 0.1, title, fontsize=10.5, weight="bold", va="top", parse_math=False)
        for row, component in enumerate(spectrum.components):
            y = top + 0.55 + row * (per + 0.45) + 0.25
            _token_bars(
                page.axes(y, per, LEFT_IN + 0.6, half - 0.6),
                component.left_tokens,
                f"#{component.rank} σ = {component.value:.3g}: left, output side (logit)",
                unit(ACCENT_RGB),
            )
            _token_bars(
                page.axes(y, per, LEFT_IN + half + 1.6, half - 0.6),
                component.right_tokens,
                f"#{component.rank}: right, input side (cosine to embeddings)",
                unit(ATTENTION_RGB),
            )

    with drawing():
        return compose([Block(height, draw)])


def layers_figure(exp: Explanation, title: str) -> Figure:
    """The paper's layer figures: the heat map with the attention / MLP contributions, the emergence chart, and the
    stable rank and rank-1 share of each analysed layer's up-to-layer map."""
    if exp.layer_attributions is None:
        raise ValueError("this explanation has no layer analysis (explain with layers)")
    blocks = [text_block([(title, 11, "bold")]), heatmap_block(exp.layer_attributions)]
    series = emergence(exp.layer_attributions, exp.layers)
    if series is not None:
        blocks.append(emergence_block(series))
    mapped = [(r.layer, r.up_to_layer) for r in sorted(exp.layers, key=lambda r: r.layer) if r.up_to_layer]
    if mapped:
        height = 2.6

        def draw(page: Page, top: float) -> None:
            ax = page.axes(top + 0.35, height - 0.9, LEFT_IN, WIDTH_IN - LEFT_IN - 0.9)
            from matplotlib.ticker import MaxNLocator

            layers = [layer for layer, _ in mapped]
            ax.plot(layers, [m.stable_rank for _, m in mapped], "-o", markersize=3, color=unit(LINE_RGB))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("stable rank", fontsize=8)
            ax.set_xlabel("layer", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            share = ax.twinx()
            shares = [m.captured_share[0] if m.captured_share else np.nan for _, m in mapped]
            share.plot(layers, shares, "-s", markersize=3, color=unit(ACCENT_RGB))
            share.set_ylabel("rank-1 share", fontsize=8, color=unit(ACCENT_RGB))
            share.tick_params(labelsize=7, colors=unit(ACCENT_RGB))
            ax.set_title(
                "up-to-layer map of the input embeddings: stable rank (black) and share kept at rank 1 (red)",
                fontsize=8.5,
            )

        blocks.append(Block(height, draw))
    with drawing():
        return compose(blocks)
